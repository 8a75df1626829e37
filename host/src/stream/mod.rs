//! Snapshots on the wire: a tar archive over HTTP.
//!
//! Archive layout (format 1), in this order:
//! 1. `.ferry/snapshot.json` — the [`Preamble`]: snapshot id, engine, shard,
//!    snapshot meta, every entry's path and size, and which entries are
//!    skipped because the receiver already holds them (resume).
//! 2. The data entries, regular files only, in plan order.
//! 3. (the source runs the plugin's term-check here)
//! 4. `.ferry/manifest.json` — the [`Manifest`]: every entry's path, size and
//!    BLAKE3 checksum (skipped ones included) and the meta. Last entry.
//! 5. The end-of-archive blocks.
//!
//! A source that fails mid-way (term changed, read error) writes
//! `.ferry/error.json` saying why and stops: no manifest, no end-of-archive.
//! A receiver accepts a snapshot only after its manifest, so it can never
//! mistake a cut or aborted stream for a complete snapshot (Neon #7944).

pub mod blockdiff;
pub mod buffer;
pub mod client;
pub mod delta;
pub mod guard;
pub mod manifest;
pub mod ratelimit;
pub mod receive;
pub mod source;
pub mod tar;

pub use manifest::{Checksum, FailureCode, FileRecord, Manifest, Preamble, ResumeRequest, SourceFailure};
pub use ratelimit::RateLimiter;
