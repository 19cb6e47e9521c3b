//! `chart.png`: the plotters chart of a run (a header with the machine and
//! the legend, throughput relative to qemu-nbd with the target ticks,
//! p99 completion latency on a log scale), and `--replot`, which rebuilds the
//! report and chart of an earlier run from its `results.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::fio::{FioResult, Side, JOBS};
use crate::opts::Opts;
use crate::probe::{Probe, ProbePhase};
use crate::report::{ratio_target, Report, TargetRow};
use crate::sampler::ProcStat;
use crate::servers::Kind;
use crate::{JobOutcome, TargetOutcome, GIB, REFERENCE, TIB};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub(crate) fn draw_chart(
    path: &Path,
    report: &Report,
    targets: &[TargetRow],
    machine: &Value,
) -> Result<()> {
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
pub(crate) fn replot(mut opts: Opts, path: &Path) -> Result<bool> {
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
