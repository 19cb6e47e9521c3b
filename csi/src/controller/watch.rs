//! One kind of Kubernetes object, watched and handed to a handler one at a
//! time: the loop under the built-in resizer and snapshotter.
//!
//! It lists the objects, handles each, then watches from the list's
//! resource version and handles every added or changed object. A handler
//! says when to look at its object again (a snapshot not yet ready, a
//! failed call: backoff doubling from 1 s to 5 min); the loop then fetches
//! the object afresh. Until then, events for that object are skipped
//! unless what the caller's fingerprint covers (the claim's request, the
//! content's deletion) changed: the handler's own status writes come back
//! as events, and must not turn a backoff into a loop. A watch that ends
//! or expires starts over with a new list, and the whole set is listed
//! again every [`RESYNC`] in any case, so nothing missed stays missed. No
//! cache: memory stays at one entry per pending retry, however many
//! objects the cluster has.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::Resource;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

/// Every object is handled again at least this often.
pub const RESYNC: Duration = Duration::from_secs(300);
/// The first retry after a failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A handler call longer than this is abandoned and retried (the
/// kubernetes-csi sidecars' `--timeout` in deploy/ is 90 s too).
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(90);

/// What a handler asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing more to do until the object changes.
    Done,
    /// Look again after this long (for example, a snapshot still cutting).
    After(Duration),
}

/// Backoff after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}

/// An object's namespace (None: cluster-scoped) and name.
type Key = (Option<String>, String);

/// When to look at an object again, why, and what it looked like then.
struct Due {
    at: Instant,
    failures: u32,
    fingerprint: String,
}

/// What the loop is given.
pub struct Watched<A, P, F> {
    /// Names the loop in logs.
    pub what: &'static str,
    /// The API of a namespace (None: all of them, or cluster-scoped).
    pub api_for: A,
    /// What, changed, makes an object worth handling before its retry is
    /// due.
    pub fingerprint: P,
    /// Handles one object.
    pub handle: F,
}

/// Runs until the process ends.
pub async fn run<K, A, P, F, Fut, E>(w: Watched<A, P, F>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    A: Fn(Option<&str>) -> Api<K>,
    P: Fn(&K) -> String,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Result<Next, E>>,
    E: std::fmt::Display,
{
    let what = w.what;
    let api_for = &w.api_for;
    let api = api_for(None);
    let mut due: HashMap<Key, Due> = HashMap::new();
    let mut list_failures = 0u32;
    loop {
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(e) => {
                // The CRDs may not be installed yet (no VolumeSnapshot
                // CRDs: no snapshots to take), or the API is restarting.
                let wait = backoff(list_failures).max(Duration::from_secs(5));
                list_failures += 1;
                if list_failures <= 3 || list_failures.is_multiple_of(20) {
                    tracing::warn!(%what, error = %e, ?wait, "cannot list; trying again");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        list_failures = 0;
        let version = list.metadata.resource_version.clone().unwrap_or_default();
        for object in list.items {
            step(&w, object, &mut due, false).await;
        }
        let resync_at = Instant::now() + RESYNC;
        let params = WatchParams::default().timeout(RESYNC.as_secs() as u32);
        let mut events = match api.watch(&params, &version).await {
            Ok(s) => s.boxed(),
            Err(e) => {
                tracing::debug!(%what, error = %e, "watch refused; listing again");
                tokio::time::sleep(FIRST_BACKOFF).await;
                continue;
            }
        };
        loop {
            let next_due = due.values().map(|d| d.at).min().unwrap_or(resync_at);
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                        step(&w, o, &mut due, false).await;
                    }
                    Some(Ok(WatchEvent::Deleted(o))) => {
                        if let Some(key) = key_of(&o) {
                            due.remove(&key);
                        }
                    }
                    Some(Ok(WatchEvent::Bookmark(_))) => {}
                    // Expired (410) or any other trouble: list again.
                    Some(Ok(WatchEvent::Error(e))) => {
                        tracing::debug!(%what, error = %e.message, "watch ended");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%what, error = %e, "watch failed");
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(next_due) => {
                    if Instant::now() >= resync_at {
                        break;
                    }
                    let now = Instant::now();
                    let ready: Vec<Key> = due
                        .iter()
                        .filter(|(_, d)| d.at <= now)
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in ready {
                        match api_for(key.0.as_deref()).get_opt(&key.1).await {
                            Ok(Some(o)) => step(&w, o, &mut due, true).await,
                            Ok(None) => {
                                due.remove(&key);
                            }
                            Err(e) => {
                                tracing::debug!(%what, name = %key.1, error = %e, "cannot read");
                                if let Some(d) = due.get_mut(&key) {
                                    d.failures += 1;
                                    d.at = Instant::now() + backoff(d.failures);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn key_of<K: Resource>(object: &K) -> Option<Key> {
    let meta = object.meta();
    Some((meta.namespace.clone(), meta.name.clone()?))
}

/// Handles one object and records when to look at it again. An object
/// with a retry pending is skipped until it is `due_now`, unless its
/// fingerprint changed.
async fn step<K, A, P, F, Fut, E>(
    w: &Watched<A, P, F>,
    object: K,
    due: &mut HashMap<Key, Due>,
    due_now: bool,
) where
    K: Resource,
    P: Fn(&K) -> String,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Result<Next, E>>,
    E: std::fmt::Display,
{
    let Some(key) = key_of(&object) else {
        return;
    };
    let fingerprint = (w.fingerprint)(&object);
    if let Some(d) = due.get(&key) {
        if !due_now && d.fingerprint == fingerprint && d.at > Instant::now() {
            return;
        }
    }
    let what = w.what;
    let name = key.1.clone();
    let failures = due.get(&key).map_or(0, |d| d.failures + 1);
    let outcome = tokio::time::timeout(HANDLER_TIMEOUT, (w.handle)(object)).await;
    let retry = |wait: Duration, failures: u32| Due {
        at: Instant::now() + wait,
        failures,
        fingerprint: fingerprint.clone(),
    };
    match outcome {
        Ok(Ok(Next::Done)) => {
            due.remove(&key);
        }
        Ok(Ok(Next::After(wait))) => {
            due.insert(key, retry(wait, 0));
        }
        Ok(Err(e)) => {
            let wait = backoff(failures);
            tracing::warn!(%what, %name, error = %e, retry_in = ?wait, "failed");
            due.insert(key, retry(wait, failures));
        }
        Err(_) => {
            let wait = backoff(failures);
            tracing::warn!(%what, %name, timeout = ?HANDLER_TIMEOUT, retry_in = ?wait, "timed out");
            due.insert(key, retry(wait, failures));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stops_at_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }
}
