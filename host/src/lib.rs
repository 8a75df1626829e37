//! Ferry: a node-local service that moves replicas of shards between nodes,
//! for any storage engine. The engine-specific parts are WebAssembly
//! components (see `wit/`); everything else is here.
//!
//! The modules follow the path of a byte:
//! - [`plugin`]: wasmtime host of the engine plugins;
//! - [`api`]: the command line.

pub mod api;
pub mod plugin;
pub mod relpath;
