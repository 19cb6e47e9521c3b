//! Progress of a backup, restore, verify or gc: bytes (or objects) done out
//! of a total. [`TerminalProgress`] draws a bar with rate and ETA on a
//! terminal; [`LogProgress`] writes a plain `tracing` line every few seconds
//! (logs, CI, the controller); [`auto`] picks one.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Receives progress; called from many tasks at once.
pub trait Progress: Send + Sync {
    /// A new phase (`"backup vol-1"`, `"gc: delete"`) of `total` units.
    fn start(&self, what: &str, total: u64, bytes: bool);
    /// `n` more units done.
    fn advance(&self, n: u64);
    /// The phase ended.
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64, _: bool) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// A bar on stderr: bytes done/total, rate, ETA.
pub struct TerminalProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self {
            bar: Mutex::new(None),
        }
    }
}

impl Progress for TerminalProgress {
    fn start(&self, what: &str, total: u64, bytes: bool) {
        let bar = indicatif::ProgressBar::new(total);
        let tpl = if bytes {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
        } else {
            "{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(tpl) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.replace(bar) {
                old.finish();
            }
        }
    }
    fn advance(&self, n: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.inc(n);
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish();
            }
        }
    }
}

/// A `tracing` info line at most every `every`, and one at the end.
pub struct LogProgress {
    every: Duration,
    what: Mutex<String>,
    bytes: std::sync::atomic::AtomicBool,
    total: AtomicU64,
    done: AtomicU64,
    started: Mutex<Instant>,
    last: Mutex<Instant>,
}

impl LogProgress {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            what: Mutex::new(String::new()),
            bytes: std::sync::atomic::AtomicBool::new(true),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
            last: Mutex::new(Instant::now()),
        }
    }

    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self
            .started
            .lock()
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0)
            .max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && total > done {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "-".into()
        };
        let what = self.what.lock().map(|w| w.clone()).unwrap_or_default();
        if self.bytes.load(Ordering::Relaxed) {
            format!(
                "{what}: {} / {} MiB ({:.0}%), {:.1} MiB/s, ETA {eta}",
                done >> 20,
                total >> 20,
                if total > 0 {
                    done as f64 * 100.0 / total as f64
                } else {
                    100.0
                },
                rate / (1 << 20) as f64
            )
        } else {
            format!("{what}: {done} / {total}, {rate:.0}/s, ETA {eta}")
        }
    }
}

impl Progress for LogProgress {
    fn start(&self, what: &str, total: u64, bytes: bool) {
        if let Ok(mut w) = self.what.lock() {
            *w = what.to_string();
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.started.lock() {
            *s = Instant::now();
        }
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
    }
    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        let due = match self.last.lock() {
            Ok(mut l) if l.elapsed() >= self.every => {
                *l = Instant::now();
                true
            }
            _ => false,
        };
        if due {
            tracing::info!("{}", self.line());
        }
    }
    fn finish(&self) {
        tracing::info!("{} (done)", self.line());
    }
}

/// A bar when stderr is a terminal, log lines every 10 s otherwise.
pub fn auto() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(TerminalProgress::new())
    } else {
        Box::new(LogProgress::new(Duration::from_secs(10)))
    }
}
