//! One incoming transfer, from queue to publish.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::future::Future as _;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::checks::FileChecks;
use super::status::{PluginBuild, Stage, State, TransferStatus};
use super::{Fencing, Shared, TransferRequest};
use crate::http::{TRANSFER_EPOCH_HEADER, TRANSFER_ID_HEADER};
use crate::install::sync::syncfs;
use crate::install::{check_tree, publish};
use crate::stream::ResumeRequest;
use crate::stream::client::{FetchError, fetch_snapshot};
use crate::stream::receive::{Arrivals, Complete, Destination, Held, Progress, ReceiveError, receive};

pub struct Transfer {
    pub id: String,
    pub request: TransferRequest,
    pub fencing: Option<Fencing>,
    pub cancel: CancellationToken,
    progress: Arc<Progress>,
    inner: Mutex<Inner>,
    done: watch::Sender<bool>,
    /// The plugin build this node runs it with (for its status).
    plugin: Option<PluginBuild>,
    /// That build, held for the whole transfer: a swap of the engine's
    /// plugin does not change it.
    engine: Option<Arc<crate::plugin::Plugin>>,
}

struct Inner {
    state: State,
    stage: Stage,
    error: Option<String>,
    attempts: u32,
    resumed_files: u64,
    snapshot_id: Option<String>,
    streaming_since: Option<Instant>,
    stage_since: Instant,
    stage_ms: Vec<(Stage, u64)>,
    created_at: u64,
    updated_at: u64,
}

impl Inner {
    /// Adds the time since the last stage change to the current stage.
    fn close_stage(&mut self) {
        let ms = self.stage_since.elapsed().as_millis() as u64;
        self.stage_since = Instant::now();
        match self.stage_ms.last_mut() {
            Some((stage, total)) if *stage == self.stage => *total += ms,
            _ => self.stage_ms.push((self.stage, ms)),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How a transfer ended, if not by success.
enum Ended {
    Failed(String),
    Cancelled,
}

impl Transfer {
    pub fn new(request: TransferRequest, id: Option<String>, fencing: Option<Fencing>) -> Transfer {
        let now = unix_now();
        Transfer {
            id: id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            request,
            fencing,
            cancel: CancellationToken::new(),
            progress: Arc::new(Progress::default()),
            plugin: None,
            engine: None,
            inner: Mutex::new(Inner {
                state: State::Queued,
                stage: Stage::Queued,
                error: None,
                attempts: 0,
                resumed_files: 0,
                snapshot_id: None,
                streaming_since: None,
                stage_since: Instant::now(),
                stage_ms: Vec::new(),
                created_at: now,
                updated_at: now,
            }),
            done: watch::channel(false).0,
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_stage(&self, stage: Stage) {
        let mut inner = self.inner();
        inner.close_stage();
        if inner.state != State::Running {
            let r = &self.request;
            tracing::info!(transfer = %self.id, engine = %r.engine, shard = %r.shard, "transfer running");
        }
        inner.state = State::Running;
        inner.stage = stage;
        if stage == Stage::Streaming && inner.streaming_since.is_none() {
            inner.streaming_since = Some(Instant::now());
        }
        inner.updated_at = unix_now();
        tracing::info!(transfer = %self.id, engine = %self.request.engine, shard = %self.request.shard, %stage, "stage");
    }

    /// Resolves once the transfer has ended and cleaned up.
    pub async fn finished(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    pub fn with_plugin(mut self, plugin: Arc<crate::plugin::Plugin>) -> Transfer {
        self.plugin =
            Some(PluginBuild { version: plugin.info().plugin_version.clone(), hash: plugin.hash().to_owned() });
        self.engine = Some(plugin);
        self
    }

    pub fn status(&self) -> TransferStatus {
        let inner = self.inner();
        let p = &self.progress;
        let (bytes_done, bytes_total) = (p.bytes_done.load(Ordering::Relaxed), p.bytes_total.load(Ordering::Relaxed));
        let rate = match inner.streaming_since {
            Some(since) if !inner.state.is_final() || inner.state == State::Succeeded => {
                let secs = since.elapsed().as_secs_f64();
                if secs > 0.0 { (p.received.load(Ordering::Relaxed) as f64 / secs) as u64 } else { 0 }
            }
            _ => 0,
        };
        let eta_secs =
            (inner.state == State::Running && rate > 0).then(|| bytes_total.saturating_sub(bytes_done) / rate);
        TransferStatus {
            id: self.id.clone(),
            engine: self.request.engine.clone(),
            shard: self.request.shard.clone(),
            source: self.request.source.clone(),
            state: inner.state,
            stage: inner.stage,
            bytes_done,
            bytes_total,
            files_done: p.files_done.load(Ordering::Relaxed),
            files_total: p.files_total.load(Ordering::Relaxed),
            rate_bytes_per_sec: rate,
            eta_secs,
            attempts: inner.attempts,
            resumed_files: inner.resumed_files,
            snapshot_id: inner.snapshot_id.clone(),
            error: inner.error.clone(),
            stage_ms: inner.stage_ms.clone(),
            consensus: None,
            unreachable: None,
            pause_ms: None,
            pause_over_budget: false,
            rounds: Vec::new(),
            plugin: self.plugin.clone(),
            created_at: inner.created_at,
            updated_at: inner.updated_at,
        }
    }
}

/// Runs a transfer to its end, then removes its staging directory.
pub async fn run(shared: Arc<Shared>, transfer: Arc<Transfer>) {
    let permit = tokio::select! {
        permit = shared.incoming.clone().acquire_owned() => {
            permit.map_err(|_| Ended::Failed("the node is shutting down".into()))
        }
        _ = transfer.cancel.cancelled() => Err(Ended::Cancelled),
    };
    // The pipeline is not raced against the cancel token but watches it
    // itself: dropping it mid-stream would leave its writer thread writing
    // into the staging directory while it is being removed.
    let outcome = match permit {
        Ok(permit) => {
            let outcome = pipeline(&shared, &transfer).await;
            drop(permit);
            outcome
        }
        Err(ended) => Err(ended),
    };
    // A consensus transfer interrupted by a shutdown keeps its staging: the
    // restarted node resumes it. Anything else leaves nothing behind.
    let keep = transfer.fencing.is_some()
        && shared.stopping.load(std::sync::atomic::Ordering::SeqCst)
        && matches!(outcome, Err(Ended::Cancelled));
    if !keep {
        let (data, id) = (shared.data.clone(), transfer.id.clone());
        let cleanup = tokio::task::spawn_blocking(move || data.remove_staging(&id)).await;
        if let Ok(Err(e)) | Err(e) = cleanup.map_err(std::io::Error::other) {
            tracing::error!(transfer = %transfer.id, "cannot remove its staging directory: {e}");
        }
    }
    {
        let mut inner = transfer.inner();
        inner.close_stage();
        inner.updated_at = unix_now();
        match outcome {
            Ok(()) => {
                inner.state = State::Succeeded;
                inner.stage = Stage::Done;
            }
            Err(Ended::Failed(error)) => {
                inner.state = State::Failed;
                inner.error = Some(error);
            }
            Err(Ended::Cancelled) => inner.state = State::Cancelled,
        }
        log_end(&transfer, &inner);
        record_metrics(&transfer.request.engine, &inner);
    }
    transfer.done.send_replace(true);
}

/// One line for a transfer's end: its state, bytes received and time.
fn log_end(transfer: &Transfer, inner: &Inner) {
    let (id, r) = (&transfer.id, &transfer.request);
    let bytes = transfer.progress.received.load(std::sync::atomic::Ordering::Relaxed);
    let duration_ms: u64 = inner.stage_ms.iter().map(|(_, ms)| ms).sum();
    let (engine, shard, attempts) = (&r.engine, &r.shard, inner.attempts);
    match (inner.state, &inner.error) {
        (State::Failed, Some(error)) => tracing::warn!(
            transfer = %id, %engine, %shard, bytes, duration_ms, attempts, %error, "transfer failed"
        ),
        (State::Cancelled, _) => {
            tracing::info!(transfer = %id, %engine, %shard, bytes, duration_ms, "transfer cancelled")
        }
        _ => tracing::info!(transfer = %id, %engine, %shard, bytes, duration_ms, attempts, "transfer succeeded"),
    }
}

/// A finished transfer in the node's metrics: its outcome, its time from
/// creation (the stages' times add up to it), and each stage's time.
fn record_metrics(engine: &str, inner: &Inner) {
    use crate::metrics::{OutcomeLabels, StageLabels};
    let metrics = crate::metrics::global();
    // A transfer that ends in neither is a failure.
    let outcome = match inner.state {
        State::Succeeded | State::Cancelled => inner.state.name(),
        _ => State::Failed.name(),
    };
    let labels = OutcomeLabels { engine: engine.to_owned(), outcome };
    metrics.transfers_finished.get_or_create(&labels).inc();
    let total: u64 = inner.stage_ms.iter().map(|(_, ms)| ms).sum();
    metrics.transfer_duration.get_or_create(&labels).observe(total as f64 / 1000.0);
    for (stage, ms) in &inner.stage_ms {
        metrics.stage_duration.get_or_create(&StageLabels { stage: stage.name() }).observe(*ms as f64 / 1000.0);
    }
}

/// Pulls, checks and installs one transfer's snapshot: [`stream`] it (with
/// the engine's [`FileChecks`] alongside, if it has them), [`check`] it,
/// then [`install`] it.
///
/// # Cancel safety
/// Not cancel safe: cancel the transfer's token instead of dropping the
/// future. Every wait watches the token, and `receive` joins its writer
/// thread before it returns, so nothing writes into staging afterwards.
async fn pipeline(shared: &Shared, transfer: &Transfer) -> Result<(), Ended> {
    let plugin = transfer.engine.clone().ok_or_else(|| Ended::Failed("no plugin build chosen".into()))?;
    let staging = shared.data.staging(&transfer.id).map_err(|e| Ended::Failed(e.to_string()))?;
    let data_dir = staging.join("data");
    let (complete, checks) = match FileChecks::new(&plugin, &transfer.request.shard, data_dir.clone()) {
        None => (stream(shared, transfer, &plugin, &staging, None).await?, None),
        Some((mut checks, arrivals, arrived)) => {
            // The checks stop with the stream: what they had not done yet
            // is done by `check`, at full priority.
            let stop = transfer.cancel.child_token();
            let streamed = async {
                let streamed = stream(shared, transfer, &plugin, &staging, Some(&arrivals)).await;
                drop(arrivals);
                stop.cancel();
                streamed
            };
            let (streamed, ()) = tokio::join!(streamed, checks.run(arrived, &stop));
            (streamed?, Some(checks))
        }
    };
    check(transfer, &plugin, &data_dir, &complete, checks.as_ref()).await?;
    install(shared, transfer, &plugin, &data_dir, &complete).await
}

/// Connects and streams, resuming after interruptions (and after a restart:
/// a consensus transfer's staging survives it, with what it holds), until
/// the whole archive is in `staging` and verified.
async fn stream(
    shared: &Shared,
    transfer: &Transfer,
    plugin: &crate::plugin::Plugin,
    staging: &std::path::Path,
    arrivals: Option<&Arrivals>,
) -> Result<Complete, Ended> {
    let request = &transfer.request;
    let data_dir = staging.join("data");
    let cancel = &transfer.cancel;
    let mut held = {
        let (staging, data_dir) = (staging.to_owned(), data_dir.clone());
        tokio::task::spawn_blocking(move || Held::load(&staging, &data_dir)).await.unwrap_or_default()
    };
    if !held.files.is_empty() {
        tracing::info!(transfer = %transfer.id, files = held.files.len(), "resuming with files received before a restart");
    }
    let mut failures = 0u32;
    let mut last_progress = std::time::Instant::now();
    loop {
        transfer.set_stage(Stage::Connecting);
        transfer.inner().attempts += 1;
        let resume = ResumeRequest { snapshot_id: held.snapshot_id.clone(), have: held.records() };
        let headers: Vec<(&str, String)> = match &transfer.fencing {
            Some(f) => vec![(TRANSFER_ID_HEADER, transfer.id.clone()), (TRANSFER_EPOCH_HEADER, f.epoch.to_string())],
            None => Vec::new(),
        };
        let fetched = tokio::select! {
            r = fetch_snapshot(&shared.client, &request.source, &shared.token, &request.engine, &request.shard, &resume, &headers, shared.retry.stall_timeout) => r,
            _ = cancel.cancelled() => return Err(Ended::Cancelled),
        };
        let interruption = match fetched {
            Ok(response) => {
                transfer.set_stage(Stage::Streaming);
                let files_before = held.files.len();
                let body = StallGuard::new(response.body, shared.retry.stall_timeout);
                let to = Destination {
                    engine: &request.engine,
                    shard: &request.shard,
                    snapshot_format: plugin.info().snapshot_format,
                    data_dir: &data_dir,
                    rate: &shared.rate,
                    progress: &transfer.progress,
                    arrivals,
                };
                let result = receive(body, &to, &mut held, cancel).await;
                transfer.inner().snapshot_id = held.snapshot_id.clone();
                if held.files.len() > files_before {
                    last_progress = std::time::Instant::now();
                }
                if !matches!(result, Err(ReceiveError::Cancelled)) {
                    // Moved to the blocking thread and back, not cloned: it
                    // holds a record per file (100,000 of them at most).
                    let dir = staging.to_owned();
                    let saving = tokio::task::spawn_blocking(move || {
                        let written = held.save(&dir);
                        (held, written)
                    });
                    let written;
                    (held, written) =
                        saving.await.map_err(|e| Ended::Failed(format!("saving what was received: {e}")))?;
                    if let Err(e) = written {
                        tracing::warn!(transfer = %transfer.id, "cannot save what was received: {e}");
                    }
                }
                match result {
                    Ok(complete) => {
                        transfer.inner().resumed_files = complete.preamble.skipped.len() as u64;
                        return Ok(complete);
                    }
                    Err(ReceiveError::Interrupted(why)) => {
                        if held.files.len() > files_before {
                            failures = 0; // progress was made
                        }
                        format!("streaming: {why}")
                    }
                    Err(ReceiveError::Cancelled) => return Err(Ended::Cancelled),
                    Err(ReceiveError::Source(failure)) => return Err(Ended::Failed(failure.to_string())),
                    Err(ReceiveError::Mismatch(why)) => {
                        return Err(Ended::Failed(format!("verifying: checksum mismatch: {why}")));
                    }
                    Err(e @ ReceiveError::Refused(_)) => return Err(Ended::Failed(format!("streaming: {e}"))),
                    Err(ReceiveError::Local(why)) => return Err(Ended::Failed(format!("streaming: writing: {why}"))),
                    Err(e @ ReceiveError::NoSpace { .. }) => return Err(Ended::Failed(format!("streaming: {e}"))),
                }
            }
            Err(FetchError::Refused(why)) => return Err(Ended::Failed(format!("connecting: {why}"))),
            Err(FetchError::Transient(why)) => format!("connecting: {why}"),
        };
        failures += 1;
        if failures >= shared.retry.max_attempts {
            return Err(Ended::Failed(format!("{interruption} (gave up after {failures} failed attempts)")));
        }
        if last_progress.elapsed() > shared.retry.stall_timeout {
            return Err(Ended::Failed(format!("{interruption} (no progress for {:?})", shared.retry.stall_timeout)));
        }
        let backoff =
            shared.retry.initial_backoff.saturating_mul(1 << (failures - 1).min(16)).min(shared.retry.max_backoff);
        tracing::info!(transfer = %transfer.id, "{interruption}; retrying in {backoff:?}");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return Err(Ended::Cancelled),
        }
    }
}

/// Checks the verified snapshot in `data_dir` while flushing it to disk:
/// the files not checked while streaming, then the engine's `validate`.
async fn check(
    transfer: &Transfer,
    plugin: &crate::plugin::Plugin,
    data_dir: &std::path::Path,
    complete: &Complete,
    checks: Option<&FileChecks>,
) -> Result<(), Ended> {
    transfer.set_stage(Stage::Verifying);
    // `receive` verified every checksum against the manifest; the stage is
    // reported for operators.
    let (request, cancel, meta) = (&transfer.request, &transfer.cancel, &complete.preamble.meta);

    // A fuzzy snapshot (written to while it was read) is only a live move's
    // first copy: its rounds, the last under the fence, make it exact, and
    // the plugin checks it then. Anything else refuses it.
    let fuzzy = complete.fuzzy;
    if fuzzy && (transfer.fencing.is_none() || !plugin.contract().has(crate::plugin::Hook::ApplyChanges)) {
        return Err(Ended::Failed(
            "verifying: the source sent a fuzzy snapshot (the shard was written to during the copy), \
             which only a live move accepts"
                .into(),
        ));
    }

    // The files are verified. Flushing them to disk and the guest's checks
    // run at once: the checks only read, and see the same bytes from the
    // page cache either way; apply and publish wait for both. A failed flush
    // is the disk's error, reported before whatever the checks made of the
    // bytes.
    transfer.set_stage(Stage::Validating);
    let dir = data_dir.to_owned();
    let flushed = blocking(move || syncfs(&dir));
    let validated = async {
        if fuzzy {
            return Ok(());
        }
        if let Some(checks) = checks {
            let left = checks.finish(&complete.preamble.snapshot_id, meta, &complete.preamble.entries).await?;
            tracing::debug!(transfer = %transfer.id, left, "files checked after the last byte");
        }
        plugin.validate(&request.shard, data_dir, meta).await.map(drop)
    };
    let (flushed, validated) = tokio::select! {
        both = async { tokio::join!(flushed, validated) } => both,
        _ = cancel.cancelled() => return Err(Ended::Cancelled),
    };
    flushed.map_err(|e| Ended::Failed(format!("streaming: writing: syncfs: {e}")))?;
    validated.map_err(|e| Ended::Failed(format!("validating: {e}")))
}

/// Applies the checked snapshot in `data_dir` and publishes it as the live
/// shard, if this transfer's epoch is still current.
async fn install(
    shared: &Shared,
    transfer: &Transfer,
    plugin: &crate::plugin::Plugin,
    data_dir: &std::path::Path,
    complete: &Complete,
) -> Result<(), Ended> {
    let (request, cancel, meta) = (&transfer.request, &transfer.cancel, &complete.preamble.meta);
    if !complete.fuzzy {
        transfer.set_stage(Stage::Applying);
        let applied = tokio::select! {
            r = plugin.apply(&request.shard, data_dir, meta) => r,
            _ = cancel.cancelled() => return Err(Ended::Cancelled),
        };
        applied.map_err(|e| Ended::Failed(format!("applying: {e}")))?;
    }
    // apply could write anything WASI allows, symlinks included: publish
    // only regular files and directories.
    let dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || check_tree(&dir))
        .await
        .map_err(|e| Ended::Failed(format!("applying: {e}")))?
        .map_err(|e| Ended::Failed(format!("applying: {e}")))?;
    let dir = data_dir.to_owned();
    blocking(move || syncfs(&dir)).await.map_err(|e| Ended::Failed(format!("applying: syncfs: {e}")))?;

    if cancel.is_cancelled() {
        return Err(Ended::Cancelled);
    }
    transfer.set_stage(Stage::Publishing);
    if let Some(fencing) = &transfer.fencing
        && !(fencing.still_current)()
    {
        return Err(Ended::Failed(format!("publishing: epoch {} is no longer current", fencing.epoch)));
    }
    let live =
        shared.data.shard(&request.engine, &request.shard).map_err(|e| Ended::Failed(format!("publishing: {e}")))?;
    let dir = data_dir.to_owned();
    let replaced =
        blocking(move || publish(&dir, &live)).await.map_err(|e| Ended::Failed(format!("publishing: {e}")))?;
    tracing::info!(transfer = %transfer.id, shard = %request.shard, replaced, "published");
    if let Some(published) = &shared.published {
        published.notify_one();
    }
    Ok(())
}

/// Fails a read that waits longer than the stall timeout for data.
pub(super) struct StallGuard<R> {
    inner: R,
    timeout: std::time::Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<R> StallGuard<R> {
    pub(super) fn new(inner: R, timeout: std::time::Duration) -> Self {
        StallGuard { inner, timeout, sleep: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallGuard<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(result)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {:?}", this.timeout),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}
