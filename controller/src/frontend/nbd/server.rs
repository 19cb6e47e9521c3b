//! The accept loop: [`serve`] hands every client of a listener to
//! [`serve_connection`] (handshake, TLS when the client starts it, then
//! transmission) until shutdown. A failing connection is logged and
//! closed; it never affects others. A client refused for want of TLS or
//! of the key is logged as a refusal, at most once per
//! [`REFUSAL_LOG_PERIOD`](strata_replica::auth::REFUSAL_LOG_PERIOD).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use strata_net::stopped;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::error::ConnError;
use super::handshake::{greet, negotiate, Negotiated, Negotiation, Session, TlsPhase, MAX_OPTIONS};
use super::ops::Export;
use super::tls::{NbdTls, TlsRefusal};
use super::transmission::transmission;
use crate::frontend::Backend;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A client must finish its handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown waits for connections to finish in-flight requests: the
/// replicas bound their unflushed data to about a second of disk time, and
/// the final flush and the whole stop must fit a pod's grace period
/// (`crate::run::STOP_BUDGET`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Serves `backend` to every client of `listener` until `shutdown` turns
/// true (or its sender is dropped); then stops accepting, lets each
/// connection finish its in-flight requests (at most [`SHUTDOWN_GRACE`])
/// and returns (the accept loop is [`strata_net::serve`]). `tls`: TLS
/// offered or required; `None` offers none.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    tls: Option<Arc<NbdTls>>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let export = Export::new(backend);
    let limits = strata_net::Limits {
        name: "NBD",
        max_connections: MAX_CONNECTIONS,
        grace: SHUTDOWN_GRACE,
    };
    let rx = shutdown.clone();
    strata_net::serve(listener, limits, shutdown, move |sock, peer| {
        let (export, rx, tls) = (export.clone(), rx.clone(), tls.clone());
        async move {
            match serve_connection(sock, export, tls.clone(), rx).await {
                Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                Err(e) => match &tls {
                    Some(t) if e.is_tls_refusal() => {
                        strata_replica::auth::log_refusal(&t.refusals, "NBD", &peer.to_string(), &e)
                    }
                    _ => tracing::info!(%peer, "NBD connection closed: {e}"),
                },
            }
        }
    })
    .await;
    Ok(())
}

/// A finished handshake: the stream transmission runs on.
enum Handshaken<S> {
    Plain(S, Session),
    Tls(Box<tokio_openssl::SslStream<S>>, Session),
    Closed,
}

/// The handshake of one connection: greeting, options, and when the
/// client starts TLS, the TLS handshake and the options inside it.
async fn handshake_any<S>(
    mut stream: S,
    buf: &mut BytesMut,
    facts: &super::handshake::ExportFacts,
    tls: Option<&NbdTls>,
) -> Result<Handshaken<S>, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(&mut stream, buf).await? else {
        return Ok(Handshaken::Closed);
    };
    let mut n = Negotiation {
        no_zeroes,
        tls: tls.map_or(TlsPhase::Unavailable, NbdTls::phase),
        ..Negotiation::default()
    };
    let mut left = MAX_OPTIONS;
    match negotiate(&mut stream, buf, &mut n, facts, &mut left).await? {
        Negotiated::Transmit(s) => return Ok(Handshaken::Plain(stream, s)),
        Negotiated::Closed => return Ok(Handshaken::Closed),
        Negotiated::StartTls => {}
    }
    // The client must wait for the ACK before its ClientHello: bytes
    // already here were sent in plaintext and must not be read as if they
    // came through TLS.
    if !buf.is_empty() {
        return Err(TlsRefusal::Injected(buf.len()).into());
    }
    let Some(tls) = tls else {
        return Err(ConnError::TlsRequired);
    };
    let mut stream = tls.accept(stream).await?;
    tracing::debug!(
        version = stream.ssl().version_str(),
        cipher = stream.ssl().current_cipher().map(|c| c.name()),
        "NBD client started TLS"
    );
    match negotiate(&mut stream, buf, &mut n, facts, &mut left).await? {
        Negotiated::Transmit(s) => Ok(Handshaken::Tls(Box::new(stream), s)),
        Negotiated::Closed => Ok(Handshaken::Closed),
        // `answer` gives a second STARTTLS an error reply.
        Negotiated::StartTls => Err(ConnError::TlsRequired),
    }
}

/// Serves one client on any byte stream (a TCP socket, or an in-memory
/// pipe in tests): handshake within [`HANDSHAKE_TIMEOUT`] (TLS included
/// when `tls` is given and the client starts it), then requests until the
/// client disconnects or `shutdown` turns true.
pub async fn serve_connection<S, B>(
    stream: S,
    export: Arc<Export<B>>,
    tls: Option<Arc<NbdTls>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let facts = export.facts();
    let shaken = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake_any(stream, &mut buf, &facts, tls.as_deref())) => match r {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
        },
        _ = stopped(&mut shutdown) => return Ok(()),
    };
    match shaken {
        Handshaken::Plain(s, session) => run(s, buf, export, session, shutdown).await,
        Handshaken::Tls(s, session) => run(*s, buf, export, session, shutdown).await,
        Handshaken::Closed => Ok(()),
    }
}

/// The transmission phase on `stream`, monomorphised per stream type (the
/// plaintext path has no TLS layer in it).
async fn run<S, B>(
    stream: S,
    buf: BytesMut,
    export: Arc<Export<B>>,
    session: Session,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    tracing::debug!(?session, "NBD client entered transmission");
    let backend = export.backend().clone();
    backend.client_attached(true);
    let (rd, wr) = tokio::io::split(stream);
    let result = transmission(rd, wr, buf, export, session, shutdown).await;
    backend.client_attached(false);
    result
}
