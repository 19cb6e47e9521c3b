//! gRPC over the cluster key, for both gRPC servers: the replica's
//! control API (on the replica port, routed there by `crate::node`) and
//! the controller's management API (a port of its own).
//!
//! A client dials with [`grpc_channel`]: with a key, each connection runs
//! the handshake for the API's [`Purpose`] and HTTP/2 then travels inside
//! encrypted records (integrity-only with a server older than them). A server takes each accepted connection through
//! [`accept_grpc`], which hands tonic a [`Sealed`] stream or refuses the
//! peer with a message its client shows.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{
    client_handshake, log_refusal, peek_up_to, refuse_keyed_client, server_handshake, AuthError,
    ClusterKey, Purpose, Sealed, ServerAuth, WireMode, MAGIC_CLIENT,
};

/// The first bytes of an HTTP/2 connection (`PRI * HTTP/2.0`).
pub const HTTP2_PREFACE: &[u8; 4] = b"PRI ";

/// What a keyed controller answers a gRPC client without the key.
pub const CONTROLLER_KEY_REQUIRED: &str =
    "The controller requires the cluster key (--cluster-key-file)";

/// A gRPC channel to the API for `purpose` at `addr`. With `key`, each of
/// the channel's connections first runs the handshake and HTTP/2 then
/// travels in encrypted records (AES-256-GCM: management calls carry
/// backup keys and S3 credentials); without, a plain channel.
///
/// A server older than encrypted records (it grants integrity-only
/// records, which the first handshake refuses) is dialled again for
/// integrity-only records, with a warning: an update that reaches the
/// clients before the servers keeps working, and a relay that strips the
/// request gets what every session had before, not less.
pub async fn grpc_channel(
    endpoint: tonic::transport::Endpoint,
    addr: SocketAddr,
    key: Option<&ClusterKey>,
    purpose: Purpose,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let Some(key) = key.cloned() else {
        return endpoint.connect().await;
    };
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let key = key.clone();
        async move {
            let dial = || async {
                let sock = TcpStream::connect(addr).await?;
                let _ = sock.set_nodelay(true);
                Ok::<_, std::io::Error>(sock)
            };
            let mut sock = dial().await?;
            let session =
                match client_handshake(&mut sock, &key, purpose, WireMode::Encrypted).await {
                    Err(AuthError::EncryptionUnsupported) => {
                        tracing::warn!(
                            %addr,
                            ?purpose,
                            "the server does not offer encrypted gRPC records (an older strata): \
                             this connection is integrity-only, readable on the network"
                        );
                        sock = dial().await?;
                        client_handshake(&mut sock, &key, purpose, WireMode::Integrity).await
                    }
                    other => other,
                }
                .map_err(std::io::Error::other)?;
            let (rd, wr) = session.client();
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Sealed::Sealed(
                sock,
                Box::new(rd),
                Box::new(wr),
            )))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// A gRPC channel to a replica's control API ([`grpc_channel`] for
/// [`Purpose::Control`]).
pub async fn control_channel(
    endpoint: tonic::transport::Endpoint,
    addr: SocketAddr,
    key: Option<&ClusterKey>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    grpc_channel(endpoint, addr, key, Purpose::Control).await
}

/// Takes one accepted connection of a gRPC-only port (the controller's
/// management API) to what tonic serves: keyed, after the handshake for
/// `purpose`; keyless, as it is. `None` when the peer was refused (and
/// told why) or left before saying anything.
pub async fn accept_grpc(
    mut sock: TcpStream,
    peer: SocketAddr,
    auth: Option<&ServerAuth>,
    purpose: Purpose,
    listener: &str,
    key_required: &str,
) -> Option<Sealed<TcpStream>> {
    let mut first = [0u8; 6];
    let n = peek_up_to(&sock, &mut first).await;
    let hello = Purpose::of_hello(&first[..n]);
    match auth {
        Some(a) => {
            if hello == Some(purpose) {
                match server_handshake(&mut sock, &a.key, purpose, false).await {
                    Ok(session) => {
                        let (rd, wr) = session.server();
                        return Some(Sealed::Sealed(sock, Box::new(rd), Box::new(wr)));
                    }
                    Err(e) => log_refusal(&a.refusals, listener, &peer.to_string(), &e),
                }
            } else if n >= 4 && first[..4] == HTTP2_PREFACE[..] {
                refuse_keyless_grpc(sock, key_required).await;
                log_refusal(
                    &a.refusals,
                    listener,
                    &peer.to_string(),
                    &"a gRPC client without the cluster key",
                );
            } else if n > 0 {
                log_refusal(
                    &a.refusals,
                    listener,
                    &peer.to_string(),
                    &"the peer does not speak the authentication handshake for this port",
                );
            }
            None
        }
        None if n >= 4 && first[..4] == MAGIC_CLIENT[..] => {
            tracing::warn!(%peer, listener, "refused a peer with a cluster key: this server has none");
            refuse_keyed_client(&mut sock).await;
            None
        }
        None if n == 0 => None,
        None => Some(Sealed::Plain(sock)),
    }
}

/// Tells a gRPC client without the key why it is refused: an HTTP/2
/// SETTINGS frame then GOAWAY (INADEQUATE_SECURITY) whose debug data,
/// `reason`, the client's error shows; then closes after reading what it
/// sent. The GOAWAY waits for the client's first request (a HEADERS
/// frame, 2 s at most): a request refused by a GOAWAY fails with its
/// debug data, while one sent after it would fail as "connection closed".
pub async fn refuse_keyless_grpc(mut sock: TcpStream, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), until_first_headers(&mut sock)).await;
    let reason = reason.as_bytes();
    let mut out = vec![0, 0, 0, 0x4, 0, 0, 0, 0, 0]; // empty SETTINGS
    let len = (8 + reason.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]); // GOAWAY on stream 0
    out.extend_from_slice(&0u32.to_be_bytes()); // last stream id
    out.extend_from_slice(&0xcu32.to_be_bytes()); // INADEQUATE_SECURITY
    out.extend_from_slice(reason);
    if sock.write_all(&out).await.is_ok() {
        let _ = sock.shutdown().await;
        // Read (and drop) what the client sends, so that closing does not
        // reset the connection before it read the GOAWAY.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Reads the client's preface and frames until a HEADERS frame (or EOF,
/// or 64 KiB of anything else).
async fn until_first_headers(sock: &mut TcpStream) {
    const HEADERS: u8 = 0x1;
    let mut preface = [0u8; 24];
    if sock.read_exact(&mut preface).await.is_err() {
        return;
    }
    let mut seen = 0usize;
    let mut header = [0u8; 9];
    let mut sink = [0u8; 4096];
    while seen < 64 << 10 && sock.read_exact(&mut header).await.is_ok() {
        if header[3] == HEADERS {
            return;
        }
        let mut left = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        seen += 9 + left;
        while left > 0 {
            let n = left.min(sink.len());
            if sock.read_exact(&mut sink[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
    }
}

impl tonic::transport::server::Connected for Sealed<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Sealed::Plain(s) | Sealed::Sealed(s, ..) => s.connect_info(),
        }
    }
}
