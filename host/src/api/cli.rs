//! The `ferry` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::consensus::ClusterStatus;
use crate::http::ApiClient;
use crate::node::Node;
use crate::node::config::{Config, read_token};
use crate::node::credentials::AuthFiles;
use crate::plugin::{
    DEFAULT_MEMORY_BUDGET, DEFAULT_MEMORY_LIMIT, DeltaMeta, Hook, HookDeadlines, HookError, Plugin, PluginRuntime,
    RuntimeConfig, ShardPosition, SnapshotMeta,
};
use crate::transfer::{State, TransferStatus};

/// `ferry --version`: the build and the plugin contracts it loads
/// ([`crate::plugin::CONTRACTS`], which a unit test holds it to).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (plugin contracts ferry:engine@0.1.0,ferry:engine@0.2.0)");

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version = VERSION,
    about = "Moves replicas of shards between nodes, for any storage engine"
)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `ferry=debug`
    /// [default: `info` for `serve`, `warn` for the other commands].
    #[arg(long, global = true, env = "FERRY_LOG")]
    pub log: Option<String>,
    /// Log lines as text, or as one JSON object per line (for log shippers).
    #[arg(long, global = true, env = "FERRY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: the HTTP API, snapshot streaming and transfers.
    Serve(Box<ServeArgs>),
    /// Start, watch and cancel transfers on a node.
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// Inspect and exercise engine plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Node configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (e.g. `ferry completions bash >
    /// /etc/bash_completion.d/ferry`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The replica table (from any node), or one engine's or shard's rows.
    Shards {
        #[command(flatten)]
        node: NodeArgs,
        /// Only this engine's shards.
        #[arg(long)]
        engine: Option<String>,
        /// Only this shard (needs --engine).
        #[arg(long, requires = "engine")]
        shard: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Make the node at --node join the cluster of the node at --to.
    Join {
        #[command(flatten)]
        node: NodeArgs,
        /// Any member of the cluster to join.
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Take the node at --node out of its cluster.
    Leave {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Members, leader, term, last applied index.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make a cluster CA in --dir (ca.crt, ca.key): every node's certificate
    /// comes from it, and members verify each other against it.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Ferry cluster CA")]
        name: String,
    },
    /// Issue a node certificate (<out>/<name>.crt, <out>/<name>.key) from the
    /// CA in --ca-dir, for the hosts other nodes reach it at.
    IssueCert {
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node's name (its --node-id).
        #[arg(long)]
        name: String,
        /// An IP address or DNS name of the node (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Where to write the certificate and key (default: --ca-dir).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file; flags override it [default: FERRY_CONFIG,
    /// $XDG_CONFIG_HOME/ferry/ferry.toml or /etc/ferry/ferry.toml, if one exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub node_id: Option<String>,
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
    /// File holding one token for every scope (default: <data-dir>/state/token,
    /// created if missing, when no scoped token file is given).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Scoped credentials: the token members share (Raft, snapshot streams).
    #[arg(long, conflicts_with = "token_file")]
    pub node_token_file: Option<PathBuf>,
    /// Scoped credentials: the operators' token (transfers, membership, plugins).
    #[arg(long, conflicts_with = "token_file", requires = "node_token_file")]
    pub admin_token_file: Option<PathBuf>,
    /// Scoped credentials: a read-only token (status, listings).
    #[arg(long, conflicts_with = "token_file", requires = "node_token_file")]
    pub read_token_file: Option<PathBuf>,
    /// TLS: this node's certificate (PEM), from the cluster CA.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this node's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the cluster CA certificate (PEM) members verify each other with.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// A base URL a direct pull may name as its source, besides the members
    /// (repeatable).
    #[arg(long = "allow-source")]
    pub allow_sources: Vec<String>,
    /// Open connections at most.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a request body may take to arrive.
    #[arg(long)]
    pub request_timeout: Option<u64>,
    /// A live move's write pause budget, in milliseconds.
    #[arg(long)]
    pub pause_budget_ms: Option<u64>,
    /// Node-wide byte rate limit per second, in and out (e.g. 100M; 0: unlimited).
    #[arg(long, value_parser = parse_size)]
    pub rate_limit: Option<u64>,
    /// Incoming transfers at once.
    #[arg(long)]
    pub max_incoming: Option<usize>,
    /// Outgoing snapshot streams at once.
    #[arg(long)]
    pub max_outgoing: Option<usize>,
    /// Failed attempts in a row before an incoming transfer gives up.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Seconds without data before a transfer stream is given up, in and out.
    #[arg(long, value_name = "SECS")]
    pub stall_timeout: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a node's TOML config as `ferry serve` would read it (unknown
    /// keys, ranges, conflicting settings); exit 0 when it is sound.
    Check {
        /// The file [default: the one `ferry serve` would find].
        file: Option<PathBuf>,
    },
}

/// Where a node's API is, and its token. What is not given comes from the
/// local node's config (`FERRY_CONFIG`, `$XDG_CONFIG_HOME/ferry/ferry.toml`
/// or `/etc/ferry/ferry.toml`): its listen address, and a token file it
/// names or keeps in its data dir, when readable.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Base URL of the node [default: the local config's listen address,
    /// else http://127.0.0.1:7070].
    #[arg(long, env = "FERRY_NODE")]
    pub node: Option<String>,
    /// File holding the API token [default: the local node's, when readable].
    #[arg(long, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The cluster CA certificate, to verify an https:// node [default: the
    /// local config's].
    #[arg(long, env = "FERRY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl NodeArgs {
    fn client(&self) -> anyhow::Result<ApiClient> {
        let local = match (&self.node, &self.token_file) {
            (Some(_), Some(_)) => None,
            _ => crate::node::config::conventional_path()?.map(|p| Config::load(&p).map(|c| (p, c))).transpose()?,
        };
        let node = match (&self.node, &local) {
            (Some(node), _) => node.clone(),
            (None, Some((_, config))) => config.api_url()?,
            (None, None) => "http://127.0.0.1:7070".to_owned(),
        };
        let token = match (&self.token_file, &local) {
            (Some(file), _) => read_token(file, false)?,
            (None, Some((path, config))) => {
                let files = config.client_token_files();
                let readable = files.iter().find_map(|f| read_token(f, false).ok());
                readable.ok_or_else(|| {
                    let tried: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                    anyhow::anyhow!(
                        "no readable token among the local node's ({}, from {}): give --token-file",
                        tried.join(", "),
                        path.display()
                    )
                })?
            }
            (None, None) => bail!("give --token-file (or FERRY_TOKEN_FILE): no local node config was found"),
        };
        let ca = self.ca_file.clone().or_else(|| local.as_ref()?.1.tls.as_ref().map(|t| t.ca_file.clone()));
        let client = match &ca {
            Some(ca) => crate::http::tls_client(crate::http::tls::client_config(ca, None)?),
            None => crate::http::client(),
        };
        Ok(ApiClient::with_client(client, &node, token))
    }
}

#[derive(Subcommand, Debug)]
pub enum TransferCommand {
    /// Move or replicate a shard through consensus (--target), or pull it
    /// from a node outside the cluster into --node (--source URL only).
    Start {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        engine: String,
        #[arg(long)]
        shard: String,
        /// With --target: the source node's name (default: the most advanced
        /// replica). Without: the base URL to pull from.
        #[arg(long)]
        source: Option<String>,
        /// The member that gets the replica.
        #[arg(long)]
        target: Option<String>,
        /// replicate (default) or move.
        #[arg(long, value_parser = ["replicate", "move"])]
        kind: Option<String>,
        /// Wait for the end, with a progress bar; exit 0 only on success.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one transfer.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List the node's transfers.
    List {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a transfer.
    Cancel {
        #[command(flatten)]
        node: NodeArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Load a plugin through the production path and say what it is.
    Check {
        /// The plugin component (`.wasm`).
        file: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a new plugin crate to start from: a complete engine for a simple
    /// format, with the guest SDK and the contract vendored and a sample
    /// shard for `ferry plugin test`.
    New {
        /// The engine's name (1-64 of a-z, 0-9, -).
        name: String,
        /// The plugin's language.
        #[arg(long, default_value = "rust", value_parser = crate::api::new_plugin::LANGS)]
        lang: String,
        /// Where to write it (default: ./NAME); must not exist.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Install a plugin build into the running cluster: the node checks it
    /// and proposes it; every member fetches it by hash, verifies and
    /// compiles it; it becomes the engine's plugin once all are ready.
    Install {
        /// The plugin component (`.wasm`).
        file: PathBuf,
        #[command(flatten)]
        node: NodeArgs,
        /// A new build of an engine that already has a plugin (without it,
        /// a build whose engine name is taken is refused).
        #[arg(long)]
        upgrade: bool,
        /// Wait until every member runs it (at most this many seconds; 0:
        /// do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll an installed build out again (a roll back to an earlier
    /// version): new transfers use it once every member holds it; running
    /// ones finish on the build they started with.
    Activate {
        engine: String,
        /// BLAKE3 of the build (`ferry plugin list` shows the installed ones;
        /// a unique prefix of at least 8 digits is enough).
        hash: String,
        #[command(flatten)]
        node: NodeArgs,
        /// Wait until every member runs it (seconds; 0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
        #[arg(long)]
        json: bool,
    },
    /// Forget an installed build: refused while it is active or a live
    /// transfer is pinned to it; every member deletes its bytes.
    Remove {
        engine: String,
        /// BLAKE3 of the build (or a unique prefix of at least 8 digits).
        hash: String,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Every member's plugins, by engine: version, contract and BLAKE3 of
    /// the build each runs, and whether all members run the same.
    List {
        #[command(flatten)]
        node: NodeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The conformance kit: run a plugin against a sample shard through
    /// Ferry's own code and name every check it fails (exit 1). Works on
    /// copies; DIR is never changed.
    Test {
        /// The plugin component (`.wasm`).
        file: PathBuf,
        /// A sample shard of the plugin's engine.
        #[arg(long)]
        shard_dir: PathBuf,
        /// A shell command that writes to the shard in `$FERRY_SHARD_DIR`
        /// (so that a snapshot taken before it is void); without it that
        /// check is skipped.
        #[arg(long)]
        mutate: Option<String>,
        /// How many times each read-only hook is called (all must agree).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=100))]
        repeat: u32,
        #[command(flatten)]
        runtime: RuntimeArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one hook of a plugin against a directory and print its result.
    RunHook {
        /// The plugin component (`.wasm`).
        file: PathBuf,
        /// describe, shard-status, create-snapshot, term-check, validate,
        /// apply; for contract 0.2.0 also changes-since, delta-check,
        /// apply-changes, fence, unfence, retire.
        #[arg(value_parser = parse_hook)]
        hook: Hook,
        /// The shard directory the hook sees as `/shard` (not needed by describe).
        #[arg(long)]
        shard_dir: Option<PathBuf>,
        /// Shard name passed to the hook (default: the directory's name).
        #[arg(long)]
        shard: Option<String>,
        /// Snapshot meta for term-check, validate and apply: JSON of a meta or
        /// of a whole plan (as printed by create-snapshot --json).
        #[arg(long, conflicts_with = "meta_file")]
        meta: Option<String>,
        /// Like --meta, from a file.
        #[arg(long)]
        meta_file: Option<PathBuf>,
        /// Position for changes-since, as TERM:POSITION.
        #[arg(long, value_parser = parse_position)]
        since: Option<ShardPosition>,
        /// Transfer epoch for fence, unfence and retire.
        #[arg(long)]
        epoch: Option<u64>,
        /// Delta meta for delta-check and apply-changes: JSON of a meta or of
        /// a whole delta plan (as printed by changes-since --json).
        #[arg(long)]
        delta_meta_file: Option<PathBuf>,
        #[command(flatten)]
        runtime: RuntimeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Plugin runtime settings shared by the commands that load plugins.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Deadline of one hook, as HOOK=MILLISECONDS (repeatable).
    #[arg(long = "deadline", value_parser = parse_deadline)]
    pub deadlines: Vec<(Hook, Duration)>,
    /// Memory limit of one plugin instance, in bytes (suffixes K, M, G).
    #[arg(long, value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Directory of compiled plugins (default: ~/.cache/ferry/compiled).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compile every time; do not read or write the compiled cache.
    #[arg(long)]
    pub no_cache: bool,
}

impl RuntimeArgs {
    pub fn config(&self) -> anyhow::Result<RuntimeConfig> {
        let mut deadlines = HookDeadlines::default();
        for (hook, deadline) in &self.deadlines {
            deadlines.set(*hook, *deadline);
        }
        let memory_limit = match self.memory_limit {
            Some(bytes) => usize::try_from(bytes).context("--memory-limit is too large")?,
            None => DEFAULT_MEMORY_LIMIT,
        };
        let cache_dir = if self.no_cache { None } else { self.cache_dir.clone().or_else(default_cache_dir) };
        // One command runs one call: the budget only has to hold it.
        let memory_budget =
            memory_limit.checked_next_multiple_of(1 << 20).unwrap_or(usize::MAX).max(DEFAULT_MEMORY_BUDGET);
        Ok(RuntimeConfig { deadlines, memory_limit, memory_budget, cache_dir, ..RuntimeConfig::default() })
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ferry").join("compiled"))
}

fn parse_hook(s: &str) -> Result<Hook, String> {
    Hook::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Hook::ALL.iter().map(|h| h.name()).collect();
        format!("unknown hook {s:?}; hooks are {}", names.join(", "))
    })
}

fn parse_deadline(s: &str) -> Result<(Hook, Duration), String> {
    let (hook, ms) = s.split_once('=').ok_or("expected HOOK=MILLISECONDS")?;
    let ms: u64 = ms.parse().map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
    if ms == 0 {
        return Err("a deadline must be at least 1 ms".into());
    }
    Ok((parse_hook(hook)?, Duration::from_millis(ms)))
}

/// `123`, `64K`, `256M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_owned(), 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_owned(), 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_owned(), 30),
        t => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 256M, 1G)"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Logs to stderr: `serve` at `info` unless told otherwise (a line per
/// transfer state change), the other commands at `warn` (their output is
/// the answer); text or JSON lines.
fn init_logging(cli: &Cli) {
    let default = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let wanted = cli.log.as_deref().unwrap_or(default);
    let filter = tracing_subscriber::EnvFilter::try_new(wanted).unwrap_or_else(|e| {
        eprintln!("warning: bad --log filter {wanted:?} ({e}); using {default:?}");
        tracing_subscriber::EnvFilter::new(default)
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        // Spans' fields (a plugin line's plugin, hook and shard) go in each line.
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

/// The `ferry` binary: parses the command line, sets up logging, runs.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line; the exit code says whether it worked.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Transfer(command) => transfer(command).await,
        Command::Cluster(command) => cluster(command).await,
        Command::Config(ConfigCommand::Check { file }) => config_check(file),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Shards { node, engine, shard, json } => {
            let mut path = String::from("/v1/shards");
            if let Some(engine) = &engine {
                crate::plugin::types::check_engine_name(engine).map_err(anyhow::Error::msg)?;
                path.push_str(&format!("?engine={engine}"));
            }
            if let Some(shard) = &shard {
                crate::install::layout::check_shard_id(shard).map_err(anyhow::Error::msg)?;
                path.push_str(&format!("&shard={shard}"));
            }
            let rows: Vec<serde_json::Value> = node.client()?.call(hyper::Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for row in &rows {
                    let replicas: Vec<String> = row["replicas"]
                        .as_object()
                        .map(|m| {
                            m.iter().map(|(node, state)| format!("{node}={}", state.as_str().unwrap_or("?"))).collect()
                        })
                        .unwrap_or_default();
                    println!(
                        "{}/{}  {}",
                        row["engine"].as_str().unwrap_or("?"),
                        row["shard"].as_str().unwrap_or("?"),
                        replicas.join(" ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Check { file, runtime, json }) => check(&file, &runtime, json).await,
        Command::Plugin(PluginCommand::List { node, json }) => plugin_list(&node, json).await,
        Command::Plugin(PluginCommand::Install { file, node, upgrade, wait, json }) => {
            plugin_install(&file, &node, upgrade, wait, json).await
        }
        Command::Plugin(PluginCommand::Activate { engine, hash, node, wait, json }) => {
            plugin_activate(&engine, &hash, &node, wait, json).await
        }
        Command::Plugin(PluginCommand::Remove { engine, hash, node, json }) => {
            plugin_remove(&engine, &hash, &node, json).await
        }
        Command::Plugin(PluginCommand::New { name, lang, dir }) => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let written = crate::api::new_plugin::write(&name, &lang, &dir)?;
            println!("plugin {name} written to {}: {}", dir.display(), written.join(", "));
            let build = match lang.as_str() {
                "rust" => "cargo build --release --target wasm32-wasip2",
                _ => "./build.sh",
            };
            println!("build: cd {} && {build} (see README.md)", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Test { file, shard_dir, mutate, repeat, runtime, json }) => {
            conformance_test(file, shard_dir, mutate, repeat, &runtime, json).await
        }
        Command::Plugin(PluginCommand::RunHook {
            file,
            hook,
            shard_dir,
            shard,
            meta,
            meta_file,
            since,
            epoch,
            delta_meta_file,
            runtime,
            json,
        }) => {
            let meta = match (meta, meta_file) {
                (Some(text), _) => Some(parse_meta(&text)?),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    Some(parse_meta(&text).with_context(|| format!("in {}", path.display()))?)
                }
                (None, None) => None,
            };
            let delta_meta = match delta_meta_file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    Some(parse_delta_meta(&text).with_context(|| format!("in {}", path.display()))?)
                }
                None => None,
            };
            let args = LiveArgs { since, epoch, delta_meta };
            run_hook(&file, hook, shard_dir.as_deref(), shard, meta, args, &runtime, json).await
        }
    }
}

async fn check(file: &Path, args: &RuntimeArgs, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = PluginRuntime::new(args.config()?)?;
    let plugin = runtime.load(file).await?;
    let info = plugin.info();
    let hooks: Vec<&str> = plugin.hooks().iter().map(|h| h.name()).collect();
    if json {
        let out = json!({
            "path": file,
            "engine": info.name,
            "plugin_version": info.plugin_version,
            "snapshot_format": info.snapshot_format,
            "contract": plugin.contract().package(),
            "hash": plugin.hash(),
            "hooks": hooks,
            "compile_ms": plugin.compile_time().as_millis() as u64,
            "from_cache": plugin.from_cache(),
            "pooling": runtime.pooling(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("plugin           {}", file.display());
        println!("engine           {}", info.name);
        println!("plugin version   {}", info.plugin_version);
        println!("contract         {}", plugin.contract().package());
        println!("snapshot format  {}", info.snapshot_format);
        println!("blake3           {}", plugin.hash());
        println!("hooks            {}", hooks.join(", "));
        println!(
            "compiled in      {:.1?}{}",
            plugin.compile_time(),
            if plugin.from_cache() { " (from cache)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn plugin_install(
    file: &Path,
    node: &NodeArgs,
    upgrade: bool,
    wait: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use hyper::Method;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let api = node.client()?.timeout(Duration::from_secs(120));
    let path = if upgrade { "/v1/plugins?upgrade" } else { "/v1/plugins" };
    let installed: serde_json::Value = api.call_bytes(Method::POST, path, bytes.into()).await?;
    let hash = installed["hash"].as_str().unwrap_or_default().to_owned();
    let (active, view) = wait_active(&api, &hash, wait).await?;
    let what = format!("installed {} build {hash}", file.display());
    report_rollout(
        &what,
        serde_json::json!({"installed": installed, "active": active, "cluster": view}),
        active,
        wait,
        json,
    )
}

async fn plugin_activate(engine: &str, hash: &str, node: &NodeArgs, wait: u64, json: bool) -> anyhow::Result<ExitCode> {
    let api = node.client()?.timeout(Duration::from_secs(60));
    let hash = full_hash(&api, engine, hash).await?;
    let path = format!("/v1/plugins/{engine}/activate");
    let plugins: serde_json::Value =
        api.call(hyper::Method::POST, &path, Some(&serde_json::json!({"hash": hash}))).await?;
    let (active, view) = wait_active(&api, &hash, wait).await?;
    let what = format!("activated {engine} build {hash}");
    report_rollout(
        &what,
        serde_json::json!({"plugins": plugins, "active": active, "cluster": view}),
        active,
        wait,
        json,
    )
}

async fn plugin_remove(engine: &str, hash: &str, node: &NodeArgs, json: bool) -> anyhow::Result<ExitCode> {
    let api = node.client()?.timeout(Duration::from_secs(60));
    let hash = full_hash(&api, engine, hash).await?;
    let plugins: serde_json::Value =
        api.call(hyper::Method::DELETE, &format!("/v1/plugins/{engine}/{hash}"), None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plugins)?);
    } else {
        println!("removed {engine} build {hash}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The installed build of `engine` whose BLAKE3 starts with `prefix`.
async fn full_hash(api: &crate::http::ApiClient, engine: &str, prefix: &str) -> anyhow::Result<String> {
    if prefix.len() == 64 {
        return Ok(prefix.to_owned());
    }
    anyhow::ensure!(prefix.len() >= 8, "give at least 8 digits of the build's BLAKE3");
    let view: serde_json::Value = api.call(hyper::Method::GET, "/v1/cluster/plugins", None).await?;
    let builds: Vec<String> = view["engines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["engine"] == engine)
        .flat_map(|e| e["builds"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["hash"].as_str().map(str::to_owned))
        .filter(|h| h.starts_with(prefix))
        .collect();
    match builds.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{engine} has no installed build whose BLAKE3 starts with {prefix}"),
        _ => bail!("{prefix} names {} builds of {engine}: give more digits", builds.len()),
    }
}

/// Polls until `hash` is its engine's active build on every member (at most
/// `wait` seconds); whether it is, and the last view.
async fn wait_active(api: &crate::http::ApiClient, hash: &str, wait: u64) -> anyhow::Result<(bool, serde_json::Value)> {
    if wait == 0 {
        return Ok((false, serde_json::Value::Null));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        let view: serde_json::Value = api.call(hyper::Method::GET, "/v1/cluster/plugins", None).await?;
        let engines = view["engines"].as_array().cloned().unwrap_or_default();
        let active = engines
            .iter()
            .any(|e| e["rollout"]["hash"] == hash && e["rollout"]["active"] == true && e["consistent"] == true);
        if active || tokio::time::Instant::now() >= deadline {
            return Ok((active, view));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn report_rollout(what: &str, out: serde_json::Value, active: bool, wait: u64, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if wait == 0 {
        println!("{what}; rolling out");
    } else if active {
        println!("{what}: active on every member");
    } else {
        println!("{what}: not active on every member within {wait} s");
    }
    Ok(if wait == 0 || active { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn plugin_list(node: &NodeArgs, json: bool) -> anyhow::Result<ExitCode> {
    let view: serde_json::Value = node.client()?.call(hyper::Method::GET, "/v1/cluster/plugins", None).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    for engine in view["engines"].as_array().into_iter().flatten() {
        let verdict = if engine["consistent"].as_bool() == Some(true) { "same build everywhere" } else { "DIFFERS" };
        println!("{}: {verdict}", engine["engine"].as_str().unwrap_or("?"));
        for (member, p) in engine["members"].as_object().into_iter().flatten() {
            let hash = p["hash"].as_str().unwrap_or("");
            println!(
                "  {member:<20} {:<10} {:<20} {}",
                p["plugin_version"].as_str().unwrap_or("?"),
                p["contract"].as_str().unwrap_or("?"),
                &hash[..hash.len().min(16)]
            );
        }
        for build in engine["builds"].as_array().into_iter().flatten() {
            let hash = build["hash"].as_str().unwrap_or("");
            let role = match (build["active"].as_bool(), build["rolling"].as_bool()) {
                (Some(true), _) => "active",
                (_, Some(true)) => "rolling out",
                _ => "installed",
            };
            let ready = build["ready"].as_array().map_or(0, Vec::len);
            println!(
                "  build {} {:<10} {role:<12} ready on {ready}",
                &hash[..hash.len().min(16)],
                build["version"].as_str().unwrap_or("?")
            );
        }
        for pin in engine["pinned"].as_array().into_iter().flatten() {
            let hash = pin["hash"].as_str().unwrap_or("");
            println!(
                "  transfer {} pinned to {}",
                pin["transfer"].as_str().unwrap_or("?"),
                &hash[..hash.len().min(16)]
            );
        }
    }
    for (member, why) in view["unreachable"].as_object().into_iter().flatten() {
        println!("unreachable: {member}: {}", why.as_str().unwrap_or(""));
    }
    Ok(ExitCode::SUCCESS)
}

async fn conformance_test(
    plugin: PathBuf,
    shard_dir: PathBuf,
    mutate: Option<String>,
    repeat: u32,
    runtime: &RuntimeArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !shard_dir.is_dir() {
        bail!("--shard-dir {} is not a directory", shard_dir.display());
    }
    let options = crate::conformance::KitOptions {
        plugin,
        shard_dir,
        repeat: repeat as usize,
        mutate,
        runtime: runtime.config()?,
    };
    let report = crate::conformance::run(&options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::conformance::render(&report));
    }
    Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `ferry config check`: loads and checks a config; prints what it sets.
fn config_check(file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let Some(path) = file.map_or_else(crate::node::config::conventional_path, |f| Ok(Some(f)))? else {
        bail!("no config file given, and none at $XDG_CONFIG_HOME/ferry/ferry.toml or /etc/ferry/ferry.toml");
    };
    let config = Config::load(&path)?;
    config.check().with_context(|| format!("config {}", path.display()))?;
    let auth = match (&config.auth, &config.token_file) {
        (Some(_), _) => "scoped tokens ([auth])".to_owned(),
        (None, Some(file)) => format!("one token, {}", file.display()),
        (None, None) => format!("one token, {}", config.data_dir.join("state/token").display()),
    };
    println!(
        "{}: ok: node {} on {} ({}), data in {}, {auth}",
        path.display(),
        config.node_id,
        config.listen,
        if config.tls.is_some() { "TLS" } else { "plain HTTP" },
        config.data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let path = match args.config.clone() {
        Some(path) => Some(path),
        None => crate::node::config::conventional_path()?,
    };
    let mut config = match &path {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.plugins_dir {
        config.plugins_dir = Some(v);
    }
    if let Some(v) = args.token_file {
        config.token_file = Some(v);
    }
    if let Some(v) = args.rate_limit {
        config.rate_limit = Some(v);
    }
    if let Some(v) = args.max_incoming {
        config.max_incoming = v;
    }
    if let Some(v) = args.max_outgoing {
        config.max_outgoing = v;
    }
    if let Some(v) = args.max_attempts {
        config.max_attempts = v;
    }
    if args.node_token_file.is_some() {
        config.token_file = None;
        config.auth = Some(AuthFiles {
            node_token_file: args.node_token_file,
            admin_token_file: args.admin_token_file,
            read_token_file: args.read_token_file,
        });
    }
    if let (Some(cert_file), Some(key_file), Some(ca_file)) = (args.tls_cert, args.tls_key, args.tls_ca) {
        config.tls = Some(crate::http::tls::TlsFiles { cert_file, key_file, ca_file });
    }
    config.allowed_sources.extend(args.allow_sources);
    if let Some(v) = args.max_connections {
        config.max_connections = v;
    }
    if let Some(v) = args.request_timeout {
        config.request_timeout = v;
    }
    if let Some(v) = args.pause_budget_ms {
        config.pause_budget_ms = v;
    }
    if let Some(v) = args.stall_timeout {
        config.stall_timeout = v;
    }

    // Before anything opens files or sockets (idempotent: the server asks again).
    crate::api::conn::raise_fd_limit();
    // Bind first: the address is part of the node's identity in the cluster.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let node = std::sync::Arc::new(Node::open(config, addr).await?);
    let engines: Vec<String> = node.plugins.iter().map(|p| p.info().name.clone()).collect();
    // One line on stdout when ready: scripts and tests wait for it.
    println!("ferry node {} listening on {} (engines: {})", node.config.node_id, node.addr(), engines.join(", "));
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let ready = format!("READY=1\nSTATUS=listening on {} (engines: {})", node.addr(), engines.join(", "));
    crate::api::sd_notify::notify(&ready);

    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        signals.cancel();
    });
    tokio::spawn(crate::node::registrar::run(node.clone(), shutdown.clone()));
    tokio::spawn(crate::node::conductor::run(node.clone(), shutdown.clone()));
    crate::api::server::serve(node.clone(), listener, shutdown).await?;
    crate::api::sd_notify::notify("STOPPING=1");
    node.consensus.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn transfer(command: TransferCommand) -> anyhow::Result<ExitCode> {
    use hyper::Method;
    match command {
        TransferCommand::Start { node, engine, shard, source, target, kind, wait, json } => {
            let api = node.client()?;
            if target.is_none() && source.is_none() {
                bail!("give --target (a transfer in the cluster) or --source URL (a pull into --node)");
            }
            let body = json!({ "engine": engine, "shard": shard, "source": source, "target": target, "kind": kind });
            let status: TransferStatus = api.call(Method::POST, "/v1/transfers", Some(&body)).await?;
            if !wait {
                print_status(&status, json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let status = watch(&api, &status.id, !json).await?;
            print_status(&status, json)?;
            Ok(if status.state == State::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        TransferCommand::Status { node, id, json } => {
            let status: TransferStatus = node.client()?.call(Method::GET, &format!("/v1/transfers/{id}"), None).await?;
            print_status(&status, json)?;
            Ok(ExitCode::SUCCESS)
        }
        TransferCommand::List { node, json } => {
            let list: Vec<TransferStatus> = node.client()?.call(Method::GET, "/v1/transfers", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for status in &list {
                    println!("{}", status_line(status));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TransferCommand::Cancel { node, id, json } => {
            let status: TransferStatus =
                node.client()?.call(Method::DELETE, &format!("/v1/transfers/{id}"), None).await?;
            print_status(&status, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn cluster(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    use hyper::Method;
    let (status, json): (ClusterStatus, bool) = match command {
        ClusterCommand::InitCa { dir, name } => {
            let (cert, key) = crate::api::pki::init_ca(&dir, &name)?;
            println!("cluster CA: {} (key {}, keep it offline)", cert.display(), key.display());
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::IssueCert { ca_dir, name, hosts, out } => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let (cert, key) = crate::api::pki::issue_cert(&ca_dir, &name, &hosts, &out)?;
            println!("node {name}: {} (key {})", cert.display(), key.display());
            return Ok(ExitCode::SUCCESS);
        }
        ClusterCommand::Join { node, to, json } => {
            // A join waits for the cluster to take the node in and replicate to it.
            let api = node.client()?.timeout(Duration::from_secs(120));
            (api.call(Method::POST, "/v1/cluster/join", Some(&json!({ "to": to }))).await?, json)
        }
        ClusterCommand::Leave { node, json } => {
            (node.client()?.call(Method::POST, "/v1/cluster/leave", None).await?, json)
        }
        ClusterCommand::Status { node, json } => (node.client()?.call(Method::GET, "/v1/cluster", None).await?, json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        let leader =
            status.leader.as_ref().map(|l| format!("{} ({})", l.name, l.addr)).unwrap_or_else(|| "none".into());
        println!(
            "node {} is {}; leader {leader}; term {}; last applied {}",
            status.node, status.state, status.term, status.last_applied
        );
        for m in &status.members {
            println!("  {:<16} {:<28} {}", m.name, m.addr, if m.voter { "voter" } else { "learner" });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls a transfer until it ends, drawing a progress bar when asked.
async fn watch(api: &ApiClient, id: &str, bar: bool) -> anyhow::Result<TransferStatus> {
    use indicatif::{ProgressBar, ProgressStyle};
    let progress = if bar { ProgressBar::new(0) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("{prefix} {msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    loop {
        let status: TransferStatus = api.call(hyper::Method::GET, &format!("/v1/transfers/{id}"), None).await?;
        progress.set_prefix(format!("{}/{}", status.engine, status.shard));
        progress.set_length(status.bytes_total);
        progress.set_position(status.bytes_done);
        progress.set_message(status.stage.to_string());
        if status.state.is_final() {
            progress.finish_and_clear();
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn status_line(s: &TransferStatus) -> String {
    let mut line = format!(
        "{}  {}/{}  {} ({})  {}/{} bytes  {}/{} files  from {}",
        s.id, s.engine, s.shard, s.state, s.stage, s.bytes_done, s.bytes_total, s.files_done, s.files_total, s.source
    );
    if s.resumed_files > 0 {
        line.push_str(&format!("  resumed {} files", s.resumed_files));
    }
    if !s.rounds.is_empty() {
        let bytes: Vec<String> = s.rounds.iter().map(|r| r.bytes.to_string()).collect();
        line.push_str(&format!("  {} catch-up rounds (bytes {})", s.rounds.len(), bytes.join(", ")));
    }
    if let Some(pause) = s.pause_ms {
        let over = if s.pause_over_budget { " OVER BUDGET" } else { "" };
        line.push_str(&format!("  pause_ms {pause}{over}"));
    }
    if let Some(build) = &s.plugin {
        line.push_str(&format!("  plugin {} ({})", build.version, &build.hash[..build.hash.len().min(12)]));
    }
    if let Some(error) = &s.error {
        line.push_str(&format!("\n  error: {error}"));
    }
    line
}

fn print_status(status: &TransferStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(status)?);
    } else {
        println!("{}", status_line(status));
    }
    Ok(())
}

/// A meta, a whole plan whose meta is taken, or `run-hook --json` output
/// around a plan.
fn parse_meta(text: &str) -> anyhow::Result<SnapshotMeta> {
    const WHAT: &str = "--meta is neither a snapshot meta {term, position, attributes} nor a plan";
    let mut value: serde_json::Value = serde_json::from_str(text).context(WHAT)?;
    if let Some(inner) = value.get_mut("ok") {
        value = inner.take();
    }
    if let Some(meta) = value.get_mut("meta") {
        value = meta.take();
    }
    serde_json::from_value::<SnapshotMeta>(value).context(WHAT)
}

/// A delta meta, a whole delta plan whose meta is taken, or `run-hook --json`
/// output around one.
fn parse_delta_meta(text: &str) -> anyhow::Result<DeltaMeta> {
    const WHAT: &str = "--delta-meta-file holds neither a delta meta {term, since, until, attributes} nor a plan";
    let mut value: serde_json::Value = serde_json::from_str(text).context(WHAT)?;
    if let Some(inner) = value.get_mut("ok") {
        value = inner.take();
    }
    if let Some(meta) = value.get_mut("meta") {
        value = meta.take();
    }
    serde_json::from_value::<DeltaMeta>(value).context(WHAT)
}

fn parse_position(s: &str) -> Result<ShardPosition, String> {
    let parse = || {
        let (term, position) = s.split_once(':')?;
        Some(ShardPosition { term: term.parse().ok()?, position: position.parse().ok()? })
    };
    parse().ok_or_else(|| format!("{s:?} is not TERM:POSITION"))
}

/// What the live hooks of `run-hook` take besides a snapshot meta.
struct LiveArgs {
    since: Option<ShardPosition>,
    epoch: Option<u64>,
    delta_meta: Option<DeltaMeta>,
}

#[allow(clippy::too_many_arguments)]
async fn run_hook(
    file: &Path,
    hook: Hook,
    shard_dir: Option<&Path>,
    shard: Option<String>,
    meta: Option<SnapshotMeta>,
    live: LiveArgs,
    args: &RuntimeArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let dir = match (hook, shard_dir) {
        (Hook::Describe, _) => None,
        (_, Some(dir)) => {
            if !dir.is_dir() {
                bail!("--shard-dir {} is not a directory", dir.display());
            }
            Some(dir)
        }
        (_, None) => bail!("{hook} needs --shard-dir"),
    };
    let shard =
        shard.or_else(|| dir.and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
    let needs_meta = matches!(hook, Hook::TermCheck | Hook::Validate | Hook::Apply | Hook::CheckFiles);
    let meta = match meta {
        Some(meta) => meta,
        None if needs_meta => bail!("{hook} needs --meta or --meta-file"),
        None => SnapshotMeta { term: 0, position: 0, attributes: Vec::new() },
    };
    let missing = |what| anyhow::anyhow!("{hook} needs {what}");
    let live = match hook {
        Hook::ChangesSince => LiveCall::Since(live.since.ok_or_else(|| missing("--since TERM:POSITION"))?),
        Hook::DeltaCheck | Hook::ApplyChanges => {
            LiveCall::Delta(live.delta_meta.ok_or_else(|| missing("--delta-meta-file"))?)
        }
        Hook::Fence | Hook::Unfence | Hook::Retire => LiveCall::Epoch(live.epoch.ok_or_else(|| missing("--epoch"))?),
        _ => LiveCall::None,
    };

    let runtime = PluginRuntime::new(args.config()?)?;
    let plugin = runtime.load(file).await?;
    let result = call_hook(&plugin, hook, &shard, dir, &meta, &live).await;
    match result {
        Ok(value) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&json!({ "hook": hook, "ok": value }))?);
            } else {
                println!("{hook}: ok");
                if !value.is_null() {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                let out = json!({ "hook": hook, "error": e.to_string(), "engine_error": e.engine_error() });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The regular files under `dir`, as relative `/`-separated paths, sorted.
fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file()
                && let Ok(rel) = entry.path().strip_prefix(dir)
            {
                files.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The argument of a live hook.
enum LiveCall {
    None,
    Since(ShardPosition),
    Delta(DeltaMeta),
    Epoch(u64),
}

async fn call_hook(
    plugin: &Plugin,
    hook: Hook,
    shard: &str,
    dir: Option<&Path>,
    meta: &SnapshotMeta,
    live: &LiveCall,
) -> Result<serde_json::Value, HookError> {
    let dir = dir.unwrap_or(Path::new("."));
    let (since, delta, epoch) = match live {
        LiveCall::Since(since) => (*since, None, 0),
        LiveCall::Delta(meta) => (ShardPosition { term: 0, position: 0 }, Some(meta), 0),
        LiveCall::Epoch(epoch) => (ShardPosition { term: 0, position: 0 }, None, *epoch),
        LiveCall::None => (ShardPosition { term: 0, position: 0 }, None, 0),
    };
    let empty = DeltaMeta { term: 0, since: 0, until: 0, attributes: Vec::new() };
    let delta = delta.unwrap_or(&empty);
    let value = match hook {
        Hook::Describe => serde_json::to_value(plugin.describe().await?),
        Hook::ShardStatus => serde_json::to_value(plugin.shard_status(shard, dir).await?),
        Hook::CreateSnapshot => serde_json::to_value(plugin.create_snapshot(shard, dir).await?),
        Hook::TermCheck => serde_json::to_value(plugin.term_check(shard, dir, meta).await?),
        Hook::Validate => serde_json::to_value(plugin.validate(shard, dir, meta).await?),
        Hook::Apply => serde_json::to_value(plugin.apply(shard, dir, meta).await?),
        Hook::ChangesSince => serde_json::to_value(plugin.changes_since(shard, dir, since).await?),
        Hook::DeltaCheck => serde_json::to_value(plugin.delta_check(shard, dir, delta).await?),
        Hook::ApplyChanges => serde_json::to_value(plugin.apply_changes(shard, dir, delta).await?),
        Hook::Fence => serde_json::to_value(plugin.fence(shard, dir, epoch).await?),
        Hook::Unfence => serde_json::to_value(plugin.unfence(shard, dir, epoch).await?),
        Hook::Retire => serde_json::to_value(plugin.retire(shard, dir, epoch).await?),
        Hook::CheckFiles => {
            // Every file in the directory, as a transfer checks them all.
            let paths = files_under(dir).map_err(|e| HookError {
                plugin: plugin.name(),
                hook,
                kind: crate::plugin::HookErrorKind::Sandbox(format!("listing {}: {e}", dir.display())),
            })?;
            for batch in paths.chunks(crate::plugin::MAX_CHECK_PATHS) {
                plugin.check_files(shard, dir, meta, batch).await?;
            }
            serde_json::to_value(json!({ "files": paths.len() }))
        }
    };
    Ok(value.expect("hook results serialize to JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_every_contract_the_host_loads() {
        let all: Vec<&str> = crate::plugin::ContractVersion::ALL.iter().map(|c| c.package()).collect();
        assert_eq!(crate::plugin::CONTRACTS, all.join(","));
        assert_eq!(VERSION, format!("{} (plugin contracts {})", env!("CARGO_PKG_VERSION"), crate::plugin::CONTRACTS));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn deadlines() {
        assert_eq!(parse_deadline("term-check=250").unwrap(), (Hook::TermCheck, Duration::from_millis(250)));
        assert!(parse_deadline("nope=1").unwrap_err().contains("unknown hook"));
        assert!(parse_deadline("apply=0").is_err());
        assert!(parse_deadline("apply").is_err());
    }

    #[test]
    fn meta_from_plan_or_meta() {
        let meta = parse_meta(r#"{"term":3,"position":9,"attributes":[["a","b"]]}"#).unwrap();
        assert_eq!(meta.term, 3);
        let plan = parse_meta(r#"{"meta":{"term":4,"position":1,"attributes":[]},"entries":[]}"#).unwrap();
        assert_eq!(plan.term, 4);
        let wrapped = parse_meta(
            r#"{"hook":"create-snapshot","ok":{"meta":{"term":5,"position":1,"attributes":[]},"entries":[]}}"#,
        )
        .unwrap();
        assert_eq!(wrapped.term, 5);
        assert!(parse_meta("{}").is_err());
    }

    #[test]
    fn live_arguments() {
        assert_eq!(parse_position("3:4096").unwrap(), ShardPosition { term: 3, position: 4096 });
        assert!(parse_position("3").is_err() && parse_position("a:1").is_err());
        let wrapped = parse_delta_meta(
            r#"{"hook":"changes-since","ok":{"meta":{"term":5,"since":1,"until":9,"attributes":[]},"entries":[]}}"#,
        )
        .unwrap();
        assert_eq!((wrapped.term, wrapped.since, wrapped.until), (5, 1, 9));
        assert!(parse_delta_meta(r#"{"term":1}"#).is_err());
    }
}
