//! What one hook call's instance can see and use: a WASI context holding only
//! the call's shard directory, captured stdout/stderr, a memory limiter, and
//! the `log` import (bounded per call, escaped to one line per message).

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::bindings::{v0_1_0 as v1, v0_2_0 as v2};
use super::limits::MemoryAccount;
use super::types::{escape_guest_text, guest_message};

/// Where the call's shard directory appears inside the guest.
pub const GUEST_SHARD_DIR: &str = "/shard";
/// How much of the guest's stdout and stderr is kept, per stream and call.
const OUTPUT_TAIL: usize = 16 * 1024;
/// Most lines of each kept tail that go into the host's log.
const OUTPUT_TAIL_LINES: usize = 200;

/// Most `log` messages one hook call may write; later ones are dropped and
/// counted.
pub const LOG_MAX_MESSAGES: u64 = 1000;
/// Most bytes of `log` messages one hook call may write.
pub const LOG_MAX_BYTES: u64 = 256 * 1024;
/// Messages a call may log in a burst before [`LOG_RATE`] applies.
pub const LOG_BURST: f64 = 100.0;
/// Messages per second a call may log once its burst is spent.
pub const LOG_RATE: f64 = 20.0;

/// Access the guest gets to the call's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// The state of one hook call's store.
pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) stdout: OutputTail,
    pub(super) stderr: OutputTail,
    pub(super) log: GuestLog,
}

impl CallState {
    /// `account` is the node's plugin memory, which the instance's growth is
    /// added to.
    pub fn new(
        dir: Option<(&Path, Access)>,
        memory_limit: usize,
        account: Arc<MemoryAccount>,
    ) -> io::Result<CallState> {
        let stdout = OutputTail::default();
        let stderr = OutputTail::default();
        let mut builder = WasiCtx::builder();
        // No env, args or stdin (the builder's defaults); no network at all.
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            // File operations run on the calling thread instead of a hop to
            // tokio's blocking pool each: far cheaper for many small files.
            // Must be set before the preopen, which captures it.
            .allow_blocking_current_thread(true);
        if let Some((path, access)) = dir {
            let perms = match access {
                Access::ReadOnly => FsPerms::ReadOnly,
                Access::ReadWrite => FsPerms::ReadWrite,
            };
            builder
                .preopened_dir(path, GUEST_SHARD_DIR, perms)
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        }
        Ok(CallState {
            wasi: builder.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter { limit: memory_limit, used: 0, last_growth: 0, account, exceeded: None },
            stdout,
            stderr,
            log: GuestLog::new(),
        })
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl CallState {
    /// A guest's `log` call, of any contract version.
    fn guest_log(&mut self, level: tracing::Level, message: String) {
        let Some(message) = self.log.admit(message) else { return };
        // The caller's span names the plugin, the hook and the shard.
        match level {
            tracing::Level::TRACE => tracing::trace!(target: "ferry::guest", "{message}"),
            tracing::Level::DEBUG => tracing::debug!(target: "ferry::guest", "{message}"),
            tracing::Level::INFO => tracing::info!(target: "ferry::guest", "{message}"),
            tracing::Level::WARN => tracing::warn!(target: "ferry::guest", "{message}"),
            tracing::Level::ERROR => tracing::error!(target: "ferry::guest", "{message}"),
        }
    }
}

impl v1::ferry::engine::log::Host for CallState {
    async fn log(&mut self, level: v1::ferry::engine::log::Level, message: String) {
        self.guest_log(v1::level(level), message);
    }
}

impl v1::ferry::engine::types::Host for CallState {}

impl v2::ferry::engine::log::Host for CallState {
    async fn log(&mut self, level: v2::ferry::engine::log::Level, message: String) {
        self.guest_log(v2::level(level), message);
    }
}

impl v2::ferry::engine::types::Host for CallState {}

/// One call's `log` budget: at most [`LOG_MAX_MESSAGES`] messages and
/// [`LOG_MAX_BYTES`] bytes, at most [`LOG_RATE`] a second after a burst of
/// [`LOG_BURST`] (a token bucket). What is over is dropped and counted, and
/// said once when the call ends, so a looping guest cannot flood the node's
/// log.
pub struct GuestLog {
    messages: u64,
    bytes: u64,
    tokens: f64,
    refilled: Instant,
    dropped_messages: u64,
    dropped_bytes: u64,
}

impl GuestLog {
    fn new() -> GuestLog {
        GuestLog {
            messages: 0,
            bytes: 0,
            tokens: LOG_BURST,
            refilled: Instant::now(),
            dropped_messages: 0,
            dropped_bytes: 0,
        }
    }

    /// The message as it may be logged (clipped, escaped), or `None` if it
    /// is over the budget; counted either way. The byte budget counts what
    /// would be written; the dropped bytes what the guest sent.
    fn admit(&mut self, message: String) -> Option<String> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * LOG_RATE).min(LOG_BURST);
        self.refilled = now;
        let sent = message.len() as u64;
        // Count and rate first: a flood is refused before any copying.
        let text = (self.messages < LOG_MAX_MESSAGES && self.tokens >= 1.0)
            .then(|| guest_message(message))
            .filter(|text| self.bytes + text.len() as u64 <= LOG_MAX_BYTES);
        match &text {
            Some(text) => {
                self.tokens -= 1.0;
                self.messages += 1;
                self.bytes += text.len() as u64;
            }
            None => {
                self.dropped_messages += 1;
                self.dropped_bytes += sent;
            }
        }
        text
    }

    /// Messages and bytes dropped so far.
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_messages, self.dropped_bytes)
    }

    /// Says, once, in the caller's span, what was dropped.
    pub fn report(&mut self) {
        let (messages, bytes) = self.dropped();
        if messages > 0 {
            tracing::warn!(
                target: "ferry::plugin",
                dropped_messages = messages,
                dropped_bytes = bytes,
                "guest log over its per-call limit ({LOG_MAX_MESSAGES} messages, {LOG_MAX_BYTES} bytes, \
                 {LOG_RATE}/s after {LOG_BURST}): dropped {messages} messages ({bytes} bytes)"
            );
            self.dropped_messages = 0;
            self.dropped_bytes = 0;
        }
    }
}

impl Drop for GuestLog {
    /// A call that ended without [`report`](GuestLog::report) (a trap while
    /// instantiating, a dropped future) still says what it dropped.
    fn drop(&mut self) {
        self.report();
    }
}

/// Logs the kept tail of a guest's stdout or stderr, one escaped line per
/// line the guest wrote, inside the caller's span and under the guest's
/// target: at most [`OUTPUT_TAIL_LINES`] lines, the earlier ones counted.
pub(super) fn log_output_tail(stream: &'static str, tail: &OutputTail) {
    let (text, dropped_bytes) = tail.text();
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(OUTPUT_TAIL_LINES);
    if dropped_bytes > 0 || skip > 0 {
        tracing::info!(target: "ferry::guest", stream, "({dropped_bytes} earlier bytes and {skip} earlier lines dropped)");
    }
    for line in &lines[skip..] {
        tracing::info!(target: "ferry::guest", stream, "{}", escape_guest_text(line));
    }
}

/// Caps the total of an instance's linear memories, and its tables; remembers
/// a refusal so the host can say "memory limit" instead of the guest's own
/// abort. What the instance holds is added to the node's memory account
/// until the instance is dropped.
pub struct MemoryLimiter {
    limit: usize,
    /// Bytes of all the instance's linear memories.
    used: usize,
    /// The last growth allowed, taken back if it then fails.
    last_growth: usize,
    account: Arc<MemoryAccount>,
    pub(super) exceeded: Option<usize>,
}

/// A guest tried to grow its memory past the limit.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded (asked for {desired})")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // The limit is on all memories of the instance together: a component
        // has several (the program's, its adapter's), and the node's budget
        // reserves one limit per call.
        let growth = desired.saturating_sub(current);
        let total = self.used.saturating_add(growth);
        if total > self.limit {
            self.exceeded = Some(total);
            // Trap at once: the guest's allocator would otherwise abort with a
            // bare `unreachable` that says nothing.
            return Err(MemoryLimitExceeded { limit: self.limit, desired: total }.into());
        }
        self.used = total;
        self.last_growth = growth;
        self.account.grow(growth);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.used -= self.last_growth;
        self.account.shrink(self.last_growth);
        self.last_growth = 0;
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; 1M entries is far past any real guest.
        Ok(desired <= 1 << 20)
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.account.shrink(self.used);
    }
}

/// Keeps the last [`OUTPUT_TAIL`] bytes a guest wrote to one stream. Writes
/// never block and never fail, so a guest flooding its output cannot trap or
/// grow host memory.
#[derive(Clone, Default)]
pub struct OutputTail(Arc<Mutex<Tail>>);

#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl OutputTail {
    fn push(&self, buf: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let keep = &buf[buf.len().saturating_sub(OUTPUT_TAIL)..];
        tail.dropped += (buf.len() - keep.len()) as u64;
        let overflow = (tail.bytes.len() + keep.len()).saturating_sub(OUTPUT_TAIL);
        tail.dropped += overflow as u64;
        tail.bytes.drain(..overflow);
        tail.bytes.extend(keep);
    }

    /// The kept text, and how many earlier bytes were dropped.
    pub fn text(&self) -> (String, u64) {
        let tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = tail.bytes.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        (String::from_utf8_lossy(&bytes).into_owned(), tail.dropped)
    }
}

impl IsTerminal for OutputTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputTail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for OutputTail {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Pulls the message out of a Rust guest's panic report on stderr
/// (`thread '…' panicked at src/lib.rs:1:2:\n<message>\nnote: …`).
pub fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.rfind("panicked at ")?;
    let rest = &stderr[start..];
    let body = rest.split_once('\n').map(|(_, body)| body).unwrap_or("");
    let message: Vec<&str> =
        body.lines().take_while(|line| !line.starts_with("note: ") && !line.starts_with("stack backtrace")).collect();
    let message = message.join("\n").trim().to_owned();
    let location = rest.lines().next().unwrap_or("").trim_start_matches("panicked at ").trim_end_matches(':');
    Some(if message.is_empty() { format!("at {location}") } else { format!("{message} (at {location})") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let tail = OutputTail::default();
        tail.push(&vec![b'a'; OUTPUT_TAIL]);
        tail.push(b"end");
        let (text, dropped) = tail.text();
        assert_eq!(text.len(), OUTPUT_TAIL);
        assert!(text.ends_with("aend"));
        assert_eq!(dropped, 3);
        tail.push(&vec![b'b'; 3 * OUTPUT_TAIL]);
        let (text, dropped) = tail.text();
        assert!(text.bytes().all(|b| b == b'b'));
        assert_eq!(dropped, 3 + OUTPUT_TAIL as u64 + 2 * OUTPUT_TAIL as u64);
    }

    #[test]
    fn guest_log_is_bounded_and_counted() {
        let mut log = GuestLog::new();
        let admitted = (0..10_000).filter_map(|_| log.admit("0123456789".into())).count() as u64;
        // The burst, plus whatever the rate refilled meanwhile.
        assert!(admitted >= LOG_BURST as u64 && admitted < LOG_BURST as u64 + 10, "{admitted}");
        assert_eq!(log.dropped(), (10_000 - admitted, (10_000 - admitted) * 10));

        // Bytes count as written: clipped, escaped.
        let mut log = GuestLog::new();
        assert_eq!(log.admit("a\nb".into()).unwrap(), "a\\nb");
        let clipped = log.admit("x".repeat(1 << 20)).unwrap();
        assert!(clipped.len() < 5000, "{}", clipped.len());
        let mut written = 4 + clipped.len() as u64;
        loop {
            log.tokens = LOG_BURST;
            match log.admit("y".repeat(4000)) {
                Some(text) => written += text.len() as u64,
                None => break,
            }
        }
        assert!(written <= LOG_MAX_BYTES && written > LOG_MAX_BYTES - 4000, "{written}");
        assert_eq!(log.dropped(), (1, 4000));
        log.report();
        assert_eq!(log.dropped(), (0, 0));

        // With the rate out of the way, the message cap holds.
        let mut log = GuestLog::new();
        let admitted = (0..5_000)
            .filter(|_| {
                log.tokens = LOG_BURST;
                log.admit("z".into()).is_some()
            })
            .count() as u64;
        assert_eq!(admitted, LOG_MAX_MESSAGES);
    }

    #[test]
    fn panic_message_is_found() {
        let stderr = "noise\nthread '<unnamed>' panicked at src/lib.rs:63:20:\nmisbehave: deliberate panic\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).unwrap(), "misbehave: deliberate panic (at src/lib.rs:63:20)");
        assert_eq!(panic_message("no panic here"), None);
    }
}
