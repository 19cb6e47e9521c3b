//! [`serve`]: accept, cap, back off, drain. See the crate doc.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::stopped;

/// First pause after a failed accept; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between two accepts that fail.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Where connections come from.
pub trait Incoming: Send {
    /// The next connection; `Ok(None)` when no more will ever come.
    fn next(&mut self) -> impl Future<Output = io::Result<Option<(TcpStream, SocketAddr)>>> + Send;
}

impl Incoming for TcpListener {
    async fn next(&mut self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        self.accept().await.map(Some)
    }
}

/// Streams accepted by someone else (the replica node's protocol router).
impl Incoming for mpsc::Receiver<(TcpStream, SocketAddr)> {
    async fn next(&mut self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        Ok(self.recv().await)
    }
}

/// How one server bounds its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Named in log lines ("NBD", "iSCSI", "replica data", ...).
    pub name: &'static str,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// How long shutdown waits for open connections before dropping them.
    pub grace: Duration,
}

/// Serves every connection of `incoming` with `handler` (one task each,
/// `TCP_NODELAY` set) until `shutdown` turns true or the source ends. Then
/// it stops accepting; after shutdown the open connections get
/// [`Limits::grace`] to finish, after the source ended they run until they
/// finish or shutdown comes. Handlers watch `shutdown` themselves to stop
/// reading new requests.
pub async fn serve<I, H, F>(
    mut incoming: I,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    handler: H,
) where
    I: Incoming,
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut backoff = FIRST_BACKOFF;
    let mut shut_down = false;
    loop {
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => { shut_down = true; break }
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => { shut_down = true; break }
            r = incoming.next() => r,
        };
        match next {
            Ok(Some((sock, peer))) => {
                backoff = FIRST_BACKOFF;
                let _ = sock.set_nodelay(true);
                let conn = handler(sock, peer);
                conns.spawn(async move {
                    conn.await;
                    drop(permit);
                });
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(server = limits.name, error = %e, ?backoff, "accept failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        while let Some(done) = conns.try_join_next() {
            log_join(limits.name, done);
        }
    }
    drop(incoming);
    if !shut_down {
        tokio::select! {
            _ = stopped(&mut shutdown) => {}
            _ = join_all(limits.name, &mut conns) => {}
        }
    }
    if tokio::time::timeout(limits.grace, join_all(limits.name, &mut conns))
        .await
        .is_err()
    {
        tracing::warn!(
            server = limits.name,
            left = conns.len(),
            grace = ?limits.grace,
            "shutdown: dropping connections that did not finish in time"
        );
        conns.shutdown().await;
    }
}

async fn join_all(name: &'static str, conns: &mut JoinSet<()>) {
    while let Some(done) = conns.join_next().await {
        log_join(name, done);
    }
}

fn log_join(name: &'static str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(server = name, error = %e, "a connection task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max: usize) -> Limits {
        Limits {
            name: "test",
            max_connections: max,
            grace: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn serves_at_most_the_limit_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (o, p) = (open.clone(), peak.clone());
        let server = tokio::spawn(serve(listener, limits(2), rx, move |mut s, _| {
            let (o, p) = (o.clone(), p.clone());
            async move {
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = s.write_all(b"x").await;
                o.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(tokio::spawn(async move {
                let mut c = TcpStream::connect(addr).await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        tx.send(true).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_drops_connections_after_the_grace_period() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, limits(4), rx, |_s, _| async move {
            // Ignores shutdown: only the grace period ends it.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }));
        let _c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = std::time::Instant::now();
        tx.send(true).unwrap();
        server.await.unwrap();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "returned before the grace period: {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "did not drop the connection: {took:?}"
        );
    }

    #[tokio::test]
    async fn a_channel_source_ends_when_its_sender_is_gone() {
        let (tx, rx) = mpsc::channel(1);
        let (_stop, shutdown) = watch::channel(false);
        let served = Arc::new(AtomicUsize::new(0));
        let s = served.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(rx, limits(4), shutdown, move |_s, _| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let _c = TcpStream::connect(addr).await.unwrap();
        let accepted = listener.accept().await.unwrap();
        tx.send(accepted).await.unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned once the source ended")
            .unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    struct Failing(usize);
    impl Incoming for Failing {
        async fn next(&mut self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
            self.0 += 1;
            if self.0 > 6 {
                return Ok(None);
            }
            Err(io::Error::from_raw_os_error(24)) // EMFILE
        }
    }

    #[tokio::test]
    async fn accept_errors_back_off() {
        let (_stop, shutdown) = watch::channel(false);
        let t = tokio::time::Instant::now();
        serve(Failing(0), limits(4), shutdown, |_s, _| async {}).await;
        // 5 + 10 + 20 + 40 + 80 + 160 ms of pauses, not a busy loop.
        assert!(
            t.elapsed() >= Duration::from_millis(315),
            "{:?}",
            t.elapsed()
        );
    }
}
