//! The node's HTTP API (hyper 1, HTTP/1.1). Every endpoint needs
//! `Authorization: Bearer <token>`; anything else gets 401 and no work.
//!
//! | method | path | |
//! | --- | --- | --- |
//! | GET | `/v1/health` | node id and consensus health (503 when unhealthy) |
//! | GET | `/v1/plugins` | loaded plugins (engine, versions, contract, BLAKE3 of the component) |
//! | POST | `/v1/plugins[?upgrade]` | install a plugin build into the cluster (body: the component); a build of an engine that has a plugin needs `upgrade` |
//! | POST | `/v1/plugins/{engine}/activate` | roll an installed build out again (`{"hash"}`): a roll back |
//! | DELETE | `/v1/plugins/{engine}/{hash}` | forget an installed build that is not active and no live transfer uses |
//! | GET | `/v1/plugins/blobs/{hash}` | a stored plugin build, for a member rolling it out |
//! | GET | `/v1/cluster/plugins` | every member's plugins by engine, and whether all run the same build |
//! | GET | `/v1/shards[?engine=E[&shard=S]]` | the replica table (of one engine, or one shard) |
//! | GET, POST | `/v1/engines/{engine}/shards/{shard}/snapshot` | stream a snapshot (POST: resume) |
//! | POST | `/v1/engines/{engine}/shards/{shard}/changes` | stream a catch-up round `{since}` |
//! | POST | `/v1/transfers` | start pulling `{engine, shard, source}` |
//! | GET | `/v1/transfers`, `/v1/transfers/{id}` | status |
//! | DELETE | `/v1/transfers/{id}` | cancel |

// Handlers return a ready answer as their error; it is built once per
// request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::conn::{self, ConnInfo};
use crate::consensus::network::FullSnapshot;
use crate::consensus::state::{Applied, Command, ReplicaState, ShardKey, TransferKind, TransferStage, clip};
use crate::consensus::{ConsensusError, JoinRequest, NotLeaderOr, TypeConfig};
use crate::http::{Body, SNAPSHOT_ID_HEADER, TRANSFER_EPOCH_HEADER, TRANSFER_ID_HEADER, error_response, json_response};
use crate::install::layout::check_shard_id;
use crate::node::credentials::{Grant, Scope};
use crate::node::{Node, rollout};
use crate::plugin::ShardPosition;
use crate::stream::client::{ChangesAnswer, ChangesRequest};
use crate::stream::source::{self, StreamContext};
use crate::stream::{FailureCode, ResumeRequest, delta};
use crate::transfer::{Stage, StartError, State, TransferRequest, TransferStatus};

/// A shard's replicas: node id to state.
type Replicas = std::collections::BTreeMap<u64, ReplicaState>;

/// Largest request body (a resume request lists up to 100,000 files).
pub const MAX_REQUEST_BODY: usize = 64 << 20;
/// How long a status listing waits for another node's progress.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the API on `listener` until `shutdown` fires, then stops accepting,
/// cancels transfers (they clean up their staging) and lets open requests
/// finish for a few seconds.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let fd_limit = conn::raise_fd_limit();
    let write_timeout = Duration::from_secs(node.config.stall_timeout);
    let limits = conn::Limits::new(node.config.max_connections, fd_limit, write_timeout);
    tracing::info!(fd_limit, max_connections = limits.max, "serving");
    let handler = {
        let node = node.clone();
        move |req, info: Arc<ConnInfo>| {
            let node = node.clone();
            async move { handle(&node, req, &info).await }
        }
    };
    let graceful = conn::accept(listener, node.tls.clone(), limits, shutdown, handler).await;
    tracing::info!("shutting down");
    node.transfers.shutdown(Duration::from_secs(10)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// What an endpoint needs from the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// The operator page's own HTML: holds no data (its script asks for a
    /// token, and calls the API with it).
    Nothing,
    Scope(Scope),
    /// Membership: an operator's, or a member leaving through its leader.
    AdminOrNode,
}

/// The credential each endpoint needs; unknown endpoints need `read` (and
/// then answer 404).
fn need(method: &Method, path: &[&str]) -> Need {
    use Scope::*;
    match (method, path) {
        (&Method::POST, ["v1", "raft", _])
        | (&Method::GET, ["v1", "raft", "transfers", _])
        | (&Method::POST, ["v1", "cluster", "members"])
        | (&Method::GET, ["v1", "cluster", "proof"])
        | (_, ["v1", "engines", _, "shards", _, "snapshot" | "changes" | "fence"]) => Need::Scope(Node),
        (&Method::DELETE, ["v1", "cluster", "members", _]) => Need::AdminOrNode,
        (&Method::GET, ["v1", "plugins", "blobs", _]) => Need::Scope(Node),
        (&Method::POST, ["v1", "cluster", "join" | "leave"])
        | (&Method::POST, ["v1", "plugins"])
        | (&Method::POST, ["v1", "plugins", _, "activate"])
        | (&Method::DELETE, ["v1", "plugins", _, _])
        | (&Method::POST, ["v1", "transfers"])
        | (&Method::DELETE, ["v1", "transfers", _]) => Need::Scope(Admin),
        (&Method::GET, ["ui"]) => Need::Nothing,
        _ => Need::Scope(Read),
    }
}

/// Checks the caller's token against what the endpoint needs. With TLS, a
/// node credential also needs the connection's client certificate from the
/// cluster CA.
fn authorize(node: &Node, req: &Request<Incoming>, info: &ConnInfo, need: Need) -> Result<(), Response<Body>> {
    if let Need::Nothing = need {
        return Ok(());
    }
    let token = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let Some(grant) = token.and_then(|t| node.credentials.check(t)) else {
        let mut response = error_response(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token");
        // An unauthenticated connection is not kept for another try.
        response.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
        return Err(response);
    };
    info.proven();
    let as_node = |grant: Grant| {
        if node.tls.is_some() && !info.verified_client {
            Err(forbidden("node requests need a client certificate from the cluster CA".into()))
        } else if grant.node {
            Ok(())
        } else {
            Err(forbidden("this endpoint needs the node credential".into()))
        }
    };
    match need {
        Need::Nothing => Ok(()),
        Need::Scope(Scope::Node) => as_node(grant),
        Need::AdminOrNode if grant.admin => Ok(()),
        Need::AdminOrNode => as_node(grant),
        Need::Scope(scope) if grant.allows(scope) => Ok(()),
        Need::Scope(scope) => Err(forbidden(format!("this endpoint needs the {} credential", scope.name()))),
    }
}

fn forbidden(message: String) -> Response<Body> {
    error_response(StatusCode::FORBIDDEN, "forbidden", message)
}

async fn handle(node: &Node, req: Request<Incoming>, info: &ConnInfo) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    if let Err(response) = authorize(node, &req, info, need(&method, &segments)) {
        return response;
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "health"]) => health(node),
        (&Method::GET, ["metrics"]) => metrics(node, &req),
        (&Method::GET, ["ui"]) => ui(),
        (&Method::GET, ["v1", "plugins"]) => plugins(node),
        (&Method::POST, ["v1", "plugins"]) => match read_body_and_query(node, req).await {
            Err(response) => response,
            Ok((body, _)) if body.is_empty() => bad_request("send the plugin component (.wasm) as the body"),
            Ok((body, req_query)) => {
                let upgrade = query_flag(&req_query, "upgrade");
                let how = if upgrade { rollout::Install::Upgrade } else { rollout::Install::New };
                match rollout::install(node, body.to_vec(), how).await {
                    Ok(builds) => json_response(StatusCode::OK, &builds),
                    Err(e) if e.contains("collides") => error_response(StatusCode::CONFLICT, "engine-taken", e),
                    Err(e) => error_response(StatusCode::BAD_REQUEST, "bad-plugin", e),
                }
            }
        },
        (&Method::POST, ["v1", "plugins", engine, "activate"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Body {
                hash: String,
            }
            let engine = engine.to_string();
            match read_json::<Body>(node, req).await {
                Ok(Some(body)) => {
                    let command = Command::ActivatePlugin { engine: engine.clone(), hash: body.hash };
                    plugin_change(node, &engine, command).await
                }
                Ok(None) => bad_request("expected {\"hash\": \"<BLAKE3 of an installed build>\"}"),
                Err(response) => response,
            }
        }
        (&Method::DELETE, ["v1", "plugins", engine, hash]) => {
            let command = Command::RemovePlugin { engine: engine.to_string(), hash: hash.to_string() };
            plugin_change(node, engine, command).await
        }
        (&Method::GET, ["v1", "plugins", "blobs", hash]) => match rollout::read_blob(node, hash) {
            Some(bytes) => Response::builder()
                .status(StatusCode::OK)
                .header(hyper::header::CONTENT_TYPE, "application/wasm")
                .body(crate::http::full(bytes))
                .expect("valid response"),
            None => not_found(format!("no plugin build {hash} here")),
        },
        (&Method::GET, ["v1", "shards"]) => shards(node, req.uri().query()),
        (&Method::GET, ["v1", "cluster"]) => json_response(StatusCode::OK, &node.consensus.status()),
        (&Method::GET, ["v1", "cluster", "proof"]) => membership_proof(node, &req),
        (&Method::POST, ["v1", "cluster", "join"]) => join(node, req).await,
        (&Method::POST, ["v1", "cluster", "leave"]) => match node.consensus.leave().await {
            Ok(()) => {
                node.rescan_shards();
                json_response(StatusCode::OK, &node.consensus.status())
            }
            Err(e) => consensus_error(e),
        },
        (&Method::POST, ["v1", "cluster", "members"]) => add_member(node, req).await,
        (&Method::DELETE, ["v1", "cluster", "members", id]) => match id.parse() {
            Ok(id) => leader_answer(node.consensus.remove_member(id).await),
            Err(_) => bad_request(format!("{id:?} is not a node id")),
        },
        // A transfer as this node has applied it (committed), for a peer
        // that cannot hear the leader: see `Consensus::ended_at_a_peer`.
        (&Method::GET, ["v1", "raft", "transfers", id]) => {
            json_response(StatusCode::OK, &node.consensus.state().transfers.get(*id))
        }
        (&Method::POST, ["v1", "raft", rpc]) => {
            let rpc = rpc.to_string();
            raft_rpc(node, &rpc, req).await
        }
        (&Method::POST, ["v1", "engines", engine, "shards", shard, "fence"]) => {
            let (engine, shard) = (engine.to_string(), shard.to_string());
            fence(node, &engine, &shard, &req).await
        }
        (&Method::GET | &Method::POST, ["v1", "engines", engine, "shards", shard, "snapshot"]) => {
            let (engine, shard) = (engine.to_string(), shard.to_string());
            snapshot(node, &engine, &shard, req).await
        }
        (&Method::GET, ["v1", "cluster", "plugins"]) => cluster_plugins(node).await,
        (&Method::POST, ["v1", "engines", engine, "shards", shard, "changes"]) => {
            let (engine, shard) = (engine.to_string(), shard.to_string());
            changes(node, &engine, &shard, req).await
        }
        (&Method::POST, ["v1", "transfers"]) => start_transfer(node, req).await,
        (&Method::GET, ["v1", "transfers"]) => list_transfers(node).await,
        (&Method::GET, ["v1", "transfers", "local"]) => json_response(StatusCode::OK, &node.transfers.list()),
        (&Method::GET, ["v1", "transfers", id]) => match transfer_status(node, id).await {
            Some(status) => json_response(StatusCode::OK, &status),
            None => not_found(format!("no transfer {id}")),
        },
        (&Method::GET, ["v1", "transfers", id, "local"]) => match node.transfers.get(id) {
            Some(status) => json_response(StatusCode::OK, &status),
            None => not_found(format!("no transfer {id} runs here")),
        },
        (&Method::DELETE, ["v1", "transfers", id]) => cancel_transfer(node, id).await,
        (&Method::GET, ["v1", "engines", engine, "shards", shard, "status"]) => {
            let (engine, shard) = (engine.to_string(), shard.to_string());
            shard_status(node, &engine, &shard).await
        }
        _ => not_found(format!("no endpoint {method} {path}")),
    }
}

fn not_found(message: String) -> Response<Body> {
    error_response(StatusCode::NOT_FOUND, "not-found", message)
}

fn bad_request(message: impl Into<String>) -> Response<Body> {
    error_response(StatusCode::BAD_REQUEST, "bad-request", message)
}

/// Reads a request body within the node-wide budget of bodies in flight, a
/// size bound and a deadline.
async fn read_body(node: &Node, req: Request<Incoming>) -> Result<bytes::Bytes, Response<Body>> {
    use hyper::body::Body as _;
    let declared = req.body().size_hint().exact().map(|n| n as usize);
    if declared == Some(0) {
        return Ok(bytes::Bytes::new());
    }
    if declared.is_some_and(|n| n > MAX_REQUEST_BODY) {
        let message = format!("request body of {} bytes; at most {MAX_REQUEST_BODY}", declared.unwrap_or(0));
        return Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, "bad-body", message));
    }
    let within = Duration::from_secs(node.config.request_timeout);
    // A body of unknown length reserves the most it may grow to.
    let limit = declared.unwrap_or(MAX_REQUEST_BODY);
    let kib = limit.div_ceil(1024) as u32;
    let _reserved = match tokio::time::timeout(within, node.request_budget.acquire_many(kib)).await {
        Ok(Ok(permit)) => permit,
        _ => {
            let message = "too many request bodies in flight; try again";
            return Err(error_response(StatusCode::SERVICE_UNAVAILABLE, "busy", message));
        }
    };
    crate::http::read_bounded(req.into_body(), limit, within).await.map_err(|e| match e {
        crate::http::BodyError::TooLarge(_) => {
            error_response(StatusCode::PAYLOAD_TOO_LARGE, "bad-body", format!("request body: {e}"))
        }
        crate::http::BodyError::Timeout(_) => {
            error_response(StatusCode::REQUEST_TIMEOUT, "bad-body", format!("request body: {e}"))
        }
        crate::http::BodyError::Read(_) => bad_request(format!("request body: {e}")),
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    node: &Node,
    req: Request<Incoming>,
) -> Result<Option<T>, Response<Body>> {
    let body = read_body(node, req).await?;
    if body.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&body).map(Some).map_err(|e| bad_request(format!("request body: {e}")))
}

/// 200 with the node id and its consensus view while Raft runs and a leader
/// is known; 503 with the reason (and the same fields) otherwise.
fn health(node: &Node) -> Response<Body> {
    let health = node.consensus.health();
    let mut body = json!({ "node_id": node.config.node_id, "consensus": health });
    match &health.problem {
        None => json_response(StatusCode::OK, &body),
        Some(problem) => {
            body["error"] = json!({ "code": "unhealthy", "message": problem });
            json_response(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    }
}

/// The operator page: one embedded HTML file (no build step, nothing fetched
/// from elsewhere), which polls `/v1/cluster`, `/v1/transfers` and
/// `/v1/shards` every second with the token the operator gives it.
fn ui() -> Response<Body> {
    const PAGE: &str = include_str!("ui/index.html");
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "text/html; charset=utf-8")
        // Its script and style are inline; nothing else may load or frame it.
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        )
        .header("x-content-type-options", "nosniff")
        .body(crate::http::full(PAGE))
        .expect("valid response")
}

/// Prometheus's scrape: the node's metrics (needs the `read` credential),
/// in OpenMetrics or the classic text format, as the scraper accepts.
fn metrics(node: &Node, req: &Request<Incoming>) -> Response<Body> {
    let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let (content_type, text) = crate::node::metrics::exposition(node, accept);
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(crate::http::full(text))
        .expect("valid response")
}

fn plugins(node: &Node) -> Response<Body> {
    json_response(StatusCode::OK, &local_plugins(node))
}

/// A request's body and its query string.
async fn read_body_and_query(node: &Node, req: Request<Incoming>) -> Result<(bytes::Bytes, String), Response<Body>> {
    let query = req.uri().query().unwrap_or("").to_owned();
    read_body(node, req).await.map(|body| (body, query))
}

/// Whether `?name` or `?name=true|1` is in the query.
fn query_flag(query: &str, name: &str) -> bool {
    query.split('&').any(|kv| kv == name || kv == format!("{name}=true") || kv == format!("{name}=1"))
}

/// An activate or remove: the engine's builds once this node applied it, or
/// 409 with the state's reason.
async fn plugin_change(node: &Node, engine: &str, command: Command) -> Response<Body> {
    match rollout::change(node, engine, command).await {
        Ok(builds) => json_response(StatusCode::OK, &builds.unwrap_or_default()),
        Err(e) => error_response(StatusCode::CONFLICT, "refused", e),
    }
}

/// A loaded plugin as `GET /v1/plugins` shows it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PluginInfo {
    engine: String,
    plugin_version: String,
    snapshot_format: u32,
    contract: String,
    /// BLAKE3 of the component: which build it is.
    hash: String,
    path: std::path::PathBuf,
}

fn local_plugins(node: &Node) -> Vec<PluginInfo> {
    node.plugins
        .iter()
        .map(|p| PluginInfo {
            engine: p.info().name.clone(),
            plugin_version: p.info().plugin_version.clone(),
            snapshot_format: p.info().snapshot_format,
            contract: p.contract().package().to_owned(),
            hash: p.hash().to_owned(),
            path: p.path().to_owned(),
        })
        .collect()
}

/// The plugins of every member, by engine: which build each runs (its
/// hash), and whether they all run the same. One bounded call per member,
/// all at once; a member that does not answer is named.
async fn cluster_plugins(node: &Node) -> Response<Body> {
    let state = node.consensus.state();
    let asks = state.members.iter().map(|(id, member)| {
        let name = member.name.clone();
        let api = node.peer(&member.addr).timeout(PEER_STATUS_TIMEOUT);
        let local = (*id == node.consensus.id).then(|| local_plugins(node));
        async move {
            let answer = match local {
                Some(list) => Ok(list),
                None => api.call::<Vec<PluginInfo>>(Method::GET, "/v1/plugins", None).await.map_err(|e| e.to_string()),
            };
            (name, answer)
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut engines: std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
        std::collections::BTreeMap::new();
    let mut unreachable = serde_json::Map::new();
    for (member, answer) in &answers {
        match answer {
            Ok(list) => {
                for p in list {
                    let row = json!({"plugin_version": p.plugin_version, "hash": p.hash, "contract": p.contract,
                                     "snapshot_format": p.snapshot_format});
                    engines.entry(p.engine.clone()).or_default().insert(member.clone(), row);
                }
            }
            Err(why) => {
                unreachable.insert(member.clone(), json!(why));
            }
        }
    }
    let rows: Vec<serde_json::Value> = engines
        .into_iter()
        .map(|(engine, members)| {
            let hashes: std::collections::BTreeSet<&str> =
                members.values().filter_map(|m| m["hash"].as_str()).collect();
            // Every member answered, has the plugin, and the same build of it.
            let consistent = hashes.len() == 1 && members.len() == answers.len();
            let names = |ready: &std::collections::BTreeSet<u64>| -> Vec<String> {
                ready.iter().map(|id| state.members.get(id).map_or(id.to_string(), |m| m.name.clone())).collect()
            };
            let installed = state.plugins.get(&engine);
            // The build asked for last (being rolled out, or active).
            let rollout = installed.and_then(|p| {
                let hash = p.wanted()?;
                let build = p.builds.get(hash)?;
                Some(json!({"hash": hash, "version": build.version, "active": p.active.as_ref() == Some(hash),
                            "ready": names(&build.ready)}))
            });
            let builds: Vec<serde_json::Value> = installed
                .map(|p| {
                    p.builds
                        .iter()
                        .map(|(hash, b)| {
                            json!({"hash": hash, "version": b.version, "ready": names(&b.ready),
                                   "installed_at": b.installed_at, "active": p.active.as_ref() == Some(hash),
                                   "rolling": p.rolling.as_ref() == Some(hash)})
                        })
                        .collect()
                })
                .unwrap_or_default();
            let pinned: Vec<serde_json::Value> = state
                .transfers
                .values()
                .filter(|t| t.engine == engine && t.stage.is_live() && t.plugin.is_some())
                .map(|t| json!({"transfer": t.id, "hash": t.plugin}))
                .collect();
            json!({"engine": engine, "consistent": consistent, "members": members, "rollout": rollout,
                   "builds": builds, "pinned": pinned})
        })
        .collect();
    json_response(StatusCode::OK, &json!({"engines": rows, "unreachable": unreachable}))
}

/// The replica table, from this node's applied state, with node names: all
/// of it, one engine's rows (`?engine=E`) or one row (`?engine=E&shard=S`),
/// found in O(log n) of the table's size.
fn shards(node: &Node, query: Option<&str>) -> Response<Body> {
    let (mut engine, mut shard) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("engine", value)) => engine = Some(value.to_owned()),
            Some(("shard", value)) => shard = Some(value.to_owned()),
            _ => return bad_request(format!("unknown query {:?}: engine=E and shard=S filter", clip(pair, 80))),
        }
    }
    if shard.is_some() && engine.is_none() {
        return bad_request("shard=S needs engine=E");
    }
    let state = node.consensus.state();
    let name = |id: &u64| state.members.get(id).map(|m| m.name.clone()).unwrap_or_else(|| id.to_string());
    let rows: Box<dyn Iterator<Item = (&ShardKey, &Replicas)>> = match (&engine, &shard) {
        (Some(e), Some(s)) => {
            let key = (e.clone(), s.clone());
            Box::new(state.replicas.get_key_value(&key).into_iter())
        }
        (Some(e), None) => {
            Box::new(state.replicas.range((e.clone(), String::new())..).take_while(move |((engine, _), _)| engine == e))
        }
        _ => Box::new(state.replicas.iter()),
    };
    let rows: Vec<serde_json::Value> = rows
        .map(|((engine, shard), replicas)| {
            let replicas: serde_json::Map<String, serde_json::Value> =
                replicas.iter().map(|(id, state)| (name(id), json!(state))).collect();
            json!({ "engine": engine, "shard": shard, "replicas": replicas })
        })
        .collect();
    json_response(StatusCode::OK, &rows)
}

fn consensus_error(e: ConsensusError) -> Response<Body> {
    match e {
        ConsensusError::Refused(m) => error_response(StatusCode::CONFLICT, "refused", m),
        ConsensusError::NoLeader(m) => error_response(StatusCode::SERVICE_UNAVAILABLE, "no-leader", m),
        other => error_response(StatusCode::INTERNAL_SERVER_ERROR, "consensus", other.to_string()),
    }
}

/// Maps a leader-only operation's outcome: 421 with the leader's address
/// when this node is not the leader.
fn leader_answer(result: Result<Applied, NotLeaderOr>) -> Response<Body> {
    match result {
        Ok(applied) => json_response(StatusCode::OK, &applied),
        Err(NotLeaderOr::NotLeader(not_leader)) => json_response(StatusCode::MISDIRECTED_REQUEST, &not_leader),
        Err(NotLeaderOr::Error(e)) => consensus_error(e),
    }
}

/// Answers a joining node's challenge: proves this node holds the cluster's
/// node credential without sending it (see [`crate::consensus::membership_proof`]).
fn membership_proof(node: &Node, req: &Request<Incoming>) -> Response<Body> {
    let nonce = req.uri().query().and_then(|q| q.strip_prefix("nonce=")).unwrap_or("");
    match crate::consensus::membership_proof(&node.token, nonce) {
        Ok(proof) => json_response(StatusCode::OK, &json!({ "node": node.config.node_id, "proof": proof })),
        Err(e) => bad_request(e),
    }
}

async fn join(node: &Node, req: Request<Incoming>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        to: String,
    }
    let body: Body = match read_json(node, req).await {
        Ok(Some(body)) => body,
        Ok(None) => return bad_request("expected {\"to\": \"http://host:port\"}"),
        Err(response) => return response,
    };
    match node.consensus.join(&body.to).await {
        Ok(()) => {
            node.rescan_shards();
            json_response(StatusCode::OK, &node.consensus.status())
        }
        Err(e) => consensus_error(e),
    }
}

async fn add_member(node: &Node, req: Request<Incoming>) -> Response<Body> {
    let join: JoinRequest = match read_json(node, req).await {
        Ok(Some(join)) => join,
        Ok(None) => return bad_request("expected {id, name, addr}"),
        Err(response) => return response,
    };
    if join.id != crate::consensus::raft_id(&join.name) {
        return bad_request("node id does not match the node's name");
    }
    leader_answer(node.consensus.add_member(&join).await)
}

/// Raft's own RPCs, from other members; each passes the consensus guard
/// (sender, terms, indexes, sizes) before openraft sees it.
async fn raft_rpc(node: &Node, rpc: &str, req: Request<Incoming>) -> Response<Body> {
    let raft = node.consensus.raft();
    let guard = match node.consensus.guard().await {
        Ok(guard) => guard,
        Err(e) => return consensus_error(e),
    };
    macro_rules! call {
        ($ty:ty, $method:ident, $check:ident) => {{
            let body: $ty = match read_json(node, req).await {
                Ok(Some(body)) => body,
                Ok(None) => return bad_request("empty Raft request"),
                Err(response) => return response,
            };
            if let Err(refused) = guard.$check(&body) {
                return bad_request(refused.to_string());
            }
            json_response(StatusCode::OK, &raft.$method(body).await)
        }};
    }
    match rpc {
        "append" => call!(openraft::raft::AppendEntriesRequest<TypeConfig>, append_entries, append),
        "vote" => call!(openraft::raft::VoteRequest<u64>, vote, vote),
        "install-snapshot" => {
            call!(openraft::raft::InstallSnapshotRequest<TypeConfig>, install_snapshot, install_snapshot)
        }
        "snapshot" => {
            let body: FullSnapshot = match read_json(node, req).await {
                Ok(Some(body)) => body,
                Ok(None) => return bad_request("empty snapshot"),
                Err(response) => return response,
            };
            if let Err(refused) = guard.full_snapshot(&body.vote, &body.meta, body.data.len()) {
                return bad_request(refused.to_string());
            }
            let (vote, snapshot) = body.into_parts();
            json_response(StatusCode::OK, &raft.install_full_snapshot(vote, snapshot).await)
        }
        "propose" => {
            let command: Command = match read_json(node, req).await {
                Ok(Some(command)) => command,
                Ok(None) => return bad_request("empty proposal"),
                Err(response) => return response,
            };
            leader_answer(node.consensus.propose_here(command).await)
        }
        other => not_found(format!("no Raft RPC {other}")),
    }
}

async fn snapshot(node: &Node, engine: &str, shard: &str, req: Request<Incoming>) -> Response<Body> {
    let (plugin, dir) = match served_shard(node, engine, shard, &req).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    // A consensus transfer (its headers were checked) of a live engine: the
    // snapshot may be fuzzy, the move's rounds complete it.
    let fuzzy_ok =
        req.headers().contains_key(TRANSFER_EPOCH_HEADER) && plugin.contract().has(crate::plugin::Hook::ApplyChanges);
    let resume: ResumeRequest = match read_json(node, req).await {
        Ok(resume) => resume.unwrap_or_default(),
        Err(response) => return response,
    };
    let permit = match outgoing_slot(node) {
        Ok(permit) => permit,
        Err(response) => return response,
    };
    let prepared = match source::prepare(&plugin, engine, shard, &dir, &resume).await {
        Ok(prepared) => prepared,
        Err(failure) => {
            return error_response(StatusCode::UNPROCESSABLE_ENTITY, "snapshot-failed", failure.to_string());
        }
    };
    let snapshot_id = prepared.preamble.snapshot_id.clone();
    tracing::info!(engine, shard, snapshot_id, skipped = prepared.preamble.skipped.len(), "sending snapshot");
    let chunks = source::stream(
        prepared,
        StreamContext {
            plugin,
            shard: shard.to_owned(),
            dir,
            rate: node.rate.clone(),
            permit: Some(permit),
            stall_timeout: Duration::from_secs(node.config.stall_timeout),
            fuzzy_ok,
        },
    );
    let mut response = archive_response(chunks);
    response.headers_mut().insert(SNAPSHOT_ID_HEADER, snapshot_id.parse().expect("hex snapshot ids are header values"));
    response
}

/// The plugin and live directory of a shard this node serves a stream of,
/// for a request that passed the transfer's fencing check.
async fn served_shard(
    node: &Node,
    engine: &str,
    shard: &str,
    req: &Request<Incoming>,
) -> Result<(Arc<crate::plugin::Plugin>, std::path::PathBuf), Response<Body>> {
    if node.plugins.get(engine).is_none() {
        return Err(not_found(format!("no plugin for engine {engine:?} on node {}", node.config.node_id)));
    }
    let dir = node.data.shard(engine, shard).map_err(|e| bad_request(e.to_string()))?;
    if !dir.is_dir() {
        return Err(not_found(format!("no shard {engine}/{shard} on node {}", node.config.node_id)));
    }
    check_fencing(node, engine, shard, req).await?;
    // The build the shard's live transfer is pinned to, on this end too.
    let plugin = rollout::for_shard(node, engine, shard)
        .await
        .map_err(|e| error_response(StatusCode::SERVICE_UNAVAILABLE, "plugin", e))?;
    Ok((plugin, dir))
}

/// One of the node's outgoing stream slots, or a 503 that says to retry.
fn outgoing_slot(node: &Node) -> Result<tokio::sync::OwnedSemaphorePermit, Response<Body>> {
    node.outgoing.clone().try_acquire_owned().map_err(|_| {
        let mut response = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("node {} is already sending {} streams", node.config.node_id, node.config.max_outgoing),
        );
        response.headers_mut().insert(hyper::header::RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
        response
    })
}

/// A streamed tar archive.
fn archive_response(chunks: tokio::sync::mpsc::Receiver<crate::stream::source::Chunk>) -> Response<Body> {
    let body = StreamBody::new(ReceiverStream::new(chunks).map(|chunk| chunk.map(Frame::data)));
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/x-tar")
        .body(BodyExt::boxed(body))
        .expect("valid response")
}

/// Fences the shard for the transfer named by the request's headers (its
/// live source must be this node) and answers the last position any write
/// can have.
async fn fence(node: &Node, engine: &str, shard: &str, req: &Request<Incoming>) -> Response<Body> {
    if req.headers().get(TRANSFER_EPOCH_HEADER).is_none() {
        return bad_request("a fence is for a transfer: send its id and epoch headers");
    }
    if let Err(response) = check_fencing(node, engine, shard, req).await {
        return response;
    }
    let epoch = req.headers().get(TRANSFER_EPOCH_HEADER).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    match crate::node::cutover::fence(node, engine, shard, epoch).await {
        Ok(info) => json_response(StatusCode::OK, &info),
        Err(e) => error_response(StatusCode::CONFLICT, "fence-failed", e),
    }
}

/// One catch-up round: the changes of a live shard after `{"since": {term,
/// position}}`, as a delta archive. Fenced and slotted like a snapshot; a
/// plan the engine refuses is 422 with the engine's stable code
/// (`history-gone`, `term-changed`, `unsupported`) so the receiver can tell
/// them apart.
async fn changes(node: &Node, engine: &str, shard: &str, req: Request<Incoming>) -> Response<Body> {
    let (plugin, dir) = match served_shard(node, engine, shard, &req).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let request = match read_json::<ChangesRequest>(node, req).await {
        Ok(Some(request)) => request,
        Ok(None) => return bad_request("expected {\"since\": {\"term\", \"position\"}}"),
        Err(response) => return response,
    };
    let since = request.since;
    let permit = match outgoing_slot(node) {
        Ok(permit) => permit,
        Err(response) => return response,
    };
    let prepared = match delta::prepare_delta(&plugin, engine, shard, &dir, since, &request.digests).await {
        Ok(delta::Prepared::Round(prepared)) => prepared,
        // Files compared block by block: the receiver sends its digests.
        Ok(delta::Prepared::NeedDigests(files)) => {
            return json_response(StatusCode::OK, &ChangesAnswer::NeedDigests { files });
        }
        Err(failure) => {
            let code = failure.code.map_or("changes-failed", FailureCode::as_str);
            return error_response(StatusCode::UNPROCESSABLE_ENTITY, code, failure.to_string());
        }
    };
    let meta = &prepared.preamble.meta;
    let entries = prepared.preamble.entries.len();
    tracing::info!(engine, shard, since = meta.since, until = meta.until, entries, "sending changes");
    let chunks = delta::stream_delta(
        prepared,
        StreamContext {
            plugin,
            shard: shard.to_owned(),
            dir,
            rate: node.rate.clone(),
            permit: Some(permit),
            stall_timeout: Duration::from_secs(node.config.stall_timeout),
            fuzzy_ok: false,
        },
    );
    archive_response(chunks)
}

/// A consensus transfer's requests carry its id and epoch: only the current
/// transfer of the shard, from this node as its source, is served.
async fn check_fencing(node: &Node, engine: &str, shard: &str, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (Some(id), Some(epoch)) = (header(TRANSFER_ID_HEADER), header(TRANSFER_EPOCH_HEADER)) else {
        return Ok(()); // a direct pull, outside consensus
    };
    let refuse = |why: String| error_response(StatusCode::CONFLICT, "stale-epoch", why);
    let Ok(epoch) = epoch.parse::<u64>() else { return Err(refuse(format!("bad epoch {epoch:?}"))) };
    // The epoch is a log index: this node may not have applied it yet. One
    // that no leader's log holds is invented: refused at once.
    if let Err(e) = node.consensus.wait_logged(epoch, Duration::from_secs(5)).await {
        return Err(refuse(format!("transfer {id} epoch {epoch}: {e}")));
    }
    let state = node.consensus.state();
    match state.transfers.get(&id) {
        Some(t)
            if t.epoch == epoch
                && t.stage.is_live()
                && t.source == node.consensus.id
                && t.engine == engine
                && t.shard == shard =>
        {
            Ok(())
        }
        Some(t) => Err(refuse(format!(
            "transfer {id} epoch {epoch} is not current here (epoch {}, {:?}, source {})",
            t.epoch, t.stage, t.source
        ))),
        None => Err(refuse(format!("no transfer {id} in this node's state"))),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    engine: String,
    shard: String,
    /// A node name (consensus transfer) or a base URL (direct pull to this node).
    source: Option<String>,
    /// The node that gets the replica; absent: a direct pull to this node.
    target: Option<String>,
    kind: Option<TransferKind>,
}

async fn start_transfer(node: &Node, req: Request<Incoming>) -> Response<Body> {
    let body: StartBody = match read_json(node, req).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            return bad_request("expected {engine, shard, target, source?, kind?} or {engine, shard, source: URL}");
        }
        Err(response) => return response,
    };
    let Some(target) = body.target else {
        let Some(source) = body.source else { return bad_request("a direct pull needs source: a base URL") };
        if body.kind.is_some() {
            return bad_request("kind is for transfers with a target");
        }
        if let Err(e) = crate::http::base_url(&source) {
            return bad_request(format!("source {:?} {e}", crate::http::redacted(&source)));
        }
        if let Err(why) = node.check_source(&source) {
            return error_response(StatusCode::FORBIDDEN, "source-not-allowed", why);
        }
        let request = TransferRequest { engine: body.engine, shard: body.shard, source };
        return match node.transfers.start(request) {
            Ok(status) => json_response(StatusCode::CREATED, &status),
            Err(e @ StartError::Invalid(_)) => bad_request(e.to_string()),
            Err(e @ StartError::UnknownEngine(_)) => not_found(e.to_string()),
            Err(e @ StartError::Busy { .. }) => error_response(StatusCode::CONFLICT, "busy", e.to_string()),
        };
    };
    if let Err(e) = check_shard_id(&body.shard) {
        return bad_request(e);
    }
    if node.plugins.get(&body.engine).is_none() {
        return not_found(format!("no plugin for engine {:?} on this node", body.engine));
    }
    let state = node.consensus.state();
    let by_name = |name: &str| state.members.iter().find(|(_, m)| m.name == name).map(|(id, _)| *id);
    let Some(target_id) = by_name(&target) else { return not_found(format!("no member named {target:?}")) };
    let source_id = match &body.source {
        Some(name) => match by_name(name) {
            Some(id) => id,
            None => return not_found(format!("no member named {name:?}")),
        },
        None => match choose_donor(node, &body.engine, &body.shard).await {
            Ok(id) => id,
            Err(why) => return error_response(StatusCode::CONFLICT, "no-donor", why),
        },
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let command = Command::StartTransfer {
        id: id.clone(),
        engine: body.engine,
        shard: body.shard,
        source: source_id,
        target: target_id,
        kind: body.kind.unwrap_or(TransferKind::Replicate),
        now: crate::node::conductor::unix_now(),
    };
    match node.consensus.propose(command).await {
        Ok(applied) => match node.consensus.wait_applied(applied.index, Duration::from_secs(10)).await {
            Err(e) => consensus_error(e),
            Ok(()) => match transfer_status(node, &id).await {
                Some(status) => json_response(StatusCode::CREATED, &status),
                None => error_response(StatusCode::INTERNAL_SERVER_ERROR, "consensus", "started transfer not visible"),
            },
        },
        Err(e) => consensus_error(e),
    }
}

/// The most advanced Active replica by (term, position), as each replica's
/// plugin reports it; a replica that does not answer is skipped if a
/// majority of the others did (Neon's donor choice).
async fn choose_donor(node: &Node, engine: &str, shard: &str) -> Result<u64, String> {
    let state = node.consensus.state();
    let active: Vec<u64> = state
        .replicas
        .get(&(engine.to_owned(), shard.to_owned()))
        .map(|r| r.iter().filter(|(_, s)| **s == ReplicaState::Active).map(|(id, _)| *id).collect())
        .unwrap_or_default();
    if active.is_empty() {
        return Err(format!("no active replica of {engine}/{shard}"));
    }
    let path = format!("/v1/engines/{engine}/shards/{shard}/status");
    let asks = active.iter().filter_map(|id| {
        let member = state.members.get(id)?;
        let (api, path) = (node.peer(&member.addr).timeout(PEER_STATUS_TIMEOUT), path.clone());
        Some(async move { api.call::<ShardPosition>(Method::GET, &path, None).await.ok().map(|p| (p, *id)) })
    });
    let mut answers: Vec<(ShardPosition, u64)> =
        futures_util::future::join_all(asks).await.into_iter().flatten().collect();
    if answers.is_empty() || answers.len() * 2 <= active.len() && active.len() > 1 {
        return Err(format!("only {} of {} active replicas answered", answers.len(), active.len()));
    }
    answers.sort();
    Ok(answers.last().expect("not empty").1)
}

async fn shard_status(node: &Node, engine: &str, shard: &str) -> Response<Body> {
    let Some(plugin) = node.plugins.get(engine) else { return not_found(format!("no plugin for engine {engine:?}")) };
    let dir = match node.data.shard(engine, shard) {
        Ok(dir) => dir,
        Err(e) => return bad_request(e.to_string()),
    };
    if !dir.is_dir() {
        return not_found(format!("no shard {engine}/{shard} on node {}", node.config.node_id));
    }
    match plugin.shard_status(shard, &dir).await {
        Ok(position) => json_response(StatusCode::OK, &position),
        Err(e) => error_response(StatusCode::UNPROCESSABLE_ENTITY, "shard-status", e.to_string()),
    }
}

/// A transfer's status: the consensus record with the target's byte progress.
async fn transfer_status(node: &Node, id: &str) -> Option<TransferStatus> {
    let state = node.consensus.state();
    let Some(record) = state.transfers.get(id).cloned() else { return node.transfers.get(id) };
    let progress = if record.target == node.consensus.id {
        Ok(node.transfers.get(id))
    } else {
        match state.members.get(&record.target) {
            Some(member) => match node
                .peer(&member.addr)
                .timeout(PEER_STATUS_TIMEOUT)
                .call::<TransferStatus>(Method::GET, &format!("/v1/transfers/{id}/local"), None)
                .await
            {
                Ok(status) => Ok(Some(status)),
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
                Err(e) => Err(format!("member {} did not answer: {e}", member.name)),
            },
            None => Ok(None),
        }
    };
    Some(merge_status(&state, record, progress))
}

/// The consensus record of a transfer with what its target reported (or why
/// it reported nothing).
fn merge_status(
    state: &crate::consensus::state::ClusterState,
    record: crate::consensus::state::TransferRecord,
    progress: Result<Option<TransferStatus>, String>,
) -> TransferStatus {
    let name = |n: u64| state.members.get(&n).map(|m| m.addr.clone()).unwrap_or_else(|| n.to_string());
    let (progress, unreachable) = match progress {
        Ok(progress) => (progress, None),
        Err(why) => (None, Some(why)),
    };
    let mut status = progress.unwrap_or_else(|| TransferStatus {
        id: record.id.clone(),
        engine: record.engine.clone(),
        shard: record.shard.clone(),
        source: name(record.source),
        state: State::Queued,
        stage: Stage::Queued,
        bytes_done: 0,
        bytes_total: 0,
        files_done: 0,
        files_total: 0,
        rate_bytes_per_sec: 0,
        eta_secs: None,
        attempts: 0,
        resumed_files: 0,
        snapshot_id: None,
        error: None,
        stage_ms: Vec::new(),
        consensus: None,
        unreachable: None,
        pause_ms: None,
        pause_over_budget: false,
        rounds: Vec::new(),
        plugin: None,
        created_at: record.started_at,
        updated_at: record.updated_at,
    });
    status.unreachable = unreachable;
    if let Some(live) = &record.live {
        status.pause_ms = live.pause_ms;
        status.pause_over_budget = live.pause_ms.is_some_and(|p| p > live.pause_budget_ms);
        status.rounds = live.rounds.clone();
    }
    // The consensus stage decides the outcome.
    match record.stage {
        TransferStage::Finished => {
            status.state = State::Succeeded;
            status.stage = Stage::Done;
        }
        TransferStage::Aborted => {
            let reason = record.failure.clone().unwrap_or_default();
            status.state = if reason == "cancelled" { State::Cancelled } else { State::Failed };
            status.error = Some(reason);
        }
        TransferStage::Snapshot | TransferStage::Partial => {
            if status.state.is_final() {
                status.state = State::Running;
            }
        }
    }
    status.consensus = Some(record);
    status
}

/// Every transfer: the consensus records with their targets' progress (one
/// bounded call per member, all at once, so a member that is gone delays the
/// answer by at most [`PEER_STATUS_TIMEOUT`] and is named in it), then the
/// direct pulls of this node.
async fn list_transfers(node: &Node) -> Response<Body> {
    let state = node.consensus.state();
    let me = node.consensus.id;
    let targets: std::collections::BTreeSet<u64> =
        state.transfers.values().map(|t| t.target).filter(|t| *t != me).collect();
    let asks = targets.into_iter().filter_map(|id| {
        let member = state.members.get(&id)?;
        let api = node.peer(&member.addr).timeout(PEER_STATUS_TIMEOUT);
        let name = member.name.clone();
        Some(async move {
            let answer = api.call::<Vec<TransferStatus>>(Method::GET, "/v1/transfers/local", None).await;
            (id, answer.map_err(|e| format!("member {name} did not answer: {e}")))
        })
    });
    let mut by_target: std::collections::BTreeMap<u64, Result<Vec<TransferStatus>, String>> =
        futures_util::future::join_all(asks).await.into_iter().collect();
    by_target.insert(me, Ok(node.transfers.list()));
    let mut list: Vec<TransferStatus> = state
        .transfers
        .values()
        .map(|record| {
            let progress = match by_target.get(&record.target) {
                Some(Ok(statuses)) => Ok(statuses.iter().find(|s| s.id == record.id).cloned()),
                Some(Err(why)) => Err(why.clone()),
                None => Ok(None),
            };
            merge_status(&state, record.clone(), progress)
        })
        .collect();
    list.extend(node.transfers.list().into_iter().filter(|t| !state.transfers.contains_key(&t.id)));
    list.sort_by_key(|t| t.created_at);
    json_response(StatusCode::OK, &list)
}

async fn cancel_transfer(node: &Node, id: &str) -> Response<Body> {
    let state = node.consensus.state();
    if let Some(record) = state.transfers.get(id) {
        if record.stage.is_live() {
            let abort = Command::AbortTransfer {
                transfer: id.to_owned(),
                epoch: record.epoch,
                reason: "cancelled".into(),
                now: crate::node::conductor::unix_now(),
            };
            match node.consensus.propose(abort).await {
                Ok(applied) => {
                    let _ = node.consensus.wait_applied(applied.index, Duration::from_secs(10)).await;
                }
                Err(e) => return consensus_error(e),
            }
        }
        return match transfer_status(node, id).await {
            Some(status) => json_response(StatusCode::ACCEPTED, &status),
            None => not_found(format!("no transfer {id}")),
        };
    }
    match node.transfers.cancel(id) {
        Some(status) => json_response(StatusCode::ACCEPTED, &status),
        None => not_found(format!("no transfer {id}")),
    }
}
