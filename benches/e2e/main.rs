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
//!
//! This file holds the run itself (`main`, `run`, one target's jobs in
//! `bench_target`, the machine description, the tool check) and the
//! constants the modules share: `opts` (command line), `sampler` (/proc
//! sampling), `servers` (the targets' processes), `fio` (jobs and the fio
//! client), `probe` (memory probe), `report` (tables, targets, JSON) and
//! `chart` (chart.png, `--replot`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::chart::{draw_chart, replot};
use crate::fio::{drop_caches, fio, idle_with_client, job_args, sync_all, FioResult};
use crate::opts::{parse_opts, Opts};
use crate::probe::{memory_probe, Probe};
use crate::report::Report;
use crate::sampler::ProcStat;
use crate::servers::{start, warnings, Kind};

/// Progress on stderr, stamped with the seconds since the run started.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[{:6.1}s] {}", $crate::since_start(), format!($($arg)*))
    };
}

fn since_start() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

// After `say!`, so the modules can use it.
mod chart;
mod fio;
mod opts;
mod probe;
mod report;
mod sampler;
mod servers;

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// The reference every ratio is taken against.
const REFERENCE: &str = "qemu-nbd";

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
