//! [`Slot`]: one configured replica of a volume, its health and counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use strata_replica::client::ReplicaClient;

/// Health of one replica, with the reason when it is out.
#[derive(Clone)]
pub enum Health {
    /// Receives every write and may serve reads.
    Healthy(Arc<ReplicaClient>),
    /// Out of the volume until recovered: never read from, never written.
    Faulted { reason: String },
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Healthy(_) => f.write_str("Healthy"),
            Health::Faulted { reason } => write!(f, "Faulted({reason})"),
        }
    }
}

/// One replica slot: where it is, how it is, and what went through it.
#[derive(Debug)]
pub struct Slot {
    pub addr: SocketAddr,
    health: RwLock<Health>,
    pub in_flight: AtomicU64,
    pub ops_ok: AtomicU64,
    pub ops_failed: AtomicU64,
}

impl Slot {
    pub fn new(addr: SocketAddr, health: Health) -> Self {
        Slot {
            addr,
            health: RwLock::new(health),
            in_flight: AtomicU64::new(0),
            ops_ok: AtomicU64::new(0),
            ops_failed: AtomicU64::new(0),
        }
    }

    pub fn health(&self) -> Health {
        self.health.read().clone()
    }

    /// The client if healthy.
    pub fn client(&self) -> Option<Arc<ReplicaClient>> {
        match &*self.health.read() {
            Health::Healthy(c) => Some(c.clone()),
            Health::Faulted { .. } => None,
        }
    }

    pub fn is_healthy(&self) -> bool {
        matches!(*self.health.read(), Health::Healthy(_))
    }

    /// Takes the replica out of the volume. Returns false if it already was.
    pub fn fault(&self, volume: &str, reason: String) -> bool {
        let mut h = self.health.write();
        if let Health::Faulted { .. } = *h {
            return false;
        }
        tracing::warn!(volume, replica = %self.addr, %reason, "replica faulted");
        *h = Health::Faulted { reason };
        true
    }

    pub(crate) fn record(&self, ok: bool) {
        if ok {
            self.ops_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.ops_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
