//! courier-bench: drives Courier, a bare relay and Mosquitto with the same load over real sockets and reports how they compare.
//!
//! Each target is started in turn (never two at once: they would share the
//! two cores), driven, measured from /proc, and stopped. See `--help`.

mod conn;
mod report;
mod scenarios;
mod servers;
mod soak;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use report::{Machine, Report, Shape, TargetResult};
use scenarios::{Load, Params};
use servers::{Server, Target};
use stats::{Progress, Stats};

#[derive(Parser)]
#[command(
    about = "Load Courier (and, for reference, a bare relay and Mosquitto) and report latency, throughput, CPU and memory",
    after_help = "Examples:\n  courier-bench one-to-one --closed\n  courier-bench one-to-one --rate 2000 --target courier\n  \
                  courier-bench group --json group.json --plot group.svg\n  courier-bench backlog\n  courier-bench idle --connections 10000\n  \
                  courier-bench soak --connections 2000 --slow-readers 20 --duration 60\n  \
                  courier-bench one-to-one --url ws://127.0.0.1:3001 --rate 100"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum Scenario {
    /// Pairs of devices, each sending to its peer: open loop (--rate) or closed loop (--closed, the default).
    OneToOne {
        /// Pairs of devices (500 pairs = the 1,000 connected devices of the targets).
        #[arg(long, default_value_t = 500)]
        pairs: usize,
        /// Open loop: this many messages a second in all, spread over every device.
        #[arg(long, conflicts_with = "closed")]
        rate: Option<f64>,
        /// Closed loop: each device keeps --window messages in flight to its peer (the default).
        #[arg(long)]
        closed: bool,
        /// Closed loop: messages each device keeps in flight to its peer.
        #[arg(long, default_value_t = 1, conflicts_with = "rate")]
        window: usize,
        #[command(flatten)]
        timing: Timing,
    },
    /// One sender to a group chat; counts recipient deliveries a second.
    Group {
        /// Members, the sender included.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Messages the sender may have in flight (not yet received by every member).
        #[arg(long, default_value_t = 10)]
        window: usize,
        #[command(flatten)]
        timing: Timing,
    },
    /// An offline device is sent a backlog, then connects and drains it (Courier: sync 100 + ack per page).
    Backlog {
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Sends the writer may have unacknowledged while filling the backlog.
        #[arg(long, default_value_t = 100)]
        window: u64,
    },
    /// Opens many connections that do nothing, and reads the server's memory.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Seconds to hold them open before reading the server's RSS.
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
    /// Courier only: devices chatting and acking, plus slow readers that stop reading, for a bounded time; samples the server's RSS and open fds.
    Soak {
        /// Chatting devices, in chats of --members.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Clients that join chats, then never read their socket and keep sending `sync`.
        #[arg(long, default_value_t = 100)]
        slow_readers: usize,
        /// Seconds of traffic, warm-up included (at most 3600: the soak always ends by itself).
        #[arg(long, default_value_t = 360.0)]
        duration: f64,
        /// Seconds at the start that are sampled but not judged: SQLite's page cache (64 MiB for
        /// the writer) takes about 3 minutes at 1,000 msgs/s to fill, and would read as growth.
        #[arg(long, default_value_t = 180.0)]
        warmup: f64,
        /// Seconds between samples of the server's RSS and open fds.
        #[arg(long, default_value_t = 5.0)]
        interval: f64,
        /// Messages a second sent in all by the chatting devices.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Members of each chat.
        #[arg(long, default_value_t = 4)]
        members: usize,
        /// Chats each slow reader is in.
        #[arg(long, default_value_t = 10)]
        slow_chats: usize,
        /// Seconds between a slow reader's unread `sync` requests.
        #[arg(long, default_value_t = 0.5)]
        sync_interval: f64,
        /// SO_RCVBUF of a slow reader's socket, bytes (a small window: the server stalls soon).
        #[arg(long, default_value_t = 16 * 1024)]
        receive_buffer: u32,
    },
}

#[derive(Args, Clone, Copy)]
struct Timing {
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
}

#[derive(Args)]
struct Common {
    /// Which servers to drive, comma-separated: courier, relay, mosquitto, or all.
    #[arg(long, global = true, default_value = "all", value_delimiter = ',')]
    target: Vec<String>,
    /// Drive an already running Courier at this URL instead of starting one (its CPU and memory are then unknown).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Secret to mint tokens with (the server's COURIER_JWT_SECRET).
    #[arg(long, global = true, env = "COURIER_JWT_SECRET", default_value = courier_core::auth::DEV_SECRET, hide_default_value = true, hide_env_values = true)]
    secret: String,
    /// Durability of the courier-local the bench starts: process or disk.
    #[arg(long, global = true, default_value = "process", value_parser = ["process", "disk"])]
    durability: String,
    /// Bytes of each message body.
    #[arg(long, global = true, default_value_t = 64)]
    size: usize,
    /// Courier receivers do not ack what they are pushed (by default they
    /// ack as a real client does: up to 100 ids a frame, at most 250 ms
    /// after the first one not yet acked).
    #[arg(long, global = true)]
    no_acks: bool,
    /// Tokio worker threads of the bench (it shares the machine with the server).
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// Connection handshakes in flight at once during set-up.
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// Write the whole result as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write a latency plot (SVG) here.
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::OneToOne { .. } => "one-to-one",
            Scenario::Group { .. } => "group",
            Scenario::Backlog { .. } => "backlog",
            Scenario::Idle { .. } => "idle",
            Scenario::Soak { .. } => "soak",
        }
    }

    fn title(&self) -> String {
        match self {
            Scenario::OneToOne { pairs, rate, window, timing, .. } => {
                let load = rate.map_or(format!("closed loop, {window} in flight per connection"), |r| {
                    format!("open loop at {r} msgs/s")
                });
                format!("one-to-one: {} devices, {load}, {} s", 2 * pairs, timing.duration)
            }
            Scenario::Group { members, window, timing } => {
                format!(
                    "group: 1 sender to {members} members ({} receive each message; delivered/s counts them all), {window} in flight, {} s",
                    members.saturating_sub(1),
                    timing.duration
                )
            }
            Scenario::Backlog { messages, .. } => {
                format!("backlog: {messages} messages to an offline device, then drained")
            }
            Scenario::Idle { connections, .. } => format!("idle: {connections} open connections"),
            Scenario::Soak { connections, slow_readers, duration, rate, members, .. } => format!(
                "soak: {connections} devices in chats of {members} at {rate} msgs/s in all, acking; \
                 {slow_readers} slow readers; {duration} s"
            ),
        }
    }

    fn shape(&self) -> Shape {
        let mut shape = Shape { devices: 0, rate: None, members: 0, messages: 0, connections: 0 };
        match self {
            Scenario::OneToOne { pairs, rate, .. } => {
                shape.devices = 2 * pairs;
                shape.rate = *rate;
            }
            Scenario::Group { members, .. } => shape.members = *members,
            Scenario::Backlog { messages, .. } => shape.messages = *messages,
            Scenario::Idle { connections, .. } | Scenario::Soak { connections, .. } => {
                shape.connections = *connections
            }
        }
        shape
    }

    /// Runs this scenario once against `server`.
    async fn run(
        &self,
        server: &Server,
        p: &Params,
        stats: std::sync::Arc<Stats>,
    ) -> anyhow::Result<TargetResult> {
        let secs = Duration::from_secs_f64;
        match *self {
            Scenario::OneToOne { pairs, rate, window, timing, .. } => {
                let load = rate.map_or(Load::Closed(window.max(1)), Load::Open);
                scenarios::one_to_one(
                    server,
                    p,
                    stats,
                    pairs,
                    load,
                    secs(timing.warmup),
                    secs(timing.duration),
                )
                .await
            }
            Scenario::Group { members, window, timing } => {
                scenarios::group(
                    server,
                    p,
                    stats,
                    members,
                    window,
                    secs(timing.warmup),
                    secs(timing.duration),
                )
                .await
            }
            Scenario::Backlog { messages, window } => {
                scenarios::backlog(server, p, stats, messages, window).await
            }
            Scenario::Idle { connections, hold } => {
                scenarios::idle(server, p, stats, connections, secs(hold)).await
            }
            Scenario::Soak {
                connections,
                slow_readers,
                duration,
                warmup,
                interval,
                rate,
                members,
                slow_chats,
                sync_interval,
                receive_buffer,
            } => {
                let shape = soak::Shape {
                    connections,
                    members,
                    rate,
                    slow: slow_readers,
                    slow_chats,
                    sync_interval: secs(sync_interval),
                    receive_buffer,
                    duration: secs(duration),
                    warmup: secs(warmup),
                    interval: secs(interval),
                };
                soak::soak(server, p, stats, &shape).await
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads.max(1))
        .enable_all()
        .build()?;
    let code = runtime.block_on(run(cli))?;
    // Don't wait for the sockets of the last run to wind down.
    runtime.shutdown_background();
    std::process::exit(code);
}

/// Idle runs hold thousands of sockets; the servers we start inherit the limit.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 25_000 => {
            eprintln!(
                "note: open files limited to {limit}; the idle scenario needs one per connection here and one in the server"
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("note: could not raise the open files limit: {e}"),
    }
}

fn targets(cli: &Cli) -> anyhow::Result<Vec<Target>> {
    if cli.common.url.is_some() {
        return Ok(vec![Target::Courier]);
    }
    let mut targets = Vec::new();
    for name in &cli.common.target {
        let add: &[Target] = match name.as_str() {
            "all" => &[Target::Courier, Target::Relay, Target::Mosquitto],
            "courier" => &[Target::Courier],
            "relay" => &[Target::Relay],
            "mosquitto" => &[Target::Mosquitto],
            other => bail!("unknown target {other:?}: courier, relay, mosquitto or all"),
        };
        for t in add {
            if !targets.contains(t) {
                targets.push(*t);
            }
        }
    }
    Ok(targets)
}

/// Runs the scenario against each target in turn; the exit code is 1 if a target failed.
async fn run(cli: Cli) -> anyhow::Result<i32> {
    let targets = targets(&cli)?;
    if let Scenario::Group { members, .. } = cli.scenario
        && members < 2
    {
        bail!("a group has at least 2 members");
    }
    if let Scenario::Soak { connections, duration, warmup, interval, rate, members, sync_interval, .. } =
        cli.scenario
    {
        if cli.common.url.is_some() {
            bail!(
                "the soak reads the server's /proc: it runs against the courier-local it starts (no --url)"
            );
        }
        if !targets.contains(&Target::Courier) {
            bail!("the soak drives Courier only: --target courier");
        }
        if !(duration > 0.0 && duration <= 3600.0) {
            bail!("--duration is 0 to 3600 seconds: the soak always ends by itself");
        }
        if !(0.0..duration).contains(&warmup) || interval <= 0.0 || interval > duration {
            bail!("--warmup must be shorter than --duration, and --interval between 0 and --duration");
        }
        if members < 2 || connections < members || rate <= 0.0 || sync_interval <= 0.0 {
            bail!("the soak needs --members 2 or more, at least that many --connections, and positive rates");
        }
    }
    // The soak is Courier's alone: the references have no slow-client bound to soak.
    let targets: Vec<Target> = match cli.scenario {
        Scenario::Soak { .. } => vec![Target::Courier],
        _ => targets,
    };
    let common = &cli.common;
    let params = Params {
        secret: common.secret.clone(),
        size: common.size,
        concurrency: common.concurrency.max(1),
        acks: !common.no_acks,
    };
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let loadavg_before = loadavg();
    let title = cli.scenario.title();
    eprintln!("{title}");
    if common.url.is_some() {
        eprintln!(
            "note: driving {}: its rate limit applies (20 frames/s per connection by default) and its CPU and memory are unknown",
            common.url.as_deref().unwrap_or_default()
        );
    }

    let mut results = Vec::new();
    for target in targets {
        let mut result = TargetResult::new(target);
        let server = match &common.url {
            Some(url) => Ok(Server::external(url)),
            None => Server::start(
                target,
                &servers::Launch { durability: &common.durability, secret: &common.secret },
            ),
        };
        match server {
            Err(e) => {
                eprintln!("{}: {e:#}", target.name());
                result.error = Some(format!("{e:#}"));
            }
            Ok(server) => {
                let stats = Stats::new();
                // The soak prints its own rows as it samples.
                let progress = (!matches!(cli.scenario, Scenario::Soak { .. })).then(|| {
                    Progress::start(format!("{:<9} {}", target.name(), cli.scenario.name()), stats.clone())
                });
                let outcome = cli.scenario.run(&server, &params, stats).await;
                drop(progress);
                match outcome {
                    Ok(done) => result = done,
                    Err(e) => {
                        eprintln!("{}: {e:#}", target.name());
                        result.error = Some(format!("{e:#}"));
                    }
                }
                // Closing thousands of sockets keeps the server busy for a moment:
                // let it finish before the next target starts.
                server.stop();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        results.push(result);
    }

    let scenario = cli.scenario.name();
    let failed = results.iter().any(|r| r.error.is_some());
    let report = Report {
        scenario: scenario.to_owned(),
        title,
        parameters: parameters(&cli),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            bench_threads: common.threads,
            loadavg_before,
            loadavg_after: loadavg(),
        },
        ratios: report::ratios(scenario, &results),
        checks: report::checks(scenario, &cli.scenario.shape(), &results),
        guarantees: report::guarantees(&common.durability),
        results,
    };
    print!("{}", report::text(&report));
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &common.plot {
        std::fs::write(path, report::svg(&report))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(i32::from(failed))
}

fn parameters(cli: &Cli) -> serde_json::Value {
    let c = &cli.common;
    let mut p = json!({
        "targets": c.target, "url": c.url, "durability": c.durability, "size": c.size,
        "threads": c.threads, "concurrency": c.concurrency, "acks": !c.no_acks,
    });
    let scenario = match &cli.scenario {
        Scenario::OneToOne { pairs, rate, window, timing, .. } => json!({
            "pairs": pairs, "devices": 2 * pairs, "rate": rate, "closed": rate.is_none(), "window": window,
            "duration": timing.duration, "warmup": timing.warmup,
        }),
        Scenario::Group { members, window, timing } => json!({
            "members": members, "window": window, "duration": timing.duration, "warmup": timing.warmup,
        }),
        Scenario::Backlog { messages, window } => json!({ "messages": messages, "window": window }),
        Scenario::Idle { connections, hold } => json!({ "connections": connections, "hold": hold }),
        Scenario::Soak {
            connections,
            slow_readers,
            duration,
            warmup,
            interval,
            rate,
            members,
            slow_chats,
            sync_interval,
            receive_buffer,
        } => json!({
            "connections": connections, "slow_readers": slow_readers, "duration": duration,
            "warmup": warmup, "interval": interval, "rate": rate, "members": members,
            "slow_chats": slow_chats, "sync_interval": sync_interval, "receive_buffer": receive_buffer,
        }),
    };
    if let (Some(p), Some(s)) = (p.as_object_mut(), scenario.as_object()) {
        p.extend(s.clone());
    }
    p
}
