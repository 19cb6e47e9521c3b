//! The report of a run: the targets (`ratio_target` and the RSS,
//! sparse-volume and idle-CPU limits), `Report` over the run's outcomes and
//! probes, the target rows checked against those limits, the markdown tables
//! (stdout and `results.md`) and the `results.json` document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::fio::side_json;
use crate::opts::Opts;
use crate::probe::{Probe, ProbePhase};
use crate::sampler::{is_server, round2, stats_json, ProcStat};
use crate::servers::Kind;
use crate::{JobOutcome, TargetOutcome, GIB, REFERENCE, SAMPLE_EVERY, TIB};

/// The targets: strata/qemu-nbd throughput ratio per job.
pub(crate) fn ratio_target(job: &str, replicas: usize) -> Option<f64> {
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

pub(crate) struct Report<'a> {
    pub(crate) opts: &'a Opts,
    pub(crate) outcomes: &'a [TargetOutcome],
    pub(crate) probes: &'a [(u64, Probe)],
}

pub(crate) struct TargetRow {
    what: String,
    value: String,
    limit: String,
    pub(crate) met: Option<bool>,
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
    pub(crate) fn job(&self, kind: &str, job: &str) -> Option<&JobOutcome> {
        self.outcomes
            .iter()
            .find(|o| o.kind.label() == kind)
            .and_then(|o| o.jobs.get(job))
    }

    pub(crate) fn ratio(&self, kind: &str, job: &str) -> Option<f64> {
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

    pub(crate) fn targets(&self) -> Vec<TargetRow> {
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

    pub(crate) fn tables(&self, targets: &[TargetRow]) -> String {
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

    pub(crate) fn json(&self, targets: &[TargetRow], machine: Value) -> Value {
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
