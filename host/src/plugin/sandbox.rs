//! What one hook call's instance can see and use: a WASI context holding only
//! the call's shard directory, captured stdout/stderr, a memory limiter, and
//! the `log` import.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use super::bindings::v0_1_0 as v0;

/// Where the call's shard directory appears inside the guest.
pub const GUEST_SHARD_DIR: &str = "/shard";
/// How much of the guest's stdout and stderr is kept, per stream and call.
const OUTPUT_TAIL: usize = 16 * 1024;

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
}

impl CallState {
    pub fn new(dir: Option<(&Path, Access)>, memory_limit: usize) -> io::Result<CallState> {
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
            limiter: MemoryLimiter { limit: memory_limit, exceeded: None },
            stdout,
            stderr,
        })
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl v0::ferry::engine::log::Host for CallState {
    async fn log(&mut self, level: v0::ferry::engine::log::Level, message: String) {
        let message = super::types::clip_message(message);
        // The caller's span names the plugin, the hook and the shard.
        match v0::level(level) {
            tracing::Level::TRACE => tracing::trace!(target: "ferry::guest", "{message}"),
            tracing::Level::DEBUG => tracing::debug!(target: "ferry::guest", "{message}"),
            tracing::Level::INFO => tracing::info!(target: "ferry::guest", "{message}"),
            tracing::Level::WARN => tracing::warn!(target: "ferry::guest", "{message}"),
            tracing::Level::ERROR => tracing::error!(target: "ferry::guest", "{message}"),
        }
    }
}

impl v0::ferry::engine::types::Host for CallState {}

/// Caps an instance's linear memories and tables; remembers a refusal so the
/// host can say "memory limit" instead of the guest's own abort.
pub struct MemoryLimiter {
    limit: usize,
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
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = Some(desired);
            // Trap at once: the guest's allocator would otherwise abort with a
            // bare `unreachable` that says nothing.
            return Err(MemoryLimitExceeded { limit: self.limit, desired }.into());
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold function references; 1M entries is far past any real guest.
        Ok(desired <= 1 << 20)
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
    fn panic_message_is_found() {
        let stderr = "noise\nthread '<unnamed>' panicked at src/lib.rs:63:20:\nmisbehave: deliberate panic\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).unwrap(), "misbehave: deliberate panic (at src/lib.rs:63:20)");
        assert_eq!(panic_message("no panic here"), None);
    }
}
