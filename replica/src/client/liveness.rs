//! Liveness of a replica connection: the watchdog that fails a request
//! past its deadline, and the TCP keepalive plus `TCP_INFO` check that
//! tells a silent replica host from a slow one.

use std::io;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Shared;

/// Keepalive probes start after the connection is silent this long (at
/// least 1 s: the kernel counts whole seconds).
fn keepalive_idle(timeout: Duration) -> Duration {
    (timeout / 2).max(Duration::from_secs(1))
}

/// Turns on TCP keepalive, so that a replica host that is up keeps
/// acknowledging something at least every [`keepalive_idle`] even while
/// no data moves (a long flush): the watchdog's proof of life.
pub(super) fn keep_alive(sock: &TcpStream, timeout: Duration) -> io::Result<()> {
    let idle = keepalive_idle(timeout);
    socket2::SockRef::from(sock).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle)
            .with_retries(3),
    )
}

/// How long the peer's kernel has acknowledged nothing on `fd` (Linux
/// `TCP_INFO`); `None` where that cannot be asked.
#[cfg(target_os = "linux")]
fn since_last_ack(fd: std::os::fd::RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len`
    // bytes into it and `fd` is the connection's open socket.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| Duration::from_millis(info.tcpi_last_ack_recv as u64))
}

#[cfg(not(target_os = "linux"))]
fn since_last_ack(_fd: std::os::fd::RawFd) -> Option<Duration> {
    None
}

/// How often the watchdog looks for overdue requests: a request fails
/// between its deadline and one tick later.
pub(super) fn watchdog_tick(timeout: Duration) -> Duration {
    (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Fails the connection when a request passes its deadline, or when the
/// replica's host has gone silent: that request gets `Timeout`, every
/// other one `Disconnected`. One timer per connection instead of one per
/// request (registering and cancelling a timer per request cost measurable
/// CPU at tens of thousands of IOPS).
///
/// Silent: a request has been pending longer than `timeout` and the peer's
/// kernel has acknowledged nothing for as long (keepalive makes a live host
/// acknowledge at least every [`keepalive_idle`]). That catches a
/// partitioned replica within about `timeout` even when only flushes,
/// which may take [`super::DURABLE_TIMEOUT_FACTOR`] times longer, are pending; a
/// replica that is slow but up keeps acknowledging and is given their full
/// deadline.
pub(super) async fn watchdog(
    shared: &Shared,
    tick: Duration,
    timeout: Duration,
    fd: std::os::fd::RawFd,
) {
    let silent_limit = timeout.max(keepalive_idle(timeout) * 2 + Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = Instant::now();
        // One pass: the first overdue request, and the oldest one.
        let (overdue, oldest) = {
            let p = shared.pending.lock();
            let mut overdue = None;
            let mut oldest: Option<(u64, Instant)> = None;
            for (&id, w) in &p.waiters {
                if overdue.is_none() && w.deadline <= now {
                    overdue = Some(id);
                }
                if oldest.is_none_or(|(_, sent)| w.sent < sent) {
                    oldest = Some((id, w.sent));
                }
            }
            (overdue, oldest.map(|(id, sent)| (id, now - sent)))
        };
        if let Some(id) = overdue {
            tracing::warn!(
                addr = %shared.addr,
                volume = %shared.volume,
                request = id,
                "replica request timed out; closing the connection"
            );
            return shared.time_out(id);
        }
        let Some((id, waited)) = oldest.filter(|(_, waited)| *waited > silent_limit) else {
            continue;
        };
        if let Some(silent) = since_last_ack(fd).filter(|s| *s > silent_limit) {
            tracing::warn!(
                addr = %shared.addr,
                volume = %shared.volume,
                request = id,
                waited_ms = waited.as_millis() as u64,
                silent_ms = silent.as_millis() as u64,
                "replica host acknowledges nothing; closing the connection"
            );
            return shared.time_out(id);
        }
    }
}
