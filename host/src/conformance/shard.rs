//! The kit's view of a shard directory: copies, fingerprints, a snapshot
//! materialized as the pipeline would deliver it, and damage.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::plugin::{PlanEntry, SnapshotPlan};

/// Copies the tree `from` into `to` (created): directories and regular
/// files only; anything else is refused (a vendor's sample shard is data).
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            fs::copy(entry.path(), &target)?;
        } else {
            return Err(io::Error::other(format!("{} is not a regular file or directory", entry.path().display())));
        }
    }
    Ok(())
}

/// Every entry below `dir` with what it holds (a directory, or a file's
/// size and BLAKE3): equal fingerprints, byte-for-byte equal trees.
pub fn fingerprint(dir: &Path) -> io::Result<BTreeMap<String, String>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path.strip_prefix(base).expect("below base").to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(base, &path, out)?;
            } else if meta.is_file() {
                let mut hasher = blake3::Hasher::new();
                io::copy(&mut fs::File::open(&path)?, &mut hasher)?;
                out.insert(rel, format!("{} bytes, {}", meta.len(), hasher.finalize().to_hex()));
            } else {
                out.insert(rel, "other".into());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// What differs between two fingerprints, for a message.
pub fn difference(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = Vec::new();
    for (path, what) in before {
        match after.get(path) {
            None => out.push(format!("{path} removed")),
            Some(now) if now != what => out.push(format!("{path} changed")),
            _ => {}
        }
    }
    out.extend(after.keys().filter(|p| !before.contains_key(*p)).map(|p| format!("{p} created")));
    out.truncate(5);
    out.join(", ")
}

/// Writes what `plan` names from the shard `src` into `dst`, as the
/// transfer pipeline delivers it before `validate`: inline entries as
/// given, file entries as their planned byte range.
pub fn materialize(plan: &SnapshotPlan, src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for entry in &plan.entries {
        let target = entry.path().join_to(dst);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        match entry {
            PlanEntry::Inline { contents, .. } => fs::write(&target, contents)?,
            PlanEntry::File { path, offset, length } => {
                let mut input = fs::File::open(path.join_to(src))?;
                let size = input.metadata()?.len();
                let length = length.unwrap_or(size.saturating_sub(*offset));
                input.seek(SeekFrom::Start(*offset))?;
                let copied = io::copy(&mut input.take(length), &mut fs::File::create(&target)?)?;
                if copied != length {
                    return Err(io::Error::other(format!("{path}: {copied} of {length} planned bytes")));
                }
            }
        }
    }
    Ok(())
}

/// The largest regular file below `dir` (relative path, size).
pub fn largest_file(dir: &Path) -> io::Result<Option<(String, u64)>> {
    let mut best: Option<(String, u64)> = None;
    for (path, what) in fingerprint(dir)? {
        let Some(size) = what.split(' ').next().and_then(|n| n.parse::<u64>().ok()) else { continue };
        if best.as_ref().is_none_or(|(_, b)| size > *b) {
            best = Some((path, size));
        }
    }
    Ok(best)
}
