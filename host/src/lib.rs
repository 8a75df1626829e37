//! Ferry: a node-local service that moves replicas of shards between nodes,
//! for any storage engine. The engine-specific parts are WebAssembly
//! components (see `wit/`); everything else is here.
//!
//! The modules follow the path of a byte:
//! - [`plugin`]: wasmtime host of the engine plugins (snapshot plans, checks);
//! - [`stream`]: the snapshot as a tar archive over HTTP, both ends;
//! - [`install`]: staging, fsync, atomic publish;
//! - [`transfer`]: an incoming transfer's lifecycle (retries, resume, cancel);
//! - [`node`]: a node's configuration and state;
//! - [`api`]: the HTTP server and the command line.

pub mod api;
pub mod conformance;
pub mod consensus;
pub mod http;
pub mod install;
pub mod metrics;
pub mod node;
pub mod plugin;
pub mod relpath;
pub mod stream;
pub mod transfer;
