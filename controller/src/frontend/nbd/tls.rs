//! NBD over TLS with a pre-shared key (the NBD spec's "TLS support": the
//! client sends `NBD_OPT_STARTTLS`, the server acknowledges, and the rest
//! of the connection, option haggling included, runs inside TLS).
//!
//! [`NbdTls`] holds the server's OpenSSL context, built at the first
//! STARTTLS (setting OpenSSL up maps about 2.4 MiB of its code, which a
//! controller whose clients are all the kernel's never needs): TLS 1.3
//! (PSK with an ephemeral (EC)DHE exchange, so a recorded session stays secret when the
//! key leaks later; no session tickets, no resumption, no early data), and
//! TLS 1.2 with `ECDHE-PSK-CHACHA20-POLY1305` because the NBD spec requires
//! TLS 1.2 support. No certificate: the PSK authenticates both ends. The
//! client names an identity (a user name) which must be the configured one;
//! the key is the volume's ([`super::psk`]). GnuTLS clients (qemu, libnbd)
//! read the same key from a psktool file.
//!
//! [`TlsMode`] says whether TLS is offered (SELECTIVETLS with no TLS-only
//! export: the kernel NBD client, which cannot speak TLS, still connects)
//! or required (FORCEDTLS: every option but STARTTLS and ABORT is answered
//! `NBD_REP_ERR_TLS_REQD`).

use std::pin::Pin;
use std::sync::OnceLock;

use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSessionCacheMode, SslVersion,
};
use strata_replica::auth::{RateLimit, REFUSAL_LOG_PERIOD};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

use super::handshake::TlsPhase;
use super::psk::Psk;

/// TLS 1.3 suites offered, in the server's order of preference (AES-GCM
/// first: hardware-accelerated on x86-64 and arm64): the SHA-256 ones, the
/// hash OpenSSL uses for a PSK given by the server callback.
pub const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";
/// TLS 1.2 suites offered: PSK with an ephemeral ECDH exchange and an AEAD.
pub const TLS12_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305";

/// Whether the NBD port offers or requires TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_POLICY`.
    Off,
    /// A client may start TLS; plaintext clients are served too.
    Offer,
    /// Only clients that start TLS reach the volume.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Offer => "offer",
            TlsMode::Require => "require",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the server's TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("NBD TLS mode {0} needs a TLS mode of offer or require")]
    NotOn(TlsMode),
}

/// Why a client's TLS was refused. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsRefusal {
    #[error("TLS refused: the client named PSK identity {0:?}, which this server does not know")]
    UnknownIdentity(String),
    #[error("TLS handshake failed (a wrong pre-shared key, or not a TLS client): {0}")]
    Handshake(String),
    #[error("The client sent {0} plaintext bytes between NBD_OPT_STARTTLS and the TLS handshake")]
    Injected(usize),
    #[error("Cannot start a TLS session")]
    Setup(#[source] ErrorStack),
}

/// The server's TLS: its mode, its PSK, its OpenSSL context (built at the
/// first STARTTLS) and the rate limit of its refusal log lines.
pub struct NbdTls {
    mode: TlsMode,
    psk: Psk,
    context: OnceLock<Result<Context, ErrorStack>>,
    pub refusals: RateLimit,
}

/// The OpenSSL side of [`NbdTls`].
struct Context {
    ctx: SslContext,
    /// The identity a client named when the callback refused it.
    refused: Index<Ssl, String>,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("mode", &self.mode)
            .field("identity", &self.psk.identity)
            .finish_non_exhaustive()
    }
}

impl NbdTls {
    /// TLS with `psk` in `mode` (offer or require).
    pub fn new(mode: TlsMode, psk: &Psk) -> Result<NbdTls, TlsSetupError> {
        if mode == TlsMode::Off {
            return Err(TlsSetupError::NotOn(mode));
        }
        Ok(NbdTls {
            mode,
            psk: psk.clone(),
            context: OnceLock::new(),
            refusals: RateLimit::new(REFUSAL_LOG_PERIOD),
        })
    }

    /// Whether a STARTTLS has built the OpenSSL context yet.
    pub fn context_built(&self) -> bool {
        self.context.get().is_some()
    }

    /// The OpenSSL context, built on first use.
    fn context(&self) -> Result<&Context, ErrorStack> {
        self.context
            .get_or_init(|| build_context(&self.psk))
            .as_ref()
            .map_err(ErrorStack::clone)
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The identity clients must name.
    pub fn identity(&self) -> &str {
        &self.psk.identity
    }

    /// Where TLS stands when a connection's option haggling begins.
    pub fn phase(&self) -> TlsPhase {
        match self.mode {
            TlsMode::Require => TlsPhase::Required,
            TlsMode::Offer => TlsPhase::Offered,
            TlsMode::Off => TlsPhase::Unavailable,
        }
    }

    /// Runs the server side of the TLS handshake on `stream` (after the
    /// `NBD_REP_ACK` to STARTTLS went out).
    pub async fn accept<S>(&self, stream: S) -> Result<SslStream<S>, TlsRefusal>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let context = self.context().map_err(TlsRefusal::Setup)?;
        let ssl = Ssl::new(&context.ctx).map_err(TlsRefusal::Setup)?;
        let mut tls = SslStream::new(ssl, stream).map_err(TlsRefusal::Setup)?;
        match Pin::new(&mut tls).accept().await {
            Ok(()) => Ok(tls),
            Err(e) => match tls.ssl().ex_data(context.refused) {
                Some(named) => Err(TlsRefusal::UnknownIdentity(named.clone())),
                None => Err(TlsRefusal::Handshake(describe(&e))),
            },
        }
    }
}

/// The OpenSSL context of TLS with `psk`.
fn build_context(psk: &Psk) -> Result<Context, ErrorStack> {
    let refused = Ssl::new_ex_index::<String>()?;
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_ciphersuites(TLS13_SUITES)?;
    b.set_cipher_list(TLS12_CIPHERS)?;
    b.set_options(
        SslOptions::NO_TICKET | SslOptions::NO_RENEGOTIATION | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_num_tickets(0)?;
    let (identity, key) = (psk.identity.clone(), psk.key);
    b.set_psk_server_callback(move |ssl, named, out| {
        let named = named.unwrap_or_default();
        if named != identity.as_bytes() || out.len() < key.len() {
            let shown: String = String::from_utf8_lossy(named).chars().take(64).collect();
            ssl.set_ex_data(refused, shown);
            return Ok(0);
        }
        out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(Context {
        ctx: b.build(),
        refused,
    })
}

/// A handshake failure in one line: OpenSSL's reason strings (e.g. "bad
/// binder", "no shared cipher", "wrong version number") or the IO error.
fn describe(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error() {
        let reasons: Vec<&str> = stack.errors().iter().filter_map(|x| x.reason()).collect();
        if !reasons.is_empty() {
            return reasons.join(", ");
        }
    }
    match e.io_error() {
        Some(io) => io.to_string(),
        None => format!("{:?}", e.code()),
    }
}

#[cfg(test)]
mod tests;
