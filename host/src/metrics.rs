//! What the node counts as it works, for `GET /metrics` (Prometheus text
//! exposition, through `prometheus-client`).
//!
//! The counters and histograms live here, at the bottom of the crate, so
//! that every layer records into them where the work happens (a hook call in
//! `plugin`, a byte in `stream`, a finished transfer in `transfer`) without
//! importing the layers above. They are one set per process: a node is a
//! process. What is read off the node's state at scrape time (transfers by
//! state, slots, Raft, replicas) is sampled by `node::metrics`.
//!
//! Labels are bounded: engine names, hook names, outcomes and stages, never
//! shard or transfer ids.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub engine: String,
    pub hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookOutcomeLabels {
    pub engine: String,
    pub hook: &'static str,
    /// `ok`, or the kind of failure (`engine_error`, `deadline`,
    /// `memory_limit`, `trap`, `queued`, `bad_reply`, …).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub engine: String,
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    pub engine: String,
    /// `true` for the round under the fence.
    pub fenced: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` (loaded compiled) or `miss` (compiled now).
    pub result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every counter and histogram of the process.
pub struct Metrics {
    pub sent_bytes: Family<EngineLabels, Counter>,
    pub sent_files: Family<EngineLabels, Counter>,
    pub received_bytes: Family<EngineLabels, Counter>,
    pub received_files: Family<EngineLabels, Counter>,
    pub rate_limit_waits: Counter,
    pub rate_limit_wait_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub hook_calls: Family<HookOutcomeLabels, Counter>,
    pub hook_duration: Histograms<HookLabels>,
    pub compile_cache: Family<CacheLabels, Counter>,
    pub transfers_finished: Family<OutcomeLabels, Counter>,
    pub transfer_duration: Histograms<OutcomeLabels>,
    pub stage_duration: Histograms<StageLabels>,
    pub catchup_rounds: Family<RoundLabels, Counter>,
    pub catchup_round_duration: Histograms<RoundLabels>,
    pub write_pause: Histograms<EngineLabels>,
    pub write_pause_over_budget: Family<EngineLabels, Counter>,
}

/// 1 ms to ~65 s: hook calls and catch-up rounds.
fn short() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 10 ms to ~3 h: transfers and their stages.
fn long() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 21))
}

/// 1 ms to ~16 s: a live move's write pause.
fn pause() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            sent_bytes: Family::default(),
            sent_files: Family::default(),
            received_bytes: Family::default(),
            received_files: Family::default(),
            rate_limit_waits: Counter::default(),
            rate_limit_wait_seconds: Counter::default(),
            hook_calls: Family::default(),
            hook_duration: Family::new_with_constructor(short),
            compile_cache: Family::default(),
            transfers_finished: Family::default(),
            transfer_duration: Family::new_with_constructor(long),
            stage_duration: Family::new_with_constructor(long),
            catchup_rounds: Family::default(),
            catchup_round_duration: Family::new_with_constructor(short),
            write_pause: Family::new_with_constructor(pause),
            write_pause_over_budget: Family::default(),
        }
    }

    /// Registers every metric (under `ferry_`) into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        let bytes = Unit::Bytes;
        r.register_with_unit(
            "ferry_stream_sent",
            "Data bytes this node sent (snapshots and catch-up rounds)",
            bytes.clone(),
            self.sent_bytes.clone(),
        );
        r.register(
            "ferry_stream_sent_files",
            "Files this node sent (snapshots and catch-up rounds)",
            self.sent_files.clone(),
        );
        r.register_with_unit(
            "ferry_stream_received",
            "Data bytes this node received and wrote to staging",
            bytes,
            self.received_bytes.clone(),
        );
        r.register(
            "ferry_stream_received_files",
            "Files this node received and wrote to staging",
            self.received_files.clone(),
        );
        r.register(
            "ferry_rate_limit_waits",
            "Times a stream waited for the node's rate limit",
            self.rate_limit_waits.clone(),
        );
        r.register_with_unit(
            "ferry_rate_limit_wait",
            "Time streams spent waiting for the node's rate limit",
            Unit::Seconds,
            self.rate_limit_wait_seconds.clone(),
        );
        r.register("ferry_hook_calls", "Plugin hook calls by engine, hook and outcome", self.hook_calls.clone());
        r.register_with_unit(
            "ferry_hook_duration",
            "Plugin hook call time, queueing and instantiation included",
            Unit::Seconds,
            self.hook_duration.clone(),
        );
        r.register("ferry_plugin_compile_cache", "Plugin loads by compiled-cache result", self.compile_cache.clone());
        r.register(
            "ferry_transfers_finished",
            "Transfers this node received, by final state",
            self.transfers_finished.clone(),
        );
        r.register_with_unit(
            "ferry_transfer_duration",
            "Time from a transfer's start to its final state, on its target",
            Unit::Seconds,
            self.transfer_duration.clone(),
        );
        r.register_with_unit(
            "ferry_transfer_stage_duration",
            "Time transfers spent in each stage, on their target",
            Unit::Seconds,
            self.stage_duration.clone(),
        );
        r.register(
            "ferry_catchup_rounds",
            "Catch-up rounds of live moves, on their target",
            self.catchup_rounds.clone(),
        );
        r.register_with_unit(
            "ferry_catchup_round_duration",
            "Time of one catch-up round",
            Unit::Seconds,
            self.catchup_round_duration.clone(),
        );
        r.register_with_unit(
            "ferry_write_pause",
            "Write pause of committed live moves, from the fence to the cut-over",
            Unit::Seconds,
            self.write_pause.clone(),
        );
        r.register(
            "ferry_write_pause_over_budget",
            "Committed live moves whose write pause exceeded the budget",
            self.write_pause_over_budget.clone(),
        );
    }

    pub fn engine(engine: &str) -> EngineLabels {
        EngineLabels { engine: engine.to_owned() }
    }

    /// Makes `engine`'s counters exist at zero, so that a scraper sees
    /// each series before its first event (an alert on `increase()` then
    /// fires on the first failure, not the second).
    pub fn touch_engine(&self, engine: &str) {
        let labels = Metrics::engine(engine);
        for family in [&self.sent_bytes, &self.sent_files, &self.received_bytes, &self.received_files] {
            family.get_or_create(&labels).inc_by(0);
        }
        self.write_pause_over_budget.get_or_create(&labels).inc_by(0);
        // The outcomes of `OutcomeLabels` (`transfer::State`'s final names;
        // this module sits below `transfer`).
        for outcome in ["succeeded", "failed", "cancelled"] {
            self.transfers_finished.get_or_create(&OutcomeLabels { engine: engine.to_owned(), outcome }).inc_by(0);
        }
    }

    /// A hook call's outcome and time.
    pub fn hook_call(&self, engine: &str, hook: &'static str, outcome: &'static str, took: Duration) {
        let engine = engine.to_owned();
        self.hook_calls.get_or_create(&HookOutcomeLabels { engine: engine.clone(), hook, outcome }).inc();
        self.hook_duration.get_or_create(&HookLabels { engine, hook }).observe(took.as_secs_f64());
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_units_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics.sent_bytes.get_or_create(&Metrics::engine("sqlite")).inc_by(5);
        metrics.hook_call("sqlite", "validate", "ok", Duration::from_millis(3));
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ferry_stream_sent_bytes_total{engine=\"sqlite\"} 5"), "{text}");
        assert!(
            text.contains("ferry_hook_calls_total{engine=\"sqlite\",hook=\"validate\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_hook_duration_seconds_bucket{le=\"0.004\",engine=\"sqlite\",hook=\"validate\"} 1"),
            "{text}"
        );
    }
}
