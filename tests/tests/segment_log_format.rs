//! The segment-log on-disk format (guests/segment-log-format), tested from the
//! host side: the guest workspace builds for wasm32 only, so its format tests
//! run here.

use std::fs;

use ferry_tests::segment_log::*;

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("slf-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn generated_shard_checks() {
    let dir = tempdir("gen");
    let generator = Generator { segment_size: 8192, ..Generator::default() };
    let control = generator.create(&dir, 50_000).unwrap();
    let summary = check_shard(&dir).unwrap();
    assert_eq!(summary.control, control);
    assert!(summary.records > 10);
    assert_eq!(summary.segments, control.flush.div_ceil(8192));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flipped_byte_is_found() {
    let dir = tempdir("flip");
    let generator = Generator { segment_size: 8192, ..Generator::default() };
    generator.create(&dir, 20_000).unwrap();
    let path = dir.join(segment_name(1));
    let mut bytes = fs::read(&path).unwrap();
    bytes[100] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let err = check_shard(&dir).unwrap_err().to_string();
    assert!(err.contains("segment-0000000000000001"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn control_roundtrip_and_corruption() {
    let control = Control {
        state: ShardState::Snapshot,
        term: 7,
        flush: 9000,
        commit: 8000,
        segment_size: 4096,
        start: 4096,
        live: Default::default(),
    };
    assert_eq!(Control::decode(&control.encode()).unwrap(), control);
    let mut bytes = control.encode();
    bytes[20] ^= 1;
    assert!(Control::decode(&bytes).unwrap_err().to_string().contains("checksum"));
}

#[test]
fn every_corruption_position_is_found() {
    // Flip each of many bytes in turn; the checker must catch every one that
    // lies in a record (headers and payloads), whatever the read chunking.
    let dir = std::env::temp_dir().join(format!("slf-every-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let control = Generator { segment_size: 8192, term: 1, seed: 9 }.create(&dir, 6000).unwrap();
    let path = dir.join(segment_name(0));
    let original = fs::read(&path).unwrap();
    let used = control.used_bytes(0) as usize;
    for at in (0..used).step_by(7) {
        let mut bytes = original.clone();
        bytes[at] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        assert!(check_shard(&dir).is_err(), "flip at {at} of {used} went unnoticed");
    }
    fs::write(&path, &original).unwrap();
    assert!(check_shard(&dir).is_ok());
    fs::remove_dir_all(&dir).unwrap();
}
