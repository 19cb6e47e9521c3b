//! The challenge-response at connect. Message building and checking are
//! pure functions; [`client_handshake`] and [`server_handshake`] run them
//! over a stream.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::key::ClusterKey;
use super::record::{hardware_gmac, RecordFormat, RecordKey, TagLayout, WireMode};
use super::stream::{SealedRead, SealedWrite};

/// First bytes of a client hello.
pub const MAGIC_CLIENT: &[u8; 4] = b"STRA";
/// First bytes of a server challenge or verdict.
pub const MAGIC_SERVER: &[u8; 4] = b"STRS";
/// What a server without a key answers to a hello, before closing.
pub const MAGIC_KEYLESS: &[u8; 4] = b"STRN";
const VERSION: u8 = 1;
pub const CLIENT_HELLO_LEN: usize = 40;
const SERVER_MSG_LEN: usize = 40;
const PROOF_LEN: usize = 32;
const CONTEXT: &[u8] = b"strata cluster-key handshake v1";
/// How long either side waits for the other's next handshake message.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const STATUS_OK: u8 = 0;
const STATUS_WRONG_KEY: u8 = 1;
const STATUS_ENCRYPTION_REQUIRED: u8 = 2;

/// Byte 6 of a hello (the record format the client asks for) and of a
/// challenge (the format the server grants). strata's first keyed release
/// ignores the hello's byte and grants 0: integrity records with the
/// leading tag layout, which newer clients then speak.
const FLAG_ENCRYPT: u8 = 1;
/// Integrity records with the sequence number after the payload in the
/// tag ([`TagLayout::Trailing`]).
const FLAG_TRAILING_TAG: u8 = 2;
/// In a hello: the client computes GMAC in hardware and prefers it to
/// BLAKE3. In a challenge: integrity records with GMAC tags.
const FLAG_GMAC: u8 = 4;
/// In a hello: the client also speaks GMAC over the payload alone
/// ([`RecordFormat::PayloadGmac`]) and prefers it. In a challenge:
/// integrity records with GMAC tags over the payload.
const FLAG_PAYLOAD_GMAC: u8 = 8;
/// In a hello: the client can leave the data wire's per-frame crc out,
/// the records' tags covering every byte. In a challenge, beside the
/// format's bit: both sides leave it out. Older peers neither send nor
/// grant it and keep their crcs.
const FLAG_NO_FRAME_CRC: u8 = 16;

/// What a server grants: the record format, and whether the data wire's
/// frames still carry their payload crc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    format: RecordFormat,
    frame_crc: bool,
}

impl Grant {
    /// The challenge's byte 6.
    fn byte(self) -> u8 {
        flags(self.format) | if self.frame_crc { 0 } else { FLAG_NO_FRAME_CRC }
    }

    /// What a challenge's byte 6 grants.
    fn of_byte(b: u8) -> Grant {
        Grant {
            format: granted_format(b & !FLAG_NO_FRAME_CRC),
            frame_crc: b & FLAG_NO_FRAME_CRC == 0,
        }
    }

    /// What a server grants for a hello's byte 6 (`gmac`: the server's CPU
    /// computes GMAC in hardware).
    fn for_hello(hello: u8, gmac: bool) -> Grant {
        Grant {
            format: grant(hello & !FLAG_NO_FRAME_CRC, gmac),
            frame_crc: hello & FLAG_NO_FRAME_CRC == 0,
        }
    }
}

/// The byte a server grants, or a client whose hello asks for exactly
/// one format sends.
fn flags(format: RecordFormat) -> u8 {
    match format {
        RecordFormat::Mac(TagLayout::Leading) => 0,
        RecordFormat::Mac(TagLayout::Trailing) => FLAG_TRAILING_TAG,
        RecordFormat::Gmac => FLAG_GMAC,
        RecordFormat::PayloadGmac => FLAG_PAYLOAD_GMAC,
        RecordFormat::AesGcm => FLAG_ENCRYPT,
    }
}

/// What a server's byte grants: the one format whose bit it carries (0
/// from a server of the first keyed release), read as a hello would be by
/// a server that speaks everything.
fn granted_format(flags: u8) -> RecordFormat {
    grant(flags, true)
}

/// A client's hello byte for `mode`: every format it speaks, GMAC only
/// when its CPU has the instructions for it (`gmac`).
fn hello_flags(mode: WireMode, gmac: bool) -> u8 {
    FLAG_NO_FRAME_CRC
        | match mode {
            WireMode::Encrypted => FLAG_ENCRYPT,
            WireMode::Integrity if gmac => FLAG_TRAILING_TAG | FLAG_GMAC | FLAG_PAYLOAD_GMAC,
            WireMode::Integrity => FLAG_TRAILING_TAG,
        }
}

/// The format a server grants for a hello byte: GMAC when both ends
/// have the instructions for it (`gmac` is the server's side), over the
/// payload alone unless the client is of the release before it, then the
/// trailing BLAKE3 tag, then the leading one for a client of the first
/// keyed release (which sends 0).
fn grant(hello: u8, gmac: bool) -> RecordFormat {
    if hello & FLAG_ENCRYPT != 0 {
        RecordFormat::AesGcm
    } else if hello & FLAG_PAYLOAD_GMAC != 0 && gmac {
        RecordFormat::PayloadGmac
    } else if hello & FLAG_GMAC != 0 && gmac {
        RecordFormat::Gmac
    } else if hello & FLAG_TRAILING_TAG != 0 {
        RecordFormat::Mac(TagLayout::Trailing)
    } else {
        RecordFormat::Mac(TagLayout::Leading)
    }
}

/// Whether a client that sent `hello` accepts `granted`: one of the
/// formats it asked for, or the leading tag layout of an older server.
fn acceptable(hello: u8, granted: RecordFormat) -> bool {
    match granted {
        RecordFormat::AesGcm => hello & FLAG_ENCRYPT != 0,
        RecordFormat::Gmac => hello & FLAG_GMAC != 0,
        RecordFormat::PayloadGmac => hello & FLAG_PAYLOAD_GMAC != 0,
        RecordFormat::Mac(TagLayout::Trailing) => hello & FLAG_TRAILING_TAG != 0,
        RecordFormat::Mac(TagLayout::Leading) => hello & FLAG_ENCRYPT == 0,
    }
}

/// Which protocol runs after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// The binary data wire.
    Data = 0,
    /// The replica's gRPC control API.
    Control = 1,
    /// The controller's gRPC management API.
    Manage = 2,
}

impl Purpose {
    pub fn from_u8(v: u8) -> Option<Purpose> {
        match v {
            0 => Some(Purpose::Data),
            1 => Some(Purpose::Control),
            2 => Some(Purpose::Manage),
            _ => None,
        }
    }

    /// The purpose a client hello announces, from its first bytes (`None`
    /// when they are not a hello).
    pub fn of_hello(first: &[u8]) -> Option<Purpose> {
        if first.len() < 6 || &first[..4] != MAGIC_CLIENT || first[4] != VERSION {
            return None;
        }
        Purpose::from_u8(first[5])
    }
}

/// Why a handshake failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("Authentication failed: wrong cluster key")]
    WrongKey,
    #[error("The server has no cluster key; refusing to use a keyless server")]
    PeerKeyless,
    #[error("The peer does not speak the authentication handshake")]
    Malformed,
    #[error("The peer asked for {0:?}, not what this port serves here")]
    WrongPurpose(Purpose),
    #[error("The server does not offer wire encryption (a strata replica older than wire encryption, or the mode was changed in transit)")]
    EncryptionUnsupported,
    #[error("The server requires wire encryption (--require-wire-encryption); this client did not ask for it (--encrypt-replica-wire)")]
    EncryptionRequired,
    #[error("The authentication handshake timed out")]
    Timeout,
    #[error("The connection failed during authentication")]
    Io(#[from] std::io::Error),
}

/// The keys of one authenticated connection.
pub struct Session {
    c2s: [u8; 32],
    s2c: [u8; 32],
    format: RecordFormat,
    frame_crc: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session(..)")
    }
}

impl Session {
    fn derive(
        key: &ClusterKey,
        purpose: Purpose,
        grant: Grant,
        nc: &[u8; 32],
        ns: &[u8; 32],
    ) -> Session {
        let dir =
            |label: &[u8]| -> [u8; 32] { *mac(key, label, purpose, grant, nc, ns).as_bytes() };
        Session {
            c2s: dir(b"session client-to-server"),
            s2c: dir(b"session server-to-client"),
            format: grant.format,
            frame_crc: grant.frame_crc,
        }
    }

    /// Whether the data wire's frames carry their payload crc on this
    /// connection. Without it the records' tags are the only check, and
    /// they cover every byte.
    pub fn frame_crc(&self) -> bool {
        self.frame_crc
    }

    /// The record mode both sides agreed on.
    pub fn mode(&self) -> WireMode {
        self.format.mode()
    }

    /// The record format both sides agreed on.
    pub fn format(&self) -> RecordFormat {
        self.format
    }

    /// The client's (reader, writer) record states.
    pub fn client(&self) -> (SealedRead, SealedWrite) {
        (
            SealedRead::with_key(RecordKey::new(self.format, self.s2c)),
            SealedWrite::with_key(RecordKey::new(self.format, self.c2s)),
        )
    }

    /// The server's (reader, writer) record states.
    pub fn server(&self) -> (SealedRead, SealedWrite) {
        (
            SealedRead::with_key(RecordKey::new(self.format, self.c2s)),
            SealedWrite::with_key(RecordKey::new(self.format, self.s2c)),
        )
    }
}

fn mac(
    key: &ClusterKey,
    label: &[u8],
    purpose: Purpose,
    grant: Grant,
    nc: &[u8; 32],
    ns: &[u8; 32],
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key.bytes());
    h.update(CONTEXT);
    h.update(&[label.len() as u8]);
    h.update(label);
    h.update(&[purpose as u8]);
    // The granted format is in every proof and session key, so a challenge
    // whose format byte was changed in transit fails the handshake. The
    // leading-tag integrity format hashes nothing extra: its proofs are
    // those of strata's first keyed release, which keeps old and new
    // compatible. (Inputs of the formats differ in length, nonces being
    // fixed size.) A hello whose byte is changed from trailing to leading
    // looks like an old server's answer and is not detected: it costs
    // speed, not integrity, both layouts being full-strength tags.
    match grant.format {
        RecordFormat::Mac(TagLayout::Leading) => {}
        RecordFormat::Mac(TagLayout::Trailing) => {
            h.update(b"trailing record tags");
        }
        RecordFormat::Gmac => {
            h.update(b"gmac record tags");
        }
        RecordFormat::PayloadGmac => {
            h.update(b"payload gmac record tags");
        }
        RecordFormat::AesGcm => {
            h.update(b"encrypted records");
        }
    }
    // Likewise whether frames carry their crc: a peer that kept them and
    // one that did not would refuse each other's frames.
    if !grant.frame_crc {
        h.update(b"frames without crc");
    }
    h.update(nc);
    h.update(ns);
    h.finalize()
}

fn client_proof(
    key: &ClusterKey,
    purpose: Purpose,
    grant: Grant,
    nc: &[u8; 32],
    ns: &[u8; 32],
) -> blake3::Hash {
    mac(key, b"proof client", purpose, grant, nc, ns)
}

fn server_proof(
    key: &ClusterKey,
    purpose: Purpose,
    grant: Grant,
    nc: &[u8; 32],
    ns: &[u8; 32],
) -> blake3::Hash {
    mac(key, b"proof server", purpose, grant, nc, ns)
}

fn hello(purpose: Purpose, flags: u8, nc: &[u8; 32]) -> [u8; CLIENT_HELLO_LEN] {
    let mut m = [0u8; CLIENT_HELLO_LEN];
    m[..4].copy_from_slice(MAGIC_CLIENT);
    m[4] = VERSION;
    m[5] = purpose as u8;
    m[6] = flags;
    m[8..].copy_from_slice(nc);
    m
}

fn server_msg(status: u8, grant: Grant, body: &[u8; 32]) -> [u8; SERVER_MSG_LEN] {
    let mut m = [0u8; SERVER_MSG_LEN];
    m[..4].copy_from_slice(MAGIC_SERVER);
    m[4] = VERSION;
    m[5] = status;
    m[6] = grant.byte();
    m[8..].copy_from_slice(body);
    m
}

/// Parses a server message: `(status, grant, body)`.
fn parse_server_msg(m: &[u8; SERVER_MSG_LEN]) -> Result<(u8, Grant, [u8; 32]), AuthError> {
    if &m[..4] != MAGIC_SERVER || m[4] != VERSION {
        return Err(AuthError::Malformed);
    }
    Ok((
        m[5],
        Grant::of_byte(m[6]),
        m[8..].try_into().expect("32 bytes"),
    ))
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, AuthError>>,
) -> Result<T, AuthError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| AuthError::Timeout)?
}

/// The client side: asks for `mode`, proves the key and checks the
/// server's proof. On success the stream carries records of the returned
/// [`Session`], in `mode`: a server that does not grant it is refused.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    key: &ClusterKey,
    purpose: Purpose,
    mode: WireMode,
) -> Result<Session, AuthError> {
    timed(async {
        let nc: [u8; 32] = rand::random();
        let asked = hello_flags(mode, hardware_gmac());
        sock.write_all(&hello(purpose, asked, &nc)).await?;
        sock.flush().await?;
        let mut msg = [0u8; SERVER_MSG_LEN];
        sock.read_exact(&mut msg[..4]).await?;
        if &msg[..4] == MAGIC_KEYLESS {
            return Err(AuthError::PeerKeyless);
        }
        sock.read_exact(&mut msg[4..]).await?;
        let (status, granted, ns) = parse_server_msg(&msg)?;
        match status {
            STATUS_OK => {}
            STATUS_ENCRYPTION_REQUIRED => return Err(AuthError::EncryptionRequired),
            _ => return Err(AuthError::Malformed),
        }
        // An older server grants the leading tag layout; a format not
        // asked for is refused (and frames without crc when not asked).
        if granted.format.mode() != mode
            || !acceptable(asked, granted.format)
            || (!granted.frame_crc && asked & FLAG_NO_FRAME_CRC == 0)
        {
            return Err(match mode {
                WireMode::Encrypted => AuthError::EncryptionUnsupported,
                WireMode::Integrity => AuthError::Malformed,
            });
        }
        sock.write_all(client_proof(key, purpose, granted, &nc, &ns).as_bytes())
            .await?;
        sock.flush().await?;
        let mut verdict = [0u8; SERVER_MSG_LEN];
        sock.read_exact(&mut verdict).await?;
        match parse_server_msg(&verdict)? {
            (STATUS_OK, _, proof)
                if blake3::Hash::from_bytes(proof)
                    == server_proof(key, purpose, granted, &nc, &ns) =>
            {
                Ok(Session::derive(key, purpose, granted, &nc, &ns))
            }
            // A server that accepted our proof but cannot prove itself
            // holds another key (or is an impostor).
            _ => Err(AuthError::WrongKey),
        }
    })
    .await
}

/// The server side: sends a fresh nonce, verifies the client's proof, and
/// only then proves itself. `expect` is the purpose this path serves. The
/// session runs in the mode the client asked for; with
/// `require_encryption` a client that did not ask for encryption is
/// refused (before any proof).
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    key: &ClusterKey,
    expect: Purpose,
    require_encryption: bool,
) -> Result<Session, AuthError> {
    timed(async {
        let mut hello = [0u8; CLIENT_HELLO_LEN];
        sock.read_exact(&mut hello[..6]).await?;
        let purpose = Purpose::of_hello(&hello[..6]).ok_or(AuthError::Malformed)?;
        if purpose != expect {
            return Err(AuthError::WrongPurpose(purpose));
        }
        sock.read_exact(&mut hello[6..]).await?;
        let format = Grant::for_hello(hello[6], hardware_gmac());
        if require_encryption && format.format.mode() != WireMode::Encrypted {
            let _ = sock
                .write_all(&server_msg(STATUS_ENCRYPTION_REQUIRED, format, &[0; 32]))
                .await;
            let _ = sock.flush().await;
            return Err(AuthError::EncryptionRequired);
        }
        let nc: [u8; 32] = hello[8..].try_into().expect("32 bytes");
        let ns: [u8; 32] = rand::random();
        sock.write_all(&server_msg(STATUS_OK, format, &ns)).await?;
        sock.flush().await?;
        let mut proof = [0u8; PROOF_LEN];
        sock.read_exact(&mut proof).await?;
        if blake3::Hash::from_bytes(proof) != client_proof(key, purpose, format, &nc, &ns) {
            let _ = sock
                .write_all(&server_msg(STATUS_WRONG_KEY, format, &[0; 32]))
                .await;
            let _ = sock.flush().await;
            return Err(AuthError::WrongKey);
        }
        let proof = server_proof(key, purpose, format, &nc, &ns);
        sock.write_all(&server_msg(STATUS_OK, format, proof.as_bytes()))
            .await?;
        sock.flush().await?;
        Ok(Session::derive(key, purpose, format, &nc, &ns))
    })
    .await
}

/// What a server without a key answers to a client hello.
pub async fn refuse_keyed_client<S: AsyncWrite + Unpin>(sock: &mut S) {
    let _ = sock.write_all(MAGIC_KEYLESS).await;
    let _ = sock.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Sealed;
    use tokio::io::duplex;

    impl Grant {
        /// What a server older than frames without crc grants.
        fn old(format: RecordFormat) -> Grant {
            Grant {
                format,
                frame_crc: true,
            }
        }
    }

    fn keys() -> (ClusterKey, ClusterKey) {
        (
            ClusterKey::from_bytes([7; 32]),
            ClusterKey::from_bytes([8; 32]),
        )
    }

    #[tokio::test]
    async fn same_key_agrees_on_a_session() {
        let (key, _) = keys();
        let (mut c, mut s) = duplex(1024);
        let server_key = key.clone();
        let server = tokio::spawn(async move {
            server_handshake(&mut s, &server_key, Purpose::Data, false)
                .await
                .map(|x| (x, s))
        });
        let session = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity)
            .await
            .unwrap();
        let (theirs, _s) = server.await.unwrap().unwrap();
        assert_eq!(session.c2s, theirs.c2s);
        assert_eq!(session.s2c, theirs.s2c);
        assert_ne!(session.c2s, session.s2c);
        let best = if hardware_gmac() {
            RecordFormat::PayloadGmac
        } else {
            RecordFormat::Mac(TagLayout::Trailing)
        };
        assert_eq!((session.format(), theirs.format()), (best, best));
        assert!(!session.frame_crc() && !theirs.frame_crc());
    }

    #[test]
    fn servers_grant_the_fastest_format_both_ends_speak() {
        use RecordFormat::*;
        let (lead, trail) = (Mac(TagLayout::Leading), Mac(TagLayout::Trailing));
        // (client's CPU has GMAC, server's has, mode) -> granted
        for (client_hw, server_hw, want) in [
            (true, true, PayloadGmac),
            (true, false, trail),
            (false, true, trail),
            (false, false, trail),
        ] {
            let hello = hello_flags(WireMode::Integrity, client_hw);
            assert_eq!(grant(hello, server_hw), want, "{client_hw} {server_hw}");
            assert!(acceptable(hello, want));
        }
        for hw in [false, true] {
            let hello = hello_flags(WireMode::Encrypted, hw);
            assert_eq!(grant(hello, hw), AesGcm);
            assert!(acceptable(hello, AesGcm));
            assert!(!acceptable(hello, lead) && !acceptable(hello, Gmac));
            // A client of the first keyed release sends 0.
            assert_eq!(grant(0, hw), lead);
        }
        // An older server's 0 is accepted by an integrity client; formats
        // it did not ask for are not.
        assert!(acceptable(hello_flags(WireMode::Integrity, true), lead));
        assert!(!acceptable(hello_flags(WireMode::Integrity, false), Gmac));
        assert!(!acceptable(
            hello_flags(WireMode::Integrity, false),
            PayloadGmac
        ));
        assert!(!acceptable(hello_flags(WireMode::Integrity, true), AesGcm));
        // A client of the release that introduced GMAC asks for it over
        // `len | payload` and gets it from a server that speaks both; a
        // server of that release grants it to a new client, which accepts.
        let gmac_release_hello = FLAG_TRAILING_TAG | FLAG_GMAC;
        assert_eq!(grant(gmac_release_hello, true), Gmac);
        assert!(acceptable(hello_flags(WireMode::Integrity, true), Gmac));
        for f in [lead, trail, Gmac, PayloadGmac, AesGcm] {
            assert_eq!(granted_format(flags(f)), f);
        }
    }

    /// A client and a server whose hello byte 6 a relay rewrites with
    /// `rewrite`: the sessions both sides agree on, after checking that
    /// records flow both ways in them.
    async fn relayed(rewrite: fn(u8) -> u8) -> (RecordFormat, RecordFormat) {
        let (key, _) = keys();
        let (mut c, mut m1) = duplex(4096);
        let (mut m2, mut s) = duplex(4096);
        let server_key = key.clone();
        let server = tokio::spawn(async move {
            let r = server_handshake(&mut s, &server_key, Purpose::Data, false).await;
            (r, s)
        });
        let relay = tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            m1.read_exact(&mut hello).await.unwrap();
            hello[6] = rewrite(hello[6]);
            m2.write_all(&hello).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut m1, &mut m2).await;
        });
        let ours = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity)
            .await
            .unwrap();
        let (theirs, s) = server.await.unwrap();
        let theirs = theirs.unwrap();
        assert_eq!(ours.c2s, theirs.c2s);

        let (cr, cw) = ours.client();
        let (sr, sw) = theirs.server();
        let mut c = Sealed::Sealed(c, Box::new(cr), Box::new(cw));
        let mut s = Sealed::Sealed(s, Box::new(sr), Box::new(sw));
        c.write_all(b"to the server").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 13];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the server");
        s.write_all(b"and back").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0u8; 8];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"and back");
        relay.abort();
        // Both keep frame crcs exactly when the client did not offer to
        // leave them out.
        let kept = rewrite(FLAG_NO_FRAME_CRC) & FLAG_NO_FRAME_CRC == 0;
        assert_eq!((ours.frame_crc(), theirs.frame_crc()), (kept, kept));
        (ours.format(), theirs.format())
    }

    /// A client that keeps its frames' crcs (strata before frames without
    /// them) gets a session with crcs from a new server.
    #[tokio::test]
    async fn a_client_that_keeps_frame_crcs_gets_them() {
        let best = if hardware_gmac() {
            RecordFormat::PayloadGmac
        } else {
            RecordFormat::Mac(TagLayout::Trailing)
        };
        assert_eq!(relayed(|b| b & !FLAG_NO_FRAME_CRC).await, (best, best));
    }

    /// strata's first keyed release ignores byte 6 of a hello and grants
    /// 0, and its clients send 0: a relay that zeroes the byte makes each
    /// side meet exactly that peer. Both fall back to the leading tag
    /// layout (whose proofs hash nothing extra, as the first release's)
    /// and records flow both ways.
    #[tokio::test]
    async fn a_peer_of_the_first_keyed_release_gets_leading_tags_and_works() {
        let leading = RecordFormat::Mac(TagLayout::Leading);
        assert_eq!(relayed(|_| 0).await, (leading, leading));
    }

    /// A client whose CPU has no AES instructions does not offer GMAC: the
    /// two sides agree on the trailing BLAKE3 tag.
    #[tokio::test]
    async fn a_client_without_gmac_gets_blake3_tags_and_works() {
        let trailing = RecordFormat::Mac(TagLayout::Trailing);
        let no_gmac = |b| b & !(FLAG_GMAC | FLAG_PAYLOAD_GMAC);
        assert_eq!(relayed(no_gmac).await, (trailing, trailing));
    }

    /// A client of the release that introduced GMAC tags (over `len |
    /// payload`) does not offer them over the payload alone: the two sides
    /// agree on its format. (On a CPU without AES instructions both fall
    /// back to BLAKE3.)
    #[tokio::test]
    async fn a_client_of_the_first_gmac_release_gets_its_gmac_and_works() {
        let want = if hardware_gmac() {
            RecordFormat::Gmac
        } else {
            RecordFormat::Mac(TagLayout::Trailing)
        };
        assert_eq!(relayed(|b| b & !FLAG_PAYLOAD_GMAC).await, (want, want));
    }

    #[tokio::test]
    async fn wrong_key_fails_on_both_sides() {
        let (key, other) = keys();
        let (mut c, mut s) = duplex(1024);
        let server = tokio::spawn(async move {
            server_handshake(&mut s, &other, Purpose::Data, false)
                .await
                .map(|_| ())
        });
        let client = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity).await;
        assert!(matches!(client, Err(AuthError::WrongKey)), "{client:?}");
        assert!(matches!(server.await.unwrap(), Err(AuthError::WrongKey)));
    }

    #[tokio::test]
    async fn a_server_without_the_key_never_proves_itself() {
        // A rogue server that accepts any proof: its verdict cannot carry a
        // valid proof, so the client refuses it.
        let (key, _) = keys();
        let (mut c, mut s) = duplex(1024);
        let rogue = tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            s.read_exact(&mut hello).await.unwrap();
            s.write_all(&server_msg(
                STATUS_OK,
                Grant::old(RecordFormat::Mac(TagLayout::Leading)),
                &[1; 32],
            ))
            .await
            .unwrap();
            let mut proof = [0u8; PROOF_LEN];
            s.read_exact(&mut proof).await.unwrap();
            s.write_all(&server_msg(
                STATUS_OK,
                Grant::old(RecordFormat::Mac(TagLayout::Leading)),
                &[2; 32],
            ))
            .await
            .unwrap();
            s
        });
        let client = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity).await;
        assert!(matches!(client, Err(AuthError::WrongKey)), "{client:?}");
        drop(rogue.await);
    }

    #[tokio::test]
    async fn a_replayed_client_handshake_fails() {
        let (key, _) = keys();
        // Record a real client's bytes.
        let (mut c, mut s) = duplex(4096);
        let server_key = key.clone();
        let server = tokio::spawn(async move {
            server_handshake(&mut s, &server_key, Purpose::Data, false)
                .await
                .unwrap();
            s
        });
        client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity)
            .await
            .unwrap();
        drop(server.await.unwrap());
        // The client wrote hello then proof; replay them to a new server
        // with a recorder in the middle.
        let (mut c1, mut s1) = duplex(4096);
        let recorder = tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            s1.read_exact(&mut hello).await.unwrap();
            s1.write_all(&server_msg(
                STATUS_OK,
                Grant::old(RecordFormat::Mac(TagLayout::Leading)),
                &[3; 32],
            ))
            .await
            .unwrap();
            let mut proof = [0u8; PROOF_LEN];
            s1.read_exact(&mut proof).await.unwrap();
            (hello, proof)
        });
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            client_handshake(&mut c1, &key, Purpose::Data, WireMode::Integrity),
        )
        .await;
        let (hello, proof) = recorder.await.unwrap();
        let (mut c2, mut s2) = duplex(4096);
        let server = tokio::spawn(async move {
            server_handshake(&mut s2, &key, Purpose::Data, false)
                .await
                .map(|_| ())
        });
        c2.write_all(&hello).await.unwrap();
        let mut challenge = [0u8; SERVER_MSG_LEN];
        c2.read_exact(&mut challenge).await.unwrap();
        c2.write_all(&proof).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(AuthError::WrongKey)));
    }

    #[tokio::test]
    async fn truncated_or_garbage_handshakes_fail() {
        let (key, _) = keys();
        for bytes in [
            &b"STRA"[..],
            &hello(Purpose::Data, FLAG_TRAILING_TAG, &[0; 32])[..20],
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let (mut c, mut s) = duplex(1024);
            let k = key.clone();
            let server = tokio::spawn(async move {
                server_handshake(&mut s, &k, Purpose::Data, false)
                    .await
                    .map(|_| ())
            });
            c.write_all(bytes).await.unwrap();
            drop(c);
            assert!(server.await.unwrap().is_err(), "{bytes:?}");
        }
        // The client refuses a server that answers garbage or closes.
        let (mut c, mut s) = duplex(1024);
        tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            let _ = s.read_exact(&mut hello).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n....").await;
        });
        assert!(
            client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn keyless_servers_and_wrong_purposes_are_named() {
        let (key, _) = keys();
        let (mut c, mut s) = duplex(1024);
        tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            let _ = s.read_exact(&mut hello).await;
            refuse_keyed_client(&mut s).await;
        });
        let r = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity).await;
        assert!(matches!(r, Err(AuthError::PeerKeyless)), "{r:?}");

        let (mut c, mut s) = duplex(1024);
        let k = key.clone();
        let server = tokio::spawn(async move {
            server_handshake(&mut s, &k, Purpose::Data, false)
                .await
                .map(|_| ())
        });
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            client_handshake(&mut c, &key, Purpose::Control, WireMode::Integrity),
        )
        .await;
        assert!(matches!(
            server.await.unwrap(),
            Err(AuthError::WrongPurpose(Purpose::Control))
        ));
    }
    /// A man in the middle that rewrites byte 6 (the mode) of the hello
    /// and, with `flip_challenge`, of the challenge too, then relays.
    async fn tampered(
        flip_challenge: bool,
        require: bool,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let (key, _) = keys();
        let (mut c, mut m1) = duplex(4096);
        let (mut m2, mut s) = duplex(4096);
        let server_key = key.clone();
        let server = tokio::spawn(async move {
            let r = server_handshake(&mut s, &server_key, Purpose::Data, require).await;
            (r, s)
        });
        let mitm = tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            m1.read_exact(&mut hello).await.unwrap();
            hello[6] ^= FLAG_ENCRYPT;
            m2.write_all(&hello).await.unwrap();
            let mut challenge = [0u8; SERVER_MSG_LEN];
            if m2.read_exact(&mut challenge).await.is_err() {
                return;
            }
            if flip_challenge {
                challenge[6] ^= FLAG_ENCRYPT;
            }
            m1.write_all(&challenge).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut m1, &mut m2).await;
        });
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            client_handshake(&mut c, &key, Purpose::Data, WireMode::Encrypted),
        )
        .await
        .expect("the client finishes");
        drop(c);
        let (server, _s) = server.await.unwrap();
        mitm.abort();
        (client, server)
    }

    #[tokio::test]
    async fn both_sides_agree_on_encryption_when_the_client_asks() {
        let (key, _) = keys();
        for require in [false, true] {
            let (mut c, mut s) = duplex(1024);
            let server_key = key.clone();
            let server = tokio::spawn(async move {
                server_handshake(&mut s, &server_key, Purpose::Data, require)
                    .await
                    .map(|x| (x, s))
            });
            let ours = client_handshake(&mut c, &key, Purpose::Data, WireMode::Encrypted)
                .await
                .unwrap();
            let (theirs, _s) = server.await.unwrap().unwrap();
            assert_eq!(ours.mode(), WireMode::Encrypted);
            assert_eq!(theirs.mode(), WireMode::Encrypted);
            assert_eq!(ours.c2s, theirs.c2s);
            // Other keys than the integrity mode's for the same nonces.
            let derive = |f, frame_crc| {
                let grant = Grant {
                    format: f,
                    frame_crc,
                };
                Session::derive(&key, Purpose::Data, grant, &[0; 32], &[0; 32]).c2s
            };
            let leading = derive(RecordFormat::Mac(TagLayout::Leading), true);
            let trailing = derive(RecordFormat::Mac(TagLayout::Trailing), true);
            let enc = derive(RecordFormat::AesGcm, true);
            assert!(leading != trailing && trailing != enc && enc != leading);
            // And other keys again without frame crcs.
            assert_ne!(derive(RecordFormat::AesGcm, false), enc);
            assert_ne!(
                derive(RecordFormat::Mac(TagLayout::Trailing), false),
                trailing
            );
        }
    }

    #[tokio::test]
    async fn a_mode_flipped_in_transit_fails_the_handshake() {
        // Hello flipped to "integrity": the server grants integrity, the
        // client asked for encryption and refuses.
        let (client, server) = tampered(false, false).await;
        assert!(
            matches!(client, Err(AuthError::EncryptionUnsupported)),
            "{client:?}"
        );
        assert!(server.is_err(), "{server:?}");
        // Both flipped, so each side sees what it expects: the proofs bind
        // the mode, so they do not match and neither side gets a session.
        let (client, server) = tampered(true, false).await;
        assert!(matches!(server, Err(AuthError::WrongKey)), "{server:?}");
        assert!(matches!(client, Err(AuthError::WrongKey)), "{client:?}");
        // A server that requires encryption refuses the flipped hello.
        let (client, server) = tampered(false, true).await;
        assert!(
            matches!(server, Err(AuthError::EncryptionRequired)),
            "{server:?}"
        );
        assert!(
            matches!(client, Err(AuthError::EncryptionRequired)),
            "{client:?}"
        );
    }

    #[tokio::test]
    async fn a_server_requiring_encryption_refuses_a_plain_client() {
        let (key, _) = keys();
        let (mut c, mut s) = duplex(1024);
        let k = key.clone();
        let server = tokio::spawn(async move {
            server_handshake(&mut s, &k, Purpose::Data, true)
                .await
                .map(|_| ())
        });
        let client = client_handshake(&mut c, &key, Purpose::Data, WireMode::Integrity).await;
        assert!(
            matches!(client, Err(AuthError::EncryptionRequired)),
            "{client:?}"
        );
        assert!(matches!(
            server.await.unwrap(),
            Err(AuthError::EncryptionRequired)
        ));
    }

    #[tokio::test]
    async fn an_old_server_is_refused_by_a_client_that_wants_encryption() {
        // A server from before wire encryption: ignores byte 6 of the hello
        // and sends 0 there in its challenge (and proves in integrity mode).
        let (key, _) = keys();
        let (mut c, mut s) = duplex(1024);
        tokio::spawn(async move {
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            s.read_exact(&mut hello).await.unwrap();
            let old = server_msg(
                STATUS_OK,
                Grant::old(RecordFormat::Mac(TagLayout::Leading)),
                &[4; 32],
            );
            s.write_all(&old).await.unwrap();
            let mut proof = [0u8; PROOF_LEN];
            let _ = s.read_exact(&mut proof).await;
        });
        let r = client_handshake(&mut c, &key, Purpose::Data, WireMode::Encrypted).await;
        assert!(matches!(r, Err(AuthError::EncryptionUnsupported)), "{r:?}");
    }
}
