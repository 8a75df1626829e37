//! Raft RPCs over the node's own authenticated HTTP API:
//! `POST /v1/raft/{append,vote,snapshot}` with JSON bodies.

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::TypeConfig;
use super::state::NodeId;
use crate::http::{self, Client};

/// A whole snapshot on the wire.
#[derive(Serialize, Deserialize)]
pub struct FullSnapshot {
    pub vote: Vote<NodeId>,
    pub meta: SnapshotMeta<NodeId, BasicNode>,
    /// The state machine as JSON text.
    pub data: String,
}

impl FullSnapshot {
    pub fn into_parts(self) -> (Vote<NodeId>, Snapshot<TypeConfig>) {
        let snapshot = Snapshot { meta: self.meta, snapshot: Box::new(Cursor::new(self.data.into_bytes())) };
        (self.vote, snapshot)
    }
}

/// Largest answer to a Raft RPC (a vote or an append's acknowledgement is tiny).
const MAX_ANSWER: usize = 1 << 20;

#[derive(Clone)]
pub struct Network {
    pub client: Client,
    pub token: std::sync::Arc<str>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer { network: self.clone(), target, addr: node.addr.clone() }
    }
}

pub struct Peer {
    network: Network,
    target: NodeId,
    addr: String,
}

/// A transport failure: the request may not have arrived.
enum Transport {
    Unreachable(String),
    Network(String),
}

impl Peer {
    /// POSTs `body` and decodes the peer's `Result<T, E>`.
    async fn call<Req: Serialize, T: DeserializeOwned, E: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
        ttl: Duration,
    ) -> Result<Result<T, E>, Transport> {
        let url = format!("{}/v1/raft/{path}", self.addr.trim_end_matches('/'));
        let body = serde_json::to_vec(body).map_err(|e| Transport::Network(e.to_string()))?;
        let request = http::request(hyper::Method::POST, &url, &self.network.token, Some(Bytes::from(body)))
            .map_err(Transport::Unreachable)?;
        let response = tokio::time::timeout(ttl, self.network.client.request(request))
            .await
            .map_err(|_| Transport::Network(format!("{url}: timed out")))?
            .map_err(|e| {
                let text = http::error_chain(&e);
                if e.is_connect() { Transport::Unreachable(text) } else { Transport::Network(text) }
            })?;
        let status = response.status();
        let bytes = http::read_bounded(response.into_body(), MAX_ANSWER, ttl)
            .await
            .map_err(|e| Transport::Network(format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(Transport::Network(format!("{url}: {status}: {}", http::ApiError::message_of(&bytes))));
        }
        serde_json::from_slice(&bytes).map_err(|e| Transport::Network(format!("{url}: {e}")))
    }
}

fn rpc_error<E: std::error::Error>(t: Transport) -> RPCError<NodeId, BasicNode, E> {
    match t {
        Transport::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&std::io::Error::other(m))),
        Transport::Network(m) => RPCError::Network(NetworkError::new(&std::io::Error::other(m))),
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let result: Result<_, RaftError<NodeId>> =
            self.call("append", &rpc, option.hard_ttl()).await.map_err(rpc_error)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let result: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.call("install-snapshot", &rpc, option.hard_ttl()).await.map_err(rpc_error)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let result: Result<_, RaftError<NodeId>> =
            self.call("vote", &rpc, option.hard_ttl()).await.map_err(rpc_error)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let data = String::from_utf8(snapshot.snapshot.into_inner())
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let body = FullSnapshot { vote, meta: snapshot.meta, data };
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            self.call("snapshot", &body, Duration::from_secs(60)).await.map_err(|t| match t {
                Transport::Unreachable(m) => StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(m))),
                Transport::Network(m) => StreamingError::Network(NetworkError::new(&std::io::Error::other(m))),
            })?;
        result.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
