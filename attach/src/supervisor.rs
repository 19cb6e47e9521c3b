//! Keeps kernel nbd attachments connected across controller restarts.
//!
//! The kernel marks a connection dead when the controller's socket closes
//! (or a request times out), multicasts NBD_CMD_LINK_DEAD and holds IO for
//! up to the dead-connection timeout. The supervisor reconnects with
//! backoff, redoes the handshake and hands the new socket over with
//! NBD_CMD_RECONFIGURE. Every `probe_interval` it also re-reads the state
//! files and NBD_CMD_STATUS (picking up new attachments, dropping detached
//! ones) and probes each device: a handshake plus a RECONFIGURE, which
//! heals a death whose LINK_DEAD it missed (the kernel ignores the socket
//! when the connection is alive). When the export grew, the reconnect's
//! RECONFIGURE carries the new size together with the socket that
//! negotiated it (NBD_ATTR_SIZE_BYTES).
//!
//! One supervisor per device: each holds an `flock` on the device's lock
//! file, so a second supervisor waits and takes over when the first dies.
//! A supervisor restart does not disturb the devices: the kernel holds the
//! sockets; the supervisor only finds the state files again.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::handshake;
use crate::kernel::Nbd;
use crate::netlink::Reconfigure;
use crate::state::{self, Attachment, DeviceLock, Method};
use crate::uri::NbdUri;
use crate::AttachError;

#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    pub state_dir: PathBuf,
    /// How often to re-read state, check STATUS and probe each device.
    pub probe_interval: Duration,
    pub connect_timeout: Duration,
    /// Supervise only these devices (`/dev/nbdN`); `None`: all recorded.
    pub only: Option<Vec<String>>,
    /// Return once none of `only` is attached any more.
    pub exit_when_detached: bool,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
}

impl Default for SupervisorOptions {
    fn default() -> Self {
        SupervisorOptions {
            state_dir: PathBuf::from(state::DEFAULT_STATE_DIR),
            probe_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            only: None,
            exit_when_detached: false,
            max_backoff: Duration::from_secs(2),
        }
    }
}

struct Held {
    attachment: Attachment,
    /// An export size seen by a probe but not applied yet (logged once).
    noticed_size: Option<u64>,
    _lock: DeviceLock,
}

/// Runs until `stop` is set (or, with `exit_when_detached`, until the
/// devices are detached).
pub fn supervise(opts: &SupervisorOptions, stop: &AtomicBool) -> Result<(), AttachError> {
    let mut nbd = Nbd::open()?;
    let events = nbd.subscribe()?;
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut next_probe = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_probe {
            let any = refresh(&mut nbd, opts, &mut held)?;
            if opts.exit_when_detached && !any {
                tracing::info!("no supervised device is attached any more; supervisor exits");
                return Ok(());
            }
            for (index, h) in held.iter_mut() {
                probe(&mut nbd, *index, h, opts);
            }
            next_probe = Instant::now() + opts.probe_interval;
        }
        let wait = next_probe
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        for index in events.wait_link_dead(wait)? {
            let Some(h) = held.get_mut(&index) else {
                continue;
            };
            tracing::warn!(device = %h.attachment.device, uri = %h.attachment.uri, "connection to the controller died (LINK_DEAD); reconnecting");
            reconnect(&mut nbd, index, &mut h.attachment, opts, stop)?;
        }
    }
    Ok(())
}

/// Picks up recorded, attached devices (taking their locks) and drops the
/// ones no longer attached. Returns whether any wanted device is attached.
fn refresh(
    nbd: &mut Nbd,
    opts: &SupervisorOptions,
    held: &mut BTreeMap<u32, Held>,
) -> Result<bool, AttachError> {
    let connected: Vec<u32> = nbd
        .status()?
        .into_iter()
        .filter(|d| d.connected)
        .map(|d| d.index)
        .collect();
    held.retain(|index, h| {
        let keep = connected.contains(index);
        if !keep {
            tracing::info!(device = %h.attachment.device, "detached; no longer supervising");
        }
        keep
    });
    let wanted = |device: &str| {
        opts.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|d| d == device))
    };
    let mut any = false;
    for a in state::load_all(&opts.state_dir)? {
        let Some(index) = a.nbd_index.filter(|_| a.method == Method::KernelNbd) else {
            continue;
        };
        if !wanted(&a.device) || !connected.contains(&index) {
            continue;
        }
        any = true;
        if let Some(h) = held.get_mut(&index) {
            // Another process (refresh_size, a re-attach) may have updated it.
            h.attachment = a;
            continue;
        }
        match DeviceLock::try_take(&opts.state_dir, &a.device)? {
            Some(lock) => {
                tracing::info!(device = %a.device, uri = %a.uri, "supervising");
                held.insert(
                    index,
                    Held {
                        attachment: a,
                        noticed_size: None,
                        _lock: lock,
                    },
                );
            }
            None => {
                tracing::debug!(device = %a.device, "another supervisor holds this device");
            }
        }
    }
    Ok(any || !held.is_empty())
}

/// One handshake and RECONFIGURE with the new socket: the kernel swaps it
/// in if it had marked the connection dead (a LINK_DEAD this supervisor
/// missed), else drops it. Failures are logged; the next probe or
/// LINK_DEAD retries.
///
/// The new size is *not* sent here: the connection the kernel keeps may
/// have been negotiated at the old size, and a server that bounds each
/// connection by its handshake size (strata's controller does) would fail
/// IO past the old end. The size goes with the socket that negotiated it,
/// in [`reconnect`].
fn probe(nbd: &mut Nbd, index: u32, h: &mut Held, opts: &SupervisorOptions) {
    match try_reconfigure(nbd, index, &mut h.attachment, opts, false) {
        Ok(size) if size != h.attachment.size && h.noticed_size != Some(size) => {
            h.noticed_size = Some(size);
            tracing::warn!(
                device = %h.attachment.device,
                device_size = h.attachment.size,
                export_size = size,
                "the export's size changed; the device follows when its connection is replaced \
                 (after a controller restart, or when the controller closes connections after growing)"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(device = %h.attachment.device, uri = %h.attachment.uri, error = %ErrorChain(&e), "probe failed")
        }
    }
}

/// Handshake + RECONFIGURE; with `with_size`, a changed export size goes
/// along (NBD_ATTR_SIZE_BYTES). Returns the export's size.
fn try_reconfigure(
    nbd: &mut Nbd,
    index: u32,
    a: &mut Attachment,
    opts: &SupervisorOptions,
    with_size: bool,
) -> Result<u64, AttachError> {
    let uri = NbdUri::parse(&a.uri)?;
    let conn = handshake::connect(&uri, opts.connect_timeout)?;
    let size = conn.info.size;
    let resize = with_size && size != a.size;
    nbd.reconfigure(&Reconfigure {
        index,
        fds: vec![conn.stream.as_raw_fd()],
        size: resize.then_some((size, u64::from(a.block_size))),
    })?;
    if resize {
        tracing::info!(device = %a.device, old = a.size, new = size, "export size changed; device resized with the new connection");
        a.size = size;
        if let Err(e) = state::save(&opts.state_dir, a) {
            tracing::warn!(device = %a.device, error = %ErrorChain(&e), "cannot record the new size");
        }
    }
    Ok(size)
}

/// Reconnects with exponential backoff until the RECONFIGURE succeeds, the
/// device is detached, or `stop` is set.
fn reconnect(
    nbd: &mut Nbd,
    index: u32,
    a: &mut Attachment,
    opts: &SupervisorOptions,
    stop: &AtomicBool,
) -> Result<(), AttachError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    let mut last_status_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        attempts += 1;
        // After LINK_DEAD the kernel's connection is dead: this socket
        // replaces it, so the size it negotiated is safe to apply.
        match try_reconfigure(nbd, index, a, opts, true) {
            Ok(_) => {
                tracing::info!(
                    device = %a.device,
                    uri = %a.uri,
                    attempts,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "reconnected: new socket handed to the kernel (RECONFIGURE)"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(device = %a.device, attempts, error = %ErrorChain(&e), "reconnect attempt failed")
            }
        }
        if last_status_check.elapsed() > Duration::from_secs(5) {
            last_status_check = Instant::now();
            if !nbd.is_connected(index)? {
                tracing::info!(device = %a.device, "detached while reconnecting");
                return Ok(());
            }
            tracing::warn!(
                device = %a.device,
                uri = %a.uri,
                attempts,
                elapsed_s = started.elapsed().as_secs(),
                dead_timeout_s = a.dead_timeout_secs,
                "controller still unreachable; IO is waiting"
            );
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(opts.max_backoff);
    }
    Ok(())
}

/// Formats an error with its sources, for log lines.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}
