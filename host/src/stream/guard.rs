//! A bound on what the tar reader may hold in memory.
//!
//! `tokio-tar` reads the payload of GNU long-name and long-link entries and of
//! PAX headers fully into memory, however large their header says it is: one
//! header claiming 8 GiB grew a receiver by gigabytes. Ferry's own writer
//! ([`super::tar`]) emits only GNU headers, regular entries and GNU long
//! names, so [`TarGuard`] sits between the network and the tar reader,
//! follows the block structure (header, data padded to a block, next header)
//! and refuses every header whose payload the reader would buffer, except a
//! GNU long name of at most [`MAX_LONG_NAME`] bytes. Other entry kinds the
//! reader streams (links, directories, devices) pass, so the receiver refuses
//! them with its own message. A refused header never reaches the reader.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tokio_tar::{EntryType, Header};

use super::tar::BLOCK;
use crate::relpath::MAX_PATH_LEN;

/// Largest GNU long-name payload: the longest relative path and its NUL.
pub const MAX_LONG_NAME: u64 = MAX_PATH_LEN as u64 + 1;

/// Passes a tar archive through, refusing headers whose payload the tar
/// reader would buffer. Errors are [`io::ErrorKind::InvalidData`] and name
/// the entry; once failed, every further read fails the same way.
pub struct TarGuard<R> {
    inner: R,
    /// The header being read, then handed out once checked.
    block: Box<[u8; BLOCK as usize]>,
    filled: usize,
    served: usize,
    /// Data and padding of the current entry still to pass through.
    data_left: u64,
    /// A long name being collected (its payload bytes, without padding).
    long_name: Option<(Vec<u8>, u64)>,
    /// The long name that applies to the next entry.
    pending_name: Option<Vec<u8>>,
    /// The last entry that passed, to place errors.
    last: Option<String>,
    failed: Option<String>,
}

impl<R> TarGuard<R> {
    pub fn new(inner: R) -> Self {
        TarGuard {
            inner,
            block: Box::new([0; BLOCK as usize]),
            filled: 0,
            served: 0,
            data_left: 0,
            long_name: None,
            pending_name: None,
            last: None,
            failed: None,
        }
    }

    /// Checks the full header in `block` and sets up its data.
    fn check_header(&mut self) -> Result<(), String> {
        let bytes = &self.block[..];
        if bytes.iter().all(|&b| b == 0) {
            return Ok(()); // an end-of-archive block
        }
        let header = Header::from_byte_slice(bytes);
        let name = match self.pending_name.as_deref() {
            Some(long) => lossy_name(long),
            None => lossy_name(&header.path_bytes()),
        };
        let place = match &self.last {
            Some(last) => format!("entry {name:?} (after {last:?})"),
            None => format!("entry {name:?}"),
        };
        // The checksum counts its own field as spaces.
        let sum: u32 =
            bytes[..148].iter().chain(&bytes[156..]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
        if header.cksum().ok() != Some(sum) {
            return Err(format!("{place}: header checksum mismatch"));
        }
        let kind = header.entry_type();
        let refuse = |what: &str| Err(format!("{place} is {what}, which Ferry archives never hold"));
        match kind {
            EntryType::XHeader | EntryType::XGlobalHeader | EntryType::SolarisXHeader => {
                return refuse(&format!("a PAX extended header (type {:?})", char::from(kind.as_byte())));
            }
            EntryType::GNULongLink => return refuse("a GNU long link name"),
            EntryType::GNUSparse => return refuse("a sparse file"),
            EntryType::Other(byte) => return refuse(&format!("an entry of unknown type {:?}", char::from(byte))),
            _ => {}
        }
        let size = header.raw_entry_size().map_err(|e| format!("{place}: bad size field: {e}"))?;
        let padded = size.checked_next_multiple_of(BLOCK).ok_or_else(|| format!("{place}: size {size} overflows"))?;
        if kind == EntryType::GNULongName {
            if self.pending_name.is_some() {
                return Err(format!("{place}: two GNU long names for one entry"));
            }
            if size > MAX_LONG_NAME {
                return Err(format!("{place} is a GNU long name of {size} bytes, at most {MAX_LONG_NAME}"));
            }
            self.long_name = Some((Vec::with_capacity(size as usize), size));
        } else {
            self.last = Some(name);
            self.pending_name = None;
        }
        self.data_left = padded;
        Ok(())
    }

    fn fail(&mut self, message: String) -> io::Error {
        self.failed = Some(message.clone());
        io::Error::new(io::ErrorKind::InvalidData, message)
    }
}

/// A name for messages: lossy UTF-8, NULs cut, at most 200 characters.
fn lossy_name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let name = String::from_utf8_lossy(&bytes[..end]);
    match name.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.into_owned(),
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for TarGuard<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(message) = &this.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, message.clone())));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // A checked header, handed out.
            if this.filled == BLOCK as usize && this.served < this.filled {
                let n = buf.remaining().min(this.filled - this.served);
                buf.put_slice(&this.block[this.served..this.served + n]);
                this.served += n;
                return Poll::Ready(Ok(()));
            }
            // The entry's data and padding, straight through; never past
            // them, so the next header is read into `block`.
            if this.data_left > 0 {
                let want = buf.remaining().min(usize::try_from(this.data_left).unwrap_or(usize::MAX));
                let mut limited = buf.take(want);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
                let got = limited.filled().len();
                if let Some((name, size)) = &mut this.long_name {
                    let keep = (*size as usize).saturating_sub(name.len()).min(got);
                    name.extend_from_slice(&limited.filled()[..keep]);
                }
                // SAFETY: `limited` wrote `got` initialised bytes into `buf`'s
                // unfilled part.
                unsafe { buf.assume_init(got) };
                buf.advance(got);
                this.data_left -= got as u64;
                if this.data_left == 0
                    && let Some((name, _)) = this.long_name.take()
                {
                    this.pending_name = Some(name);
                }
                return Poll::Ready(Ok(()));
            }
            // The next header.
            if this.filled == BLOCK as usize {
                this.filled = 0;
                this.served = 0;
            }
            let mut into = ReadBuf::new(&mut this.block[this.filled..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut into))?;
            let got = into.filled().len();
            if got == 0 {
                if this.filled == 0 {
                    return Poll::Ready(Ok(())); // the end, between entries
                }
                let message = format!("the archive ends inside a header, {} of {BLOCK} bytes in", this.filled);
                return Poll::Ready(Err(this.fail(message)));
            }
            this.filled += got;
            if this.filled == BLOCK as usize
                && let Err(message) = this.check_header()
            {
                return Poll::Ready(Err(this.fail(message)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relpath::RelPath;
    use crate::stream::tar;
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    /// Hands out one byte per read, to split headers and data everywhere.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    /// A valid relative path of exactly `len` bytes.
    fn long_path(len: usize) -> String {
        let mut path = String::new();
        while path.len() < len {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(&"d".repeat((len - path.len()).min(100)));
        }
        assert_eq!(path.len(), len);
        path
    }

    fn file(archive: &mut Vec<u8>, path: &str, data: &[u8]) {
        archive.extend_from_slice(&tar::header(&RelPath::new(path).unwrap(), data.len() as u64));
        archive.extend_from_slice(data);
        archive.extend_from_slice(&tar::padding(data.len() as u64).unwrap_or_default());
    }

    fn raw(archive: &mut Vec<u8>, mut header: Header, name: &[u8], size: u64) {
        header.set_size(size);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_cksum();
        archive.extend_from_slice(header.as_bytes());
    }

    fn typed(kind: EntryType) -> Header {
        let mut header = if matches!(kind, EntryType::XHeader | EntryType::XGlobalHeader) {
            Header::new_ustar()
        } else {
            Header::new_gnu()
        };
        header.set_entry_type(kind);
        header
    }

    /// What the tar reader makes of `archive` through the guard: each entry's
    /// path and data, or the first error.
    async fn read(archive: &[u8], trickle: bool) -> Result<Vec<(String, Vec<u8>)>, String> {
        let reader: Box<dyn AsyncRead + Unpin + '_> =
            if trickle { Box::new(Trickle(archive)) } else { Box::new(archive) };
        let mut tar = tokio_tar::Archive::new(TarGuard::new(reader));
        let mut entries = tar.entries().map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(entry) = entries.next().await {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let path = String::from_utf8(entry.path_bytes().unwrap().into_owned()).unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).await.map_err(|e| e.to_string())?;
            out.push((path, data));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn ferry_archives_pass_unchanged() {
        let long = long_path(300);
        let mut archive = Vec::new();
        let files: Vec<(&str, Vec<u8>)> =
            vec![("a", b"hello".to_vec()), (&long, vec![7; 3000]), ("empty", vec![]), ("b", vec![1; 1024])];
        for (path, data) in &files {
            file(&mut archive, path, data);
        }
        archive.extend_from_slice(&tar::end());
        for trickle in [false, true] {
            let got = read(&archive, trickle).await.unwrap();
            let want: Vec<(String, Vec<u8>)> = files.iter().map(|(p, d)| (p.to_string(), d.clone())).collect();
            assert_eq!(got, want, "trickle: {trickle}");
        }
        let mut passed = Vec::new();
        TarGuard::new(&archive[..]).read_to_end(&mut passed).await.unwrap();
        assert_eq!(passed, archive, "the guard changes nothing");
    }

    #[tokio::test]
    async fn extension_payloads_are_refused_before_the_reader_sees_them() {
        const GIB8: u64 = 8 << 30;
        let cases: Vec<(EntryType, &[u8], u64, &str)> = vec![
            (EntryType::XHeader, b"././@PaxHeader", GIB8, "is a PAX extended header (type 'x')"),
            (EntryType::XGlobalHeader, b"pax_global_header", 20, "is a PAX extended header (type 'g')"),
            (EntryType::SolarisXHeader, b"solaris", 20, "is a PAX extended header (type 'X')"),
            (EntryType::GNULongLink, b"././@LongLink", 20, "is a GNU long link name"),
            (EntryType::GNUSparse, b"sparse", 20, "is a sparse file"),
            (EntryType::new(b'V'), b"volume", 0, "unknown type 'V'"),
            (EntryType::GNULongName, b"././@LongLink", GIB8, "GNU long name of 8589934592 bytes, at most 4097"),
        ];
        for (kind, name, size, want) in cases {
            let mut archive = Vec::new();
            file(&mut archive, "first", b"x");
            raw(&mut archive, typed(kind), name, size);
            // Endless payload, as far as the reader could tell.
            archive.resize(archive.len() + (1 << 20), b'a');
            for trickle in [false, true] {
                let error = read(&archive, trickle).await.unwrap_err();
                let place = format!("entry {:?} (after \"first\")", std::str::from_utf8(name).unwrap());
                assert!(error.contains(&place) && error.contains(want), "{kind:?}: {error}");
            }
        }
    }

    #[tokio::test]
    async fn long_names_are_bounded_and_name_their_entry() {
        // At the limit: passes.
        let name = long_path(MAX_PATH_LEN);
        let mut archive = Vec::new();
        file(&mut archive, &name, b"data");
        archive.extend_from_slice(&tar::end());
        assert_eq!(read(&archive, false).await.unwrap(), vec![(name.clone(), b"data".to_vec())]);

        // A second long name for the same entry, and an error after a long
        // name names the entry by it.
        let mut twice = Vec::new();
        let long = tar::header(&RelPath::new(&name).unwrap(), 0);
        twice.extend_from_slice(&long[..long.len() - BLOCK as usize]);
        twice.extend_from_slice(&long[..long.len() - BLOCK as usize]);
        let error = read(&twice, false).await.unwrap_err();
        assert!(error.contains("two GNU long names"), "{error}");

        let mut after = Vec::new();
        file(&mut after, &name, b"data");
        raw(&mut after, typed(EntryType::XHeader), b"pax", 10);
        let error = read(&after, false).await.unwrap_err();
        // Named by its long name, cut for the message.
        assert!(error.contains(&format!("(after \"{}…\")", &name[..200])), "{error}");
    }

    #[tokio::test]
    async fn broken_headers_are_refused() {
        let mut archive = Vec::new();
        file(&mut archive, "first", b"x");
        let mut bad = tar::header(&RelPath::new("second").unwrap(), 1).to_vec();
        bad[0] ^= 1;
        archive.extend_from_slice(&bad);
        let error = read(&archive, false).await.unwrap_err();
        assert!(error.contains("checksum mismatch"), "{error}");

        let mut cut = Vec::new();
        file(&mut cut, "first", b"x");
        cut.extend_from_slice(&[1; 100]);
        let error = read(&cut, false).await.unwrap_err();
        assert!(error.contains("ends inside a header, 100 of 512"), "{error}");

        // A failed guard stays failed.
        let mut guard = TarGuard::new(&bad[..]);
        let mut sink = [0u8; 512];
        assert!(guard.read(&mut sink).await.is_err());
        assert!(guard.read(&mut sink).await.is_err());
    }
}
