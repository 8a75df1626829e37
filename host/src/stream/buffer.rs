//! Chunk buffers that are reused instead of allocated per chunk.
//!
//! A transfer moves gigabytes in 1 MiB chunks. A fresh allocation per chunk
//! costs page faults and zeroing each time (a chunk is above the allocator's
//! mmap threshold), and on a VM whose host reclaims freed memory, touching
//! new pages is dearer still; a small pool keeps a transfer on the same few
//! megabytes.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A fixed-capacity byte buffer, filled front to back.
pub struct ChunkBuf {
    data: Box<[u8]>,
    len: usize,
}

impl ChunkBuf {
    pub fn new(capacity: usize) -> ChunkBuf {
        ChunkBuf { data: vec![0; capacity].into_boxed_slice(), len: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// The unfilled part, up to `limit` bytes of content in all.
    pub fn spare(&mut self, limit: usize) -> &mut [u8] {
        let end = limit.clamp(self.len, self.capacity());
        &mut self.data[self.len..end]
    }

    /// Marks `n` more bytes of [`spare`](Self::spare) as filled.
    pub fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.capacity(), "advance past capacity");
        self.len += n;
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// Buffers handed back and forth between the network side and a disk side.
#[derive(Clone)]
pub struct BufferPool {
    idle: Arc<Mutex<Vec<ChunkBuf>>>,
    size: usize,
    keep: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` idle ones.
    pub fn new(size: usize, keep: usize) -> BufferPool {
        BufferPool { idle: Arc::default(), size, keep }
    }

    /// An empty buffer: an idle one, or a new one.
    pub fn take(&self) -> ChunkBuf {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        idle.unwrap_or_else(|| ChunkBuf::new(self.size))
    }

    pub fn give_back(&self, mut buf: ChunkBuf) {
        buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep && buf.capacity() == self.size {
            idle.push(buf);
        }
    }
}

impl BufferPool {
    /// Hands `buf` out as [`Bytes`] that come back to this pool when the last
    /// clone is dropped (once the HTTP layer has written them).
    pub fn lend(&self, buf: ChunkBuf) -> Bytes {
        Bytes::from_owner(Lent { buf: Some(buf), pool: self.clone() })
    }
}

struct Lent {
    buf: Option<ChunkBuf>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_fill_up_to_a_limit() {
        let mut buf = ChunkBuf::new(100);
        assert_eq!(buf.spare(40).len(), 40);
        buf.spare(40)[..3].copy_from_slice(b"abc");
        buf.advance(3);
        assert_eq!(&*buf, b"abc");
        assert_eq!(buf.spare(40).len(), 37);
        assert_eq!(buf.spare(2).len(), 0, "a limit below the content gives nothing");
        assert_eq!(buf.spare(usize::MAX).len(), 97);
    }

    #[test]
    #[should_panic(expected = "advance past capacity")]
    fn advancing_past_capacity_panics() {
        ChunkBuf::new(4).advance(5);
    }

    #[test]
    fn pool_reuses_and_caps_idle_buffers() {
        let pool = BufferPool::new(64, 1);
        let (mut a, b) = (pool.take(), pool.take());
        let first = a.spare(usize::MAX).as_ptr();
        a.advance(10);
        pool.give_back(a);
        pool.give_back(b);
        assert_eq!(pool.idle.lock().unwrap().len(), 1, "only one idle buffer is kept");
        let mut again = pool.take();
        assert!(again.is_empty(), "returned buffers come back empty");
        assert_eq!(again.spare(usize::MAX).as_ptr(), first, "the idle buffer is reused");
        pool.give_back(ChunkBuf::new(8));
        assert_eq!(pool.idle.lock().unwrap().len(), 0, "a foreign size is not kept");
    }

    #[test]
    fn lent_bytes_come_back_when_dropped() {
        let pool = BufferPool::new(64, 4);
        let mut buf = pool.take();
        buf.spare(3).copy_from_slice(b"xyz");
        buf.advance(3);
        let bytes = pool.lend(buf);
        let clone = bytes.slice(1..);
        assert_eq!(&bytes[..], b"xyz");
        drop(bytes);
        assert_eq!(pool.idle.lock().unwrap().len(), 0, "a clone still holds it");
        assert_eq!(&clone[..], b"yz");
        drop(clone);
        assert_eq!(pool.idle.lock().unwrap().len(), 1);
    }
}
