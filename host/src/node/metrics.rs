//! `GET /metrics`: the process's counters and histograms
//! ([`crate::metrics`]) plus gauges read off the node's state at scrape
//! time: its transfers by state, its stream slots, its view of Raft, the
//! replica table, its plugins, and the build.
//!
//! Gauges are made fresh for each scrape, so a label set that no longer
//! applies (a transfer state with none left, a member that left) is gone
//! rather than stuck at its last value.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::Node;

/// The content type of [`render`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`classic`]'s text.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition for a scraper that sent `accept`: OpenMetrics when it
/// asks for it (Prometheus does), else the classic text format (what
/// `promtool check metrics`, `curl` and older scrapers read).
pub fn exposition(node: &Node, accept: &str) -> (&'static str, String) {
    let text = render(node);
    if accept.contains("application/openmetrics-text") { (OPENMETRICS, text) } else { (CLASSIC, classic(&text)) }
}

/// OpenMetrics text as the classic format: a counter's family is named
/// with its `_total` (as its samples are), and `# UNIT` and `# EOF`, which
/// the classic format does not have, go.
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineState {
    engine: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabel {
    member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    engine: String,
    version: String,
    contract: String,
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    contracts: &'static str,
}

/// The node's metrics, in the OpenMetrics text format.
fn render(node: &Node) -> String {
    let mut registry = Registry::default();
    let metrics = crate::metrics::global();
    for plugin in node.plugins.iter() {
        metrics.touch_engine(&plugin.info().name);
    }
    metrics.register(&mut registry);
    transfers(node, &mut registry);
    slots(node, &mut registry);
    raft(node, &mut registry);
    replicas(node, &mut registry);
    plugins(node, &mut registry);
    // An info metric the classic way (a gauge at 1), which every parser of
    // the text format reads.
    let build = Family::<BuildLabels, Gauge>::default();
    let labels = BuildLabels { version: env!("CARGO_PKG_VERSION"), contracts: crate::plugin::CONTRACTS };
    build.get_or_create(&labels).set(1);
    registry.register("ferry_build_info", "The ferry build and the plugin contracts it loads (1)", build);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// This node's transfers (as their target), by engine and state, and the
/// consensus transfers not yet ended, by stage.
fn transfers(node: &Node, registry: &mut Registry) {
    let family = Family::<EngineState, Gauge>::default();
    let mut queued = 0;
    for t in node.transfers.list() {
        queued += i64::from(t.state == crate::transfer::State::Queued);
        family.get_or_create(&EngineState { engine: t.engine.clone(), state: t.state.name() }).inc();
    }
    registry.register("ferry_transfers", "Transfers this node receives or received, by engine and state", family);
    gauge(registry, "ferry_transfer_queue_depth", "Transfers waiting for an incoming slot on this node", queued);

    let stages = Family::<EngineState, Gauge>::default();
    for t in node.consensus.state().transfers.values().filter(|t| t.stage.is_live()) {
        stages.get_or_create(&EngineState { engine: t.engine.clone(), state: t.stage.name() }).inc();
    }
    registry.register("ferry_cluster_transfers_live", "Cluster transfers not yet ended, by engine and stage", stages);
}

/// Stream slots: capacity and use, in and out.
fn slots(node: &Node, registry: &mut Registry) {
    let (capacity, used) = (Family::<Direction, Gauge>::default(), Family::<Direction, Gauge>::default());
    let config = &node.config;
    let rows = [
        ("in", config.max_incoming, node.transfers.incoming_available()),
        ("out", config.max_outgoing, node.outgoing.available_permits()),
    ];
    for (direction, max, free) in rows {
        capacity.get_or_create(&Direction { direction }).set(max as i64);
        used.get_or_create(&Direction { direction }).set(max.saturating_sub(free) as i64);
    }
    registry.register("ferry_stream_slots", "Streams this node may run at once", capacity);
    registry.register("ferry_stream_slots_used", "Streams this node runs now", used);
}

/// This node's view of Raft.
fn raft(node: &Node, registry: &mut Registry) {
    let status = node.consensus.status();
    let names: BTreeMap<u64, String> = status.members.iter().map(|m| (m.id, name_of(m))).collect();
    gauge(registry, "ferry_raft_term", "The current Raft term", status.term as i64);
    gauge(registry, "ferry_raft_applied_index", "The last log index this node applied", status.last_applied as i64);
    gauge(registry, "ferry_raft_last_log_index", "The last log index this node stored", status.last_log_index as i64);
    gauge(registry, "ferry_raft_is_leader", "1 if this node is the Raft leader", i64::from(status.state == "leader"));
    gauge(registry, "ferry_raft_members", "Members of the cluster's Raft membership", status.members.len() as i64);
    let state = Family::<StateLabel, Gauge>::default();
    state.get_or_create(&StateLabel { state: status.state.clone() }).set(1);
    registry.register("ferry_raft_state", "This node's Raft role (1 for the current one)", state);
    let leader = Family::<MemberLabel, Gauge>::default();
    if let Some(l) = &status.leader {
        leader.get_or_create(&MemberLabel { member: name_of(l) }).set(1);
    }
    registry.register("ferry_raft_leader", "The leader this node knows (1), by member name", leader);
    let seen: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64> = Default::default();
    seen.set(node.consensus.leader_seen_age().as_secs_f64());
    registry.register_with_unit(
        "ferry_raft_leader_contact_age",
        "Time since this node last heard from a leader (0 on the leader while a quorum acknowledges it)",
        Unit::Seconds,
        seen,
    );
    // On the leader: how far each member's log matches.
    let matched = Family::<MemberLabel, Gauge>::default();
    for (id, index) in node.consensus.replication() {
        let member = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
        matched.get_or_create(&MemberLabel { member }).set(index.map_or(-1, |i| i as i64));
    }
    registry.register(
        "ferry_raft_member_matched_index",
        "On the leader: the last log index each member holds (-1: none yet)",
        matched,
    );
}

fn name_of(m: &crate::consensus::MemberStatus) -> String {
    if m.name.is_empty() { m.id.to_string() } else { m.name.clone() }
}

/// The replica table, counted by engine and state (cluster-wide).
fn replicas(node: &Node, registry: &mut Registry) {
    let family = Family::<EngineState, Gauge>::default();
    for (key, replicas) in &node.consensus.state().replicas {
        for state in replicas.values() {
            family.get_or_create(&EngineState { engine: key.0.clone(), state: state.name() }).inc();
        }
    }
    registry.register("ferry_replicas", "Replicas in the cluster's replica table, by engine and state", family);
}

/// The plugin builds this node runs, one per engine.
fn plugins(node: &Node, registry: &mut Registry) {
    let family = Family::<PluginLabels, Gauge>::default();
    for p in node.plugins.iter() {
        let labels = PluginLabels {
            engine: p.info().name.clone(),
            version: p.info().plugin_version.clone(),
            contract: p.contract().package().to_owned(),
            hash: p.hash().to_owned(),
        };
        family.get_or_create(&labels).set(1);
    }
    registry.register("ferry_plugin", "The plugin build this node runs for each engine (1)", family);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_classic_format_names_counter_families_with_their_total() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total 5\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let want = "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total 5\n\
                    # HELP g A gauge.\n# TYPE g gauge\ng 1\n";
        assert_eq!(super::classic(om), want);
    }
}
