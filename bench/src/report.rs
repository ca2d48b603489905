//! What a run found: the per-target results, Courier's ratios and targets, as a table, JSON and an SVG plot.

use std::fmt::Write as _;

use serde::Serialize;

use crate::servers::Target;
use crate::soak::SoakResult;
use crate::stats::{Latency, human};

/// One target's figures for one scenario. Fields a scenario does not measure stay empty.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetResult {
    pub target: String,
    /// Why the target did not run (not installed, failed...).
    pub error: Option<String>,
    /// Why the scenario does not apply to the target.
    pub skipped: Option<String>,
    /// Length of the measured window.
    pub seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Expected deliveries that had not arrived when the run ended.
    pub undelivered: u64,
    pub delivered_per_s: Option<f64>,
    pub latency: Option<Latency>,
    /// Backlog: messages/s the server took from one sender while the reader was offline.
    pub fill_per_s: Option<f64>,
    pub connect_ms: Option<f64>,
    /// Backlog: sync + ack of the whole inbox (Courier); receive + PUBACK of every queued message (Mosquitto).
    pub drain_ms: Option<f64>,
    pub connections: Option<u64>,
    pub connects_per_s: Option<f64>,
    pub rss_mb: Option<f64>,
    pub rss_per_connection_kb: Option<f64>,
    /// Percent of one core, over the measured window; unknown for a server the bench did not start.
    pub server_cpu_percent: Option<f64>,
    /// Server CPU time per delivered message (per delivery, in group): what a
    /// message costs, which other load on the machine changes far less than it
    /// changes throughput.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// VmHWM: the most the server process ever held resident.
    pub server_peak_rss_mb: Option<f64>,
    pub bench_cpu_percent: Option<f64>,
    /// CPU used by everything else on the machine meanwhile (other builds, tests).
    pub other_cpu_percent: Option<f64>,
    pub notes: Vec<String>,
    /// The soak's samples and verdict.
    pub soak: Option<SoakResult>,
}

impl TargetResult {
    pub fn new(target: Target) -> TargetResult {
        TargetResult { target: target.name().to_owned(), ..TargetResult::default() }
    }

    pub fn set_usage(&mut self, usage: crate::servers::Usage) {
        self.server_cpu_percent = usage.server;
        self.bench_cpu_percent = usage.bench;
        self.other_cpu_percent = usage.other;
    }

    fn ran(&self) -> bool {
        self.error.is_none() && self.skipped.is_none()
    }
}

/// The whole result of a run, as `--json` writes it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    /// One line that says what was run ("1000 devices, closed loop, 10 s").
    pub title: String,
    pub parameters: serde_json::Value,
    pub machine: Machine,
    pub results: Vec<TargetResult>,
    pub ratios: Vec<Ratio>,
    pub checks: Vec<Check>,
    pub guarantees: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub bench_threads: usize,
    /// /proc/loadavg before and after: other work on the machine skews every figure.
    pub loadavg_before: String,
    pub loadavg_after: String,
}

/// Courier's figure divided by a reference's.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub metric: String,
    pub reference: String,
    pub courier: f64,
    pub other: f64,
    pub ratio: f64,
}

/// One of the issue's targets, as met or missed by Courier in this run.
#[derive(Debug, Serialize)]
pub struct Check {
    pub goal: String,
    pub value: String,
    pub met: bool,
    /// Set when this run's size is not the one the target names.
    pub caveat: Option<String>,
}

/// What each target promises when it answers, so nobody reads the ratios as like for like.
pub fn guarantees(durability: &str) -> Vec<String> {
    let courier = if durability == "disk" {
        "courier: SUCCESS after the message's log row (body and recipient inboxes) is committed and fsynced (durability=disk): survives a crash and a power cut"
    } else {
        "courier: SUCCESS after the message's log row (body and recipient inboxes) is committed to SQLite (WAL, durability=process): survives the process being killed, not a power cut (--durability disk fsyncs each commit group)"
    };
    vec![
        courier.to_owned(),
        "relay: no storage, no auth, no acknowledgement: a frame to an offline peer is dropped; the ceiling of the stack".to_owned(),
        "mosquitto: QoS 1 PUBACK once the message is in memory; the store is written to disk every autosave_interval (1800 s stock) and at shutdown, so a crash loses what came since".to_owned(),
        "mosquitto: max_queued_messages is raised to 1,000,000 here; stock Mosquitto drops an offline client's messages past 1,000".to_owned(),
    ]
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.3}")
    }
}

fn lat(r: &TargetResult, f: fn(&Latency) -> f64) -> String {
    r.latency.as_ref().map_or("-".into(), |l| ms(f(l)))
}

type Column = (&'static str, fn(&TargetResult) -> String);

fn columns(scenario: &str) -> Vec<Column> {
    let mut columns: Vec<Column> = match scenario {
        "backlog" => vec![
            ("fill msg/s", |r| r.fill_per_s.map_or("-".into(), human)),
            ("connect ms", |r| opt(r.connect_ms, 1)),
            ("drain ms", |r| opt(r.drain_ms, 1)),
            ("drained", |r| r.received.to_string()),
        ],
        "soak" => vec![
            ("connections", |r| r.connections.map_or("-".into(), |c| c.to_string())),
            ("delivered/s", |r| r.delivered_per_s.map_or("-".into(), human)),
            ("p50 ms", |r| lat(r, |l| l.p50_ms)),
            ("p99 ms", |r| lat(r, |l| l.p99_ms)),
            ("max ms", |r| lat(r, |l| l.max_ms)),
            ("sent", |r| r.sent.to_string()),
            ("undelivered", |r| r.undelivered.to_string()),
            ("RSS MB 1st/3rd third", |r| {
                let s = r.soak.as_ref();
                format!(
                    "{}/{}",
                    opt(s.and_then(|s| s.rss_first_third_mb), 1),
                    opt(s.and_then(|s| s.rss_last_third_mb), 1)
                )
            }),
            ("fds max", |r| r.soak.as_ref().and_then(|s| s.fds_max).map_or("-".into(), |n| n.to_string())),
            ("cut-offs", |r| r.soak.as_ref().map_or("-".into(), |s| s.cut_offs.to_string())),
        ],
        "idle" => vec![
            ("connections", |r| r.connections.map_or("-".into(), |c| c.to_string())),
            ("connects/s", |r| r.connects_per_s.map_or("-".into(), human)),
            ("RSS MB", |r| opt(r.rss_mb, 1)),
            ("KB/conn", |r| opt(r.rss_per_connection_kb, 1)),
        ],
        _ => vec![
            ("delivered/s", |r| r.delivered_per_s.map_or("-".into(), human)),
            ("p50 ms", |r| lat(r, |l| l.p50_ms)),
            ("p90 ms", |r| lat(r, |l| l.p90_ms)),
            ("p99 ms", |r| lat(r, |l| l.p99_ms)),
            ("p99.9 ms", |r| lat(r, |l| l.p999_ms)),
            ("max ms", |r| lat(r, |l| l.max_ms)),
            ("sent", |r| r.sent.to_string()),
            ("undelivered", |r| r.undelivered.to_string()),
            ("server µs/msg", |r| opt(r.server_cpu_us_per_delivery, 0)),
        ],
    };
    columns.extend::<[Column; 5]>([
        ("errors", |r| r.errors.to_string()),
        ("server CPU %", |r| opt(r.server_cpu_percent, 0)),
        ("peak RSS MB", |r| opt(r.server_peak_rss_mb, 1)),
        ("bench CPU %", |r| opt(r.bench_cpu_percent, 0)),
        ("other CPU %", |r| opt(r.other_cpu_percent, 0)),
    ]);
    columns
}

/// The table, ratios, checks and guarantees, as printed on stdout.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{}", report.title);
    let _ = writeln!(
        out,
        "machine: {} cores, bench on {} threads; load average before {} / after {}\n\
         CPU % is of one core (200 = both); \"other\" is the rest of the machine during the window\n",
        report.machine.cores,
        report.machine.bench_threads,
        report.machine.loadavg_before,
        report.machine.loadavg_after
    );
    let columns = columns(&report.scenario);
    let mut rows =
        vec![std::iter::once("target".to_owned()).chain(columns.iter().map(|c| c.0.to_owned())).collect()];
    for r in report.results.iter().filter(|r| r.ran()) {
        rows.push(
            std::iter::once(r.target.clone()).chain(columns.iter().map(|c| (c.1)(r))).collect::<Vec<_>>(),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|row| row[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| if i == 0 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  "));
    }
    for r in &report.results {
        if let Some(error) = &r.error {
            let _ = writeln!(out, "{}: did not run: {error}", r.target);
        }
        if let Some(why) = &r.skipped {
            let _ = writeln!(out, "{}: skipped: {why}", r.target);
        }
        if let Some(first) = &r.first_error {
            let _ = writeln!(out, "{}: first error: {first}", r.target);
        }
        for note in &r.notes {
            let _ = writeln!(out, "{}: {note}", r.target);
        }
        if let Some(soak) = &r.soak {
            out.push_str(&crate::soak::text(soak));
        }
    }
    if !report.ratios.is_empty() {
        let _ = writeln!(out, "\ncourier's ratios:");
        for ratio in &report.ratios {
            let _ = writeln!(
                out,
                "  {:<22} courier / {:<9} = {:.2}  ({} vs {})",
                ratio.metric,
                ratio.reference,
                ratio.ratio,
                short(ratio.courier),
                short(ratio.other)
            );
        }
    }
    if !report.checks.is_empty() {
        let _ = writeln!(out, "\ntargets (courier):");
        for check in &report.checks {
            let mark = if check.met { "met   " } else { "MISSED" };
            let caveat = check.caveat.as_deref().map(|c| format!("  ({c})")).unwrap_or_default();
            let _ = writeln!(out, "  {mark} {}: {}{caveat}", check.goal, check.value);
        }
    }
    let _ = writeln!(out, "\nwhat an answer guarantees:");
    for line in &report.guarantees {
        let _ = writeln!(out, "  - {line}");
    }
    out
}

fn short(value: f64) -> String {
    if value >= 1000.0 { human(value) } else { format!("{value:.3}") }
}

/// Courier against each reference on the scenario's headline figures.
pub fn ratios(scenario: &str, results: &[TargetResult]) -> Vec<Ratio> {
    let find = |name: &str| results.iter().find(|r| r.target == name && r.ran());
    let Some(courier) = find("courier") else { return Vec::new() };
    type Metric = (&'static str, fn(&TargetResult) -> Option<f64>);
    let metrics: Vec<Metric> = match scenario {
        "backlog" => vec![("drain ms", |r| r.drain_ms)],
        "idle" => vec![("RSS MB", |r| r.rss_mb), ("KB per connection", |r| r.rss_per_connection_kb)],
        _ => vec![
            ("delivered/s", |r| r.delivered_per_s),
            ("p50 ms", |r| r.latency.as_ref().map(|l| l.p50_ms)),
            ("p99 ms", |r| r.latency.as_ref().map(|l| l.p99_ms)),
        ],
    };
    let mut ratios = Vec::new();
    for reference in ["relay", "mosquitto"] {
        let Some(other) = find(reference) else { continue };
        for (metric, get) in &metrics {
            if let (Some(a), Some(b)) = (get(courier), get(other))
                && b > 0.0
            {
                ratios.push(Ratio {
                    metric: (*metric).to_owned(),
                    reference: reference.to_owned(),
                    courier: a,
                    other: b,
                    ratio: a / b,
                });
            }
        }
    }
    ratios
}

/// The run's shape, as far as the issue's targets care.
pub struct Shape {
    pub devices: usize,
    pub rate: Option<f64>,
    pub members: usize,
    pub messages: u64,
    pub connections: usize,
}

/// The issue's targets that this run can speak to.
pub fn checks(scenario: &str, shape: &Shape, results: &[TargetResult]) -> Vec<Check> {
    let find = |name: &str| results.iter().find(|r| r.target == name && r.ran());
    let Some(courier) = find("courier") else { return Vec::new() };
    let size_caveat = |actual: String, wanted: &str| {
        (actual != wanted).then(|| format!("the target is for {wanted}; this run: {actual}"))
    };
    let mut checks = Vec::new();
    match scenario {
        "one-to-one" => {
            let caveat = size_caveat(format!("{} devices", shape.devices), "1000 devices");
            let rate = courier.delivered_per_s.unwrap_or(0.0);
            let p99 = courier.latency.as_ref().map_or(f64::INFINITY, |l| l.p99_ms);
            match shape.rate {
                None => {
                    checks.push(Check {
                        goal: "at least 30,000 delivered/s".into(),
                        value: format!("{rate:.0}/s"),
                        met: rate >= 30_000.0,
                        caveat: caveat.clone(),
                    });
                    if let Some(m) = find("mosquitto").and_then(|r| r.delivered_per_s) {
                        checks.push(Check {
                            goal: "more delivered/s than Mosquitto".into(),
                            value: format!("{rate:.0}/s vs {m:.0}/s"),
                            met: rate > m,
                            caveat: caveat.clone(),
                        });
                    }
                    if let Some(r) = find("relay").and_then(|r| r.delivered_per_s) {
                        checks.push(Check {
                            goal: "at least 0.7 of the relay's delivered/s".into(),
                            value: format!("{:.2}", rate / r),
                            met: rate >= 0.7 * r,
                            caveat,
                        });
                    }
                }
                Some(r) => {
                    let (goal, limit) = if r <= 2_000.0 {
                        ("p99 at most 1 ms at 2,000 msgs/s", 1.0)
                    } else {
                        ("p99 at most 10 ms at 20,000 msgs/s", 10.0)
                    };
                    let wanted = if limit == 1.0 { 2_000.0 } else { 20_000.0 };
                    let caveat = caveat.or_else(|| {
                        (r != wanted).then(|| format!("the target is at {wanted} msgs/s; this run: {r}"))
                    });
                    checks.push(Check {
                        goal: goal.into(),
                        value: format!("p99 {p99:.3} ms"),
                        met: p99 <= limit,
                        caveat,
                    });
                }
            }
        }
        "group" => {
            let rate = courier.delivered_per_s.unwrap_or(0.0);
            checks.push(Check {
                goal: "at least 100,000 recipient deliveries/s in a 100-member group".into(),
                value: format!("{rate:.0}/s"),
                met: rate >= 100_000.0,
                caveat: size_caveat(format!("{} members", shape.members), "100 members"),
            });
        }
        "backlog" => {
            let drain = courier.drain_ms.unwrap_or(f64::INFINITY);
            checks.push(Check {
                goal: "backlog synced and acked in at most 100 ms".into(),
                value: format!("{drain:.1} ms (+ {:.1} ms to connect)", courier.connect_ms.unwrap_or(0.0)),
                met: drain <= 100.0 && courier.undelivered == 0,
                caveat: size_caveat(format!("{} messages", shape.messages), "10000 messages"),
            });
        }
        "soak" => {
            if let Some(soak) = &courier.soak {
                checks.extend(crate::soak::checks(soak, courier));
            }
        }
        "idle" => {
            if let Some(rss) = courier.rss_mb {
                checks.push(Check {
                    goal: "idle connections in at most 120 MB RSS".into(),
                    value: format!("{rss:.1} MB"),
                    met: rss <= 120.0,
                    caveat: size_caveat(format!("{} connections", shape.connections), "10000 connections"),
                });
            }
        }
        _ => {}
    }
    checks
}

fn color(target: &str) -> &'static str {
    match target {
        "courier" => "#d62728",
        "relay" => "#1f77b4",
        _ => "#2ca02c",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// An SVG: latency percentile curves per target on log axes, or for the
/// scenarios without latencies, bars of their headline figure.
pub fn svg(report: &Report) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 150.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 60.0;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="14" font-weight="bold">{}</text>
"#,
        W / 2.0,
        escape(&report.title)
    );
    let ran: Vec<&TargetResult> = report.results.iter().filter(|r| r.ran()).collect();
    let curves: Vec<(&str, &Vec<(f64, f64)>)> =
        ran.iter().filter_map(|r| Some((r.target.as_str(), &r.latency.as_ref()?.curve))).collect();

    if !curves.is_empty() {
        // x: "nines" of the percentile, -log10(1 - p); y: log10 of ms.
        let nines = |p: f64| -(1.0 - p / 100.0).max(1e-9).log10();
        let x_max =
            curves.iter().flat_map(|(_, c)| c.iter().map(|(p, _)| nines(*p))).fold(1.0f64, f64::max).ceil();
        let values = curves.iter().flat_map(|(_, c)| c.iter().map(|(_, v)| *v));
        let lo = values.clone().fold(f64::INFINITY, f64::min).max(1e-3).log10().floor();
        let hi = values.fold(0.0f64, f64::max).max(1e-3).log10().ceil().max(lo + 1.0);
        let x = |n: f64| LEFT + n / x_max * pw;
        let y = |v: f64| TOP + ph - (v.max(1e-3).log10() - lo) / (hi - lo) * ph;
        for (n, label) in [
            (0.0, "p0"),
            (std::f64::consts::LOG10_2, "p50"),
            (1.0, "p90"),
            (2.0, "p99"),
            (3.0, "p99.9"),
            (4.0, "p99.99"),
        ] {
            if n <= x_max {
                let _ = writeln!(
                    s,
                    r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1}" stroke="#ddd"/><text x="{0:.1}" y="{2}" text-anchor="middle">{label}</text>"##,
                    x(n),
                    TOP + ph,
                    TOP + ph + 16.0
                );
            }
        }
        for decade in (lo as i32)..=(hi as i32) {
            let v = 10f64.powi(decade);
            let label = if v >= 1.0 { format!("{v:.0} ms") } else { format!("{v} ms") };
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{label}</text>"##,
                y(v),
                LEFT + pw,
                LEFT - 6.0,
                y(v) + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">send-to-receive latency (log)</text>"#,
            LEFT + pw / 2.0,
            H - 14.0,
            TOP + ph / 2.0,
            TOP + ph / 2.0
        );
        for (i, (target, curve)) in curves.iter().enumerate() {
            let points: Vec<String> =
                curve.iter().map(|(p, v)| format!("{:.1},{:.1}", x(nines(*p)), y(*v))).collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
                color(target),
                points.join(" ")
            );
            let ly = TOP + 10.0 + i as f64 * 20.0;
            let _ = writeln!(
                s,
                r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{2}" stroke-width="3"/><text x="{3}" y="{4}">{target}</text>"#,
                LEFT + pw + 15.0,
                LEFT + pw + 40.0,
                color(target),
                LEFT + pw + 46.0,
                ly + 4.0
            );
        }
    } else {
        let (label, get): (&str, fn(&TargetResult) -> Option<f64>) = match report.scenario.as_str() {
            "backlog" => {
                ("drain ms: Courier sync + ack, Mosquitto receive + PUBACK (lower is better)", |r| r.drain_ms)
            }
            _ => ("server RSS MB with the connections open (lower is better)", |r| r.rss_mb),
        };
        let bars: Vec<(&str, f64)> = ran.iter().filter_map(|r| Some((r.target.as_str(), get(r)?))).collect();
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
        let _ = writeln!(s, r#"<text x="{LEFT}" y="{}">{label}</text>"#, TOP + ph + 30.0);
        for (i, (target, value)) in bars.iter().enumerate() {
            let top = TOP + 10.0 + i as f64 * 50.0;
            let width = value / max * pw;
            let _ = writeln!(
                s,
                r#"<text x="{0}" y="{1}" text-anchor="end">{target}</text><rect x="{LEFT}" y="{2}" width="{width:.1}" height="30" fill="{3}"/><text x="{4:.1}" y="{1}">{value:.1}</text>"#,
                LEFT - 6.0,
                top + 20.0,
                top,
                color(target),
                LEFT + width + 6.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
