//! [`RangeLock`]: overlapping writes wait for each other; others run in
//! parallel. This is what makes every replica apply overlapping writes in
//! the same order (a global mutex would serialise everything).

use std::collections::BTreeMap;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Byte ranges currently held by in-flight writes.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Held>,
    released: Notify,
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    /// id -> [start, end)
    ranges: BTreeMap<u64, (u64, u64)>,
}

/// Releases its range when dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and
            // the await is not missed.
            notified.as_mut().enable();
            if let Some(id) = self.try_lock(start, end) {
                return RangeGuard { lock: self, id };
            }
            notified.await;
        }
    }

    fn try_lock(&self, start: u64, end: u64) -> Option<u64> {
        let mut held = self.held.lock();
        // Ranges are few (bounded by requests in flight): a scan is cheapest.
        if held.ranges.values().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        let id = held.next_id;
        held.next_id += 1;
        held.ranges.insert(id, (start, end));
        Some(id)
    }

    /// Number of ranges held right now.
    pub fn held(&self) -> usize {
        self.held.lock().ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.held.lock().ranges.remove(&self.id);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::new());
        let g1 = lock.lock(0, 100).await;
        // Disjoint: immediate.
        let g2 = tokio::time::timeout(Duration::from_millis(100), lock.lock(100, 200))
            .await
            .expect("disjoint range must not wait");
        // Overlapping: waits until g1 is dropped.
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(50, 60).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "an overlapping range was granted while held"
        );
        drop(g1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter must wake after release")
            .unwrap();
        drop(g2);
        assert_eq!(lock.held(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_contending_writers_never_overlap() {
        let lock = Arc::new(RangeLock::new());
        let active = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (lock, active) = (lock.clone(), active.clone());
            tasks.push(tokio::spawn(async move {
                let start = (i * 37) % 200;
                let end = start + 30;
                let _g = lock.lock(start, end).await;
                {
                    let mut a = active.lock();
                    assert!(
                        a.iter().all(|&(s, e)| !(s < end && start < e)),
                        "overlap granted"
                    );
                    a.push((start, end));
                }
                tokio::task::yield_now().await;
                active.lock().retain(|&r| r != (start, end));
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .unwrap()
                .unwrap();
        }
    }
}
