//! The client side: the fio jobs (`Job`, `JOBS`, `job_args`), running fio
//! with `ioengine=nbd` while sampling the server (`fio`), its parsed results
//! (`FioResult`, `Side`), syncing and dropping the page cache before a job,
//! and the idle-client measurement with qemu-io (`idle_with_client`).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::opts::Opts;
use crate::sampler::{round2, sample_for, ProcStat, Sampler, Watch};
use crate::servers::{tail, Server};

pub(crate) struct Job {
    pub(crate) key: &'static str,
    pub(crate) label: &'static str,
    pub(crate) rw: &'static str,
    pub(crate) bs: &'static str,
    pub(crate) qd: u32,
    pub(crate) rwmix_read: Option<u32>,
}

impl Job {
    pub(crate) fn reads(&self) -> bool {
        self.rw.contains("read") || self.rw == "randrw"
    }
}

pub(crate) const JOBS: [Job; 6] = [
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

#[derive(Clone, Debug, Default)]
pub(crate) struct Side {
    pub(crate) iops: f64,
    pub(crate) mib_s: f64,
    pub(crate) p50_us: Option<f64>,
    pub(crate) p99_us: Option<f64>,
    pub(crate) ios: u64,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct FioResult {
    pub(crate) read: Side,
    pub(crate) write: Side,
}

impl FioResult {
    pub(crate) fn iops(&self) -> f64 {
        self.read.iops + self.write.iops
    }
    pub(crate) fn mib_s(&self) -> f64 {
        self.read.mib_s + self.write.mib_s
    }
    /// The latency shown in the table: reads for jobs that read (the 70%
    /// side of randrw), writes otherwise.
    pub(crate) fn shown(&self) -> &Side {
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

pub(crate) fn side_json(s: &Side) -> Value {
    json!({"iops": round2(s.iops), "mib_s": round2(s.mib_s), "clat_p50_us": s.p50_us.map(round2),
           "clat_p99_us": s.p99_us.map(round2), "ios": s.ios})
}

/// Runs fio against `uri` while sampling `watch` (and fio itself); fails on
/// a fio error, a timeout, or output without JSON.
pub(crate) fn fio(
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

pub(crate) fn job_args(job: &Job, opts: &Opts) -> Vec<String> {
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

pub(crate) fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Drops the page cache (server-side files: the raw files and the replica
/// files). Needs root; returns whether it worked.
pub(crate) fn drop_caches() -> bool {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// CPU and RSS of `server` with an NBD client attached and idle (qemu-io
/// sleeping), over `secs`. Returns the stats and whether the client stayed
/// connected.
pub(crate) fn idle_with_client(
    server: &Server,
    secs: u64,
    logdir: &Path,
) -> Result<(Vec<ProcStat>, bool)> {
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
