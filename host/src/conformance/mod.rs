//! The vendor conformance kit: `ferry plugin test PLUGIN.wasm --shard-dir DIR`.
//!
//! What `csi-sanity` is to CSI drivers: it runs a plugin against a sample
//! shard through Ferry's own code (the plugin runtime with its sandbox,
//! deadlines and memory limits; two real nodes in this process moving the
//! shard over loopback) and names every check the plugin fails. It works on
//! copies of DIR and never changes DIR.
//!
//! It sits above `api` (it starts nodes and their servers), like the CLI.

mod nodes;
pub mod shard;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::plugin::types::check_engine_name;
use crate::plugin::{
    EngineError, Hook, HookError, HookErrorKind, Plugin, PluginRuntime, RuntimeConfig, ShardPosition, SnapshotPlan,
};
use crate::transfer::{State, TransferRequest};

/// The shard id the kit gives the sample shard.
const SHARD: &str = "kit-shard";
/// Transfer epochs the live checks fence with (any numbers do).
const EPOCH: u64 = 7001;

pub struct KitOptions {
    pub plugin: PathBuf,
    pub shard_dir: PathBuf,
    /// Each read-only hook is called this many times; all answers must agree.
    pub repeat: usize,
    /// A shell command that writes to the shard in `$FERRY_SHARD_DIR` so
    /// that a snapshot taken before it is void (its term moves).
    pub mutate: Option<String>,
    pub runtime: RuntimeConfig,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "outcome", content = "detail")]
pub enum Outcome {
    Passed(String),
    Failed(String),
    Skipped(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub ms: u64,
}

/// Every call of one hook the kit made.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HookStats {
    pub hook: &'static str,
    pub calls: u32,
    pub max_ms: u64,
    /// The largest linear memory its instances reached, in bytes.
    pub peak_memory: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub plugin: String,
    pub engine: Option<String>,
    pub contract: Option<String>,
    pub checks: Vec<CheckResult>,
    pub hooks: Vec<HookStats>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| !matches!(c.outcome, Outcome::Failed(_)))
    }
}

/// Runs every check; the report says which passed.
/// How many files `check-files` is tried on alone.
const ALONE_FILES: usize = 64;

pub async fn run(options: &KitOptions) -> anyhow::Result<Report> {
    let work = tempfile::Builder::new().prefix("ferry-kit-").tempdir()?;
    let mut kit = Kit {
        options,
        work: work.path().to_owned(),
        runtime: PluginRuntime::new(options.runtime.clone())?,
        report: Report {
            plugin: options.plugin.display().to_string(),
            engine: None,
            contract: None,
            checks: Vec::new(),
            hooks: Vec::new(),
        },
    };
    kit.run_all().await;
    Ok(kit.report)
}

type Checked = Result<String, String>;

struct Kit<'a> {
    options: &'a KitOptions,
    work: PathBuf,
    runtime: PluginRuntime,
    report: Report,
}

impl Kit<'_> {
    fn record(&mut self, check: &'static str, started: Instant, outcome: Outcome) {
        let ms = started.elapsed().as_millis() as u64;
        self.report.checks.push(CheckResult { check, outcome, ms });
    }

    fn checked(&mut self, check: &'static str, started: Instant, result: Checked) -> bool {
        let ok = result.is_ok();
        self.record(check, started, result.map_or_else(Outcome::Failed, Outcome::Passed));
        ok
    }

    /// Calls a hook, timed, with its instance's peak memory.
    async fn call<T, F: Future<Output = Result<T, HookError>>>(
        &mut self,
        hook: Hook,
        f: impl FnOnce() -> F,
    ) -> Result<T, HookError> {
        self.runtime.reset_memory_peak();
        let started = Instant::now();
        let result = f().await;
        let ms = started.elapsed().as_millis() as u64;
        let peak = self.runtime.memory().in_use_peak;
        let stats = match self.report.hooks.iter_mut().position(|s| s.hook == hook.name()) {
            Some(at) => &mut self.report.hooks[at],
            None => {
                self.report.hooks.push(HookStats { hook: hook.name(), ..HookStats::default() });
                self.report.hooks.last_mut().expect("just pushed")
            }
        };
        stats.calls += 1;
        stats.max_ms = stats.max_ms.max(ms);
        stats.peak_memory = stats.peak_memory.max(peak);
        result
    }

    fn copy_of_shard(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.work.join(name);
        shard::copy_tree(&self.options.shard_dir, &dir).map_err(|e| format!("copying the shard: {e}"))?;
        Ok(dir)
    }

    async fn run_all(&mut self) {
        let started = Instant::now();
        let plugin = match self.runtime.load(&self.options.plugin).await {
            Ok(plugin) => plugin,
            Err(e) => {
                self.record("loads", started, Outcome::Failed(e.to_string()));
                return;
            }
        };
        self.report.engine = Some(plugin.info().name.clone());
        self.report.contract = Some(plugin.contract().package().to_owned());
        let loaded = format!(
            "{} {}, contract {}, compiled in {} ms",
            plugin.info().name,
            plugin.info().plugin_version,
            plugin.contract().package(),
            plugin.compile_time().as_millis()
        );
        self.record("loads", started, Outcome::Passed(loaded));

        let started = Instant::now();
        let described = self.describe(&plugin).await;
        self.checked("describe is valid and stable", started, described);

        let started = Instant::now();
        let missing = self.missing_shard(&plugin).await;
        self.checked("a missing shard is a typed error", started, missing);

        let started = Instant::now();
        let read_only = self.read_only_hooks(&plugin).await;
        self.checked("read-only hooks change nothing and agree", started, read_only);

        let started = Instant::now();
        let damage = self.validate_refuses_damage(&plugin).await;
        self.checked("validate accepts the snapshot and refuses a damaged one", started, damage);

        let started = Instant::now();
        match self.options.mutate.clone() {
            Some(cmd) => {
                let mutated = self.term_check_after_mutation(&plugin, &cmd).await;
                self.checked("term-check fails after a write", started, mutated);
            }
            None => self.record(
                "term-check fails after a write",
                started,
                Outcome::Skipped("give --mutate CMD, a command that writes to $FERRY_SHARD_DIR".into()),
            ),
        }

        let started = Instant::now();
        let moved = self.round_trip(&plugin).await;
        self.checked("the shard moves between two nodes", started, moved);

        if plugin.contract().has(Hook::Fence) {
            let started = Instant::now();
            let fences = self.fences(&plugin).await;
            self.checked("fence, unfence and retire keep their epochs", started, fences);
        }
    }

    async fn describe(&mut self, plugin: &Plugin) -> Checked {
        let first = self.call(Hook::Describe, || plugin.describe()).await.map_err(|e| e.to_string())?;
        check_engine_name(&first.name).map_err(|e| format!("engine name: {e}"))?;
        if first.plugin_version.is_empty() || first.plugin_version.len() > 128 {
            return Err(format!("plugin version {:?} is empty or longer than 128 bytes", first.plugin_version));
        }
        for _ in 1..self.options.repeat {
            let again = self.call(Hook::Describe, || plugin.describe()).await.map_err(|e| e.to_string())?;
            if again != first {
                return Err(format!("describe answered {first:?}, then {again:?}"));
            }
        }
        Ok(format!("{} calls agree", self.options.repeat))
    }

    async fn missing_shard(&mut self, plugin: &Plugin) -> Checked {
        let empty = self.work.join("empty");
        std::fs::create_dir_all(&empty).map_err(|e| e.to_string())?;
        let typed = |what: &str, e: HookError| match e.kind {
            HookErrorKind::Engine(_) => Ok(()),
            _ => Err(format!("{what} on an empty directory failed without an engine error: {e}")),
        };
        match self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &empty)).await {
            Ok(p) => return Err(format!("shard-status of an empty directory answered {p:?}")),
            Err(e) => typed("shard-status", e)?,
        }
        match self.call(Hook::CreateSnapshot, || plugin.create_snapshot(SHARD, &empty)).await {
            Ok(_) => return Err("create-snapshot of an empty directory answered a plan".into()),
            Err(e) => typed("create-snapshot", e)?,
        }
        Ok("shard-status and create-snapshot answer engine errors".into())
    }

    async fn read_only_hooks(&mut self, plugin: &Plugin) -> Checked {
        let dir = self.copy_of_shard("read-only")?;
        let before = shard::fingerprint(&dir).map_err(|e| e.to_string())?;
        let mut status = None;
        let mut plan: Option<SnapshotPlan> = None;
        let mut delta = None;
        for _ in 0..self.options.repeat {
            let now = self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &dir)).await;
            let now = now.map_err(|e| format!("shard-status: {e}"))?;
            agree("shard-status", &mut status, now)?;
            let planned = self.call(Hook::CreateSnapshot, || plugin.create_snapshot(SHARD, &dir)).await;
            let planned = planned.map_err(|e| format!("create-snapshot: {e}"))?;
            agree("create-snapshot", &mut plan, planned)?;
            let meta = plan.as_ref().expect("set above").meta.clone();
            self.call(Hook::TermCheck, || plugin.term_check(SHARD, &dir, &meta))
                .await
                .map_err(|e| format!("term-check of an untouched shard: {e}"))?;
            if plugin.contract().has(Hook::ChangesSince) {
                let since = status.expect("set above");
                let changes = self.call(Hook::ChangesSince, || plugin.changes_since(SHARD, &dir, since)).await;
                let changes = changes.map_err(|e| format!("changes-since its own position: {e}"))?;
                agree("changes-since", &mut delta, changes)?;
                let meta = delta.as_ref().expect("set above").meta.clone();
                self.call(Hook::DeltaCheck, || plugin.delta_check(SHARD, &dir, &meta))
                    .await
                    .map_err(|e| format!("delta-check of an untouched shard: {e}"))?;
            }
            let after = shard::fingerprint(&dir).map_err(|e| e.to_string())?;
            if after != before {
                return Err(format!("the shard changed: {}", shard::difference(&before, &after)));
            }
        }
        let entries = plan.map_or(0, |p| p.entries.len());
        let position = status.map(|p| format!("{}:{}", p.term, p.position)).unwrap_or_default();
        Ok(format!("{} rounds; position {position}; {entries} snapshot entries", self.options.repeat))
    }

    async fn validate_refuses_damage(&mut self, plugin: &Plugin) -> Checked {
        let source = self.copy_of_shard("validate-source")?;
        let plan = self.call(Hook::CreateSnapshot, || plugin.create_snapshot(SHARD, &source)).await;
        let plan = plan.map_err(|e| format!("create-snapshot: {e}"))?;
        let status = self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &source)).await;
        let status = status.map_err(|e| format!("shard-status: {e}"))?;
        let whole = self.work.join("validate-whole");
        shard::materialize(&plan, &source, &whole).map_err(|e| format!("materializing the plan: {e}"))?;
        let paths: Vec<String> = plan.entries.iter().map(|e| e.path().as_str().to_owned()).collect();
        let alone = if plugin.checks_files() { self.files_checked_alone(plugin, &plan, &whole).await? } else { 0 };
        let got = self.check_and_validate(plugin, &whole, &plan.meta, &paths).await;
        let got = got.map_err(|e| format!("validate of an intact snapshot: {e}"))?;
        if got != status {
            return Err(format!("validate says {got:?}, the source's shard-status {status:?}"));
        }
        let Some((largest, size)) = shard::largest_file(&whole).map_err(|e| e.to_string())? else {
            return Ok("validated; no file to damage".into());
        };
        let mut refused = Vec::new();
        for damage in ["a file missing", "a file cut short"] {
            let dir = self.work.join(format!("validate-{}", refused.len()));
            shard::copy_tree(&whole, &dir).map_err(|e| e.to_string())?;
            let file = dir.join(&largest);
            let done = match damage {
                "a file missing" => std::fs::remove_file(&file),
                _ => {
                    std::fs::OpenOptions::new().write(true).open(&file).and_then(|f| f.set_len(size.saturating_sub(1)))
                }
            };
            done.map_err(|e| format!("damaging {largest}: {e}"))?;
            match self.check_and_validate(plugin, &dir, &plan.meta, &paths).await {
                Ok(p) => return Err(format!("validate accepted the snapshot with {damage} ({largest}): {p:?}")),
                Err(e) => refused.push(format!("{damage}: {}", short(&e.to_string()))),
            }
        }
        let alone = match alone {
            0 => String::new(),
            n => format!("; check-files passed {n} files each alone in a directory"),
        };
        Ok(format!("refused {}{alone}", refused.join("; ")))
    }

    /// As a transfer checks a received snapshot: `check-files` on every
    /// path (if the plugin has it), then `validate`.
    async fn check_and_validate(
        &mut self,
        plugin: &Plugin,
        dir: &Path,
        meta: &crate::plugin::SnapshotMeta,
        paths: &[String],
    ) -> Result<ShardPosition, HookError> {
        if plugin.checks_files() {
            for batch in paths.chunks(crate::plugin::MAX_CHECK_PATHS) {
                self.call(Hook::CheckFiles, || plugin.check_files(SHARD, dir, meta, batch)).await?;
            }
        }
        self.call(Hook::Validate, || plugin.validate(SHARD, dir, meta)).await
    }

    /// `check-files` runs while other files are still absent: each of the
    /// intact snapshot's files (the first [`ALONE_FILES`]) must pass alone
    /// in a directory. Returns how many were checked.
    async fn files_checked_alone(
        &mut self,
        plugin: &Plugin,
        plan: &SnapshotPlan,
        whole: &Path,
    ) -> Result<usize, String> {
        let mut checked = 0;
        for (i, entry) in plan.entries.iter().take(ALONE_FILES).enumerate() {
            let path = entry.path();
            let dir = self.work.join(format!("alone-{i}"));
            let (from, to) = (path.join_to(whole), path.join_to(&dir));
            let copied = to.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::copy(&from, &to));
            copied.map_err(|e| format!("copying {path}: {e}"))?;
            let paths = [path.as_str().to_owned()];
            let got = self.call(Hook::CheckFiles, || plugin.check_files(SHARD, &dir, &plan.meta, &paths)).await;
            got.map_err(|e| {
                format!("check-files of {path}, alone in a directory (other files may not have arrived yet): {e}")
            })?;
            let _ = std::fs::remove_dir_all(&dir);
            checked += 1;
        }
        Ok(checked)
    }

    async fn term_check_after_mutation(&mut self, plugin: &Plugin, cmd: &str) -> Checked {
        let dir = self.copy_of_shard("mutate")?;
        let plan = self.call(Hook::CreateSnapshot, || plugin.create_snapshot(SHARD, &dir)).await;
        let plan = plan.map_err(|e| format!("create-snapshot: {e}"))?;
        // Its output is kept out of the report's (stdout may be JSON).
        let out = tokio::process::Command::new("sh")
            .args(["-c", cmd])
            .env("FERRY_SHARD_DIR", &dir)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running --mutate: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("--mutate {cmd:?} failed ({}): {}", out.status, short(stderr.trim())));
        }
        match self.call(Hook::TermCheck, || plugin.term_check(SHARD, &dir, &plan.meta)).await {
            Ok(()) => Err("term-check passed a snapshot taken before a write".into()),
            Err(e) if matches!(e.engine_error(), Some(EngineError::TermChanged(_))) => {
                Ok(format!("term-changed: {}", short(&e.to_string())))
            }
            Err(e) => Err(format!("term-check failed, but not with term-changed: {e}")),
        }
    }

    async fn round_trip(&mut self, plugin: &Plugin) -> Checked {
        let engine = plugin.info().name.clone();
        let plugins = self.work.join("plugins");
        std::fs::create_dir_all(&plugins).map_err(|e| e.to_string())?;
        std::fs::copy(&self.options.plugin, plugins.join(format!("{engine}.wasm"))).map_err(|e| e.to_string())?;
        let token = self.work.join("token");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&token);
            let secret = uuid::Uuid::new_v4().simple().to_string();
            file.and_then(|mut f| f.write_all(secret.as_bytes()))
                .map_err(|e| format!("writing the nodes' token: {e}"))?;
        }
        let runtime = &self.options.runtime;
        let source = nodes::KitNode::start("kit-source", &self.work.join("node-a"), &plugins, &token, runtime)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let target = nodes::KitNode::start("kit-target", &self.work.join("node-b"), &plugins, &token, runtime)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let result = self.move_between(plugin, &engine, &source, &target).await;
        source.stop().await;
        target.stop().await;
        result
    }

    async fn move_between(
        &mut self,
        plugin: &Plugin,
        engine: &str,
        source: &nodes::KitNode,
        target: &nodes::KitNode,
    ) -> Checked {
        let from = source.shard_dir(engine, SHARD);
        shard::copy_tree(&self.options.shard_dir, &from).map_err(|e| format!("copying the shard: {e}"))?;
        let request = TransferRequest { engine: engine.into(), shard: SHARD.into(), source: source.url.clone() };
        let clock = Instant::now();
        let started = target.node.transfers.start(request).map_err(|e| format!("starting the transfer: {e}"))?;
        let done = tokio::time::timeout(Duration::from_secs(600), target.node.transfers.wait(&started.id))
            .await
            .map_err(|_| "the transfer did not end within 600 s".to_string())?
            .ok_or("the transfer vanished")?;
        if done.state != State::Succeeded {
            return Err(format!("the transfer {:?}: {}", done.state, done.error.unwrap_or_default()));
        }
        let copy = target.shard_dir(engine, SHARD);
        let theirs = self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &from)).await;
        let ours = self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &copy)).await;
        let (theirs, ours) = (theirs.map_err(|e| e.to_string())?, ours.map_err(|e| format!("the copy: {e}"))?);
        if theirs != ours {
            return Err(format!("the copy stands at {ours:?}, the source at {theirs:?}"));
        }
        let ms = clock.elapsed().as_millis();
        let mut detail = format!("{} bytes in {ms} ms; the copy stands at {ours:?}", done.bytes_total);
        if plugin.contract().has(Hook::ChangesSince) {
            detail.push_str(&self.catch_up_round(plugin, source, target, &copy, ours).await?);
        }
        Ok(detail)
    }

    /// A catch-up round over the real endpoint onto the copy: with nothing
    /// written since, the copy stays where it is.
    async fn catch_up_round(
        &mut self,
        plugin: &Plugin,
        source: &nodes::KitNode,
        target: &nodes::KitNode,
        copy: &Path,
        at: ShardPosition,
    ) -> Checked {
        let digests = crate::transfer::catchup::DigestCache::default();
        let scratch = self.work.join("round");
        let engine = plugin.info().name.clone();
        let request = crate::transfer::catchup::RoundRequest {
            client: &target.node.client,
            source: &source.url,
            token: &target.node.token,
            engine: &engine,
            shard: SHARD,
            transfer: None,
            since: at,
            scratch: &scratch,
            replica: copy,
            plugin,
            rate: &target.node.rate,
            stall_timeout: Duration::from_secs(60),
            digests: &digests,
        };
        let round = crate::transfer::catchup::pull_round(&request, &tokio_util::sync::CancellationToken::new())
            .await
            .map_err(|e| format!("a catch-up round: {e}"))?;
        if round.position != at {
            return Err(format!("a round with no write moved the copy from {at:?} to {:?}", round.position));
        }
        Ok(format!("; a catch-up round ({} entries, {} bytes) keeps it there", round.entries, round.bytes))
    }

    async fn fences(&mut self, plugin: &Plugin) -> Checked {
        let dir = self.copy_of_shard("fences")?;
        let status = self.call(Hook::ShardStatus, || plugin.shard_status(SHARD, &dir)).await;
        let status = status.map_err(|e| format!("shard-status: {e}"))?;
        let fenced = |e: &HookError| matches!(e.engine_error(), Some(EngineError::Fenced(_)));
        let first = self.call(Hook::Fence, || plugin.fence(SHARD, &dir, EPOCH)).await;
        let first = first.map_err(|e| format!("fence: {e}"))?;
        let again = self.call(Hook::Fence, || plugin.fence(SHARD, &dir, EPOCH)).await;
        let again = again.map_err(|e| format!("fence again with the same epoch: {e}"))?;
        if again.last != first.last {
            return Err(format!("fence answered {:?}, then {:?}", first.last, again.last));
        }
        if first.last.term == status.term && first.last.position < status.position {
            return Err(format!("the fence's last position {:?} is behind the shard's {status:?}", first.last));
        }
        match self.call(Hook::Fence, || plugin.fence(SHARD, &dir, EPOCH + 1)).await {
            Ok(_) => return Err("another epoch fenced a fenced shard".into()),
            Err(e) if fenced(&e) => {}
            Err(e) => return Err(format!("another epoch's fence failed without `fenced`: {e}")),
        }
        match self.call(Hook::Unfence, || plugin.unfence(SHARD, &dir, EPOCH + 1)).await {
            Ok(()) => return Err("another epoch lifted the fence".into()),
            Err(e) if fenced(&e) => {}
            Err(e) => return Err(format!("another epoch's unfence failed without `fenced`: {e}")),
        }
        for _ in 0..2 {
            self.call(Hook::Unfence, || plugin.unfence(SHARD, &dir, EPOCH))
                .await
                .map_err(|e| format!("unfence: {e}"))?;
        }
        self.call(Hook::Fence, || plugin.fence(SHARD, &dir, EPOCH + 2))
            .await
            .map_err(|e| format!("fencing again after the unfence: {e}"))?;
        for _ in 0..2 {
            self.call(Hook::Retire, || plugin.retire(SHARD, &dir, EPOCH + 2))
                .await
                .map_err(|e| format!("retire: {e}"))?;
        }
        match self.call(Hook::Fence, || plugin.fence(SHARD, &dir, EPOCH + 3)).await {
            Ok(_) => Err("a retired shard took a new fence".into()),
            Err(_) => Ok(format!(
                "last {:?}, {} locks; epochs kept apart; unfence and retire repeat; a retired shard stays retired",
                first.last,
                first.locks.len()
            )),
        }
    }
}

/// Keeps the first answer; later ones must equal it.
fn agree<T: PartialEq + std::fmt::Debug>(hook: &str, first: &mut Option<T>, now: T) -> Result<(), String> {
    match first {
        Some(f) if *f != now => Err(format!("{hook} answered {f:?}, then {now:?}")),
        Some(_) => Ok(()),
        None => {
            *first = Some(now);
            Ok(())
        }
    }
}

fn short(text: &str) -> String {
    match text.char_indices().nth(160) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The report as lines for a terminal.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "plugin {} ({}, {})\n",
        report.plugin,
        report.engine.as_deref().unwrap_or("?"),
        report.contract.as_deref().unwrap_or("?")
    );
    for c in &report.checks {
        let (mark, detail) = match &c.outcome {
            Outcome::Passed(d) => ("PASS", d),
            Outcome::Failed(d) => ("FAIL", d),
            Outcome::Skipped(d) => ("SKIP", d),
        };
        out.push_str(&format!("{mark}  {} ({} ms): {detail}\n", c.check, c.ms));
    }
    out.push_str("hooks:\n");
    for h in &report.hooks {
        out.push_str(&format!(
            "  {:<16} {:>3} calls, slowest {:>5} ms, peak memory {} KiB\n",
            h.hook,
            h.calls,
            h.max_ms,
            h.peak_memory / 1024
        ));
    }
    let failed = report.checks.iter().filter(|c| matches!(c.outcome, Outcome::Failed(_))).count();
    out.push_str(&if failed == 0 {
        "conformance: passed\n".to_owned()
    } else {
        format!("conformance: {failed} checks failed\n")
    });
    out
}
