//! The memory probe: strata with 1 replica on a sparse volume (1 GiB and
//! 1 TiB), measured idle, idle with a client attached, during and after
//! 10,000 scattered 4 KiB writes, and (full runs only) under 4 KiB randwrite
//! QD32.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::Result;

use crate::fio::{fio, idle_with_client, job_args, JOBS};
use crate::opts::Opts;
use crate::sampler::{sample_for, ProcStat};
use crate::servers::{start, Kind};
use crate::{GIB, TIB};

#[derive(Default)]
pub(crate) struct ProbePhase {
    pub(crate) procs: Vec<ProcStat>,
    pub(crate) note: String,
}

/// phase -> stats, for one volume size.
pub(crate) type Probe = Vec<(&'static str, ProbePhase)>;

pub(crate) fn memory_probe(size: u64, opts: &Opts, work: &Path) -> Result<Probe> {
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
