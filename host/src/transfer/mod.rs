//! Incoming transfers: pull a shard's snapshot from a source node, verify,
//! validate, apply and publish it.
//!
//! A transfer's life: `queued` (waiting for an incoming slot, before the
//! source is even asked, so a busy receiver never makes a source snapshot for
//! nothing) → `running` through the stages connecting, streaming, verifying,
//! validating, applying, publishing → `succeeded`, `failed` (with the step
//! that failed) or `cancelled`. Whatever the end, the staging directory is
//! removed and the live replica is either untouched or atomically replaced.

pub mod catchup;
mod checks;
mod status;
mod task;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

pub use status::{PluginBuild, Stage, State, TransferStatus};
pub use task::Transfer;

use crate::http::Client;
use crate::install::DataDir;
use crate::install::layout::{check_shard_id, check_transfer_id};
use crate::plugin::Registry;
use crate::stream::RateLimiter;

/// What to pull.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub engine: String,
    pub shard: String,
    /// Base URL of the source node, e.g. `http://127.0.0.1:7070`.
    pub source: String,
}

/// The consensus side of a transfer, when there is one.
#[derive(Clone)]
pub struct Fencing {
    /// The transfer's epoch, sent with every snapshot request.
    pub epoch: u64,
    /// Asked right before publishing: is this transfer still current?
    pub still_current: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The plugin build the transfer is pinned to (see
    /// [`Registry::resolve`]); the node loads it before starting.
    pub plugin: Option<String>,
}

/// How hard to try before giving up.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Failed attempts in a row (no new file received) before the transfer fails.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A read that waits longer than this for data breaks the attempt, and a
    /// transfer that receives no new file for this long fails.
    pub stall_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a transfer could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Invalid(String),
    #[error("no plugin for engine {0:?} on this node")]
    UnknownEngine(String),
    #[error("transfer {id} of {engine}/{shard} is already {state}")]
    Busy { id: String, engine: String, shard: String, state: State },
}

/// Everything a transfer task needs from its node.
pub struct Shared {
    pub data: DataDir,
    pub plugins: Arc<Registry>,
    pub client: Client,
    pub token: Arc<str>,
    pub rate: Arc<RateLimiter>,
    pub incoming: Arc<Semaphore>,
    pub retry: RetryPolicy,
    /// Woken after a publish (the node registers the new replica).
    pub published: Option<Arc<tokio::sync::Notify>>,
    /// Set when the node shuts down: consensus transfers keep their staging
    /// to resume after the restart.
    pub stopping: std::sync::atomic::AtomicBool,
}

/// The node's incoming transfers.
pub struct TransferManager {
    shared: Arc<Shared>,
    transfers: Mutex<BTreeMap<String, Arc<Transfer>>>,
}

impl TransferManager {
    pub fn new(shared: Shared) -> TransferManager {
        TransferManager { shared: Arc::new(shared), transfers: Mutex::new(BTreeMap::new()) }
    }

    pub fn start(&self, request: TransferRequest) -> Result<TransferStatus, StartError> {
        self.start_with(request, None, None)
    }

    /// Incoming slots free now.
    pub fn incoming_available(&self) -> usize {
        self.shared.incoming.available_permits()
    }

    /// Waits for an incoming slot (FIFO, as the pipeline's queue): a live
    /// move's catch-up and cut-over hold one, like its snapshot did, so that
    /// `max_incoming` bounds everything a node pulls at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future gives up its place in the queue.
    pub async fn incoming_slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.shared.incoming.clone().acquire_owned().await.expect("the incoming semaphore is never closed")
    }

    /// Starts a transfer with a given id (a consensus transfer's) and fencing.
    pub fn start_with(
        &self,
        request: TransferRequest,
        id: Option<String>,
        fencing: Option<Fencing>,
    ) -> Result<TransferStatus, StartError> {
        check_shard_id(&request.shard).map_err(StartError::Invalid)?;
        if let Some(id) = &id {
            check_transfer_id(id).map_err(StartError::Invalid)?;
        }
        let plugin = match &fencing {
            Some(f) => self.shared.plugins.resolve(&request.engine, f.plugin.as_deref()),
            None => self.shared.plugins.get(&request.engine),
        };
        let Some(plugin) = plugin else {
            return Err(match fencing.and_then(|f| f.plugin) {
                Some(hash) => StartError::Invalid(format!("plugin build {hash} of {} is not loaded", request.engine)),
                None => StartError::UnknownEngine(request.engine),
            });
        };
        crate::http::base_url(&request.source)
            .map_err(|e| StartError::Invalid(format!("source {:?} {e}", crate::http::redacted(&request.source))))?;
        let mut transfers = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(active) = transfers.values().find(|t| {
            t.request.engine == request.engine && t.request.shard == request.shard && !t.status().state.is_final()
        }) {
            let status = active.status();
            return Err(StartError::Busy {
                id: status.id,
                engine: request.engine,
                shard: request.shard,
                state: status.state,
            });
        }
        let transfer = Arc::new(Transfer::new(request, id, fencing).with_plugin(plugin));
        transfers.insert(transfer.id.clone(), transfer.clone());
        drop(transfers);
        let r = &transfer.request;
        tracing::info!(
            transfer = %transfer.id, engine = %r.engine, shard = %r.shard, source = %crate::http::redacted(&r.source),
            "transfer queued"
        );
        tokio::spawn(task::run(self.shared.clone(), transfer.clone()));
        Ok(transfer.status())
    }

    pub fn get(&self, id: &str) -> Option<TransferStatus> {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|t| t.status())
    }

    pub fn list(&self) -> Vec<TransferStatus> {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner()).values().map(|t| t.status()).collect()
    }

    /// Whether a transfer with this id runs here and has not ended.
    pub fn is_running(&self, id: &str) -> bool {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner()).get(id).is_some_and(|t| !t.status().state.is_final())
    }

    /// Waits until transfer `id` ends; its final status.
    pub async fn wait(&self, id: &str) -> Option<TransferStatus> {
        let transfer = self.transfers.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()?;
        transfer.finished().await;
        Some(transfer.status())
    }

    /// Asks a transfer to stop; it cleans up and ends `cancelled`.
    pub fn cancel(&self, id: &str) -> Option<TransferStatus> {
        let transfer = self.transfers.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()?;
        transfer.cancel.cancel();
        Some(transfer.status())
    }

    /// Whether the node is shutting down.
    pub fn stopping(&self) -> bool {
        self.shared.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ids of transfers that run here and have not ended.
    pub fn running(&self) -> Vec<String> {
        self.transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|t| !t.status().state.is_final())
            .map(|t| t.id.clone())
            .collect()
    }

    /// Cancels every transfer and waits (bounded) until they have cleaned up.
    pub async fn shutdown(&self, within: Duration) {
        self.shared.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let all: Vec<Arc<Transfer>> =
            self.transfers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for transfer in &all {
            transfer.cancel.cancel();
        }
        let deadline = tokio::time::Instant::now() + within;
        for transfer in all {
            let _ = tokio::time::timeout_at(deadline, transfer.finished()).await;
        }
    }
}
