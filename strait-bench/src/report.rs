//! Results: one [`Row`] per measured point, printed as tables, written as
//! JSON, drawn as SVG.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::units::format_size;

/// Which implementation produced a row.
pub const STRAIT: &str = "strait";
/// Plain libfabric calls, no engine.
pub const RAW: &str = "raw";

/// One measured point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// `write`, `paged`, `read`, `imm_latency`, `send_latency`.
    pub workload: String,
    /// `strait`, `raw`, or `tcp-N` (N kernel TCP streams).
    pub driver: String,
    /// Bytes per request (for paged: page size x pages).
    pub size: u64,
    /// Paged writes: bytes per page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Requests completed (messages, for TCP).
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time of the measurement.
    pub seconds: f64,
    /// Round-trip latency percentiles, microseconds (latency workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p50_us: Option<f64>,
    /// See `rtt_p50_us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p90_us: Option<f64>,
    /// See `rtt_p50_us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_us: Option<f64>,
    /// With `--repeat`: this row is the median run; lowest and highest GB/s
    /// of all runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<(f64, f64)>,
    /// `kv`: the request (model, tokens, layout, TP, layer-wise or whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `kv`: engine requests the transfer took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// `kv`: wall time per layer, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_us: Option<f64>,
    /// `kv`: the caller's CPU time submitting, per layer, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_layer: Option<f64>,
}

impl Row {
    /// Gigabytes (1e9) per second.
    pub fn gbytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// Million operations per second.
    pub fn mops(&self) -> f64 {
        self.ops as f64 / self.seconds / 1e6
    }

    fn is_latency(&self) -> bool {
        self.rtt_p50_us.is_some()
    }
}

/// A whole run: its configuration and rows. This is the `--json` output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `strait-bench`.
    pub tool: String,
    /// The tool's version.
    pub version: String,
    /// Provider both ends used (`tcp`, `shm`, `efa`).
    pub provider: String,
    /// NICs of the client's engine.
    pub client_nics: usize,
    /// NICs of the server's engine.
    pub server_nics: usize,
    /// Requests kept in flight by bandwidth workloads.
    pub depth: usize,
    /// Pages per request of the paged workload.
    pub pages: u32,
    /// Measurement time per point, seconds.
    pub duration: f64,
    /// Runs per bandwidth point (the median is reported).
    #[serde(default = "one")]
    pub repeat: u32,
    /// The client engine's polling mode: `busy`, or `adaptive` with its
    /// spin (`adaptive:50us`). The server of `loopback` uses the same.
    #[serde(default)]
    pub poll: String,
    /// The points.
    pub rows: Vec<Row>,
    /// With `--stats`: the client engine's `stats()` after the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
    /// The same, as a table (printed, not serialized).
    #[serde(skip)]
    pub stats_table: Option<String>,
}

fn one() -> u32 {
    1
}

fn describe(workload: &str) -> &'static str {
    match workload {
        "write" => "single writes, each with an immediate",
        "paged" => "paged writes (KV-cache pattern: scattered pages, one immediate per request)",
        "read" => "one-sided reads",
        "imm_latency" => "write-with-immediate ping-pong (zero-length writes)",
        "send_latency" => "send/recv ping-pong",
        "kv" => "KV cache of one request, prefill to decode (medians; baselines on the same bytes)",
        _ => "",
    }
}

/// Rows of one workload at one point (size, page size), by driver.
struct Point<'a> {
    size: u64,
    page_size: Option<u64>,
    rows: Vec<&'a Row>,
}

impl Point<'_> {
    fn get(&self, driver: &str) -> Option<&Row> {
        self.rows.iter().copied().find(|r| r.driver == driver)
    }
}

fn points<'a>(rows: &'a [Row], workload: &str) -> Vec<Point<'a>> {
    let mut out: Vec<Point<'a>> = Vec::new();
    for r in rows.iter().filter(|r| r.workload == workload) {
        match out.iter_mut().find(|p| p.size == r.size && p.page_size == r.page_size) {
            Some(p) => p.rows.push(r),
            None => out.push(Point { size: r.size, page_size: r.page_size, rows: vec![r] }),
        }
    }
    out
}

/// Distinct values of `field` in first-seen order.
fn distinct<'a>(rows: impl Iterator<Item = &'a Row>, field: impl Fn(&Row) -> &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        if !out.iter().any(|d| d == field(r)) {
            out.push(field(r).to_owned());
        }
    }
    out
}

fn kv_table(out: &mut String, rows: &[Row]) {
    let _ = writeln!(
        out,
        "{:<44} {:<10} {:>9} {:>8} {:>8} {:>9} {:>8} {:>11} {:>9}",
        "request", "driver", "ms", "GB/s", "Mop/s", "requests", "layer us", "cpu us/layer", "vs strait"
    );
    let rows: Vec<&Row> = rows.iter().filter(|r| r.workload == "kv").collect();
    for r in &rows {
        let label = r.label.clone().unwrap_or_default();
        let strait = rows.iter().find(|s| s.label == r.label && s.driver == STRAIT).map(|s| s.gbytes_per_s());
        let _ = writeln!(
            out,
            "{label:<44} {:<10} {:>9.2} {:>8.3} {:>8.4} {:>9} {:>8.0} {:>11.1} {:>9}",
            r.driver,
            r.seconds * 1e3,
            r.gbytes_per_s(),
            r.requests.unwrap_or(0) as f64 / r.seconds / 1e6,
            r.requests.unwrap_or(0),
            r.layer_us.unwrap_or(0.0),
            r.cpu_us_per_layer.unwrap_or(0.0),
            ratio(strait, Some(r.gbytes_per_s())),
        );
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

impl Report {
    /// The tables, one per workload, as printed at the end of a run.
    pub fn tables(&self) -> String {
        let mut out = String::new();
        for workload in distinct(self.rows.iter(), |r| &r.workload) {
            let points = points(&self.rows, &workload);
            let mut title = format!(
                "\n== {workload}: {} | {} | client {} NIC(s) -> server {} NIC(s)",
                describe(&workload),
                self.provider,
                self.client_nics,
                self.server_nics
            );
            if workload == "paged" {
                let _ = write!(title, " | {} pages per request", self.pages);
            }
            if !workload.ends_with("latency") {
                let _ = write!(title, " | depth {}", self.depth);
                if self.repeat > 1 {
                    let _ = write!(title, " | median of {} runs", self.repeat);
                }
            }
            let _ = writeln!(out, "{title}");
            let latency = points.first().is_some_and(|p| p.rows.iter().any(|r| r.is_latency()));
            if workload == "kv" {
                kv_table(&mut out, &self.rows);
            } else if latency {
                self.latency_table(&mut out, &points);
            } else {
                self.bandwidth_table(&mut out, &points, &workload);
            }
        }
        out
    }

    fn bandwidth_table(&self, out: &mut String, points: &[Point<'_>], workload: &str) {
        let tcp: Vec<String> =
            distinct(self.rows.iter().filter(|r| r.workload == workload && r.driver.starts_with("tcp")), |r| &r.driver);
        let has_raw = points.iter().any(|p| p.get(RAW).is_some());
        let first = if workload == "paged" { "page" } else { "size" };
        let mut header = format!("{first:>9} {:>11} {:>8} {:>8}", "strait GB/s", "Gbit/s", "Mop/s");
        if has_raw {
            let _ = write!(header, " | {:>8} {:>10}", "raw GB/s", "strait/raw");
        }
        for t in &tcp {
            let _ = write!(header, " | {:>11} {:>10}", format!("{t} GB/s"), format!("strait/{t}"));
        }
        let _ = writeln!(out, "{header}");
        for p in points {
            let strait = p.get(STRAIT);
            let gb = strait.map(Row::gbytes_per_s);
            let label = format_size(p.page_size.unwrap_or(p.size));
            let cell = |v: Option<f64>, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}"));
            let mut line = format!(
                "{label:>9} {:>11} {:>8} {:>8}",
                cell(gb, 3),
                cell(gb.map(|g| g * 8.0), 2),
                cell(strait.map(Row::mops), 4)
            );
            if has_raw {
                let raw = p.get(RAW).map(Row::gbytes_per_s);
                let _ = write!(line, " | {:>8} {:>10}", cell(raw, 3), ratio(gb, raw));
            }
            for t in &tcp {
                let v = p.get(t).map(Row::gbytes_per_s);
                let _ = write!(line, " | {:>11} {:>10}", cell(v, 3), ratio(gb, v));
            }
            let _ = writeln!(out, "{line}");
        }
    }

    fn latency_table(&self, out: &mut String, points: &[Point<'_>]) {
        let has_raw = points.iter().any(|p| p.get(RAW).is_some());
        let cols = |who: &str| format!(" {:>10} {:>10} {:>10} {:>8}", format!("{who} p50"), "p90", "p99", "samples");
        let mut header = format!("{:>9}{} µs", "size", cols("strait"));
        if has_raw {
            let _ = write!(header, " |{} µs {:>14}", cols("raw"), "p50 raw/strait");
        }
        let _ = writeln!(out, "{header}");
        let cells = |r: Option<&Row>| {
            let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
            format!(
                " {:>10} {:>10} {:>10} {:>8}",
                cell(r.and_then(|r| r.rtt_p50_us)),
                cell(r.and_then(|r| r.rtt_p90_us)),
                cell(r.and_then(|r| r.rtt_p99_us)),
                r.map_or("-".into(), |r| r.ops.to_string())
            )
        };
        for p in points {
            let s = p.get(STRAIT);
            let mut line = format!("{:>9}{}   ", format_size(p.size), cells(s));
            if has_raw {
                let r = p.get(RAW);
                let _ = write!(
                    line,
                    " |{}    {:>14}",
                    cells(r),
                    ratio(r.and_then(|r| r.rtt_p50_us), s.and_then(|r| r.rtt_p50_us))
                );
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }

    /// Bandwidth against message size: one line per (workload, driver) of
    /// the single-write and read workloads, log2 size on x, GB/s on y.
    pub fn svg(&self) -> String {
        let series: Vec<(String, Vec<(u64, f64)>)> = ["write", "read"]
            .iter()
            .flat_map(|&w| {
                distinct(self.rows.iter().filter(|r| r.workload == w), |r| &r.driver).into_iter().map(move |d| (w, d))
            })
            .map(|(w, d)| {
                let mut pts: Vec<(u64, f64)> = self
                    .rows
                    .iter()
                    .filter(|r| r.workload == w && r.driver == d)
                    .map(|r| (r.size, r.gbytes_per_s()))
                    .collect();
                pts.sort_by_key(|p| p.0);
                (format!("{w} {d}"), pts)
            })
            .filter(|(_, pts)| !pts.is_empty())
            .collect();
        plot(
            &format!(
                "strait-bench {}: client {} NIC(s) -> server {} NIC(s), depth {}",
                self.provider, self.client_nics, self.server_nics, self.depth
            ),
            &series,
        )
    }
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Escapes text for XML.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Draws the series as polylines on log2(x) against linear y.
fn plot(title: &str, series: &[(String, Vec<(u64, f64)>)]) -> String {
    let (w, h) = (820.0, 500.0);
    let (left, right, top, bottom) = (70.0, 200.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| (p.0.max(1) as f64).log2()));
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (xmin, xmax) = if xmin > xmax {
        (10.0, 20.0)
    } else if xmin == xmax {
        (xmin - 1.0, xmax + 1.0)
    } else {
        (xmin, xmax)
    };
    let ymax_data = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).filter(|y| y.is_finite()).fold(0.0, f64::max);
    let step = nice_step(ymax_data.max(0.1) / 5.0);
    let ymax = (ymax_data / step).ceil().max(1.0) * step;
    let px = |x: f64| left + (x - xmin) / (xmax - xmin) * pw;
    let py = |y: f64| top + ph - y / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        left + pw / 2.0,
        xml(title)
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ymax + step / 2.0 {
        let yy = py(y);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{y:.1}</text>"#, left - 6.0, yy + 4.0);
        y += step;
    }
    // X ticks at every power of two present in the range.
    let mut x = xmin.ceil();
    while x <= xmax {
        let xx = px(x);
        let _ = writeln!(s, r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/>"##, top + ph);
        if (x as i64) % 2 == 0 || xmax - xmin <= 8.0 {
            let label = format_size(1u64 << (x as u32).min(62));
            let _ = writeln!(
                s,
                r#"<text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                top + ph + 18.0,
                xml(&label)
            );
        }
        x += 1.0;
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ =
        writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">message size</text>"#, left + pw / 2.0, h - 15.0);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">GB/s</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if name.contains("tcp") { r#" stroke-dasharray="6 4""# } else { "" };
        let path: Vec<String> =
            pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px((x.max(1) as f64).log2()), py(y))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>"#);
        }
        let ly = top + 10.0 + i as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#,
            lx + 25.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{}</text>"#, lx + 32.0, ly + 4.0, xml(name));
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|&v| v >= raw).unwrap_or(10.0 * p)
}

/// An engine's stats as JSON (the same fields as the Rust snapshot;
/// durations in seconds).
pub fn stats_json(s: &strait::stats::EngineStats) -> serde_json::Value {
    use serde_json::json;
    use strait::stats::{ErrorCounts, Histogram, OpCounts, ERROR_KINDS};
    let ops = |o: &OpCounts| json!({"writes": o.writes, "reads": o.reads, "sends": o.sends});
    let errors = |e: &ErrorCounts| {
        serde_json::Value::Object(ERROR_KINDS.iter().enumerate().map(|(i, k)| (k.to_string(), json!(e.0[i]))).collect())
    };
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    let hist = |h: &Histogram| {
        json!({"count": h.count(), "mean": secs(h.mean()), "p50": secs(h.percentile(0.5)),
               "p90": secs(h.percentile(0.9)), "p99": secs(h.percentile(0.99)), "max": secs(h.max())})
    };
    json!({
        "nics": s.nics.iter().map(|n| json!({
            "posted": ops(&n.posted), "bytes_posted": n.bytes_posted, "busy": n.busy, "completed": n.completed,
            "errors": errors(&n.errors), "imms_out": n.imms_out, "imms_in": n.imms_in, "messages_in": n.messages_in,
            "receives_posted": n.receives_posted,
        })).collect::<Vec<_>>(),
        "peers": s.peers.iter().map(|p| json!({
            "address": p.address.to_string(), "label": p.label, "posted": ops(&p.posted), "bytes_posted": p.bytes_posted,
            "imms_out": p.imms_out, "completed": p.completed, "errors": errors(&p.errors), "requests_ok": p.requests_ok,
            "requests_failed": p.requests_failed, "in_flight": p.in_flight, "oldest_in_flight": secs(p.oldest_in_flight),
            "expired": p.expired, "resets": p.resets,
        })).collect::<Vec<_>>(),
        "in_flight": s.in_flight,
        "oldest_in_flight": secs(s.oldest_in_flight),
        "latency": s.latency.kinds().into_iter().map(|(k, h)| (k.to_string(), hist(h))).collect::<serde_json::Map<_, _>>(),
        "receive_buffers": s.receive_buffers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: &str, driver: &str, size: u64, gb: f64) -> Row {
        Row {
            workload: workload.into(),
            driver: driver.into(),
            size,
            page_size: None,
            ops: 1000,
            bytes: (gb * 1e9) as u64,
            seconds: 1.0,
            rtt_p50_us: None,
            rtt_p90_us: None,
            rtt_p99_us: None,
            spread: None,
            label: None,
            requests: None,
            layer_us: None,
            cpu_us_per_layer: None,
        }
    }

    fn report() -> Report {
        Report {
            tool: "strait-bench".into(),
            version: "0".into(),
            provider: "tcp".into(),
            client_nics: 2,
            server_nics: 1,
            depth: 16,
            pages: 64,
            duration: 0.5,
            repeat: 1,
            poll: "adaptive:50us".into(),
            rows: vec![
                row("write", "strait", 4096, 0.5),
                row("write", "raw", 4096, 0.6),
                row("write", "tcp-1", 4096, 1.0),
                row("write", "strait", 1 << 20, 3.0),
                row("write", "raw", 1 << 20, 3.1),
                row("write", "tcp-1", 1 << 20, 3.5),
                Row {
                    rtt_p50_us: Some(20.0),
                    rtt_p90_us: Some(31.5),
                    rtt_p99_us: Some(40.0),
                    ..row("imm_latency", "strait", 0, 0.0)
                },
            ],
            stats: None,
            stats_table: None,
        }
    }

    #[test]
    fn tables_show_every_driver_and_the_ratios() {
        let t = report().tables();
        assert!(t.contains("== write"), "{t}");
        assert!(t.contains("strait/raw"), "{t}");
        assert!(t.contains("tcp-1 GB/s"), "{t}");
        assert!(t.contains("0.83"), "ratio 0.5/0.6 missing: {t}");
        assert!(t.contains("== imm_latency"), "{t}");
        assert!(t.contains("20.0") && t.contains("31.5"), "p50 and p90 in the latency table: {t}");
        assert!(t.contains("samples") && t.contains("1000"), "sample count in the latency table: {t}");
    }

    #[test]
    fn svg_is_well_formed_with_one_line_per_driver() {
        let svg = report().svg();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let lines = doc.descendants().filter(|n| n.has_tag_name("polyline")).count();
        assert_eq!(lines, 3);
        assert!(svg.contains("write strait"));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.03), 0.05);
    }
}
