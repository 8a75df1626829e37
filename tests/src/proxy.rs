//! A TCP proxy on 127.0.0.1 that breaks things on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Close the connection after this many response bytes.
    CutAfter(u64),
    /// Flip one bit of the response byte at this offset.
    FlipByteAt(u64),
}

/// Forwards to `target`; the first `faulty` connections suffer `fault`.
pub struct FaultProxy {
    pub url: String,
    pub downstream_bytes: Arc<AtomicU64>,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target_url: &str, fault: Fault, faulty: usize) -> FaultProxy {
        let target = target_url.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let downstream_bytes = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (bytes, count) = (downstream_bytes.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let fault = (n < faulty).then_some(fault);
                let (target, bytes) = (target.clone(), bytes.clone());
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(&target).await {
                        relay(client, upstream, fault, bytes).await;
                    }
                });
            }
        });
        FaultProxy { url, downstream_bytes, connections, task }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: TcpStream, fault: Option<Fault>, total: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match upstream_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        match fault {
            Some(Fault::CutAfter(limit)) if sent + n as u64 >= limit => {
                let keep = (limit - sent) as usize;
                let _ = client_write.write_all(&chunk[..keep]).await;
                total.fetch_add(keep as u64, Ordering::SeqCst);
                break; // dropping both halves closes the connection
            }
            Some(Fault::FlipByteAt(at)) if (sent..sent + n as u64).contains(&at) => {
                chunk[(at - sent) as usize] ^= 0x01;
            }
            _ => {}
        }
        if client_write.write_all(chunk).await.is_err() {
            break;
        }
        sent += n as u64;
        total.fetch_add(n as u64, Ordering::SeqCst);
    }
    up.abort();
}
