//! Named fail points for crash tests: a test arms one name, and the store
//! returns [`StoreError::FailPoint`] when it reaches that step, as if the
//! process had died there. Unarmed, a check is one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::error::{Result, StoreError};

/// Every fail point the store defines, in the order an operation reaches them.
pub const ALL: &[&str] = &[
    "meta.tmp_written",
    "meta.tmp_synced",
    "meta.renamed",
    "snapshot.head_flushed",
    "snapshot.files_created",
    "revert.files_created",
    "revert.meta_written",
    "delete.chunk_merged",
    "delete.child_synced",
    "delete.meta_written",
];

#[derive(Debug, Default)]
pub struct FailPoints {
    any_armed: AtomicBool,
    armed: Mutex<Option<(&'static str, u32)>>,
}

impl FailPoints {
    /// Arms `name` to fire on its `(skip + 1)`-th hit.
    pub fn arm(&self, name: &'static str, skip: u32) {
        *self.armed.lock() = Some((name, skip));
        self.any_armed.store(true, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        *self.armed.lock() = None;
        self.any_armed.store(false, Ordering::SeqCst);
    }

    pub fn check(&self, name: &'static str) -> Result<()> {
        if !self.any_armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut armed = self.armed.lock();
        match armed.as_mut() {
            Some((n, skip)) if *n == name => {
                if *skip == 0 {
                    *armed = None;
                    self.any_armed.store(false, Ordering::SeqCst);
                    return Err(StoreError::FailPoint(name));
                }
                *skip -= 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
