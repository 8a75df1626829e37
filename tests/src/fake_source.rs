//! A fake source node that answers every request with a fixed archive or raw
//! bytes (a status head then an endless body, a head then silence, ...), and
//! a builder of archives, honest or hostile.

use ferry::plugin::SnapshotMeta;
use ferry::relpath::RelPath;
use ferry::stream::manifest::{
    ARCHIVE_FORMAT, Checksum, EntryInfo, FileRecord, MANIFEST_PATH, Manifest, PREAMBLE_PATH, Preamble,
};
use ferry::stream::tar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tar::{EntryType, Header};

/// What the fake source answers to every request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A 200 response with this archive as its body.
    Archive(Vec<u8>),
    /// These raw bytes (a status head, maybe part of a body), then silence:
    /// the connection stays open until the server is stopped.
    ThenSilence(Vec<u8>),
    /// These raw bytes, then `fill` over and over until the peer goes away
    /// (a body without a length, ended by closing).
    Endless { head: Vec<u8>, fill: Vec<u8> },
}

impl Reply {
    /// A 200 head for a body ended by closing the connection, then `body`,
    /// then `fill` for ever.
    pub fn endless_archive(body: Vec<u8>, fill: &[u8]) -> Reply {
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-tar\r\nconnection: close\r\n\r\n".to_vec();
        head.extend_from_slice(&body);
        Reply::Endless { head, fill: fill.to_vec() }
    }
}

/// Serves `archive` as the body of a 200 response to any request, forever.
pub async fn serve(archive: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    serve_reply(Reply::Archive(archive)).await
}

/// Answers every request with `reply`, until the returned task is aborted
/// (which closes every connection it holds).
pub async fn serve_reply(reply: Reply) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        // Dropped with this task: connections end with the server.
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let reply = reply.clone();
            connections.spawn(async move {
                if read_request(&mut conn).await.is_none() {
                    return;
                }
                match reply {
                    Reply::Archive(archive) => {
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/x-tar\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            archive.len()
                        );
                        let _ = conn.write_all(response.as_bytes()).await;
                        let _ = conn.write_all(&archive).await;
                        let _ = conn.shutdown().await;
                    }
                    Reply::ThenSilence(bytes) => {
                        let _ = conn.write_all(&bytes).await;
                        // Keep the connection open; notice the peer leaving.
                        let mut sink = [0u8; 1024];
                        while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                    Reply::Endless { head, fill } => {
                        if conn.write_all(&head).await.is_err() {
                            return;
                        }
                        while conn.write_all(&fill).await.is_ok() {}
                    }
                }
            });
            // Forget the connections that ended.
            while connections.try_join_next().is_some() {}
        }
    });
    (url, task)
}

/// Reads a request's head and its body; `None` if the peer went away.
async fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        request.extend_from_slice(&buf[..n]);
        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    while request.len() < head_end + length {
        let n = conn.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        request.extend_from_slice(&buf[..n]);
    }
    Some(request)
}

/// Builds archives entry by entry.
pub struct ArchiveBuilder {
    pub bytes: Vec<u8>,
}

pub fn meta() -> SnapshotMeta {
    SnapshotMeta { term: 1, position: 1, attributes: vec![] }
}

pub fn checksum(data: &[u8]) -> Checksum {
    Checksum(*blake3::hash(data).as_bytes())
}

impl ArchiveBuilder {
    pub fn new() -> ArchiveBuilder {
        ArchiveBuilder { bytes: Vec::new() }
    }

    /// A regular file entry written the way Ferry writes them.
    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        let path = RelPath::new(path).unwrap();
        self.bytes.extend_from_slice(&tar::header(&path, data.len() as u64));
        self.data(data)
    }

    fn data(mut self, data: &[u8]) -> Self {
        self.bytes.extend_from_slice(data);
        if let Some(pad) = tar::padding(data.len() as u64) {
            self.bytes.extend_from_slice(&pad);
        }
        self
    }

    /// Any entry, with a raw name (no validation) and a raw size in the header.
    pub fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], header_size: u64, data: &[u8]) -> Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(header_size);
        header.set_mode(0o644);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.bytes.extend_from_slice(header.as_bytes());
        self.data(data)
    }

    /// A raw header block as it is (its checksum is the caller's), no data.
    pub fn header(mut self, header: &Header) -> Self {
        self.bytes.extend_from_slice(header.as_bytes());
        self
    }

    pub fn preamble(self, engine: &str, shard: &str, entries: &[(&str, u64)]) -> Self {
        self.preamble_of_format(engine, shard, entries, 1)
    }

    /// A preamble announcing a snapshot of layout `snapshot_format`.
    pub fn preamble_of_format(self, engine: &str, shard: &str, entries: &[(&str, u64)], snapshot_format: u32) -> Self {
        let preamble = Preamble {
            format: ARCHIVE_FORMAT,
            snapshot_id: "fake".into(),
            engine: engine.into(),
            shard: shard.into(),
            snapshot_format,
            meta: meta(),
            entries: entries.iter().map(|(p, s)| EntryInfo { path: RelPath::new(p).unwrap(), size: *s }).collect(),
            skipped: vec![],
        };
        self.file(PREAMBLE_PATH, &serde_json::to_vec(&preamble).unwrap())
    }

    pub fn manifest(self, entries: &[(&str, &[u8])]) -> Self {
        let manifest = Manifest {
            format: ARCHIVE_FORMAT,
            snapshot_id: "fake".into(),
            meta: meta(),
            entries: entries
                .iter()
                .map(|(p, d)| FileRecord { path: RelPath::new(p).unwrap(), size: d.len() as u64, blake3: checksum(d) })
                .collect(),
            fuzzy: false,
        };
        self.file(MANIFEST_PATH, &serde_json::to_vec(&manifest).unwrap())
    }

    pub fn end(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&tar::end());
        self.bytes
    }
}

impl Default for ArchiveBuilder {
    fn default() -> Self {
        Self::new()
    }
}
