//! The bench's picture, as hand-written SVG: latency (p50 and p99, log scale) and throughput
//! against the number of concurrent clients, through syncgate and direct, from the latency-0
//! runs (the sweep, else whatever of overhead and throughput ran).

use std::fmt::Write;

use super::report::Machine;

/// One closed-loop run at upstream latency 0.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) clients: usize,
    /// Through syncgate (else straight to the upstream).
    pub(crate) syncgate: bool,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) rps: f64,
}

const WIDTH: f64 = 980.0;
const HEIGHT: f64 = 490.0;
const TOP: f64 = 110.0;
const BOTTOM: f64 = 390.0;
const PANELS: [(f64, f64); 2] = [(80.0, 450.0), (570.0, 940.0)];
const SYNCGATE: &str = "#1f6feb";
const DIRECT: &str = "#d9822b";
const DASHED: &str = "6 4";

/// The whole SVG document.
pub(crate) fn render(points: &[Point], machine: &Machine) -> String {
    // A later run at the same concurrency (the sweep) replaces an earlier one.
    let mut kept: Vec<Point> = Vec::new();
    for p in points {
        kept.retain(|k| (k.clients, k.syncgate) != (p.clients, p.syncgate));
        kept.push(*p);
    }
    kept.sort_by_key(|p| (p.syncgate, p.clients));

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    text(
        &mut svg,
        WIDTH / 2.0,
        30.0,
        18,
        "middle",
        "bold",
        "syncgate vs. calling the upstream directly, by concurrent clients",
    );
    text(
        &mut svg,
        WIDTH / 2.0,
        52.0,
        12,
        "middle",
        "normal",
        "mock upstream answering at once (latency 0); closed-loop clients on keep-alive connections",
    );
    text(
        &mut svg,
        WIDTH / 2.0,
        70.0,
        11,
        "middle",
        "normal",
        &machine.summary(),
    );
    if kept.is_empty() {
        text(
            &mut svg,
            WIDTH / 2.0,
            HEIGHT / 2.0,
            14,
            "middle",
            "normal",
            "no latency-0 scenario ran: add --scenarios sweep (or overhead, throughput)",
        );
        svg.push_str("</svg>\n");
        return svg;
    }

    let clients: Vec<usize> = {
        let mut c: Vec<usize> = kept.iter().map(|p| p.clients).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let lo = (clients[0] as f64).log2();
    let hi = (clients[clients.len() - 1] as f64).log2();
    let x_of = |panel: usize, n: usize| {
        let (left, right) = PANELS[panel];
        let inner = (left + 20.0, right - 20.0);
        if hi > lo {
            inner.0 + ((n as f64).log2() - lo) / (hi - lo) * (inner.1 - inner.0)
        } else {
            (left + right) / 2.0
        }
    };

    // Latency: log scale over whole decades.
    let lat: Vec<f64> = kept
        .iter()
        .flat_map(|p| [p.p50_ms, p.p99_ms])
        .filter(|v| *v > 0.0)
        .collect();
    let min = lat.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3);
    let max = lat.iter().copied().fold(0.0, f64::max).max(min * 1.01);
    let (dlo, dhi) = (
        min.log10().floor(),
        max.log10().ceil().max(min.log10().floor() + 1.0),
    );
    let y_lat = |v: f64| BOTTOM - (v.max(1e-3).log10() - dlo) / (dhi - dlo) * (BOTTOM - TOP);
    let mut ticks = Vec::new();
    let mut decade = dlo;
    // 1, 2 and 5 in each decade while that stays readable; only the decades beyond that.
    let steps: &[f64] = if dhi - dlo > 3.0 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    while decade < dhi + 0.5 {
        for &m in steps {
            let v = m * 10f64.powf(decade);
            if v.log10() <= dhi + 1e-9 {
                ticks.push(v);
            }
        }
        decade += 1.0;
    }
    frame(
        &mut svg,
        0,
        "latency per request (ms, log scale)",
        &ticks,
        y_lat,
    );

    // Throughput: linear from zero, in steps of 1, 2 or 5 × 10^k.
    let top_rps = kept.iter().map(|p| p.rps).fold(0.0, f64::max).max(1.0);
    let step = nice_step(top_rps / 5.0);
    // Headroom above the highest point for its label.
    let y_max = (top_rps * 1.08 / step).ceil() * step;
    let y_rps = |v: f64| BOTTOM - v / y_max * (BOTTOM - TOP);
    let rps_ticks: Vec<f64> = (0..=((y_max / step).round() as usize))
        .map(|i| i as f64 * step)
        .collect();
    frame(&mut svg, 1, "throughput (requests/s)", &rps_ticks, y_rps);

    for (panel, &(left, right)) in PANELS.iter().enumerate() {
        for &n in &clients {
            let x = x_of(panel, n);
            text(
                &mut svg,
                x,
                BOTTOM + 18.0,
                11,
                "middle",
                "normal",
                &n.to_string(),
            );
        }
        text(
            &mut svg,
            (left + right) / 2.0,
            BOTTOM + 38.0,
            12,
            "middle",
            "normal",
            "concurrent clients (log scale)",
        );
    }

    let rps_of = |clients: usize, syncgate: bool| {
        kept.iter()
            .find(|p| p.clients == clients && p.syncgate == syncgate)
            .map_or(0.0, |p| p.rps)
    };
    for (syncgate, color) in [(false, DIRECT), (true, SYNCGATE)] {
        let side: Vec<&Point> = kept.iter().filter(|p| p.syncgate == syncgate).collect();
        let line = |f: &dyn Fn(&Point) -> (f64, f64)| -> Vec<(f64, f64)> {
            side.iter().map(|p| f(p)).collect()
        };
        series(
            &mut svg,
            &line(&|p| (x_of(0, p.clients), y_lat(p.p50_ms))),
            color,
            None,
        );
        series(
            &mut svg,
            &line(&|p| (x_of(0, p.clients), y_lat(p.p99_ms))),
            color,
            Some(DASHED),
        );
        let rps = line(&|p| (x_of(1, p.clients), y_rps(p.rps)));
        series(&mut svg, &rps, color, None);
        for (p, (x, y)) in side.iter().zip(&rps) {
            // The higher of the two values at this concurrency is labelled above its dot,
            // the lower below it (unless that would run into the axis).
            let higher = p.rps >= rps_of(p.clients, !syncgate);
            let dy = if higher || y + 16.0 > BOTTOM {
                -8.0
            } else {
                16.0
            };
            let label = format_rps(p.rps);
            let _ = writeln!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="{color}">{label}</text>"#,
                y + dy
            );
        }
    }

    legend(&mut svg);
    svg.push_str("</svg>\n");
    svg
}

/// A panel's box, grid lines, tick labels and title.
fn frame(svg: &mut String, panel: usize, title: &str, ticks: &[f64], y: impl Fn(f64) -> f64) {
    let (left, right) = PANELS[panel];
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        right - left,
        BOTTOM - TOP
    );
    for &t in ticks {
        let ty = y(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{ty:.1}" x2="{right}" y2="{ty:.1}" stroke="#e3e3e3"/>"##
        );
        text(
            svg,
            left - 6.0,
            ty + 4.0,
            11,
            "end",
            "normal",
            &format_tick(t),
        );
    }
    text(
        svg,
        (left + right) / 2.0,
        TOP - 10.0,
        13,
        "middle",
        "bold",
        title,
    );
}

/// A polyline with a dot on each point.
fn series(svg: &mut String, points: &[(f64, f64)], color: &str, dash: Option<&str>) {
    let coords: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let dash = dash.map_or(String::new(), |d| format!(r#" stroke-dasharray="{d}""#));
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
        coords.join(" ")
    );
    for (x, y) in points {
        let _ = writeln!(
            svg,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
        );
    }
}

fn legend(svg: &mut String) {
    let entries = [
        ("syncgate p50 / rps", SYNCGATE, None),
        ("syncgate p99", SYNCGATE, Some(DASHED)),
        ("direct p50 / rps", DIRECT, None),
        ("direct p99", DIRECT, Some(DASHED)),
    ];
    let y = HEIGHT - 28.0;
    let mut x = 190.0;
    for (label, color, dash) in entries {
        let dash = dash.map_or(String::new(), |d| format!(r#" stroke-dasharray="{d}""#));
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>"#,
            x + 28.0
        );
        text(svg, x + 34.0, y + 4.0, 12, "start", "normal", label);
        x += 160.0;
    }
}

fn text(svg: &mut String, x: f64, y: f64, size: u32, anchor: &str, weight: &str, s: &str) {
    let _ = writeln!(
        svg,
        r##"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" fill="#222">{}</text>"##,
        escape(s)
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// 1, 2 or 5 × 10^k, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let base = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * base)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * base)
}

fn format_tick(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

/// A number without trailing zeros: 0.05, 2, 12.5.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn format_rps(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_ticks_are_round() {
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(1200.0), 2000.0);
        assert_eq!(nice_step(0.07), 0.1);
        assert_eq!(format_tick(20000.0), "20k");
        assert_eq!(format_tick(0.05), "0.05");
        assert_eq!(escape("a<b & c"), "a&lt;b &amp; c");
    }

    #[test]
    fn a_chart_has_both_panels_and_every_point() {
        let points: Vec<Point> = [1, 8, 64]
            .iter()
            .flat_map(|&c| {
                [false, true].map(|s| Point {
                    clients: c,
                    syncgate: s,
                    p50_ms: 0.05 * c as f64,
                    p99_ms: 0.2 * c as f64,
                    rps: 1000.0 * c as f64,
                })
            })
            .collect();
        let svg = render(&points, &super::super::report::machine());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert_eq!(svg.matches("<circle").count(), 18);
        assert!(svg.contains("throughput (requests/s)"));
        let empty = render(&[], &super::super::report::machine());
        assert!(empty.contains("no latency-0 scenario ran"));
    }
}
