//! How operators and other nodes talk to Ferry.

pub mod cli;
pub mod conn;
pub mod new_plugin;
pub mod pki;
pub mod sd_notify;
pub mod server;
