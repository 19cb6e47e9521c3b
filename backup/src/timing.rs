//! Where a backup's or a restore's time goes: busy time per stage, summed
//! over every chunk (chunks overlap, so the stages add up to more than the
//! wall time; their ratios show what dominates). Reported in the summaries
//! (`--json`) and logged at the end of each run.
//!
//! Backup stages: `read` (the snapshot source), `hash` (keyed BLAKE3 and the
//! all-zero check), `lookup` (reading the target's pack indexes: which chunks it holds),
//! `compress` (zstd), `encrypt` (XChaCha20-Poly1305 or the keyed checksum),
//! `upload` (PUT). Restore stages: `download` (GET), `decrypt`,
//! `decompress`, `verify` (the chunk's hash against its name), `write`
//! (the sink).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Read,
    Hash,
    Lookup,
    Compress,
    Encrypt,
    Upload,
    Download,
    Decrypt,
    Decompress,
    Verify,
    Write,
}

const STAGES: usize = 11;

impl Stage {
    const ALL: [Stage; STAGES] = [
        Stage::Read,
        Stage::Hash,
        Stage::Lookup,
        Stage::Compress,
        Stage::Encrypt,
        Stage::Upload,
        Stage::Download,
        Stage::Decrypt,
        Stage::Decompress,
        Stage::Verify,
        Stage::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Hash => "hash",
            Stage::Lookup => "lookup",
            Stage::Compress => "compress",
            Stage::Encrypt => "encrypt",
            Stage::Upload => "upload",
            Stage::Download => "download",
            Stage::Decrypt => "decrypt",
            Stage::Decompress => "decompress",
            Stage::Verify => "verify",
            Stage::Write => "write",
        }
    }
}

/// Busy nanoseconds per stage, shared by the tasks of one run.
#[derive(Debug, Default)]
pub struct Timings {
    nanos: [AtomicU64; STAGES],
}

impl Timings {
    pub fn add(&self, stage: Stage, d: Duration) {
        self.nanos[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs `f`, adding its time to `stage`.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.add(stage, t.elapsed());
        r
    }

    /// Awaits `f`, adding the time until it completes to `stage`.
    pub async fn time_async<T>(&self, stage: Stage, f: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let r = f.await;
        self.add(stage, t.elapsed());
        r
    }

    /// Seconds per stage that saw any time, in pipeline order.
    pub fn report(&self) -> StageSeconds {
        StageSeconds(
            Stage::ALL
                .iter()
                .filter_map(|&s| {
                    let n = self.nanos[s as usize].load(Ordering::Relaxed);
                    (n > 0).then(|| (s.name(), (n as f64 / 1e6).round() / 1e3))
                })
                .collect(),
        )
    }
}

/// Busy seconds per stage, for summaries and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageSeconds(pub Vec<(&'static str, f64)>);

impl serde::Serialize for StageSeconds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl std::fmt::Display for StageSeconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k} {v:.2}s")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_only_stages_with_time_in_order() {
        let t = Timings::default();
        t.add(Stage::Upload, Duration::from_millis(1500));
        t.add(Stage::Read, Duration::from_millis(250));
        t.add(Stage::Read, Duration::from_millis(250));
        let r = t.report();
        assert_eq!(r.0, vec![("read", 0.5), ("upload", 1.5)]);
        assert_eq!(r.to_string(), "read 0.50s, upload 1.50s");
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"read":0.5,"upload":1.5}"#
        );
    }
}
