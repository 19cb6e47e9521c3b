//! The accept loop and the login phase: [`serve`] hands every connection
//! to [`serve_connection`], which runs login ([`Login`]) within
//! [`LOGIN_TIMEOUT`], registers the session ([`Sessions`]: TSIH
//! allocation, reinstatement of a session with the same initiator name
//! and ISID) and then runs the full feature phase ([`full_feature`]).
//! A failing connection is logged and closed; it never affects others.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::chap::ChapConfig;
use super::conn::{full_feature, read_frame, ConnOptions, WINDOW};
use super::error::ConnError;
use super::login::*;
use super::pdu::{encode, login_response, parse_request, stamp_seq, Digests, OutPdu, Request};
use crate::frontend::scsi::lun::Lun;
use crate::frontend::scsi::pages::Identity;
use crate::frontend::Backend;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must finish login within this time.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for connections to finish in-flight commands: the
/// replicas bound their unflushed data to about a second of disk time, and
/// the final flush and the whole stop must fit a pod's grace period
/// (`crate::run::STOP_BUDGET`).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The iSCSI name of a volume's target: `iqn.2026-11.io.strata:<volume>`,
/// with the volume name lower-cased and characters an IQN cannot hold
/// replaced by `-`.
pub fn target_name(volume: &str) -> String {
    let v: String = volume
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == ':' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("iqn.2026-11.io.strata:{v}")
}

/// Target settings beyond the backend.
#[derive(Debug, Clone, Default)]
pub struct IscsiOptions {
    /// CHAP secrets; `None` allows initiators without authentication.
    pub chap: Option<ChapConfig>,
    pub conn: ConnOptions,
}

/// Live sessions by TSIH.
#[derive(Default)]
pub struct Sessions {
    last: u16,
    live: HashMap<u16, (String, [u8; 6], watch::Sender<bool>)>,
}

impl Sessions {
    /// Registers a new session, ending an older one of the same initiator
    /// and ISID (session reinstatement); returns its TSIH and the signal
    /// that ends it.
    pub fn open(&mut self, initiator: &str, isid: [u8; 6]) -> (u16, watch::Receiver<bool>) {
        self.live.retain(|_, (i, s, kill)| {
            let same = i == initiator && *s == isid;
            if same {
                let _ = kill.send(true);
            }
            !same
        });
        loop {
            self.last = self.last.wrapping_add(1);
            if self.last != 0 && !self.live.contains_key(&self.last) {
                break;
            }
        }
        let (tx, rx) = watch::channel(false);
        self.live
            .insert(self.last, (initiator.to_string(), isid, tx));
        (self.last, rx)
    }

    pub fn exists(&self, tsih: u16) -> bool {
        self.live.contains_key(&tsih)
    }

    pub fn close(&mut self, tsih: u16) {
        self.live.remove(&tsih);
    }
}

struct SessionGuard {
    sessions: Arc<Mutex<Sessions>>,
    tsih: u16,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.lock().close(self.tsih);
    }
}

/// Everything connections share.
pub struct Target<B> {
    pub lun: Arc<Lun<B>>,
    pub cfg: Arc<TargetConfig>,
    pub sessions: Arc<Mutex<Sessions>>,
    pub opts: ConnOptions,
}

impl<B: Backend> Target<B> {
    pub fn new(backend: Arc<B>, opts: IscsiOptions) -> Arc<Target<B>> {
        let volume = backend.volume_name().to_string();
        let name = target_name(&volume);
        Arc::new(Target {
            lun: Arc::new(Lun::new(
                backend,
                Identity {
                    volume,
                    target: name.clone(),
                },
            )),
            cfg: Arc::new(TargetConfig {
                target_name: name,
                chap: opts.chap,
            }),
            sessions: Arc::default(),
            opts: opts.conn,
        })
    }
}

/// Serves `backend` as one LUN to every client of `listener` until
/// `shutdown` turns true; then stops accepting, lets connections finish
/// (at most [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    opts: IscsiOptions,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let target = Target::new(backend, opts);
    let limits = strata_net::Limits {
        name: "iSCSI",
        max_connections: MAX_CONNECTIONS,
        grace: SHUTDOWN_GRACE,
    };
    let rx = shutdown.clone();
    strata_net::serve(listener, limits, shutdown, move |sock, peer| {
        let (target, rx) = (target.clone(), rx.clone());
        async move {
            let local = match sock.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            };
            match serve_connection(sock, local, target, rx).await {
                Ok(()) => tracing::debug!(%peer, "iSCSI connection closed"),
                Err(e) => tracing::info!(%peer, "iSCSI connection closed: {e}"),
            }
        }
    })
    .await;
    Ok(())
}

async fn send_login<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut p: OutPdu,
    statsn: u32,
    cmdsn: u32,
) -> io::Result<()> {
    stamp_seq(
        &mut p.bhs,
        Some(statsn),
        cmdsn,
        cmdsn.wrapping_add(WINDOW - 1),
    );
    let mut out = Vec::with_capacity(48 + p.data.len() + 4);
    encode(&mut out, &p.bhs, &p.data, Digests::default());
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Serves one connection: login, then the full feature phase.
pub async fn serve_connection<S, B>(
    mut stream: S,
    local: SocketAddr,
    target: Arc<Target<B>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let login = async {
        let mut login = Login::new(&target.cfg);
        let mut statsn: Option<u32> = None;
        let mut first = true;
        loop {
            let Some(f) =
                read_frame(&mut stream, &mut buf, Digests::default(), LOGIN_MAX_DATA).await?
            else {
                return Ok(None);
            };
            let Request::Login(req) = parse_request(&f.bhs, &f.ahs, f.data)? else {
                return Err(ConnError::Protocol(
                    "a PDU other than Login before login".into(),
                ));
            };
            let s = *statsn.get_or_insert(req.exp_statsn);
            statsn = Some(s.wrapping_add(1));
            if first && req.tsih != 0 {
                // This target never adds a connection to a session.
                let status = if target.sessions.lock().exists(req.tsih) {
                    TOO_MANY_CONNECTIONS
                } else {
                    SESSION_DOES_NOT_EXIST
                };
                let p = login_response(&req, false, req.csg, 0, 0, status, Default::default());
                send_login(&mut stream, p, s, req.cmdsn).await?;
                return Err(ConnError::LoginFailed(status.0, status.1));
            }
            first = false;
            let step = login.step(&req, &mut rand::thread_rng());
            match step {
                Step::Continue(p) => send_login(&mut stream, p, s, req.cmdsn).await?,
                Step::Fail(p) => {
                    let status = (p.bhs[36], p.bhs[37]);
                    send_login(&mut stream, p, s, req.cmdsn).await?;
                    return Err(ConnError::LoginFailed(status.0, status.1));
                }
                Step::Done(mut p, neg) => {
                    let (tsih, kill) = target.sessions.lock().open(&neg.initiator_name, neg.isid);
                    p.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
                    send_login(&mut stream, p, s, req.cmdsn).await?;
                    return Ok(Some((neg, tsih, kill, s.wrapping_add(1))));
                }
            }
        }
    };
    let done = tokio::select! {
        r = tokio::time::timeout(LOGIN_TIMEOUT, login) => match r {
            Ok(r) => r?,
            Err(_) => return Err(ConnError::LoginTimeout(LOGIN_TIMEOUT)),
        },
        _ = strata_net::stopped(&mut shutdown) => return Ok(()),
    };
    let Some((neg, tsih, kill, statsn)) = done else {
        return Ok(());
    };
    let _guard = SessionGuard {
        sessions: target.sessions.clone(),
        tsih,
    };
    tracing::debug!(initiator = %neg.initiator_name, tsih, ?neg.session_type, "iSCSI login");
    let (rd, wr) = tokio::io::split(stream);
    full_feature(
        rd,
        wr,
        buf,
        target.lun.clone(),
        target.cfg.clone(),
        local,
        neg.session_type,
        neg.params,
        neg.cmdsn,
        statsn,
        target.opts,
        shutdown,
        kill,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(target_name("vol"), "iqn.2026-11.io.strata:vol");
        assert_eq!(target_name("My_Vol 1"), "iqn.2026-11.io.strata:my-vol-1");
    }

    #[test]
    fn sessions_reinstate_and_allocate() {
        let mut s = Sessions::default();
        let (a, mut ka) = s.open("i", [1; 6]);
        let (b, _kb) = s.open("i", [2; 6]);
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        assert!(!*ka.borrow_and_update());
        let (c, _kc) = s.open("i", [1; 6]);
        assert!(*ka.borrow_and_update(), "the old session is told to end");
        assert!(!s.exists(a) && s.exists(b) && s.exists(c));
        s.close(b);
        assert!(!s.exists(b));
    }
}
