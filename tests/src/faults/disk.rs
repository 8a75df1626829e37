//! A node's data directory on its own disk: an ext4 file system on a loop
//! device, so that the disk can be made slow or full without touching the
//! machine's.
//!
//! - Slow: a cgroup-v1 `blkio.throttle.{read,write}_bps_device` limit on
//!   the loop device for the node's process (this machine has neither
//!   device-mapper's `delay` target nor cgroup v2's `io.max`). Writes the
//!   node syncs, and reads that miss the page cache, go at that rate.
//! - Failing: the file system is small, so writes past it fail with ENOSPC
//!   from the kernel, as on a full disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static DISKS: AtomicU32 = AtomicU32::new(0);

const BLKIO: &str = "/sys/fs/cgroup/blkio";

pub struct Disk {
    image: PathBuf,
    device: String,
    /// Where the file system is mounted.
    pub mount: PathBuf,
    cgroup: PathBuf,
    /// `major:minor` of the loop device.
    numbers: String,
    _dir: tempfile::TempDir,
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Why this machine cannot give a node its own throttled disk, if not.
pub fn unsupported() -> Option<String> {
    if !Path::new(BLKIO).join("blkio.throttle.write_bps_device").exists() {
        return Some(format!("no cgroup-v1 blkio throttling at {BLKIO}"));
    }
    if Command::new("losetup").arg("-V").output().is_err() || Command::new("mkfs.ext4").arg("-V").output().is_err() {
        return Some("no losetup or mkfs.ext4 (tests/setup.sh installs them)".into());
    }
    None
}

impl Disk {
    /// A fresh file system of `mib` MiB, mounted, no limit yet.
    pub fn new(mib: u64) -> Disk {
        let dir = tempfile::Builder::new().prefix("ferry-disk-").tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-F", &device]);
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run("mount", &[&device, mount.to_str().unwrap()]);
        let numbers = run("lsblk", &["-dno", "MAJ:MIN", &device]);
        let k = DISKS.fetch_add(1, Ordering::Relaxed);
        let cgroup = Path::new(BLKIO).join(format!("ferry-disk-{}-{k}", std::process::id()));
        std::fs::create_dir_all(&cgroup).unwrap();
        Disk { image, device, mount, cgroup, numbers, _dir: dir }
    }

    /// Puts process `pid` (a node) under this disk's limits.
    pub fn adopt(&self, pid: u32) {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// Limits reads and writes to `bytes_per_sec` (0: no limit).
    pub fn throttle(&self, bytes_per_sec: u64) {
        for file in ["blkio.throttle.write_bps_device", "blkio.throttle.read_bps_device"] {
            std::fs::write(self.cgroup.join(file), format!("{} {bytes_per_sec}", self.numbers)).unwrap();
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
        // The cgroup can go once its processes have (the node is dropped
        // first; a straggler moves to the root).
        if let Ok(procs) = std::fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_file(&self.image);
    }
}
