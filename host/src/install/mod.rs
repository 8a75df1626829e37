//! Making received bytes durable and visible: staging directories, fsync,
//! and the atomic publish of a shard.
//!
//! The rule: nothing is visible under `shards/` until it is complete,
//! verified, validated, applied, checked to hold only regular files and
//! directories, and durable; then it appears (or replaces the old replica) in
//! one atomic rename.

pub mod check;
pub mod layout;
pub mod publish;
pub mod sync;

pub use check::{TreeError, check_tree};
pub use layout::DataDir;
pub use publish::publish;
