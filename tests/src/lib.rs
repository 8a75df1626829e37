//! Ferry's test kit: paths of the guests built from this checkout, the
//! `ferry` binary, and helpers to make and copy shards.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ferry::plugin::{DeltaEntry, DeltaPlan, SnapshotPlan};

/// Paths of the guest plugins, built by this crate's build script.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
}

pub use segment_log_format as segment_log;

pub mod appender;
pub mod engines;
pub mod fake_source;
pub mod faults;
pub mod node;
pub mod proxy;
pub mod sqlite_writer;

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
    Ok(ferry::conformance::shard::materialize(plan, src, dst)?)
}

/// Applies what a delta plan names from the shard `src` to the replica `dst`,
/// as the receiving host would: ranges written in place (the file created or
/// extended), block-diff files made equal block by block and cut to length,
/// inline entries replacing the file, removals.
pub fn materialize_delta(plan: &DeltaPlan, src: &Path, dst: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    for entry in &plan.entries {
        let target = entry.path().join_to(dst);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let source = entry.path().join_to(src);
        match entry {
            DeltaEntry::Range { path, offset, length } => {
                let input = fs::File::open(&source).with_context(|| source.display().to_string())?;
                let mut bytes = vec![0u8; *length as usize];
                input.read_exact_at(&mut bytes, *offset).with_context(|| format!("{path}: range {offset}+{length}"))?;
                let output = fs::OpenOptions::new().create(true).write(true).truncate(false).open(&target)?;
                output.write_all_at(&bytes, *offset)?;
                output.sync_all()?;
            }
            DeltaEntry::BlockDiff { path, block_size, length } => {
                let input = fs::read(&source).with_context(|| source.display().to_string())?;
                if (input.len() as u64) < *length {
                    bail!("{path}: {} bytes, shorter than {length}", input.len());
                }
                let output =
                    fs::OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&target)?;
                let mut have = Vec::new();
                (&output).read_to_end(&mut have)?;
                for (i, block) in input[..*length as usize].chunks(*block_size as usize).enumerate() {
                    let at = i * *block_size as usize;
                    if have.get(at..at + block.len()) != Some(block) {
                        output.write_all_at(block, at as u64)?;
                    }
                }
                output.set_len(*length)?;
                output.sync_all()?;
            }
            DeltaEntry::Inline { contents, .. } => fs::write(&target, contents)?,
            DeltaEntry::Remove { .. } => match fs::remove_file(&target) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            },
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

/// Every file below `dir` with its bytes (a shard compared before and after).
pub fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tree(dir).into_iter().filter(|p| !p.ends_with('/')).map(|p| (p.clone(), fs::read(dir.join(&p)).unwrap())).collect()
}

/// The conformance kit, `ferry plugin test --json`, as a vendor runs it.
pub mod kit {
    use std::path::Path;
    use std::process::Command;

    use serde_json::Value;

    /// Runs the kit; whether it passed, its JSON report, and each check as
    /// (check, outcome, detail).
    pub fn run(plugin: &Path, shard: &Path, mutate: Option<&str>, cache: &Path) -> (bool, Value, Vec<Check>) {
        let mut cmd = Command::new(crate::ferry_bin());
        cmd.args(["plugin", "test"])
            .arg(plugin)
            .args(["--json", "--shard-dir"])
            .arg(shard)
            .arg("--cache-dir")
            .arg(cache);
        if let Some(mutate) = mutate {
            cmd.args(["--mutate", mutate]);
        }
        let out = cmd.output().expect("running ferry plugin test");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        let checks = outcomes(&report);
        (out.status.success(), report, checks)
    }

    /// A compiled-plugin cache under the workspace's `target/`, shared by
    /// the kit and the nodes of one plugin's tests, so that a large
    /// component compiles once per build, not once per node.
    pub fn shared_cache(name: &str) -> std::path::PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub type Check = (String, String, String);

    pub fn outcomes(report: &Value) -> Vec<Check> {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (c["check"].as_str().unwrap().into(), c["outcome"].as_str().unwrap().into(), c["detail"].to_string())
            })
            .collect()
    }
}
