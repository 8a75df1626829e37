//! What a hook call must hold before it may instantiate: a call slot of its
//! engine, an instance slot of the node and its memory limit out of the
//! node's memory budget. Each is a FIFO queue (a tokio semaphore), so a busy
//! or runaway plugin makes later calls wait, never fail, and one engine can
//! hold no more than its own call slots.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One of the queues a call may wait in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// The engine's own call slots (`max_calls_per_engine`).
    EngineCalls(usize),
    /// The node's instance slots (the pooling allocator's).
    Instances(usize),
    /// The node's plugin memory budget, in bytes.
    Memory(usize),
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Queue::EngineCalls(n) => write!(f, "one of this engine's {n} call slots"),
            Queue::Instances(n) => write!(f, "one of the node's {n} plugin instance slots"),
            Queue::Memory(bytes) => write!(f, "memory out of the node's plugin memory budget of {bytes} bytes"),
        }
    }
}

/// A FIFO queue in front of `permits` units of something.
pub(super) struct Gate {
    semaphore: Arc<Semaphore>,
    /// Calls that hold units or wait for them.
    calls: Arc<AtomicUsize>,
    queue: Queue,
}

/// Units taken from a [`Gate`]; given back when dropped.
pub(super) struct Pass {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
}

/// Counts a call in its gate from the moment it queues until it leaves,
/// whether it got its units, timed out or was dropped while waiting.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gate {
    /// A gate of `permits` units, named `queue` in errors.
    pub fn new(permits: usize, queue: Queue) -> Gate {
        Gate { semaphore: Arc::new(Semaphore::new(permits)), calls: Arc::default(), queue }
    }

    /// Waits, in arrival order, for `units` until `deadline`. On timeout (or
    /// units got only once the deadline passed), returns which queue it was
    /// and how many other calls were in it.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped wait takes nothing and leaves the queue.
    pub async fn enter(&self, units: u32, deadline: Instant) -> Result<Pass, (Queue, usize)> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let ticket = Ticket(self.calls.clone());
        let acquire = self.semaphore.clone().acquire_many_owned(units);
        match tokio::time::timeout_at(deadline.into(), acquire).await {
            // Units that came free just as (or after) the deadline passed are
            // no use: the call would be interrupted before it did anything,
            // and "queued" says better why.
            Ok(Ok(permit)) if Instant::now() < deadline => Ok(Pass { _permit: permit, _ticket: ticket }),
            // The semaphore is never closed; treat it like a full queue.
            Ok(_) | Err(_) => Err((self.queue, self.calls.load(Ordering::Relaxed).saturating_sub(1))),
        }
    }
}

/// The node's plugin memory, as reserved by calls and as really grown by
/// their instances.
#[derive(Default)]
pub(super) struct MemoryAccount {
    reserved: AtomicUsize,
    reserved_peak: AtomicUsize,
    in_use: AtomicUsize,
    in_use_peak: AtomicUsize,
}

impl MemoryAccount {
    /// A call reserved `bytes` of the budget.
    pub fn reserve(&self, bytes: usize) {
        let now = self.reserved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.reserved_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A call gave its reservation back.
    pub fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// An instance's linear memory grew by `bytes`.
    pub fn grow(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.in_use_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// An instance gave back `bytes` (it ended, or a growth failed).
    pub fn shrink(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Starts the peaks again from what is held now.
    pub fn reset_peaks(&self) {
        self.reserved_peak.store(self.reserved.load(Ordering::Relaxed), Ordering::Relaxed);
        self.in_use_peak.store(self.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The figures now, against `budget`.
    pub fn usage(&self, budget: usize) -> MemoryUsage {
        MemoryUsage {
            budget,
            reserved: self.reserved.load(Ordering::Relaxed),
            reserved_peak: self.reserved_peak.load(Ordering::Relaxed),
            in_use: self.in_use.load(Ordering::Relaxed),
            in_use_peak: self.in_use_peak.load(Ordering::Relaxed),
        }
    }
}

/// Plugin memory of a node, in bytes: what running calls reserved out of the
/// budget (each its instance's memory limit) and what their instances' linear
/// memories really hold; peaks since the runtime started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUsage {
    /// `memory_budget`.
    pub budget: usize,
    /// Memory limits of the calls holding a reservation now.
    pub reserved: usize,
    pub reserved_peak: usize,
    /// Linear memory of the live instances now.
    pub in_use: usize,
    pub in_use_peak: usize,
}

/// A call's memory reservation; returned to the account when dropped.
pub(super) struct Reservation {
    _pass: Pass,
    account: Arc<MemoryAccount>,
    bytes: usize,
}

impl Reservation {
    /// Books `bytes` to `account` for as long as `pass` is held.
    pub fn new(pass: Pass, account: Arc<MemoryAccount>, bytes: usize) -> Reservation {
        account.reserve(bytes);
        Reservation { _pass: pass, account, bytes }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.account.release(self.bytes);
    }
}

/// Everything a call holds while its instance lives. Must be dropped after
/// the call's store, which gives the pooling slot and the memory back.
pub(super) struct Slot {
    pub _engine: Pass,
    pub _instance: Pass,
    pub _memory: Reservation,
}

/// Units of the memory gate: whole MiB.
pub(super) const MIB: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn gate_queues_in_order_and_times_out_saying_where() {
        let gate = Gate::new(2, Queue::EngineCalls(2));
        let soon = || Instant::now() + Duration::from_millis(50);
        let a = gate.enter(1, soon()).await.unwrap();
        let b = gate.enter(1, soon()).await.unwrap();
        let (queue, behind) = gate.enter(1, soon()).await.err().unwrap();
        assert_eq!(queue, Queue::EngineCalls(2));
        assert_eq!(behind, 2);
        drop(a);
        let c = gate.enter(1, soon()).await.unwrap();
        // Units free, but too late: queued all the same.
        drop(b);
        assert!(gate.enter(1, Instant::now()).await.is_err());
        // A timed-out waiter leaves the count: only `c` is in.
        assert_eq!(gate.calls.load(Ordering::Relaxed), 1);
        drop(c);
        assert_eq!(gate.calls.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn account_keeps_peaks() {
        let account = MemoryAccount::default();
        account.reserve(10);
        account.reserve(5);
        account.release(10);
        account.grow(7);
        account.shrink(7);
        let usage = account.usage(100);
        assert_eq!((usage.reserved, usage.reserved_peak, usage.in_use, usage.in_use_peak), (5, 15, 0, 7));
    }
}
