//! [`Slot`]: one configured replica of a volume: its health (with the
//! reason when it is out), the regions it still needs copied, what it was
//! when it left (to tell a returning replica from a replaced one), and its
//! counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use strata_replica::client::ReplicaClient;
use strata_replica::extent::RangeMap;

use super::disk::DiskStats;

/// Size of a region in the dirty map: resync copies whole regions.
pub const REGION: u64 = 1 << 20;

/// Health of one replica.
#[derive(Clone)]
pub enum Health {
    /// Up to date: receives every write, serves reads, counts for quorum.
    Healthy(Arc<ReplicaClient>),
    /// Write-only while the regions it missed are copied to it: receives
    /// every write, never serves reads, does not count for quorum.
    Syncing(Arc<ReplicaClient>),
    /// Out of the volume until it rejoins: never read from, never written.
    Faulted { reason: String },
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Healthy(_) => f.write_str("Healthy"),
            Health::Syncing(_) => f.write_str("Syncing"),
            Health::Faulted { reason } => write!(f, "Faulted({reason})"),
        }
    }
}

/// What a replica was when it left the volume. A returning replica with
/// the same lineage and epoch only needs the regions it missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub lineage: String,
    pub epoch: u64,
}

/// Progress of a resync or rebuild, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct SyncProgress {
    pub full: bool,
    /// Regions are compared (digests) before they are copied.
    pub verify: bool,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub started: Option<Instant>,
}

impl SyncProgress {
    pub fn rate_mib(&self) -> f64 {
        match self.started {
            Some(t) if t.elapsed().as_secs_f64() > 0.0 => {
                self.done_bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub fn eta_secs(&self) -> u64 {
        let rate = self.rate_mib() * (1 << 20) as f64;
        if rate <= 0.0 {
            return 0;
        }
        (self.total_bytes.saturating_sub(self.done_bytes) as f64 / rate) as u64
    }
}

/// One replica slot.
#[derive(Debug)]
pub struct Slot {
    pub addr: SocketAddr,
    health: RwLock<Health>,
    /// Regions (in units of [`REGION`]) this replica must get copied before
    /// it is healthy again. Grows while it is faulted; O(regions written).
    pending: Mutex<RangeMap<()>>,
    departure: Mutex<Option<Departure>>,
    pub progress: Mutex<SyncProgress>,
    /// Reconnect backoff: next attempt not before this, and the current delay.
    pub retry: Mutex<(Instant, std::time::Duration)>,
    pub in_flight: AtomicU64,
    pub ops_ok: AtomicU64,
    pub ops_failed: AtomicU64,
    /// Heap bytes of the replica's in-memory index, as it last reported
    /// them (`mgmt::refresh_index_bytes`); 0 until then.
    pub index_bytes: AtomicU64,
    /// While syncing: compare each region with the source by digest and
    /// copy only those that differ (after a crash, when the replica may
    /// differ anywhere it was written since its last flush).
    pub verify: AtomicBool,
    /// While syncing: the replica holds every acknowledged write already
    /// (it only may differ where writes were in flight at a controller
    /// crash), so it counts for the write quorum, though it is not read.
    pub counts_for_quorum: AtomicBool,
    /// Faulted for lagging and not healthy again yet: while it is out, no
    /// other replica is faulted for lagging (`lag.rs`).
    pub out_for_lag: AtomicBool,
    /// The last lag fault and the rejoin delay it imposed.
    last_lag: Mutex<Option<(Instant, std::time::Duration)>>,
    /// How fast its disk answers: flush and write latency, throughput,
    /// slow or not (`disk.rs`).
    pub disk: DiskStats,
    /// The replica copies from peers itself (PULL) and drops a copy's
    /// reads from its cache, as its status said; cleared when a PULL to it
    /// could not reach its source (the controller then relays).
    pub peer_copy: AtomicBool,
    /// The replica serves READ_PIECES and takes piecewise PULLs, as its
    /// status said: a copy between two such replicas reads only the data,
    /// many pieces per request (`copy.rs`).
    pub reads_pieces: AtomicBool,
}

/// Counts one request in flight on a slot for as long as it lives (a
/// request dropped when its replica is faulted for lagging is counted out
/// too).
pub(crate) struct InFlight(Arc<Slot>);

impl InFlight {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(slot)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one flush (or FUA write) waiting on a slot's disk for as long as
/// it lives, however it ends (answered, failed, dropped for lagging).
pub(crate) struct FlushWaiting(Arc<Slot>, Instant);

impl FlushWaiting {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        let started = slot.disk.flush_started();
        FlushWaiting(slot, started)
    }
}

impl Drop for FlushWaiting {
    fn drop(&mut self) {
        self.0.disk.flush_done(self.1);
    }
}

impl Slot {
    pub fn new(addr: SocketAddr, health: Health, departure: Option<Departure>) -> Self {
        Slot {
            addr,
            health: RwLock::new(health),
            pending: Mutex::new(RangeMap::new()),
            departure: Mutex::new(departure),
            progress: Mutex::new(SyncProgress::default()),
            retry: Mutex::new((Instant::now(), std::time::Duration::from_millis(250))),
            in_flight: AtomicU64::new(0),
            ops_ok: AtomicU64::new(0),
            ops_failed: AtomicU64::new(0),
            index_bytes: AtomicU64::new(0),
            verify: AtomicBool::new(false),
            out_for_lag: AtomicBool::new(false),
            last_lag: Mutex::new(None),
            counts_for_quorum: AtomicBool::new(false),
            disk: DiskStats::default(),
            peer_copy: AtomicBool::new(false),
            reads_pieces: AtomicBool::new(false),
        }
    }

    pub fn health(&self) -> Health {
        self.health.read().clone()
    }

    pub fn set_health(&self, h: Health) {
        if matches!(h, Health::Healthy(_)) {
            self.out_for_lag.store(false, Ordering::Release);
        }
        *self.health.write() = h;
    }

    /// After a lag fault: the next rejoin waits 1 s, doubling (up to 60 s)
    /// while lag faults come less than a minute apart, so a replica that
    /// keeps lagging cannot flap in and out.
    pub fn back_off_after_lag(&self) {
        const FIRST: std::time::Duration = std::time::Duration::from_secs(1);
        const MAX: std::time::Duration = std::time::Duration::from_secs(60);
        let now = Instant::now();
        let mut last = self.last_lag.lock();
        let delay = match *last {
            Some((at, d)) if now.duration_since(at) < MAX => (d * 2).min(MAX),
            _ => FIRST,
        };
        *last = Some((now, delay));
        *self.retry.lock() = (now + delay, delay);
    }

    /// The client if healthy (readable, counts for quorum).
    pub fn healthy_client(&self) -> Option<Arc<ReplicaClient>> {
        match &*self.health.read() {
            Health::Healthy(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// The client if the replica receives writes (healthy or syncing), and
    /// whether it counts for the write quorum (healthy, or syncing with
    /// every acknowledged write already: see `counts_for_quorum`).
    pub fn write_target(&self) -> Option<(Arc<ReplicaClient>, bool)> {
        match &*self.health.read() {
            Health::Healthy(c) => Some((c.clone(), true)),
            Health::Syncing(c) => Some((c.clone(), self.counts_for_quorum.load(Ordering::Acquire))),
            Health::Faulted { .. } => None,
        }
    }

    pub fn is_healthy(&self) -> bool {
        matches!(*self.health.read(), Health::Healthy(_))
    }

    pub fn is_faulted(&self) -> bool {
        matches!(*self.health.read(), Health::Faulted { .. })
    }

    /// Takes the replica out. `departure` records what it was (lineage,
    /// epoch) if known. Returns false if it already was out.
    pub fn fault(&self, volume: &str, reason: String) -> bool {
        let mut h = self.health.write();
        if let Health::Faulted { .. } = *h {
            return false;
        }
        tracing::warn!(volume, replica = %self.addr, %reason, "replica faulted");
        *h = Health::Faulted { reason };
        true
    }

    pub fn departure(&self) -> Option<Departure> {
        self.departure.lock().clone()
    }

    pub fn set_departure(&self, d: Option<Departure>) {
        *self.departure.lock() = d;
    }

    /// Marks the regions overlapping `[offset, offset + len)` as missed.
    pub fn mark_pending(&self, offset: u64, len: u64) {
        let first = offset / REGION;
        let last = (offset + len.max(1)).div_ceil(REGION);
        self.pending.lock().set(first, last, ());
    }

    /// Marks every region of a volume of `size` bytes (a full rebuild).
    pub fn mark_all_pending(&self, size: u64) {
        self.pending.lock().set(0, size.div_ceil(REGION), ());
    }

    /// The first region still to copy, removed from the set.
    pub fn take_pending(&self) -> Option<u64> {
        let mut p = self.pending.lock();
        let (s, _, _) = p.iter().next()?;
        p.clear(s, s + 1);
        Some(s)
    }

    /// Up to `max` contiguous pending regions from the first one, removed
    /// from the set: (first region, count).
    pub fn take_pending_run(&self, max: u64) -> Option<(u64, u64)> {
        let mut p = self.pending.lock();
        let (s, e, _) = p.iter().next()?;
        let n = (e - s).min(max.max(1));
        p.clear(s, s + n);
        Some((s, n))
    }

    pub fn pending_regions(&self) -> u64 {
        self.pending.lock().iter().map(|(s, e, _)| e - s).sum()
    }

    pub(crate) fn record(&self, ok: bool) {
        if ok {
            self.ops_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.ops_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
