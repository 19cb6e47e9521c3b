//! /proc sampling: the processes to watch (`Watch`, optionally with their
//! descendants), their peak RSS and CPU over a window (`ProcStat`), the
//! background `Sampler` thread (every `SAMPLE_EVERY`), the machine's busy CPU
//! from /proc/stat, and the small helpers the report shares (`stats_json`,
//! `is_server`, `round2`).

use std::collections::HashMap;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::SAMPLE_EVERY;

/// A process to watch; `tree` also counts its descendants (nbd-server forks a
/// child per connection, fio a process per job).
#[derive(Clone)]
pub(crate) struct Watch {
    pub(crate) name: String,
    pub(crate) pid: i32,
    pub(crate) tree: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct ProcStat {
    pub(crate) name: String,
    pub(crate) peak_rss_mib: f64,
    pub(crate) cpu_pct: f64,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime + stime ticks, zombie) from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(i32, u64, bool)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(f.first(), Some(&"Z") | Some(&"X"));
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime, zombie))
}

fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((_, _, false)))
}

/// Every live pid's parent, for finding descendants.
pub(crate) fn parent_map() -> HashMap<i32, i32> {
    let mut m = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((ppid, _, _)) = proc_stat(pid) {
                    m.insert(pid, ppid);
                }
            }
        }
    }
    m
}

pub(crate) fn descendants(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<ProcStat>, f64)>,
}

impl Sampler {
    pub(crate) fn start(watch: Vec<Watch>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || sample_loop(&watch, &flag));
        Sampler { stop, handle }
    }

    pub(crate) fn finish(self) -> Vec<ProcStat> {
        self.finish_with_machine().0
    }

    /// Also an `other` entry: the machine's busy CPU not spent in the
    /// watched processes (other work on the machine, the kernel's IO threads).
    pub(crate) fn finish_with_machine(self) -> (Vec<ProcStat>, f64) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// Busy and total jiffies of all CPUs together, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle.min(total), total)
}

/// The processes' stats, and the whole machine's busy CPU over the window
/// (% of one core, all cores summed).
fn sample_loop(watch: &[Watch], stop: &AtomicBool) -> (Vec<ProcStat>, f64) {
    struct Track {
        base: HashMap<i32, u64>,
        last: HashMap<i32, u64>,
        peak_rss: u64,
    }
    let started = Instant::now();
    let machine0 = machine_ticks();
    let any_tree = watch.iter().any(|w| w.tree);
    let mut tracks: Vec<Track> = Vec::new();
    let pids_of = |w: &Watch, parents: &HashMap<i32, i32>| {
        if w.tree {
            descendants(w.pid, parents)
        } else {
            vec![w.pid]
        }
    };
    let parents = if any_tree {
        parent_map()
    } else {
        HashMap::new()
    };
    for w in watch {
        let mut t = Track {
            base: HashMap::new(),
            last: HashMap::new(),
            peak_rss: 0,
        };
        let mut rss = 0;
        for pid in pids_of(w, &parents) {
            if let Some((_, ticks, _)) = proc_stat(pid) {
                t.base.insert(pid, ticks);
                t.last.insert(pid, ticks);
                rss += rss_kib(pid);
            }
        }
        t.peak_rss = rss;
        tracks.push(t);
    }
    let mut done = false;
    while !done {
        let next = Instant::now() + SAMPLE_EVERY;
        while Instant::now() < next {
            if stop.load(Ordering::SeqCst) {
                done = true;
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let parents = if any_tree {
            parent_map()
        } else {
            HashMap::new()
        };
        for (w, t) in watch.iter().zip(tracks.iter_mut()) {
            let mut rss = 0;
            for pid in pids_of(w, &parents) {
                if let Some((_, ticks, _)) = proc_stat(pid) {
                    // A process born during the window counts from zero.
                    t.base.entry(pid).or_insert(0);
                    t.last.insert(pid, ticks);
                    rss += rss_kib(pid);
                }
            }
            t.peak_rss = t.peak_rss.max(rss);
        }
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let hz = clk_tck();
    let machine1 = machine_ticks();
    let busy = machine1.0.saturating_sub(machine0.0) as f64;
    let total = machine1.1.saturating_sub(machine0.1).max(1) as f64;
    let ncpu = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let machine_busy = busy / total * ncpu * 100.0;
    let stats = watch
        .iter()
        .zip(tracks)
        .map(|(w, t)| {
            let ticks: u64 = t
                .last
                .iter()
                .map(|(pid, &l)| l.saturating_sub(t.base.get(pid).copied().unwrap_or(0)))
                .sum();
            ProcStat {
                name: w.name.clone(),
                peak_rss_mib: t.peak_rss as f64 / 1024.0,
                cpu_pct: ticks as f64 / hz / secs * 100.0,
            }
        })
        .collect();
    (stats, machine_busy)
}

pub(crate) fn sample_for(watch: &[Watch], d: Duration) -> Vec<ProcStat> {
    let s = Sampler::start(watch.to_vec());
    thread::sleep(d);
    s.finish()
}

pub(crate) fn stats_json(stats: &[ProcStat]) -> Value {
    Value::Object(
        stats
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    json!({"peak_rss_mib": round2(p.peak_rss_mib), "cpu_pct": round2(p.cpu_pct)}),
                )
            })
            .collect(),
    )
}

/// A strata or reference server process (not fio, not `other`).
pub(crate) fn is_server(p: &ProcStat) -> bool {
    p.name != "fio" && p.name != "other"
}

pub(crate) fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
