//! How operators and other nodes talk to Ferry.

pub mod cli;
pub mod client;
pub mod server;
