//! A server with TLS on an in-memory pipe against an OpenSSL PSK client:
//! the right key gets option haggling inside TLS; a wrong key, a wrong
//! identity, garbage instead of a ClientHello, or plaintext bytes slipped
//! in after STARTTLS end the connection with the matching refusal.

use std::pin::Pin;
use std::sync::Arc;

use openssl::ssl::{Ssl, SslConnector, SslMethod, SslVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_openssl::SslStream;

use super::*;
use crate::frontend::mem::MemBackend;
use crate::frontend::nbd::error::ConnError;
use crate::frontend::nbd::ops::Export;
use crate::frontend::nbd::proto::*;
use crate::frontend::nbd::serve_connection;

fn psk(identity: &str, byte: u8) -> Psk {
    Psk {
        identity: identity.into(),
        key: [byte; 32],
    }
}

/// Starts a server with TLS in `mode` (key all 7s, identity "strata").
fn server(mode: TlsMode) -> (DuplexStream, tokio::task::JoinHandle<Result<(), ConnError>>) {
    serve_with(Arc::new(NbdTls::new(mode, &psk("strata", 7)).unwrap()))
}

/// Serves one connection with `tls`.
fn serve_with(tls: Arc<NbdTls>) -> (DuplexStream, tokio::task::JoinHandle<Result<(), ConnError>>) {
    let (client, sock) = tokio::io::duplex(256 * 1024);
    let export = Export::new(Arc::new(MemBackend::new("test", 1 << 20)));
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let _keep = _tx;
        serve_connection(sock, export, Some(tls), rx).await
    });
    (client, task)
}

/// Reads the greeting, sends the client flags and STARTTLS, expects ACK.
async fn start_tls(c: &mut DuplexStream, extra: &[u8]) {
    let mut greeting = [0u8; GREETING_LEN];
    c.read_exact(&mut greeting).await.unwrap();
    let mut wire = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    encode_option(&mut wire, NBD_OPT_STARTTLS, &[]);
    wire.extend_from_slice(extra);
    c.write_all(&wire).await.unwrap();
    if extra.is_empty() {
        let mut ack = [0u8; 20];
        c.read_exact(&mut ack).await.unwrap();
        assert_eq!(&ack[12..16], &NBD_REP_ACK.to_be_bytes());
    }
}

/// An OpenSSL client naming `p.identity` with `p.key`.
async fn connect(
    c: DuplexStream,
    p: Psk,
    max: Option<SslVersion>,
) -> Result<SslStream<DuplexStream>, openssl::ssl::Error> {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_max_proto_version(max).unwrap();
    // SslConnector's default list leaves PSK suites out.
    b.set_cipher_list(TLS12_CIPHERS).unwrap();
    b.set_psk_client_callback(move |_, _, identity, key| {
        identity[..p.identity.len()].copy_from_slice(p.identity.as_bytes());
        identity[p.identity.len()] = 0;
        key[..32].copy_from_slice(&p.key);
        Ok(32)
    });
    let ssl = Ssl::new(b.build().context()).unwrap();
    let mut s = SslStream::new(ssl, c).unwrap();
    Pin::new(&mut s).connect().await.map(|()| s)
}

#[tokio::test]
async fn the_right_key_gets_options_inside_tls_with_either_version() {
    for (max, version) in [(None, "TLSv1.3"), (Some(SslVersion::TLS1_2), "TLSv1.2")] {
        let (mut c, task) = server(TlsMode::Require);
        start_tls(&mut c, &[]).await;
        let mut s = match connect(c, psk("strata", 7), max).await {
            Ok(s) => s,
            Err(e) => panic!("{version}: {e:?} server: {:?}", task.await),
        };
        assert_eq!(
            s.ssl().version_str(),
            version,
            "{:?}",
            s.ssl().current_cipher().map(|c| c.name())
        );
        let mut wire = Vec::new();
        encode_option(&mut wire, NBD_OPT_LIST, &[]);
        encode_option(&mut wire, NBD_OPT_ABORT, &[]);
        s.write_all(&wire).await.unwrap();
        // SERVER reply (4-byte name length + "test"), ACK, ACK to ABORT.
        let mut got = vec![0u8; 20 + 8 + 20 + 20];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[12..16], &NBD_REP_SERVER.to_be_bytes());
        assert_eq!(&got[24..28], b"test");
        assert_eq!(&got[40..44], &NBD_REP_ACK.to_be_bytes());
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_wrong_key_or_identity_is_refused() {
    let (mut c, task) = server(TlsMode::Offer);
    start_tls(&mut c, &[]).await;
    assert!(connect(c, psk("strata", 8), None).await.is_err());
    let e = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, ConnError::Tls(TlsRefusal::Handshake(_))),
        "{e:?}"
    );
    assert!(e.is_tls_refusal());

    let (mut c, task) = server(TlsMode::Offer);
    start_tls(&mut c, &[]).await;
    assert!(connect(c, psk("alice", 7), None).await.is_err());
    let e = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, ConnError::Tls(TlsRefusal::UnknownIdentity(who)) if who == "alice"),
        "{e:?}"
    );
    // The message names the identity, never the key.
    assert!(!e.to_string().contains("0707"));
}

#[tokio::test]
async fn garbage_or_injected_plaintext_after_starttls_closes() {
    let (mut c, task) = server(TlsMode::Require);
    start_tls(&mut c, &[]).await;
    c.write_all(b"GARBAGE GARBAGE GARBAGE GARBAGE\r\n")
        .await
        .unwrap();
    let e = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, ConnError::Tls(TlsRefusal::Handshake(_))),
        "{e:?}"
    );

    // Bytes sent with STARTTLS, before its ACK, would be read as if they
    // came through TLS: refused (the STARTTLS command-injection flaw).
    let (mut c, task) = server(TlsMode::Offer);
    let mut injected = Vec::new();
    encode_option(&mut injected, NBD_OPT_STRUCTURED_REPLY, &[]);
    start_tls(&mut c, &injected).await;
    let e = task.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, ConnError::Tls(TlsRefusal::Injected(16))),
        "{e:?}"
    );
}

#[test]
fn off_is_not_a_tls_mode() {
    assert!(matches!(
        NbdTls::new(TlsMode::Off, &psk("strata", 1)),
        Err(TlsSetupError::NotOn(TlsMode::Off))
    ));
    let t = NbdTls::new(TlsMode::Offer, &psk("strata", 1)).unwrap();
    assert_eq!(t.phase(), TlsPhase::Offered);
    assert!(!format!("{t:?}").contains("0101"));
}

/// OpenSSL is set up at the first STARTTLS, not when the server starts: a
/// controller whose clients are all plaintext (the kernel's) never maps
/// its code.
#[tokio::test]
async fn the_openssl_context_is_built_at_the_first_starttls() {
    let tls = Arc::new(NbdTls::new(TlsMode::Offer, &psk("strata", 7)).unwrap());
    assert!(!tls.context_built());
    // A plaintext client: its options are answered without TLS.
    let (mut c, task) = serve_with(tls.clone());
    let mut greeting = [0u8; GREETING_LEN];
    c.read_exact(&mut greeting).await.unwrap();
    c.write_all(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .await
        .unwrap();
    abort(&mut c).await;
    task.await.unwrap().unwrap();
    assert!(!tls.context_built(), "a plaintext client set OpenSSL up");
    // The first STARTTLS builds it, and the handshake works.
    let (mut c, task) = serve_with(tls.clone());
    start_tls(&mut c, &[]).await;
    let mut s = match connect(c, psk("strata", 7), None).await {
        Ok(s) => s,
        Err(e) => panic!("{e:?} server: {:?}", task.await),
    };
    assert!(tls.context_built());
    abort(&mut s).await;
    task.await.unwrap().unwrap();
}

/// Sends NBD_OPT_ABORT and expects its ACK.
async fn abort(c: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    let mut wire = Vec::new();
    encode_option(&mut wire, NBD_OPT_ABORT, &[]);
    c.write_all(&wire).await.unwrap();
    let mut ack = [0u8; 20];
    c.read_exact(&mut ack).await.unwrap();
    assert_eq!(&ack[12..16], &NBD_REP_ACK.to_be_bytes());
}
