//! Locks that keep `gc` from deleting what a running backup or restore
//! needs. They are plain objects, so they work the same on every S3 server
//! and on a directory.
//!
//! - A backup (or restore) first writes `locks/<kind>/<volume>/<id>` and
//!   rewrites it every heartbeat; only then does it look at `locks/gc`, and
//!   if a live gc lock is there it waits until that gc has finished
//!   deleting.
//! - A gc writes `locks/gc` first and only then lists `locks/`; if any live
//!   backup or restore lock is there, it deletes nothing (it reports the
//!   unreferenced objects and says which lock deferred it).
//!
//! Both write before they read, and S3 (like a filesystem) reads its own
//! writes, so at least one of the two sees the other: gc never deletes
//! beside a running backup, and a backup never starts its dedup checks
//! while gc deletes. A lock not rewritten for `stale_after` belongs to a dead
//! process and is ignored (gc removes it); a backup whose own lock was
//! removed as stale fails before it writes its manifest rather than
//! trusting chunks that gc may have swept.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::error::Result;
use crate::store::Store;
use crate::target::{Target, GC_LOCK};

pub(crate) struct Lock {
    store: Store,
    key: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Lock {
    /// Writes the lock, starts its heartbeat, then waits for a gc that is
    /// deleting to finish.
    pub async fn acquire(target: &Target, kind: &str, volume: &str, id: &str) -> Result<Lock> {
        let key = format!("locks/{kind}/{volume}/{id}");
        let body = Bytes::from(
            serde_json::json!({
                "kind": kind, "volume": volume, "id": id,
                "host": hostname(), "pid": std::process::id(),
            })
            .to_string(),
        );
        target.store.put(&key, body.clone()).await?;
        let store = target.store.clone();
        let every = target.opts.heartbeat;
        let hb_key = key.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = store.put(&hb_key, body.clone()).await {
                    tracing::warn!("cannot refresh lock {hb_key}: {e}");
                }
            }
        });
        let lock = Lock {
            store: target.store.clone(),
            key,
            heartbeat,
        };
        wait_for_gc(target).await?;
        Ok(lock)
    }

    /// False if gc removed this lock as stale.
    pub async fn still_held(&self) -> Result<bool> {
        self.store.exists(&self.key).await
    }

    pub async fn release(self) {
        self.heartbeat.abort();
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!("cannot remove lock {}: {e}", self.key);
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// The server's idea of "now": the modification time of an object just
/// written, or the local clock if the store does not say.
pub(crate) async fn server_now(store: &Store, key: &str) -> SystemTime {
    match store.modified(key).await {
        Ok(Some(t)) => t,
        _ => SystemTime::now(),
    }
}

fn is_live(modified: SystemTime, now: SystemTime, stale_after: Duration) -> bool {
    match now.duration_since(modified) {
        Ok(age) => age < stale_after,
        Err(_) => true, // modified in the future (clock skew): live
    }
}

async fn wait_for_gc(target: &Target) -> Result<()> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        let Some(modified) = target.store.modified(GC_LOCK).await? else {
            return Ok(());
        };
        let now = SystemTime::now().max(modified);
        if !is_live(modified, now, target.opts.stale_after)
            || start.elapsed() > target.opts.stale_after
        {
            tracing::warn!("ignoring a stale gc lock in {}", target.url());
            return Ok(());
        }
        if !logged {
            tracing::info!("waiting for gc to finish deleting in {}", target.url());
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Live and stale locks other than gc's, as of the server time `now`.
pub(crate) async fn list_locks(
    target: &Target,
    now: SystemTime,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for o in target.store.list("locks/").await? {
        if o.key == GC_LOCK {
            continue;
        }
        if is_live(o.modified, now, target.opts.stale_after) {
            live.push(o.key);
        } else {
            stale.push(o.key);
        }
    }
    Ok((live, stale))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
