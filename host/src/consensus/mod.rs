//! Consensus: an openraft cluster of Ferry nodes and the replicated state.

pub mod state;
