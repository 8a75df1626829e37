//! Writing tar: headers (GNU, with long names), padding and the end marker,
//! as `Bytes` for the HTTP body. File data is not copied here: the caller
//! sends its own chunks between [`header`] and [`padding`].

use bytes::Bytes;
use tokio_tar::{EntryType, Header};

use crate::relpath::RelPath;

pub const BLOCK: u64 = 512;

/// The blocks that start a regular-file entry of `size` bytes at `path`:
/// a GNU long-name entry first when the path does not fit in 100 bytes.
pub fn header(path: &RelPath, size: u64) -> Bytes {
    let name = path.as_str().as_bytes();
    let mut out = Vec::with_capacity(3 * BLOCK as usize);
    if name.len() > 100 {
        let mut long = base_header(EntryType::GNULongName, name.len() as u64 + 1);
        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        long.set_cksum();
        out.extend_from_slice(long.as_bytes());
        out.extend_from_slice(name);
        out.push(0);
        out.resize(out.len() + padding_len(name.len() as u64 + 1) as usize, 0);
    }
    let mut header = base_header(EntryType::Regular, size);
    let short = &name[..name.len().min(100)];
    header.as_old_mut().name[..short.len()].copy_from_slice(short);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    Bytes::from(out)
}

fn base_header(kind: EntryType, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

pub fn padding_len(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Zeros that pad an entry of `size` bytes to a whole block.
pub fn padding(size: u64) -> Option<Bytes> {
    match padding_len(size) {
        0 => None,
        n => Some(Bytes::from(vec![0u8; n as usize])),
    }
}

/// The end-of-archive marker: two zero blocks.
pub fn end() -> Bytes {
    Bytes::from(vec![0u8; 2 * BLOCK as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    async fn roundtrip(files: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        let mut archive = Vec::new();
        for (path, data) in files {
            archive.extend_from_slice(&header(&RelPath::new(path).unwrap(), data.len() as u64));
            archive.extend_from_slice(data);
            if let Some(pad) = padding(data.len() as u64) {
                archive.extend_from_slice(&pad);
            }
        }
        archive.extend_from_slice(&end());
        let mut reader = tokio_tar::Archive::new(&archive[..]);
        let mut entries = reader.entries().unwrap();
        let mut out = Vec::new();
        while let Some(entry) = entries.next().await {
            let mut entry = entry.unwrap();
            assert_eq!(entry.header().entry_type(), EntryType::Regular);
            let path = String::from_utf8(entry.path_bytes().unwrap().into_owned()).unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).await.unwrap();
            out.push((path, data));
        }
        out
    }

    #[tokio::test]
    async fn tokio_tar_reads_what_we_write() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(200));
        let files: Vec<(&str, &[u8])> = vec![("a", b"hello"), ("dir/b", &[7u8; 1024]), (&long, b"x"), ("empty", b"")];
        let got = roundtrip(&files).await;
        assert_eq!(got.len(), 4);
        for ((path, data), (got_path, got_data)) in files.iter().zip(&got) {
            assert_eq!(path, got_path);
            assert_eq!(*data, &got_data[..]);
        }
    }
}
