//! The step table (stdout), `results.json`, `results.csv` and `qps_latency.svg`.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::stats::{Percentiles, StepSummary};

fn p3(p: Option<Percentiles>) -> String {
    match p {
        Some(p) => format!("{:.0}/{:.0}/{:.0}", p.p50_ms, p.p95_ms, p.p99_ms),
        None => "-".into(),
    }
}

/// The engine's busy share as a percentage ("-" for a server that does not export it).
fn busy(b: Option<f64>) -> String {
    b.map(|b| format!("{:.0}%", 100.0 * b)).unwrap_or_else(|| "-".into())
}

/// The table, one row per step, with the saturation mark and the recommendation.
pub fn table(steps: &[StepSummary], recommended: Option<f64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} {:>9} {:>6} {:>6} {:>20} {:>20} {:>16} {:>9} {:>5} {}",
        "QPS",
        "achieved",
        "done",
        "errors",
        "E2E p50/95/99 ms",
        "TTFT p50/95/99 ms",
        "TPOT p50/95/99",
        "out tok/s",
        "busy",
        ""
    );
    for s in steps {
        let mut note = String::new();
        if s.saturated {
            note.push_str(" <- saturation");
        }
        if s.in_flight_cap_hits > 0 {
            let _ = write!(note, " (max-in-flight hit {}x: closed loop)", s.in_flight_cap_hits);
        }
        for (d, (c, n)) in &s.accuracy {
            let _ = write!(note, " {d}:{:.0}%", 100.0 * *c as f64 / (*n).max(1) as f64);
        }
        let step = match s.concurrency {
            Some(n) => format!("c={n}"),
            None => format!("{:.2}", s.offered_qps),
        };
        let _ = writeln!(
            out,
            "{:>8} {:>9.2} {:>6} {:>6} {:>20} {:>20} {:>16} {:>9.1} {:>5}{note}",
            step,
            s.achieved_qps,
            s.completed,
            s.error_count(),
            p3(s.e2e),
            p3(s.ttft),
            p3(s.tpot),
            s.output_tokens_per_s,
            busy(s.busy)
        );
    }
    per_model_table(&mut out, steps);
    if steps.iter().all(|s| s.concurrency.is_some()) {
        let _ = writeln!(out, "closed loop (c = clients sending back to back): throughput, not latency under load");
        return out;
    }
    match recommended {
        Some(r) => {
            let _ = writeln!(out, "recommended limit: {r:.2} QPS (70% of the saturation step)");
        }
        None => {
            let top = steps.last().map(|s| s.offered_qps).unwrap_or(0.0);
            let _ = writeln!(out, "no saturation up to {top:.2} QPS: raise the rates to find it");
        }
    }
    out
}

/// Per-model rows of every step that sent to more than one model (what fairness is judged by).
fn per_model_table(out: &mut String, steps: &[StepSummary]) {
    if steps.iter().all(|s| s.per_model.is_empty()) {
        return;
    }
    let _ = writeln!(
        out,
        "per model:\n{:>8} {:<24} {:>6} {:>6} {:>6} {:>20} {:>20}",
        "QPS", "model", "sent", "done", "errors", "TTFT p50/95/99 ms", "E2E p50/95/99 ms"
    );
    for s in steps {
        let step = match s.concurrency {
            Some(n) => format!("c={n}"),
            None => format!("{:.2}", s.offered_qps),
        };
        for (m, r) in &s.per_model {
            let _ = writeln!(
                out,
                "{:>8} {:<24} {:>6} {:>6} {:>6} {:>20} {:>20}",
                step,
                m,
                r.sent,
                r.completed,
                r.errors,
                p3(r.ttft),
                p3(r.e2e)
            );
        }
    }
}

/// `results.csv`: one row per step.
pub fn csv(steps: &[StepSummary]) -> String {
    let mut out = String::from(
        "offered_qps,scheduled_qps,achieved_qps,sent,completed,errors,e2e_p50_ms,e2e_p95_ms,e2e_p99_ms,ttft_p50_ms,ttft_p95_ms,ttft_p99_ms,tpot_p50_ms,tpot_p95_ms,tpot_p99_ms,output_tokens_per_s,in_flight_cap_hits,saturated,busy\n",
    );
    let f = |p: Option<Percentiles>| match p {
        Some(p) => format!("{:.3},{:.3},{:.3}", p.p50_ms, p.p95_ms, p.p99_ms),
        None => ",,".into(),
    };
    for s in steps {
        let _ = writeln!(
            out,
            "{},{:.4},{:.4},{},{},{},{},{},{},{:.2},{},{},{}",
            s.offered_qps,
            s.scheduled_qps,
            s.achieved_qps,
            s.sent,
            s.completed,
            s.error_count(),
            f(s.e2e),
            f(s.ttft),
            f(s.tpot),
            s.output_tokens_per_s,
            s.in_flight_cap_hits,
            s.saturated,
            s.busy.map(|b| format!("{b:.4}")).unwrap_or_default()
        );
    }
    out
}

/// `qps_latency.svg`: E2E P50/P95/P99 against offered QPS, saturation marked.
pub fn svg(path: &Path, steps: &[StepSummary], title: &str) -> Result<(), String> {
    let pts: Vec<(f64, Percentiles)> = steps.iter().filter_map(|s| s.e2e.map(|p| (s.offered_qps, p))).collect();
    if pts.is_empty() {
        return Err("no completed requests to plot".into());
    }
    let xmax = pts.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1;
    let ymax = pts.iter().map(|p| p.1.p99_ms).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax.max(1e-3), 0.0..ymax.max(1e-3))
        .map_err(e)?;
    chart.configure_mesh().x_desc("offered QPS").y_desc("end-to-end latency (ms)").draw().map_err(e)?;
    let series: [(&str, RGBColor, fn(&Percentiles) -> f64); 3] =
        [("P50", BLUE, |p| p.p50_ms), ("P95", RGBColor(230, 140, 0), |p| p.p95_ms), ("P99", RED, |p| p.p99_ms)];
    for (name, color, get) in series {
        let line: Vec<(f64, f64)> = pts.iter().map(|(q, p)| (*q, get(p))).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(e)?;
    }
    if let Some(s) = steps.iter().find(|s| s.saturated) {
        let x = s.offered_qps;
        chart
            .draw_series(LineSeries::new(vec![(x, 0.0), (x, ymax)], BLACK.mix(0.4)))
            .map_err(e)?
            .label("saturation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
