//! Ferry's test kit: paths of the guests built from this checkout, the
//! `ferry` binary, and helpers to make and copy shards.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ferry::plugin::{PlanEntry, SnapshotPlan};

/// Paths of the guest plugins, built by this crate's build script.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

pub use segment_log_format as segment_log;

pub mod engines;
pub mod fake_source;
pub mod node;
pub mod proxy;

/// The `ferry` binary under test: this package's `ferry-e2e` bin, which
/// cargo builds before running this package's tests (same entry point as
/// the real `ferry`), so it is never stale.
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // A test: target/<profile>/deps/<test>; a bin: target/<profile>/<bin>.
    let dir = exe.parent().expect("exe dir");
    let candidates = [dir.join("ferry-e2e"), dir.parent().unwrap_or(dir).join("ferry-e2e")];
    let found = candidates.iter().find(|p| p.exists());
    found.cloned().unwrap_or_else(|| panic!("{} is missing: build with cargo", candidates[1].display()))
}

/// Copies what a snapshot plan names from the shard `src` into `dst`, as the
/// transfer pipeline would deliver it: inline entries as written, file
/// entries as the planned byte range.
pub fn materialize(plan: &SnapshotPlan, src: &Path, dst: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dst)?;
    for entry in &plan.entries {
        let target = entry.path().join_to(dst);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        match entry {
            PlanEntry::Inline { contents, .. } => fs::write(&target, contents)?,
            PlanEntry::File { path, offset, length } => {
                let source = path.join_to(src);
                let mut input = fs::File::open(&source).with_context(|| source.display().to_string())?;
                let size = input.metadata()?.len();
                let length = length.unwrap_or(size.saturating_sub(*offset));
                if offset + length > size {
                    bail!("{path}: range {offset}+{length} is past its {size} bytes");
                }
                input.seek(SeekFrom::Start(*offset))?;
                let mut output = fs::File::create(&target)?;
                std::io::copy(&mut input.take(length), &mut output)?;
                output.flush()?;
            }
        }
    }
    Ok(())
}

/// Every file below `dir`, relative, sorted: for asserting directory trees.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
