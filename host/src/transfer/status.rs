//! What a transfer reports.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }

    /// The name the API and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Queued,
    Connecting,
    Streaming,
    Verifying,
    Validating,
    Applying,
    Publishing,
    Done,
}

impl Stage {
    /// The name the API and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::Connecting => "connecting",
            Stage::Streaming => "streaming",
            Stage::Verifying => "verifying",
            Stage::Validating => "validating",
            Stage::Applying => "applying",
            Stage::Publishing => "publishing",
            Stage::Done => "done",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A transfer as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransferStatus {
    pub id: String,
    pub engine: String,
    pub shard: String,
    pub source: String,
    pub state: State,
    pub stage: Stage,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Received bytes per second while streaming.
    pub rate_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    /// Connection attempts so far (1 when nothing broke).
    pub attempts: u32,
    /// Files not sent again because a previous attempt had received them.
    pub resumed_files: u64,
    pub snapshot_id: Option<String>,
    /// Why it failed, naming the step.
    pub error: Option<String>,
    /// Time spent in each stage so far, in milliseconds, in order.
    pub stage_ms: Vec<(Stage, u64)>,
    /// For a transfer through consensus: its record in the replicated state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consensus: Option<crate::consensus::state::TransferRecord>,
    /// Set when the node that runs the transfer did not answer in time: the
    /// byte progress shown is not current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
    /// A live move's write pause: from the source's fence to the commit of
    /// the new owner, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Whether that pause went over the node's budget.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause_over_budget: bool,
    /// A live move's catch-up rounds (the fenced ones last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<crate::consensus::state::RoundRecord>,
    /// The build of the engine's plugin this node runs the transfer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginBuild>,
    /// Unix seconds.
    pub created_at: u64,
    pub updated_at: u64,
}

/// Which build of a plugin: its own version and the BLAKE3 of its component.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginBuild {
    pub version: String,
    pub hash: String,
}
