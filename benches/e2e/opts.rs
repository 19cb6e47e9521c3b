//! Command-line options of the benchmark: `Opts`, the usage line, size
//! parsing (`4G`) and `parse_opts`, which also picks the smoke run's
//! defaults (volume size, runtimes, the jobs it keeps) and the output folder.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use crate::fio::{Job, JOBS};
use crate::GIB;

pub(crate) struct Opts {
    pub(crate) smoke: bool,
    pub(crate) size: u64,
    pub(crate) runtime: u64,
    pub(crate) ramp: u64,
    pub(crate) idle_secs: u64,
    pub(crate) probe_secs: u64,
    pub(crate) probe: bool,
    pub(crate) out: PathBuf,
    pub(crate) strata: PathBuf,
    pub(crate) jobs: Vec<&'static Job>,
    /// Redraw the table and chart from a results.json instead of running.
    pub(crate) replot: Option<PathBuf>,
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

pub(crate) fn parse_opts() -> Result<Opts> {
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
