//! The end-to-end performance and footprint benchmark (issue 6).
//!
//! One run, one target after another on this machine: two reference NBD
//! servers on a raw file (`qemu-nbd --cache=writeback` and Debian's
//! `nbd-server`), then strata with 1 replica and with 3 replicas (real
//! `strata replica serve` and `strata controller serve` processes). The same
//! fio jobs (`ioengine=nbd`) run against each: 4 KiB randwrite QD1 and QD32,
//! 1 MiB sequential write QD8, 70/30 4 KiB randrw QD16, 4 KiB randread QD32,
//! 1 MiB sequential read QD8. Each target is pre-filled (1 MiB sequential
//! writes over the whole volume) so reads hit data, everything is synced
//! before each job, and the page cache is dropped before each job that reads.
//! While a job runs, the RSS and CPU time of every server process (and of
//! fio) are sampled every 200 ms from /proc.
//!
//! Then a memory probe: strata with 1 replica for a 1 GiB and a 1 TiB sparse
//! volume, idle, idle with an NBD client attached (CPU over ~10 s), after
//! 10,000 scattered 4 KiB writes, and under 4 KiB randwrite QD32.
//!
//! Output: a table on stdout (also `results.md`), `results.json` and
//! `chart.png` under `target/bench-e2e/` (or `--out DIR`). Performance
//! numbers never fail the run; a server that does not start, a server
//! process that dies, or a fio error does (exit status 1).
//!
//! Run: `cargo bench --bench e2e` (about 12 minutes) or
//! `cargo bench --bench e2e -- --smoke` (a few seconds per target, for CI);
//! `scripts/bench-e2e.sh [--smoke]` installs the tools first. Options:
//! `--runtime SECS --ramp SECS --size 4G --idle-secs SECS --out DIR
//! --no-probe`; `STRATA_BIN` selects the strata binary.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Progress on stderr, stamped with the seconds since the run started.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[{:6.1}s] {}", since_start(), format!($($arg)*))
    };
}

fn since_start() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

const EXPORT: &str = "bench";
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The reference every ratio is taken against.
const REFERENCE: &str = "qemu-nbd";

// ---------------------------------------------------------------- options

struct Opts {
    smoke: bool,
    size: u64,
    runtime: u64,
    ramp: u64,
    idle_secs: u64,
    probe_secs: u64,
    probe: bool,
    out: PathBuf,
    strata: PathBuf,
    jobs: Vec<&'static Job>,
    /// Redraw the table and chart from a results.json instead of running.
    replot: Option<PathBuf>,
}

fn usage() -> &'static str {
    "usage: cargo bench --bench e2e -- [--smoke] [--runtime SECS] [--ramp SECS] [--size 4G] \
     [--idle-secs SECS] [--out DIR] [--no-probe] [--replot results.json]"
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("bad size {s}"))?
        * mul)
}

fn parse_opts() -> Result<Opts> {
    let mut smoke = false;
    let (mut runtime, mut ramp, mut size, mut idle, mut out) = (None, None, None, None, None);
    let mut probe = true;
    let mut replot = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
        match a.as_str() {
            "--smoke" => smoke = true,
            "--runtime" => runtime = Some(value("--runtime")?.parse::<u64>()?),
            "--ramp" => ramp = Some(value("--ramp")?.parse::<u64>()?),
            "--size" => size = Some(parse_size(&value("--size")?)?),
            "--idle-secs" => idle = Some(value("--idle-secs")?.parse::<u64>()?),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--no-probe" => probe = false,
            "--replot" => replot = Some(PathBuf::from(value("--replot")?)),
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            // `cargo bench` passes --bench to harness = false targets.
            "--bench" => {}
            other => eprintln!("bench-e2e: ignoring argument {other:?} ({})", usage()),
        }
    }
    let out = out.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("bench-e2e")
    });
    // A smoke run (CI, scripts/test-all.sh) must not overwrite a full run's results.
    let out = if smoke { out.join("smoke") } else { out };
    let strata = std::env::var_os("STRATA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_strata")));
    let jobs = if smoke {
        JOBS.iter()
            .filter(|j| matches!(j.key, "randwrite_4k_qd32" | "randrw70_4k_qd16"))
            .collect()
    } else {
        JOBS.iter().collect()
    };
    Ok(Opts {
        smoke,
        size: size.unwrap_or(if smoke { 256 << 20 } else { 4 * GIB }),
        runtime: runtime.unwrap_or(if smoke { 1 } else { 17 }),
        ramp: ramp.unwrap_or(if smoke { 0 } else { 3 }),
        idle_secs: idle.unwrap_or(if smoke { 1 } else { 10 }),
        probe_secs: if smoke { 1 } else { 5 },
        probe,
        out,
        strata,
        jobs,
        replot,
    })
}

// ---------------------------------------------------------------- jobs and targets

struct Job {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
    rwmix_read: Option<u32>,
}

impl Job {
    fn reads(&self) -> bool {
        self.rw.contains("read") || self.rw == "randrw"
    }
}

const JOBS: [Job; 6] = [
    Job {
        key: "randwrite_4k_qd1",
        label: "4K randwrite QD1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
        rwmix_read: None,
    },
    Job {
        key: "randwrite_4k_qd32",
        label: "4K randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
        rwmix_read: None,
    },
    Job {
        key: "seqwrite_1m_qd8",
        label: "1M seq write QD8",
        rw: "write",
        bs: "1m",
        qd: 8,
        rwmix_read: None,
    },
    Job {
        key: "randrw70_4k_qd16",
        label: "4K randrw 70/30 QD16",
        rw: "randrw",
        bs: "4k",
        qd: 16,
        rwmix_read: Some(70),
    },
    Job {
        key: "randread_4k_qd32",
        label: "4K randread QD32",
        rw: "randread",
        bs: "4k",
        qd: 32,
        rwmix_read: None,
    },
    Job {
        key: "seqread_1m_qd8",
        label: "1M seq read QD8",
        rw: "read",
        bs: "1m",
        qd: 8,
        rwmix_read: None,
    },
];

/// The issue's targets: strata/qemu-nbd throughput ratio per job.
fn ratio_target(job: &str, replicas: usize) -> Option<f64> {
    match (replicas, job) {
        (1, "randwrite_4k_qd32" | "randread_4k_qd32") => Some(1.0),
        (1, "randwrite_4k_qd1") => Some(0.8),
        (1, "seqwrite_1m_qd8" | "seqread_1m_qd8") => Some(0.9),
        (3, "randwrite_4k_qd32") => Some(0.6),
        (3, "randread_4k_qd32" | "seqread_1m_qd8") => Some(0.9),
        (3, "randwrite_4k_qd1" | "seqwrite_1m_qd8") => Some(0.5),
        _ => None,
    }
}
const RSS_LIMIT_MIB: f64 = 32.0;
const SPARSE_DELTA_LIMIT_MIB: f64 = 2.0;
const IDLE_CPU_LIMIT_PCT: f64 = 0.5;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    QemuNbd,
    NbdServer,
    Strata(usize),
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::QemuNbd => "qemu-nbd".into(),
            Kind::NbdServer => "nbd-server".into(),
            Kind::Strata(1) => "strata-1".into(),
            Kind::Strata(n) => format!("strata-{n}"),
        }
    }
}

// ---------------------------------------------------------------- /proc sampling

/// A process to watch; `tree` also counts its descendants (nbd-server forks a
/// child per connection, fio a process per job).
#[derive(Clone)]
struct Watch {
    name: String,
    pid: i32,
    tree: bool,
}

#[derive(Clone, Debug)]
struct ProcStat {
    name: String,
    peak_rss_mib: f64,
    cpu_pct: f64,
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

fn alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((_, _, false)))
}

/// Every live pid's parent, for finding descendants.
fn parent_map() -> HashMap<i32, i32> {
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

fn descendants(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, &pp)| pp == p).map(|(&c, _)| c));
        i += 1;
    }
    out
}

struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<ProcStat>, f64)>,
}

impl Sampler {
    fn start(watch: Vec<Watch>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || sample_loop(&watch, &flag));
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<ProcStat> {
        self.finish_with_machine().0
    }

    /// Also an `other` entry: the machine's busy CPU not spent in the
    /// watched processes (other work on the machine, the kernel's IO threads).
    fn finish_with_machine(self) -> (Vec<ProcStat>, f64) {
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

fn sample_for(watch: &[Watch], d: Duration) -> Vec<ProcStat> {
    let s = Sampler::start(watch.to_vec());
    thread::sleep(d);
    s.finish()
}

fn stats_json(stats: &[ProcStat]) -> Value {
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
fn is_server(p: &ProcStat) -> bool {
    p.name != "fio" && p.name != "other"
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

// ---------------------------------------------------------------- servers

/// A loopback port below the kernel's ephemeral range: a port from
/// `bind(":0")` could be taken by any outgoing connection between our
/// check and the server binding it.
fn free_addr() -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 0..1000 {
        let port = 31_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 1000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in 31000-31999")
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this benchmark started.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn tail(path: &Path) -> String {
    tail_n(path, 15)
}

/// The last `n` lines of a log, without terminal colour codes.
fn tail_n(path: &Path, n: usize) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
    let mut s = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            s.push(c);
        }
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running target: its child processes (killed on drop) or a daemon pid.
struct Server {
    label: String,
    uri: String,
    watch: Vec<Watch>,
    children: Vec<(String, Child, PathBuf)>,
    daemon: Option<i32>,
}

impl Server {
    fn check_alive(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}):\n{}", tail(log));
            }
        }
        if let Some(pid) = self.daemon {
            if !alive(pid) {
                bail!("{} (pid {pid}) is gone", self.label);
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        // The controller first (it flushes to its replicas), then the rest.
        for (name, child, log) in &mut self.children {
            if let Ok(Some(_)) = child.try_wait() {
                continue; // already gone: check_alive reports that
            }
            let t = Instant::now();
            kill(child.id() as i32, libc::SIGTERM);
            let deadline = t + STOP_TIMEOUT;
            let mut status = None;
            while Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    status = Some(st);
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let secs = t.elapsed().as_secs_f64();
            match status {
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    warn(format!(
                        "{} {name}: no exit within {} s of SIGTERM, killed",
                        self.label,
                        STOP_TIMEOUT.as_secs()
                    ));
                }
                Some(st) if !st.success() && st.code().is_some() => warn(format!(
                    "{} {name}: exited {st} after SIGTERM; log tail: {}",
                    self.label,
                    tail_n(log, 3).replace('\n', " / ")
                )),
                Some(_) if secs > 5.0 => warn(format!(
                    "{} {name}: took {secs:.1} s to stop after SIGTERM",
                    self.label
                )),
                Some(_) => {}
            }
        }
        self.children.clear();
        if let Some(pid) = self.daemon.take() {
            let pids = descendants(pid, &parent_map());
            for &p in pids.iter().rev() {
                kill(p, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
                thread::sleep(Duration::from_millis(20));
            }
            for &p in &pids {
                if alive(p) {
                    kill(p, libc::SIGKILL);
                }
            }
        }
    }
}

/// A server process that had to be killed, or stopped slowly: reported, not
/// a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn warn(msg: String) {
    say!("!! warning: {msg}");
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).push(msg);
}

fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_logged(prog: &Path, args: &[String], log: &Path) -> Result<Child> {
    let f = fs::File::create(log)?;
    Command::new(prog)
        .args(args)
        .env("STRATA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("cannot start {}", prog.display()))
}

fn wait_listening(addr: SocketAddr, server: &mut Server, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        server.check_alive()?;
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{} did not listen on {addr} within {secs} s", server.label)
}

fn raw_file(dir: &Path, size: u64) -> Result<PathBuf> {
    let path = dir.join("disk.raw");
    fs::File::create(&path)?.set_len(size)?;
    Ok(path)
}

fn start_qemu_nbd(dir: &Path, size: u64) -> Result<Server> {
    let file = raw_file(dir, size)?;
    let addr = free_addr()?;
    let args: Vec<String> = [
        "--cache=writeback",
        "-f",
        "raw",
        "--persistent",
        "--shared=8",
        "-x",
        EXPORT,
        "-b",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        &file.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join("qemu-nbd.log");
    let child = spawn_logged(Path::new("qemu-nbd"), &args, &log)?;
    let pid = child.id() as i32;
    let mut s = Server {
        label: "qemu-nbd".into(),
        uri: format!("nbd://{addr}/{EXPORT}"),
        watch: vec![Watch {
            name: "qemu-nbd".into(),
            pid,
            tree: false,
        }],
        children: vec![("qemu-nbd".into(), child, log)],
        daemon: None,
    };
    wait_listening(addr, &mut s, 20)?;
    Ok(s)
}

fn start_nbd_server(dir: &Path, size: u64) -> Result<Server> {
    let file = raw_file(dir, size)?;
    let addr = free_addr()?;
    let config = dir.join("nbd-server.conf");
    let pidfile = dir.join("nbd-server.pid");
    fs::write(
        &config,
        format!(
            "[generic]\nlistenaddr = 127.0.0.1\nport = {}\n\n[{EXPORT}]\nexportname = {}\n",
            addr.port(),
            file.display()
        ),
    )?;
    // nbd-server daemonizes (its -d serves one connection only): the
    // launcher exits, the daemon writes its pid file.
    let log = dir.join("nbd-server.log");
    let out = Command::new("nbd-server")
        .arg("-C")
        .arg(&config)
        .arg("-p")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(dir.join("nbd-server.err"))?)
        .status()
        .context("cannot run nbd-server")?;
    if !out.success() {
        bail!(
            "nbd-server exited {out}:\n{}",
            tail(&dir.join("nbd-server.err"))
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("nbd-server wrote no pid file");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut s = Server {
        label: "nbd-server".into(),
        uri: format!("nbd://{addr}/{EXPORT}"),
        watch: vec![Watch {
            name: "nbd-server".into(),
            pid,
            tree: true,
        }],
        children: Vec::new(),
        daemon: Some(pid),
    };
    wait_listening(addr, &mut s, 20)?;
    Ok(s)
}

fn start_strata(bin: &Path, dir: &Path, size: u64, replicas: usize) -> Result<Server> {
    let mut s = Server {
        label: format!("strata-{replicas}"),
        uri: String::new(),
        watch: Vec::new(),
        children: Vec::new(),
        daemon: None,
    };
    let mut replica_addrs = Vec::new();
    let mut replica_children = Vec::new();
    for i in 0..replicas {
        let addr = free_addr()?;
        let name = format!("replica-{i}");
        let log = dir.join(format!("{name}.log"));
        let args = vec![
            "replica".to_string(),
            "serve".into(),
            "--dir".into(),
            dir.join(&name).display().to_string(),
            "--listen".into(),
            addr.to_string(),
        ];
        let child = spawn_logged(bin, &args, &log)?;
        s.watch.push(Watch {
            name: name.clone(),
            pid: child.id() as i32,
            tree: false,
        });
        s.children.push((name, child, log));
        wait_listening(addr, &mut s, 20)?;
        replica_addrs.push(addr);
    }
    // Stop order: controller first.
    replica_children.append(&mut s.children);
    let (nbd, control, metrics) = (free_addr()?, free_addr()?, free_addr()?);
    let mut args: Vec<String> = vec![
        "controller".into(),
        "serve".into(),
        "--volume".into(),
        EXPORT.into(),
        "--nbd".into(),
        nbd.to_string(),
        "--control".into(),
        control.to_string(),
        "--metrics".into(),
        metrics.to_string(),
        "--create-size".into(),
        size.to_string(),
    ];
    for a in &replica_addrs {
        args.push("--replica".into());
        args.push(a.to_string());
    }
    let log = dir.join("controller.log");
    let child = spawn_logged(bin, &args, &log)?;
    s.watch.insert(
        0,
        Watch {
            name: "controller".into(),
            pid: child.id() as i32,
            tree: false,
        },
    );
    s.children.push(("controller".into(), child, log));
    s.children.append(&mut replica_children);
    s.uri = format!("nbd://{nbd}/{EXPORT}");
    wait_listening(nbd, &mut s, 60)?;
    Ok(s)
}

fn start(kind: Kind, opts: &Opts, dir: &Path, size: u64) -> Result<Server> {
    fs::create_dir_all(dir)?;
    match kind {
        Kind::QemuNbd => start_qemu_nbd(dir, size),
        Kind::NbdServer => start_nbd_server(dir, size),
        Kind::Strata(n) => start_strata(&opts.strata, dir, size, n),
    }
}

// ---------------------------------------------------------------- fio

#[derive(Clone, Debug, Default)]
struct Side {
    iops: f64,
    mib_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    ios: u64,
}

#[derive(Clone, Debug, Default)]
struct FioResult {
    read: Side,
    write: Side,
}

impl FioResult {
    fn iops(&self) -> f64 {
        self.read.iops + self.write.iops
    }
    fn mib_s(&self) -> f64 {
        self.read.mib_s + self.write.mib_s
    }
    /// The latency shown in the table: reads for jobs that read (the 70%
    /// side of randrw), writes otherwise.
    fn shown(&self) -> &Side {
        if self.read.ios > 0 {
            &self.read
        } else {
            &self.write
        }
    }
}

fn side(v: &Value) -> Side {
    let pct = |k: &str| v["clat_ns"]["percentile"][k].as_f64().map(|ns| ns / 1000.0);
    Side {
        iops: v["iops"].as_f64().unwrap_or(0.0),
        mib_s: v["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        ios: v["total_ios"].as_u64().unwrap_or(0),
    }
}

fn side_json(s: &Side) -> Value {
    json!({"iops": round2(s.iops), "mib_s": round2(s.mib_s), "clat_p50_us": s.p50_us.map(round2),
           "clat_p99_us": s.p99_us.map(round2), "ios": s.ios})
}

/// Runs fio against `uri` while sampling `watch` (and fio itself); fails on
/// a fio error, a timeout, or output without JSON.
fn fio(
    uri: &str,
    name: &str,
    args: &[String],
    watch: &[Watch],
    timeout: Duration,
    logdir: &Path,
) -> Result<(FioResult, Vec<ProcStat>)> {
    let out_path = logdir.join(format!("fio-{name}.json"));
    let err_path = logdir.join(format!("fio-{name}.err"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=json")
        .arg("--randrepeat=0")
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?);
    let mut child = cmd.spawn().context("cannot start fio")?;
    let mut w = watch.to_vec();
    w.push(Watch {
        name: "fio".into(),
        pid: child.id() as i32,
        tree: true,
    });
    let sampler = Sampler::start(w);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            sampler.finish();
            bail!("fio {name} did not finish within {} s", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (mut stats, busy) = sampler.finish_with_machine();
    let watched: f64 = stats.iter().map(|p| p.cpu_pct).sum();
    stats.push(ProcStat {
        name: "other".into(),
        peak_rss_mib: 0.0,
        cpu_pct: (busy - watched).max(0.0),
    });
    let text = fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "fio {name} failed ({status}):\n{}\n{}",
            tail(&err_path),
            tail(&out_path)
        );
    }
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("fio {name}: no JSON in its output:\n{text}"))?;
    let v: Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("fio {name}: bad JSON output"))?;
    let job = &v["jobs"][0];
    let err = job["error"].as_i64().unwrap_or(0);
    if err != 0 {
        bail!("fio {name}: job error {err}:\n{}", tail(&err_path));
    }
    Ok((
        FioResult {
            read: side(&job["read"]),
            write: side(&job["write"]),
        },
        stats,
    ))
}

fn job_args(job: &Job, opts: &Opts) -> Vec<String> {
    let mut a = vec![
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.qd),
        "--norandommap".into(),
        "--time_based".into(),
        format!("--runtime={}", opts.runtime),
    ];
    if opts.ramp > 0 {
        a.push(format!("--ramp_time={}", opts.ramp));
    }
    if let Some(m) = job.rwmix_read {
        a.push(format!("--rwmixread={m}"));
    }
    a
}

fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Drops the page cache (server-side files: the raw files and the replica
/// files). Needs root; returns whether it worked.
fn drop_caches() -> bool {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// CPU and RSS of `server` with an NBD client attached and idle (qemu-io
/// sleeping), over `secs`. Returns the stats and whether the client stayed
/// connected.
fn idle_with_client(server: &Server, secs: u64, logdir: &Path) -> Result<(Vec<ProcStat>, bool)> {
    let ms = (secs + 3) * 1000;
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("sleep {ms}"), &server.uri])
        .stdin(Stdio::null())
        .stdout(fs::File::create(logdir.join("idle-client.log"))?)
        .stderr(fs::File::create(logdir.join("idle-client.err"))?)
        .spawn()
        .context("cannot start qemu-io")?;
    thread::sleep(Duration::from_millis(700));
    let stats = sample_for(&server.watch, Duration::from_secs(secs));
    let connected = matches!(client.try_wait(), Ok(None));
    let _ = client.kill();
    let _ = client.wait();
    Ok((stats, connected))
}

// ---------------------------------------------------------------- the run

struct JobOutcome {
    result: FioResult,
    procs: Vec<ProcStat>,
    dropped_cache: bool,
}

struct TargetOutcome {
    kind: Kind,
    prefill_mib_s: Option<f64>,
    idle: Option<(Vec<ProcStat>, bool)>,
    jobs: BTreeMap<&'static str, JobOutcome>,
    /// fio errors of single jobs (the run fails, the other jobs still ran).
    errors: Vec<String>,
}

fn bench_target(kind: Kind, opts: &Opts, work: &Path, out: &mut TargetOutcome) -> Result<()> {
    let label = kind.label();
    let dir = work.join(&label);
    say!("== {label}: starting");
    let mut server =
        start(kind, opts, &dir, opts.size).with_context(|| format!("{label} failed to start"))?;
    if matches!(kind, Kind::Strata(_)) {
        say!(
            "== {label}: idle with a client attached, {} s",
            opts.idle_secs
        );
        out.idle = Some(idle_with_client(&server, opts.idle_secs, &dir)?);
        server.check_alive()?;
    }
    say!(
        "== {label}: pre-fill {} MiB (1M sequential writes, QD8)",
        opts.size >> 20
    );
    let started = Instant::now();
    let fill = [
        "--rw=write".to_string(),
        "--bs=1m".into(),
        "--iodepth=8".into(),
        format!("--size={}", opts.size),
    ];
    let (r, _) = fio(
        &server.uri,
        "prefill",
        &fill,
        &server.watch,
        Duration::from_secs(1800),
        &dir,
    )?;
    out.prefill_mib_s = Some(r.mib_s());
    say!(
        "   {:.0} MiB/s, {:.1} s",
        r.mib_s(),
        started.elapsed().as_secs_f64()
    );
    for job in &opts.jobs {
        server.check_alive()?;
        let t = Instant::now();
        sync_all();
        let dropped = job.reads() && drop_caches();
        let settle = t.elapsed().as_secs_f64();
        let run = fio(
            &server.uri,
            job.key,
            &job_args(job, opts),
            &server.watch,
            Duration::from_secs(opts.runtime + opts.ramp + 120),
            &dir,
        );
        let (result, procs) = match run {
            Ok(r) => r,
            Err(e) => {
                // Record it and go on with the next job while the server lives.
                say!("!! {label}: {}: {e:#}", job.label);
                out.errors.push(format!("{}: {e:#}", job.label));
                continue;
            }
        };
        say!(
            "   {:<22} {:>9.0} IOPS {:>8.1} MiB/s  p99 {:>8.0} us  (sync{} {settle:.1} s)  {}",
            job.label,
            result.iops(),
            result.mib_s(),
            result.shown().p99_us.unwrap_or(f64::NAN),
            if dropped { "+drop" } else { "" },
            procs
                .iter()
                .map(|p| format!("{} {:.0}% {:.1}M", p.name, p.cpu_pct, p.peak_rss_mib))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out.jobs.insert(
            job.key,
            JobOutcome {
                result,
                procs,
                dropped_cache: dropped,
            },
        );
    }
    server.check_alive()?;
    server.stop();
    if out.errors.is_empty() {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(())
}

#[derive(Default)]
struct ProbePhase {
    procs: Vec<ProcStat>,
    note: String,
}

/// phase -> stats, for one volume size.
type Probe = Vec<(&'static str, ProbePhase)>;

fn memory_probe(size: u64, opts: &Opts, work: &Path) -> Result<Probe> {
    let label = if size >= TIB {
        format!("{} TiB", size / TIB)
    } else {
        format!("{} GiB", size / GIB)
    };
    say!("== memory probe: strata-1, {label} sparse volume");
    let dir = work.join(format!("probe-{}", size >> 30));
    let mut server = start(Kind::Strata(1), opts, &dir, size)?;
    let mut phases: Probe = Vec::new();
    say!("   started");
    thread::sleep(Duration::from_millis(500));
    phases.push((
        "idle",
        ProbePhase {
            procs: sample_for(&server.watch, Duration::from_secs(opts.probe_secs.min(2))),
            note: "no client".into(),
        },
    ));
    let (procs, connected) = idle_with_client(&server, opts.idle_secs, &dir)?;
    phases.push((
        "idle_client",
        ProbePhase {
            procs,
            note: format!(
                "qemu-io attached and sleeping{}, {} s",
                if connected { "" } else { " (it exited early)" },
                opts.idle_secs
            ),
        },
    ));
    let scattered = [
        "--rw=randwrite".to_string(),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        "--number_ios=10000".into(),
        "--norandommap".into(),
        format!("--size={size}"),
    ];
    let (_, procs) = fio(
        &server.uri,
        "scattered-10k",
        &scattered,
        &server.watch,
        Duration::from_secs(300),
        &dir,
    )?;
    say!("   10,000 scattered writes done");
    phases.push((
        "writing_10k_scattered",
        ProbePhase {
            procs,
            note: "fio 10,000 random 4 KiB writes over the whole volume".into(),
        },
    ));
    thread::sleep(Duration::from_millis(500));
    phases.push((
        "after_10k_scattered",
        ProbePhase {
            procs: sample_for(&server.watch, Duration::from_secs(opts.probe_secs.min(2))),
            note: "idle, after the 10,000 writes".into(),
        },
    ));
    if opts.smoke {
        // The main jobs already ran QD32; keep the smoke run short.
        server.stop();
        let _ = fs::remove_dir_all(&dir);
        return Ok(phases);
    }
    say!("   randwrite QD32");
    let job = JOBS.iter().find(|j| j.key == "randwrite_4k_qd32").unwrap();
    let mut args = job_args(job, opts);
    args.retain(|a| !a.starts_with("--runtime") && !a.starts_with("--ramp"));
    args.push(format!("--runtime={}", opts.probe_secs));
    let (r, procs) = fio(
        &server.uri,
        "probe-randwrite-qd32",
        &args,
        &server.watch,
        Duration::from_secs(opts.probe_secs + 120),
        &dir,
    )?;
    phases.push((
        "randwrite_4k_qd32",
        ProbePhase {
            procs,
            note: format!("{} s, {:.0} IOPS", opts.probe_secs, r.iops()),
        },
    ));
    server.check_alive()?;
    server.stop();
    let _ = fs::remove_dir_all(&dir);
    Ok(phases)
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if s.trim().is_empty() {
                s = String::from_utf8_lossy(&o.stderr).into_owned();
            }
            s.trim().to_string()
        })
        .unwrap_or_default()
}

fn machine(work: &Path) -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let w = work.display().to_string();
    let fs_line = cmd_out("df", &["-T", &w]);
    let fs_line = fs_line.lines().last().unwrap_or("").to_string();
    let git = cmd_out(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    );
    json!({
        "date_utc": cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        "nproc": cmd_out("nproc", &[]),
        "kernel": cmd_out("uname", &["-r"]),
        "cpu": cpu,
        "memory": cmd_out("sh", &["-c", "free -g | awk '/Mem:/{print $2\" GiB\"}'"]),
        "filesystem": fs_line,
        "fio": cmd_out("fio", &["--version"]),
        "qemu_nbd": cmd_out("qemu-nbd", &["--version"]).lines().next().unwrap_or("").to_string(),
        "nbd_server": cmd_out("sh", &["-c", "nbd-server -V 2>&1 | head -1"]),
        "strata_git": git,
        "loadavg_at_start": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn require_tools() -> Result<()> {
    for tool in ["fio", "qemu-nbd", "nbd-server", "qemu-io"] {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!("{tool} is not installed: run scripts/bench-e2e.sh, which installs it");
        }
    }
    Ok(())
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("bench-e2e: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<bool> {
    since_start();
    let opts = parse_opts()?;
    if let Some(path) = opts.replot.clone() {
        return replot(opts, &path);
    }
    require_tools()?;
    if !opts.strata.exists() {
        bail!("no strata binary at {}", opts.strata.display());
    }
    fs::create_dir_all(&opts.out)?;
    let work = tempfile::Builder::new()
        .prefix("work-")
        .tempdir_in(&opts.out)?;
    let started = Instant::now();
    let machine = machine(work.path());
    eprintln!(
        "bench-e2e: {} run, volume {} MiB, {} jobs x {} s (+{} s ramp), output in {}",
        if opts.smoke { "smoke" } else { "full" },
        opts.size >> 20,
        opts.jobs.len(),
        opts.runtime,
        opts.ramp,
        opts.out.display()
    );
    let mut errors = Vec::new();
    let mut outcomes = Vec::new();
    for kind in [
        Kind::QemuNbd,
        Kind::NbdServer,
        Kind::Strata(1),
        Kind::Strata(3),
    ] {
        let mut o = TargetOutcome {
            kind,
            prefill_mib_s: None,
            idle: None,
            jobs: BTreeMap::new(),
            errors: Vec::new(),
        };
        if let Err(e) = bench_target(kind, &opts, work.path(), &mut o) {
            eprintln!("!! {}: {e:#}", kind.label());
            errors.push(format!("{}: {e:#}", kind.label()));
        }
        errors.extend(o.errors.iter().map(|e| format!("{}: {e}", kind.label())));
        outcomes.push(o);
    }
    let mut probes: Vec<(u64, Probe)> = Vec::new();
    if opts.probe {
        for size in [GIB, TIB] {
            match memory_probe(size, &opts, work.path()) {
                Ok(p) => probes.push((size, p)),
                Err(e) => {
                    eprintln!("!! memory probe {size}: {e:#}");
                    errors.push(format!("memory probe ({size} bytes): {e:#}"));
                }
            }
        }
    }
    let report = Report {
        opts: &opts,
        outcomes: &outcomes,
        probes: &probes,
    };
    let targets = report.targets();
    let mut tables = report.tables(&targets);
    let warns = warnings();
    if !warns.is_empty() {
        let _ = writeln!(tables, "\nWarnings (not failures):\n");
        for w in &warns {
            let _ = writeln!(tables, "- {w}");
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(tables, "\nErrors (the run fails):\n");
        for e in &errors {
            let _ = writeln!(tables, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    println!("{tables}");
    fs::write(opts.out.join("results.md"), &tables)?;
    let mut v = report.json(&targets, machine);
    v["errors"] = json!(errors);
    v["warnings"] = json!(warns);
    v["machine"]["loadavg_at_end"] = json!(fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim());
    v["elapsed_secs"] = json!(started.elapsed().as_secs());
    fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&v)?,
    )?;
    say!("== chart");
    let chart = opts.out.join("chart.png");
    match draw_chart(&chart, &report, &targets, &v["machine"]) {
        Ok(()) => eprintln!("bench-e2e: chart {}", chart.display()),
        Err(e) => eprintln!("bench-e2e: warning: no chart: {e:#}"),
    }
    eprintln!(
        "bench-e2e: results {} ({} s)",
        opts.out.join("results.json").display(),
        started.elapsed().as_secs()
    );
    if !errors.is_empty() {
        eprintln!("bench-e2e: logs kept in {}", work.keep().display());
        eprintln!("bench-e2e: FAILED:");
        for e in &errors {
            eprintln!("  - {e}");
        }
        return Ok(false);
    }
    Ok(true)
}

// ---------------------------------------------------------------- report

struct Report<'a> {
    opts: &'a Opts,
    outcomes: &'a [TargetOutcome],
    probes: &'a [(u64, Probe)],
}

struct TargetRow {
    what: String,
    value: String,
    limit: String,
    met: Option<bool>,
}

fn met_str(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

impl Report<'_> {
    fn job(&self, kind: &str, job: &str) -> Option<&JobOutcome> {
        self.outcomes
            .iter()
            .find(|o| o.kind.label() == kind)
            .and_then(|o| o.jobs.get(job))
    }

    fn ratio(&self, kind: &str, job: &str) -> Option<f64> {
        let r = self.job(REFERENCE, job)?.result.iops();
        let v = self.job(kind, job)?.result.iops();
        (r > 0.0).then(|| v / r)
    }

    fn probe_phase(&self, size: u64, phase: &str) -> Option<&ProbePhase> {
        self.probes
            .iter()
            .find(|(s, _)| *s == size)
            .and_then(|(_, p)| p.iter().find(|(n, _)| *n == phase))
            .map(|(_, p)| p)
    }

    fn targets(&self) -> Vec<TargetRow> {
        let mut rows = Vec::new();
        for n in [1usize, 3] {
            let kind = format!("strata-{n}");
            for job in &self.opts.jobs {
                if let Some(t) = ratio_target(job.key, n) {
                    let r = self.ratio(&kind, job.key);
                    rows.push(TargetRow {
                        what: format!("{kind} / {REFERENCE}, {}", job.label),
                        value: fmt_opt(r, 2),
                        limit: format!(">= {t:.1}"),
                        met: r.map(|r| r >= t),
                    });
                }
            }
        }
        // RSS under QD32.
        for n in [1usize, 3] {
            let kind = format!("strata-{n}");
            let mut peak: BTreeMap<String, f64> = BTreeMap::new();
            for job in ["randwrite_4k_qd32", "randread_4k_qd32"] {
                if let Some(j) = self.job(&kind, job) {
                    for p in j.procs.iter().filter(|p| is_server(p)) {
                        let e = peak.entry(p.name.clone()).or_insert(0.0);
                        *e = e.max(p.peak_rss_mib);
                    }
                }
            }
            if !peak.is_empty() {
                let max = peak.values().cloned().fold(0.0, f64::max);
                rows.push(TargetRow {
                    what: format!("{kind} peak RSS under 4K QD32 (randwrite, randread)"),
                    value: peak
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                        + " MiB",
                    limit: format!("< {RSS_LIMIT_MIB:.0} MiB each"),
                    met: Some(max < RSS_LIMIT_MIB),
                });
            }
        }
        if let Some(p) = self.probe_phase(TIB, "randwrite_4k_qd32") {
            let max = p
                .procs
                .iter()
                .filter(|p| is_server(p))
                .map(|p| p.peak_rss_mib)
                .fold(0.0, f64::max);
            rows.push(TargetRow {
                what: "strata-1, 1 TiB volume, peak RSS under 4K randwrite QD32".into(),
                value: p
                    .procs
                    .iter()
                    .filter(|p| is_server(p))
                    .map(|p| format!("{} {:.1}", p.name, p.peak_rss_mib))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + " MiB",
                limit: format!("< {RSS_LIMIT_MIB:.0} MiB each"),
                met: Some(max < RSS_LIMIT_MIB),
            });
        }
        // 1 TiB vs 1 GiB.
        for phase in ["idle", "after_10k_scattered"] {
            if let (Some(g), Some(t)) = (self.probe_phase(GIB, phase), self.probe_phase(TIB, phase))
            {
                let deltas: Vec<(String, f64)> = t
                    .procs
                    .iter()
                    .filter_map(|tp| {
                        g.procs
                            .iter()
                            .find(|gp| gp.name == tp.name)
                            .map(|gp| (tp.name.clone(), tp.peak_rss_mib - gp.peak_rss_mib))
                    })
                    .collect();
                let max = deltas.iter().map(|d| d.1).fold(f64::MIN, f64::max);
                rows.push(TargetRow {
                    what: format!("RSS 1 TiB minus 1 GiB volume, {phase}"),
                    value: deltas
                        .iter()
                        .map(|(k, v)| format!("{k} {v:+.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                        + " MiB",
                    limit: format!("< {SPARSE_DELTA_LIMIT_MIB:.0} MiB"),
                    met: Some(max < SPARSE_DELTA_LIMIT_MIB),
                });
            }
        }
        // Idle CPU with an attached client: the volume's processes together.
        let mut idle: Vec<(String, &[ProcStat])> = Vec::new();
        for o in self.outcomes {
            if let Some((procs, _)) = &o.idle {
                idle.push((format!("{} (4 GiB)", o.kind.label()), procs));
            }
        }
        for (size, label) in [(GIB, "strata-1 (1 GiB)"), (TIB, "strata-1 (1 TiB)")] {
            if let Some(p) = self.probe_phase(size, "idle_client") {
                idle.push((label.into(), &p.procs));
            }
        }
        for (label, procs) in idle {
            let total: f64 = procs.iter().map(|p| p.cpu_pct).sum();
            rows.push(TargetRow {
                what: format!(
                    "idle CPU, client attached, {label}, all processes (over {} s)",
                    self.opts.idle_secs
                ),
                value: format!(
                    "{total:.2}% ({})",
                    procs
                        .iter()
                        .map(|p| format!("{} {:.2}", p.name, p.cpu_pct))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                limit: format!("< {IDLE_CPU_LIMIT_PCT}% of a core"),
                met: Some(total < IDLE_CPU_LIMIT_PCT),
            });
        }
        rows
    }

    fn tables(&self, targets: &[TargetRow]) -> String {
        let mut s = String::new();
        let kinds: Vec<String> = self.outcomes.iter().map(|o| o.kind.label()).collect();
        let _ = writeln!(
            s,
            "### Throughput and latency ({} MiB volume, {} s per job after {} s ramp)\n",
            self.opts.size >> 20,
            self.opts.runtime,
            self.opts.ramp
        );
        let _ = writeln!(
            s,
            "| job | target | IOPS | MiB/s | p50 us | p99 us | x {REFERENCE} | issue target | |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---|");
        for job in &self.opts.jobs {
            for kind in &kinds {
                let Some(j) = self.job(kind, job.key) else {
                    let _ = writeln!(s, "| {} | {kind} | failed | | | | | | |", job.label);
                    continue;
                };
                let r = &j.result;
                let n = kind
                    .strip_prefix("strata-")
                    .and_then(|n| n.parse::<usize>().ok());
                let t = n.and_then(|n| ratio_target(job.key, n));
                let ratio = self.ratio(kind, job.key);
                let _ = writeln!(
                    s,
                    "| {} | {kind} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
                    job.label,
                    r.iops(),
                    r.mib_s(),
                    fmt_opt(r.shown().p50_us, 0),
                    fmt_opt(r.shown().p99_us, 0),
                    fmt_opt(ratio, 2),
                    t.map(|t| format!(">= {t:.1}")).unwrap_or_default(),
                    match (t, ratio) {
                        (Some(t), Some(r)) => met_str(Some(r >= t)),
                        _ => "",
                    }
                );
            }
        }
        let _ = writeln!(
            s,
            "\nLatency is fio's completion latency (clat); for randrw it is the reads'. \
             The page cache was dropped before every job that reads: {}.\n",
            if self
                .outcomes
                .iter()
                .flat_map(|o| o.jobs.values())
                .any(|j| j.dropped_cache)
            {
                "yes"
            } else {
                "NO (not root?)"
            }
        );
        let _ = writeln!(
            s,
            "### Where the CPU goes: % of one core (peak RSS MiB) per process during each job\n\n\
             `fio` is the client (its job process included); `other` is the rest of the \
             machine's busy CPU in the window: kernel threads (block IO, page cache \
             writeback) and anything else that ran.\n"
        );
        let _ = writeln!(s, "| job | target | processes |");
        let _ = writeln!(s, "|---|---|---|");
        for job in &self.opts.jobs {
            for kind in &kinds {
                if let Some(j) = self.job(kind, job.key) {
                    let _ = writeln!(
                        s,
                        "| {} | {kind} | {} |",
                        job.label,
                        j.procs
                            .iter()
                            .map(|p| format!(
                                "{} {:.0}% ({:.1})",
                                p.name, p.cpu_pct, p.peak_rss_mib
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        let prefill: Vec<String> = self
            .outcomes
            .iter()
            .filter_map(|o| {
                o.prefill_mib_s
                    .map(|m| format!("{} {m:.0} MiB/s", o.kind.label()))
            })
            .collect();
        let _ = writeln!(
            s,
            "\nPre-fill (1M sequential write QD8 of the whole volume, sparse to allocated): {}.\n",
            prefill.join(", ")
        );
        if !self.probes.is_empty() {
            let _ = writeln!(
                s,
                "### Memory probe: strata-1, RSS MiB (peak in the window) and CPU % of a core\n"
            );
            let _ = writeln!(s, "| volume | phase | controller | replica-0 | note |");
            let _ = writeln!(s, "|---|---|---:|---:|---|");
            for (size, phases) in self.probes {
                let vol = if *size >= TIB { "1 TiB" } else { "1 GiB" };
                for (name, p) in phases {
                    let cell = |n: &str| {
                        p.procs
                            .iter()
                            .find(|x| x.name == n)
                            .map(|x| format!("{:.2} MiB, {:.2}%", x.peak_rss_mib, x.cpu_pct))
                            .unwrap_or_default()
                    };
                    let _ = writeln!(
                        s,
                        "| {vol} | {name} | {} | {} | {} |",
                        cell("controller"),
                        cell("replica-0"),
                        p.note
                    );
                }
            }
            s.push('\n');
        }
        let _ = writeln!(s, "### Targets (issue 6)\n");
        let _ = writeln!(s, "| target | measured | limit | |");
        let _ = writeln!(s, "|---|---|---|---|");
        for t in targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.what,
                t.value,
                t.limit,
                met_str(t.met)
            );
        }
        let met = targets.iter().filter(|t| t.met == Some(true)).count();
        let _ = writeln!(s, "\n{met} of {} targets met.", targets.len());
        s
    }

    fn json(&self, targets: &[TargetRow], machine: Value) -> Value {
        let mut jobs = serde_json::Map::new();
        for job in &self.opts.jobs {
            let mut per = serde_json::Map::new();
            for o in self.outcomes {
                let kind = o.kind.label();
                if let Some(j) = o.jobs.get(job.key) {
                    let n = match o.kind {
                        Kind::Strata(n) => Some(n),
                        _ => None,
                    };
                    per.insert(
                        kind.clone(),
                        json!({
                            "iops": round2(j.result.iops()),
                            "mib_s": round2(j.result.mib_s()),
                            "clat_p50_us": j.result.shown().p50_us.map(round2),
                            "clat_p99_us": j.result.shown().p99_us.map(round2),
                            "read": side_json(&j.result.read),
                            "write": side_json(&j.result.write),
                            "ratio_to_reference": self.ratio(&kind, job.key).map(|r| (r * 1000.0).round() / 1000.0),
                            "target_ratio": n.and_then(|n| ratio_target(job.key, n)),
                            "processes": stats_json(&j.procs),
                            "page_cache_dropped": j.dropped_cache,
                        }),
                    );
                }
            }
            jobs.insert(
                job.key.into(),
                json!({"label": job.label, "rw": job.rw, "bs": job.bs, "iodepth": job.qd,
                       "rwmixread": job.rwmix_read, "targets": per}),
            );
        }
        let idle: serde_json::Map<String, Value> = self
            .outcomes
            .iter()
            .filter_map(|o| {
                o.idle.as_ref().map(|(p, connected)| {
                    (
                        o.kind.label(),
                        json!({"processes": stats_json(p), "client_connected": connected}),
                    )
                })
            })
            .collect();
        let prefill: serde_json::Map<String, Value> = self
            .outcomes
            .iter()
            .filter_map(|o| o.prefill_mib_s.map(|m| (o.kind.label(), json!(round2(m)))))
            .collect();
        let probe: serde_json::Map<String, Value> = self
            .probes
            .iter()
            .map(|(size, phases)| {
                (
                    if *size >= TIB { "1TiB" } else { "1GiB" }.to_string(),
                    Value::Object(
                        phases
                            .iter()
                            .map(|(n, p)| {
                                (
                                    n.to_string(),
                                    json!({"processes": stats_json(&p.procs), "note": p.note}),
                                )
                            })
                            .collect(),
                    ),
                )
            })
            .collect();
        json!({
            "machine": machine,
            "settings": {
                "smoke": self.opts.smoke,
                "volume_bytes": self.opts.size,
                "runtime_secs": self.opts.runtime,
                "ramp_secs": self.opts.ramp,
                "idle_secs": self.opts.idle_secs,
                "reference": REFERENCE,
                "sample_interval_ms": SAMPLE_EVERY.as_millis() as u64,
            },
            "jobs": jobs,
            "prefill_mib_s": prefill,
            "idle_with_client": idle,
            "memory_probe": probe,
            "targets": targets.iter().map(|t| json!({
                "target": t.what, "measured": t.value, "limit": t.limit, "met": t.met,
            })).collect::<Vec<_>>(),
        })
    }
}

// ---------------------------------------------------------------- chart

fn draw_chart(path: &Path, report: &Report, targets: &[TargetRow], machine: &Value) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let font = fs::read(FONT).with_context(|| format!("cannot read {FONT} (fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

    let jobs = &report.opts.jobs;
    let kinds: Vec<String> = report.outcomes.iter().map(|o| o.kind.label()).collect();
    let colors = [
        RGBColor(127, 127, 127),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
    ];
    let n = jobs.len() as f64;
    let nk = kinds.len() as f64;
    let bar = |i: usize, k: usize| {
        let w = 0.8 / nk;
        let x0 = i as f64 + 0.1 + k as f64 * w;
        (x0, x0 + w * 0.9)
    };
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing: {e:?}");

    let root = BitMapBackend::new(path, (1400, 1050)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (head, body) = root.split_vertically(100);
    let met = targets.iter().filter(|t| t.met == Some(true)).count();
    head.draw_text(
        "strata end-to-end benchmark: fio over NBD, strata vs qemu-nbd and nbd-server",
        &("sans-serif", 26).into_font().color(&BLACK),
        (20, 10),
    )
    .map_err(err)?;
    head.draw_text(
        &format!(
            "{} | {} cores, {} | kernel {} | volume {} MiB, {} s per job{} | issue targets met: {met}/{}",
            machine["date_utc"].as_str().unwrap_or(""),
            machine["nproc"].as_str().unwrap_or("?"),
            machine["cpu"].as_str().unwrap_or(""),
            machine["kernel"].as_str().unwrap_or(""),
            report.opts.size >> 20,
            report.opts.runtime,
            if report.opts.smoke { " (SMOKE RUN)" } else { "" },
            targets.len()
        ),
        &("sans-serif", 16).into_font().color(&RGBColor(60, 60, 60)),
        (20, 44),
    )
    .map_err(err)?;
    // The legend, in the header so it never covers a bar.
    let mut lx = 20;
    for (k, kind) in kinds.iter().enumerate() {
        let color = colors[k % colors.len()];
        head.draw(&Rectangle::new([(lx, 72), (lx + 16, 88)], color.filled()))
            .map_err(err)?;
        head.draw_text(
            kind,
            &("sans-serif", 16).into_font().color(&BLACK),
            (lx + 22, 71),
        )
        .map_err(err)?;
        lx += 150;
    }
    head.draw(&PathElement::new(
        vec![(lx, 80), (lx + 22, 80)],
        BLACK.stroke_width(3),
    ))
    .map_err(err)?;
    head.draw_text(
        "issue target (strata / qemu-nbd)",
        &("sans-serif", 16).into_font().color(&BLACK),
        (lx + 28, 71),
    )
    .map_err(err)?;
    let (top, bottom) = body.split_vertically(500);

    // Top: throughput relative to the reference.
    let ymax = jobs
        .iter()
        .flat_map(|j| kinds.iter().filter_map(|k| report.ratio(k, j.key)))
        .fold(1.2f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&top)
        .margin(15)
        .margin_left(20)
        .caption(
            format!(
                "Throughput (IOPS) relative to {REFERENCE}; black ticks = issue targets for strata"
            ),
            ("sans-serif", 20),
        )
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc(format!("x {REFERENCE}"))
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (n, 1.0)],
            RGBColor(90, 90, 90).stroke_width(1),
        ))
        .map_err(err)?;
    let value_style =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, kind) in kinds.iter().enumerate() {
        let color = colors[k % colors.len()];
        let bars: Vec<_> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                report.ratio(kind, j.key).map(|r| {
                    let (x0, x1) = bar(i, k);
                    Rectangle::new([(x0, 0.0), (x1, r)], color.filled())
                })
            })
            .collect();
        chart.draw_series(bars).map_err(err)?;
        let labels: Vec<_> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                report.ratio(kind, j.key).map(|r| {
                    let (x0, x1) = bar(i, k);
                    // Above the target tick when the tick is higher.
                    let nrep = kind.strip_prefix("strata-").and_then(|s| s.parse().ok());
                    let t = nrep.and_then(|n| ratio_target(j.key, n)).unwrap_or(0.0);
                    let y = if t > r && t - r < ymax * 0.06 { t } else { r };
                    Text::new(format!("{r:.2}"), ((x0 + x1) / 2.0, y), value_style.clone())
                })
            })
            .collect();
        chart.draw_series(labels).map_err(err)?;
        if let Some(nrep) = kind
            .strip_prefix("strata-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            let ticks: Vec<_> = jobs
                .iter()
                .enumerate()
                .filter_map(|(i, j)| {
                    ratio_target(j.key, nrep).map(|t| {
                        let (x0, x1) = bar(i, k);
                        PathElement::new(
                            vec![(x0 - 0.01, t), (x1 + 0.01, t)],
                            BLACK.stroke_width(3),
                        )
                    })
                })
                .collect();
            chart.draw_series(ticks).map_err(err)?;
        }
    }
    let job_label_style =
        TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, j) in jobs.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw_text(j.label, &job_label_style, (px, py + 8))
            .map_err(err)?;
    }

    // Bottom: p99 completion latency, log scale.
    let lats: Vec<f64> = jobs
        .iter()
        .flat_map(|j| {
            kinds
                .iter()
                .filter_map(|k| report.job(k, j.key).and_then(|o| o.result.shown().p99_us))
        })
        .filter(|v| *v > 0.0)
        .collect();
    let lo = lats.iter().cloned().fold(f64::MAX, f64::min).min(1e9) / 2.0;
    let hi = lats.iter().cloned().fold(1.0f64, f64::max) * 2.0;
    let lo = if lo.is_finite() && lo > 0.0 && lo < hi {
        lo
    } else {
        1.0
    };
    let mut chart = ChartBuilder::on(&bottom)
        .margin(15)
        .margin_left(20)
        .caption(
            "p99 completion latency, microseconds, log scale (lower is better; randrw: reads)",
            ("sans-serif", 20),
        )
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc("p99 us")
        .y_label_formatter(&|v| {
            // Only 1, 2 and 5 times a power of ten, so labels do not collide.
            let lead = *v / 10f64.powf(v.log10().floor());
            if [1.0, 2.0, 5.0].iter().any(|d| (lead - d).abs() < 0.01) {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .light_line_style(RGBColor(235, 235, 235))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    for (k, kind) in kinds.iter().enumerate() {
        let color = colors[k % colors.len()];
        let bars: Vec<_> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| {
                report
                    .job(kind, j.key)
                    .and_then(|o| o.result.shown().p99_us)
                    .filter(|v| *v > 0.0)
                    .map(|v| {
                        let (x0, x1) = bar(i, k);
                        Rectangle::new([(x0, lo), (x1, v)], color.filled())
                    })
            })
            .collect();
        chart.draw_series(bars).map_err(err)?;
    }
    for (i, j) in jobs.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, lo));
        root.draw_text(j.label, &job_label_style, (px, py + 8))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

// ---------------------------------------------------------------- replot

const PROBE_PHASES: [&str; 5] = [
    "idle",
    "idle_client",
    "writing_10k_scattered",
    "after_10k_scattered",
    "randwrite_4k_qd32",
];

fn procs_from(v: &Value) -> Vec<ProcStat> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(name, p)| ProcStat {
                    name: name.clone(),
                    peak_rss_mib: p["peak_rss_mib"].as_f64().unwrap_or(0.0),
                    cpu_pct: p["cpu_pct"].as_f64().unwrap_or(0.0),
                })
                .collect::<Vec<_>>()
        })
        .map(|mut v| {
            // Servers first, then the client, then the rest (as when measured).
            v.sort_by_key(|p| (p.name == "other", p.name == "fio", p.name.clone()));
            v
        })
        .unwrap_or_default()
}

fn side_from(v: &Value) -> Side {
    Side {
        iops: v["iops"].as_f64().unwrap_or(0.0),
        mib_s: v["mib_s"].as_f64().unwrap_or(0.0),
        p50_us: v["clat_p50_us"].as_f64(),
        p99_us: v["clat_p99_us"].as_f64(),
        ios: v["ios"].as_u64().unwrap_or(0),
    }
}

/// Rebuilds the report of an earlier run from its results.json and writes
/// results.md and chart.png next to `--out` (results.json is left alone).
fn replot(mut opts: Opts, path: &Path) -> Result<bool> {
    let v: Value = serde_json::from_str(
        &fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    let st = &v["settings"];
    opts.smoke = st["smoke"].as_bool().unwrap_or(false);
    opts.size = st["volume_bytes"].as_u64().unwrap_or(opts.size);
    opts.runtime = st["runtime_secs"].as_u64().unwrap_or(opts.runtime);
    opts.ramp = st["ramp_secs"].as_u64().unwrap_or(opts.ramp);
    opts.idle_secs = st["idle_secs"].as_u64().unwrap_or(opts.idle_secs);
    opts.jobs = JOBS
        .iter()
        .filter(|j| v["jobs"].get(j.key).is_some())
        .collect();
    let mut outcomes = Vec::new();
    for kind in [
        Kind::QemuNbd,
        Kind::NbdServer,
        Kind::Strata(1),
        Kind::Strata(3),
    ] {
        let label = kind.label();
        let mut o = TargetOutcome {
            kind,
            prefill_mib_s: v["prefill_mib_s"][&label].as_f64(),
            idle: v["idle_with_client"].get(&label).map(|i| {
                (
                    procs_from(&i["processes"]),
                    i["client_connected"].as_bool().unwrap_or(false),
                )
            }),
            jobs: BTreeMap::new(),
            errors: Vec::new(),
        };
        for job in &opts.jobs {
            if let Some(t) = v["jobs"][job.key]["targets"].get(&label) {
                o.jobs.insert(
                    job.key,
                    JobOutcome {
                        result: FioResult {
                            read: side_from(&t["read"]),
                            write: side_from(&t["write"]),
                        },
                        procs: procs_from(&t["processes"]),
                        dropped_cache: t["page_cache_dropped"].as_bool().unwrap_or(false),
                    },
                );
            }
        }
        outcomes.push(o);
    }
    let mut probes: Vec<(u64, Probe)> = Vec::new();
    for (size, key) in [(GIB, "1GiB"), (TIB, "1TiB")] {
        if let Some(p) = v["memory_probe"].get(key) {
            let phases = PROBE_PHASES
                .iter()
                .filter_map(|&n| {
                    p.get(n).map(|ph| {
                        (
                            n,
                            ProbePhase {
                                procs: procs_from(&ph["processes"]),
                                note: ph["note"].as_str().unwrap_or("").to_string(),
                            },
                        )
                    })
                })
                .collect();
            probes.push((size, phases));
        }
    }
    let report = Report {
        opts: &opts,
        outcomes: &outcomes,
        probes: &probes,
    };
    let targets = report.targets();
    let mut tables = report.tables(&targets);
    for (key, title) in [
        ("warnings", "Warnings (not failures)"),
        ("errors", "Errors (the run fails)"),
    ] {
        let items: Vec<&str> = v[key]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if !items.is_empty() {
            let _ = writeln!(tables, "\n{title}:\n");
            for w in items {
                let _ = writeln!(tables, "- {}", w.lines().next().unwrap_or(""));
            }
        }
    }
    println!("{tables}");
    fs::create_dir_all(&opts.out)?;
    fs::write(opts.out.join("results.md"), &tables)?;
    let chart = opts.out.join("chart.png");
    draw_chart(&chart, &report, &targets, &v["machine"])?;
    eprintln!("bench-e2e: redrew {} and results.md", chart.display());
    Ok(true)
}
