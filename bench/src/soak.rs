//! The soak: thousands of chatting devices and a hundred clients that stop reading, for a bounded time, while Courier's RSS and open files are sampled.
//!
//! Chatting devices sit in chats of a few members, send on evenly spread
//! timers (a modest total rate) and ack every message pushed to them, as an
//! app does. Slow readers join some of those chats, stop reading their
//! socket and keep asking for `sync` pages they never read, so the server
//! queues output for them until protocol v2's bound cuts them off (1 MiB
//! queued, or 30 s without write progress); they then reconnect and stall
//! again, as a misbehaving client would. The server should hold its memory
//! and file descriptors flat through all of it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::conn::{Incoming, Route, Ws};
use crate::report::{Check, TargetResult};
use crate::scenarios::{Device, Params, closed_early, create_chat, open_all};
use crate::servers::{Endpoint, Probe, Server};
use crate::stats::{self, Latency, Stats, human};

/// How far the mean RSS of the last third may rise over the first third's.
const RSS_GROWTH_LIMIT: f64 = 0.10;
/// Descriptors the server may hold beyond one per connection and what it
/// held idle: the odd socket mid-handshake or mid-close.
const FD_SLACK: u64 = 32;
/// A slow reader's TCP segment size: an internet path's, not loopback's 64 KiB
/// (see [`Ws::connect_slow_link`]).
const SLOW_LINK_MSS: u32 = 1460;
/// How long after sending stops the chatting devices' last deliveries may take.
const GRACE: Duration = Duration::from_secs(10);
/// What a slow reader asks for, again and again: a full page of its inbox,
/// which it never acks, so every answer is as big as the server makes them.
const SYNC: &str = r#"{"action":"sync","limit":100}"#;

/// The soak's shape, from the command line.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Chatting devices.
    pub connections: usize,
    /// Members per chat (the last chat takes any remainder).
    pub members: usize,
    /// Messages a second sent in all by the chatting devices.
    pub rate: f64,
    pub slow: usize,
    /// Chats each slow reader is a member of.
    pub slow_chats: usize,
    /// How often a slow reader sends a `sync` it will not read.
    pub sync_interval: Duration,
    /// SO_RCVBUF of a slow reader's socket, bytes.
    pub receive_buffer: u32,
    /// Time with traffic, warm-up included.
    pub duration: Duration,
    /// The first part of `duration`, sampled but not judged.
    pub warmup: Duration,
    pub interval: Duration,
}

/// The server's footprint at one instant.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Footprint {
    pub rss_mb: Option<f64>,
    pub rss_anon_mb: Option<f64>,
    pub open_fds: Option<u64>,
}

impl Footprint {
    fn of(server: &Server) -> Footprint {
        let sample = server.sample();
        Footprint {
            rss_mb: sample.map(|s| mb(s.rss_kb)),
            rss_anon_mb: sample.map(|s| mb(s.rss_anon_kb)),
            open_fds: server.open_fds(),
        }
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// One row of the table: the server now, and the load over the interval before.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    /// Seconds since traffic started.
    pub t_s: f64,
    /// VmRSS, and its parts: anonymous (heap), and mapped files + shared memory (the SQLite map).
    pub rss_mb: Option<f64>,
    pub rss_anon_mb: Option<f64>,
    pub rss_file_mb: Option<f64>,
    pub open_fds: Option<u64>,
    /// The server's data dir on disk: the database grows with the inboxes
    /// slow readers never ack, and SQLite's page cache (anonymous memory,
    /// 64 MiB for the writer) and map (file pages) with it.
    pub data_mb: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub other_cpu_percent: Option<f64>,
    pub sent_per_s: Option<f64>,
    pub delivered_per_s: Option<f64>,
    pub acks_per_s: Option<f64>,
    /// Slow readers with a connection open (stalled) now.
    pub slow_connected: u64,
    /// Slow-reader cut-offs so far, as the slow readers saw them.
    pub cut_offs: u64,
    /// Taken during warm-up: shown, not judged.
    pub warmup: bool,
}

/// Everything the soak found, as `--json` writes it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakResult {
    pub connections: usize,
    pub members: usize,
    pub chats: usize,
    pub rate: f64,
    /// Seconds between two sends of one chatting device.
    pub send_period_s: f64,
    pub slow_readers: usize,
    pub slow_chats: usize,
    pub sync_interval_s: f64,
    pub receive_buffer: u32,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub interval_s: f64,
    /// The server idle, before anyone connected.
    pub idle: Footprint,
    /// Every device connected and in its chats, before traffic.
    pub connected: Footprint,
    /// After every client went away, once the descriptors settled (or 15 s).
    pub after_close: Footprint,
    pub samples: Vec<SoakSample>,
    /// Mean RSS of the first and the last third of the samples after warm-up.
    pub rss_first_third_mb: Option<f64>,
    pub rss_last_third_mb: Option<f64>,
    pub rss_growth_percent: Option<f64>,
    /// The same for anonymous memory alone: what a leak would grow.
    pub anon_first_third_mb: Option<f64>,
    pub anon_last_third_mb: Option<f64>,
    pub anon_growth_percent: Option<f64>,
    /// Least-squares slope of RSS over the samples after warm-up.
    pub rss_slope_mb_per_min: Option<f64>,
    pub fds_max: Option<u64>,
    /// Idle descriptors + one per connection (chatting and slow) + a small constant.
    pub fds_limit: Option<u64>,
    pub rss_flat: bool,
    pub fds_bounded: bool,
    pub fds_released: bool,
    pub verdict: String,
    /// Deliveries to chatting devices still missing 3 s after sending stopped,
    /// and how long it took until none was (`None`: some still missing after 10 s).
    pub undelivered_after_3s: Option<u64>,
    pub drain_seconds: Option<f64>,
    /// Cut-offs as the slow readers saw them (a write failed), and reconnects that failed.
    pub cut_offs: u64,
    pub reconnect_failures: u64,
    /// Slow readers never cut off in the whole run.
    pub slow_never_cut_off: usize,
    /// Seconds from a slow reader's first unread `sync` to its cut-off being seen.
    pub stall_seconds_p50: Option<f64>,
    pub stall_seconds_max: Option<f64>,
    /// The longest a slow reader still stalled at the end had been so.
    pub stalled_at_end_max_s: Option<f64>,
    /// Every cut-off a slow reader saw, in the order seen.
    pub stalls: Vec<Stall>,
    /// Cut-offs in the server's log, by reason (best effort: read from its warnings).
    pub server_cut_offs_byte_cap: u64,
    pub server_cut_offs_stalled: u64,
    pub server_cut_offs_other: u64,
}

/// One slow reader's connection, from its first unread `sync` to the write that found it cut off.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stall {
    pub slow_reader: usize,
    pub seconds: f64,
    /// `sync` requests written meanwhile: the server read them all, or the
    /// stall would have ended on the 30 s deadline alone.
    pub syncs: u64,
}

/// What the tasks count beyond [`Stats`].
struct Counters {
    acks: AtomicU64,
    /// Deliveries to chatting devices that the sends so far call for.
    expected: AtomicU64,
    slow_connected: AtomicU64,
    cut_offs: AtomicU64,
    reconnect_failures: AtomicU64,
    /// Per slow reader: cut-offs seen, and since when its connection is stalled.
    slow_cut_offs: Vec<AtomicU64>,
    stalled_since: Mutex<Vec<Option<Instant>>>,
    stalls: Mutex<Vec<Stall>>,
}

impl Counters {
    fn new(slow: usize) -> Counters {
        Counters {
            acks: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            slow_connected: AtomicU64::new(0),
            cut_offs: AtomicU64::new(0),
            reconnect_failures: AtomicU64::new(0),
            slow_cut_offs: (0..slow).map(|_| AtomicU64::new(0)).collect(),
            stalled_since: Mutex::new(vec![None; slow]),
            stalls: Mutex::new(Vec::new()),
        }
    }

    fn stalled(&self, slow: usize, since: Option<Instant>) {
        self.stalled_since.lock().unwrap_or_else(|e| e.into_inner())[slow] = since;
    }
}

/// The device ranges of the chats: `members` each, the remainder joining the last.
fn chat_ranges(connections: usize, members: usize) -> Vec<std::ops::Range<usize>> {
    let members = members.max(2);
    let chats = (connections / members).max(1);
    (0..chats).map(|c| c * members..if c + 1 == chats { connections } else { (c + 1) * members }).collect()
}

/// The chats slow reader `j` is in: spread so that, while there are enough
/// chats, no chat has two slow readers.
fn slow_reader_chats(j: usize, slow: usize, slow_chats: usize, chats: usize) -> Vec<usize> {
    let mut picked: Vec<usize> = (0..slow_chats.min(chats)).map(|i| (j + i * slow) % chats).collect();
    picked.sort_unstable();
    picked.dedup();
    picked
}

/// The query string of a Courier device: user `name`, device "d".
fn query(p: &Params, name: &str) -> String {
    let token = courier_core::auth::mint(p.secret.as_bytes(), name, 24 * 3600);
    format!("token={token}&deviceId=d")
}

/// Runs the soak against the courier-local `server`.
pub async fn soak(
    server: &Server,
    p: &Params,
    stats: Arc<Stats>,
    shape: &Shape,
) -> anyhow::Result<TargetResult> {
    let Endpoint::Ws(url) = &server.endpoint else { bail!("the soak drives Courier") };
    if server.pid().is_none() {
        bail!("the soak reads the server's /proc: it needs the courier-local it starts (no --url)");
    }
    let ranges = chat_ranges(shape.connections, shape.members);
    let send_period = Duration::from_secs_f64(shape.connections as f64 / shape.rate);
    let mut result = SoakResult {
        connections: shape.connections,
        members: shape.members,
        chats: ranges.len(),
        rate: shape.rate,
        send_period_s: send_period.as_secs_f64(),
        slow_readers: shape.slow,
        slow_chats: shape.slow_chats.min(ranges.len()),
        sync_interval_s: shape.sync_interval.as_secs_f64(),
        receive_buffer: shape.receive_buffer,
        duration_s: shape.duration.as_secs_f64(),
        warmup_s: shape.warmup.as_secs_f64(),
        interval_s: shape.interval.as_secs_f64(),
        idle: Footprint::of(server),
        ..SoakResult::default()
    };
    eprintln!(
        "  {} chatting devices in {} chats, {} msgs/s in all (each device every {:.1} s), acking each push; \
         {} slow readers in {} chats each, an unread sync every {:.2} s, SO_RCVBUF {} bytes, MSS {SLOW_LINK_MSS}",
        shape.connections,
        ranges.len(),
        shape.rate,
        result.send_period_s,
        shape.slow,
        result.slow_chats,
        result.sync_interval_s,
        shape.receive_buffer
    );

    // Slow readers first, so that their devices exist when the chats they
    // join are created. From here on they read nothing at all.
    let slow_names: Vec<String> = (0..shape.slow).map(|j| format!("s{j}")).collect();
    let slow_sockets: Vec<Ws> = stream::iter(&slow_names)
        .map(|name| async move {
            Ws::connect_slow_link(url, &query(p, name), shape.receive_buffer, SLOW_LINK_MSS)
                .await
                .with_context(|| format!("connecting slow reader {name}"))
        })
        .buffered(p.concurrency)
        .try_collect()
        .await?;

    let names: Vec<String> = (0..shape.connections).map(|i| format!("k{i}")).collect();
    let mut devices = open_all(server, p, &names, |_| None, &stats).await?;
    let mut slow_of_chat = vec![Vec::new(); ranges.len()];
    for (j, name) in slow_names.iter().enumerate() {
        for chat in slow_reader_chats(j, shape.slow, shape.slow_chats, ranges.len()) {
            slow_of_chat[chat].push(name.clone());
        }
    }
    // Each chat is created by its first device; the others (slow readers
    // included) are in it from the start.
    let mut creators: Vec<&mut Device> = Vec::new();
    let mut rest = devices.as_mut_slice();
    for range in &ranges {
        let (chat, after) = rest.split_at_mut(range.len());
        creators.push(&mut chat[0]);
        rest = after;
    }
    let chat_ids: Vec<String> = stream::iter(creators.into_iter().zip(&ranges).zip(&slow_of_chat))
        .map(|((creator, range), slow)| {
            let others: Vec<String> = names[range.start + 1..range.end].iter().chain(slow).cloned().collect();
            async move { create_chat(creator.ws(), &others).await }
        })
        .buffered(p.concurrency)
        .try_collect()
        .await?;
    stats.sent.store(0, Ordering::Relaxed);
    result.connected = Footprint::of(server);

    let counters = Arc::new(Counters::new(shape.slow));
    let mut tasks = JoinSet::new();
    let chat_of: Vec<usize> =
        ranges.iter().enumerate().flat_map(|(c, range)| range.clone().map(move |_| c)).collect();
    for (who, device) in devices.into_iter().enumerate() {
        let Device::Ws(ws) = device else { unreachable!("Courier devices are WebSockets") };
        let chat = chat_of[who];
        // The devices' timers spread evenly over one period: a smooth total rate.
        let first = send_period.mul_f64(who as f64 / shape.connections as f64);
        tasks.spawn(chat_device(ChatDevice {
            who,
            ws: *ws,
            route: Route::Chat(chat_ids[chat].clone()),
            recipients: (ranges[chat].len() - 1) as u64,
            first,
            period: send_period,
            size: p.size,
            stats: stats.clone(),
            counters: counters.clone(),
        }));
    }
    // Slow readers start stalling over the first quarter of the run (at
    // most 30 s), so their cut-offs do not all land at once.
    let spread = (shape.duration / 4).min(Duration::from_secs(30));
    for (j, ws) in slow_sockets.into_iter().enumerate() {
        tasks.spawn(slow_reader(SlowReader {
            index: j,
            url: url.clone(),
            query: query(p, &slow_names[j]),
            first: Some(ws),
            delay: spread.mul_f64(j as f64 / shape.slow.max(1) as f64),
            shape: shape.clone(),
            stats: stats.clone(),
            counters: counters.clone(),
        }));
    }

    let window = sample(server, &stats, &counters, shape, &mut result).await;

    // Stop sending; let what is in flight land (and be acked), then hang up on everything.
    // Late is told apart from lost: what is missing 3 s after the stop, and
    // whether it all came within GRACE.
    stats.stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    // A send that saw no stop yet has counted itself by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let missing =
        || counters.expected.load(Ordering::Relaxed).saturating_sub(stats.received.load(Ordering::Relaxed));
    result.undelivered_after_3s = None;
    while stopped.elapsed() < GRACE && missing() > 0 {
        if result.undelivered_after_3s.is_none() && stopped.elapsed() >= Duration::from_secs(3) {
            result.undelivered_after_3s = Some(missing());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    result.undelivered_after_3s = Some(result.undelivered_after_3s.unwrap_or_else(missing));
    result.drain_seconds = (missing() == 0).then(|| stopped.elapsed().as_secs_f64());
    tasks.shutdown().await;
    result.after_close = settle(server, &result.idle).await;

    let mut target = TargetResult::new(server.target);
    target.seconds = window.seconds;
    target.sent = stats.sent.load(Ordering::Relaxed);
    target.received = stats.received.load(Ordering::Relaxed);
    target.undelivered = counters.expected.load(Ordering::Relaxed).saturating_sub(target.received);
    target.errors = stats.errors.load(Ordering::Relaxed);
    target.first_error = stats.first_error();
    target.delivered_per_s = Some(window.delivered as f64 / window.seconds.max(1e-9));
    target.latency = Latency::of(&stats.histogram());
    target.set_usage(window.usage);
    target.server_peak_rss_mb = server.sample().map(|s| s.peak_rss_kb as f64 / 1024.0);
    target.connections = Some((shape.connections + shape.slow) as u64);
    target.rss_mb = result.samples.last().and_then(|s| s.rss_mb);

    result.cut_offs = counters.cut_offs.load(Ordering::Relaxed);
    result.reconnect_failures = counters.reconnect_failures.load(Ordering::Relaxed);
    result.slow_never_cut_off =
        counters.slow_cut_offs.iter().filter(|n| n.load(Ordering::Relaxed) == 0).count();
    result.stalls = counters.stalls.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut stalls: Vec<f64> = result.stalls.iter().map(|s| s.seconds).collect();
    stalls.sort_by(f64::total_cmp);
    result.stall_seconds_p50 = stalls.get(stalls.len() / 2).copied();
    result.stall_seconds_max = stalls.last().copied();
    result.stalled_at_end_max_s = window.stalled_at_end_max_s;
    result.server_cut_offs_byte_cap = server.log.cut_off_bytes.load(Ordering::Relaxed);
    result.server_cut_offs_stalled = server.log.cut_off_stalled.load(Ordering::Relaxed);
    result.server_cut_offs_other = server.log.cut_off_other.load(Ordering::Relaxed);
    judge(&mut result);
    target.soak = Some(result);
    Ok(target)
}

/// What the sampling loop measured beyond its rows.
struct Window {
    /// From the end of warm-up to the end.
    seconds: f64,
    delivered: u64,
    usage: crate::servers::Usage,
    stalled_at_end_max_s: Option<f64>,
}

/// Samples the server every interval until the duration is over; latencies
/// are recorded after warm-up only.
async fn sample(
    server: &Server,
    stats: &Stats,
    counters: &Counters,
    shape: &Shape,
    result: &mut SoakResult,
) -> Window {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(shape.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let counts = || {
        (
            stats.sent.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
            counters.acks.load(Ordering::Relaxed),
        )
    };
    let mut last: Option<(Probe, (u64, u64, u64))> = None;
    let mut measured: Option<(Probe, u64, Instant)> = None;
    eprintln!("  {}", header());
    loop {
        ticks.tick().await;
        let t = started.elapsed();
        let probe = Probe::take(server);
        let now = counts();
        let warmup = t < shape.warmup;
        if !warmup && measured.is_none() {
            stats.recording.store(true, Ordering::Relaxed);
            measured = Some((probe, now.1, Instant::now()));
        }
        let (usage, rates) = match &last {
            Some((before, then)) => {
                let usage = before.usage(&probe);
                let seconds = probe.seconds_since(before).max(1e-9);
                let rate = |a: u64, b: u64| Some(a.saturating_sub(b) as f64 / seconds);
                (usage, (rate(now.0, then.0), rate(now.1, then.1), rate(now.2, then.2)))
            }
            None => (crate::servers::Usage::default(), (None, None, None)),
        };
        let row = SoakSample {
            t_s: t.as_secs_f64(),
            rss_mb: probe.server.map(|s| mb(s.rss_kb)),
            rss_anon_mb: probe.server.map(|s| mb(s.rss_anon_kb)),
            rss_file_mb: probe.server.map(|s| mb(s.rss_file_kb)),
            open_fds: server.open_fds(),
            data_mb: server.data_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
            server_cpu_percent: usage.server,
            other_cpu_percent: usage.other,
            sent_per_s: rates.0,
            delivered_per_s: rates.1,
            acks_per_s: rates.2,
            slow_connected: counters.slow_connected.load(Ordering::Relaxed),
            cut_offs: counters.cut_offs.load(Ordering::Relaxed),
            warmup,
        };
        eprintln!("  {}", row_text(&row));
        result.samples.push(row);
        last = Some((probe, now));
        if t + shape.interval / 2 >= shape.duration {
            break;
        }
    }
    stats.recording.store(false, Ordering::Relaxed);
    let end = Probe::take(server);
    let stalled_at_end_max_s = counters
        .stalled_since
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flatten()
        .map(|since| since.elapsed().as_secs_f64())
        .reduce(f64::max);
    let (probe, received0, at) =
        measured.unwrap_or((end, stats.received.load(Ordering::Relaxed), Instant::now()));
    Window {
        seconds: at.elapsed().as_secs_f64(),
        delivered: stats.received.load(Ordering::Relaxed) - received0,
        usage: probe.usage(&end),
        stalled_at_end_max_s,
    }
}

/// Waits (at most 15 s) for the server to close what the clients left, and reads its footprint.
async fn settle(server: &Server, idle: &Footprint) -> Footprint {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = Footprint::of(server);
        let settled = now.open_fds.zip(idle.open_fds).is_none_or(|(now, idle)| now <= idle + 2);
        if settled || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The verdict: RSS flat after warm-up, descriptors bounded by the connections and released after.
fn judge(r: &mut SoakResult) {
    let judged: Vec<&SoakSample> = r.samples.iter().filter(|s| !s.warmup && s.t_s > 0.0).collect();
    let rss: Vec<(f64, f64)> = judged.iter().filter_map(|s| Some((s.t_s, s.rss_mb?))).collect();
    let third = rss.len() / 3;
    if third >= 1 {
        let mean = |xs: &[(f64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
        let (first, last) = (mean(&rss[..third]), mean(&rss[rss.len() - third..]));
        r.rss_first_third_mb = Some(first);
        r.rss_last_third_mb = Some(last);
        r.rss_growth_percent = Some((last / first - 1.0) * 100.0);
        r.rss_flat = last <= first * (1.0 + RSS_GROWTH_LIMIT);
        r.rss_slope_mb_per_min = slope(&rss).map(|per_s| per_s * 60.0);
    }
    let anon: Vec<f64> = judged.iter().filter_map(|s| s.rss_anon_mb).collect();
    let third = anon.len() / 3;
    if third >= 1 {
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let (first, last) = (mean(&anon[..third]), mean(&anon[anon.len() - third..]));
        r.anon_first_third_mb = Some(first);
        r.anon_last_third_mb = Some(last);
        r.anon_growth_percent = Some((last / first - 1.0) * 100.0);
    }
    r.fds_max = r.samples.iter().filter_map(|s| s.open_fds).max();
    r.fds_limit = r.idle.open_fds.map(|idle| idle + (r.connections + r.slow_readers) as u64 + FD_SLACK);
    r.fds_bounded = r.fds_max.zip(r.fds_limit).is_some_and(|(max, limit)| max <= limit);
    r.fds_released =
        r.after_close.open_fds.zip(r.idle.open_fds).is_some_and(|(after, idle)| after <= idle + FD_SLACK);

    let mut verdict = String::new();
    let flat = r.rss_flat && r.fds_bounded;
    let _ = write!(verdict, "{}: ", if flat { "FLAT" } else { "NOT FLAT" });
    match (r.rss_first_third_mb, r.rss_last_third_mb, r.rss_growth_percent) {
        (Some(first), Some(last), Some(growth)) => {
            let _ = write!(
                verdict,
                "RSS {first:.1} MB (first third after warm-up) -> {last:.1} MB (last third), {growth:+.1} % (limit +{:.0} %), slope {:+.2} MB/min",
                RSS_GROWTH_LIMIT * 100.0,
                r.rss_slope_mb_per_min.unwrap_or(0.0)
            );
            if let (Some(first), Some(last), Some(growth)) =
                (r.anon_first_third_mb, r.anon_last_third_mb, r.anon_growth_percent)
            {
                let _ = write!(verdict, " (of which anonymous {first:.1} -> {last:.1} MB, {growth:+.1} %)");
            }
        }
        _ => {
            let _ = write!(verdict, "too few samples after warm-up to judge RSS (need 3)");
        }
    }
    match (r.fds_max, r.fds_limit) {
        (Some(max), Some(limit)) => {
            let _ = write!(
                verdict,
                "; open fds at most {max} (limit {limit} = {} idle + {} connections + {FD_SLACK}), {} after the clients left ({})",
                r.idle.open_fds.unwrap_or(0),
                r.connections + r.slow_readers,
                r.after_close.open_fds.unwrap_or(0),
                if r.fds_released { "released" } else { "NOT released" }
            );
        }
        _ => {
            let _ = write!(verdict, "; open fds unknown");
        }
    }
    r.verdict = verdict;
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

struct ChatDevice {
    who: usize,
    ws: Ws,
    route: Route,
    /// Chatting devices each of its messages goes to.
    recipients: u64,
    first: Duration,
    period: Duration,
    size: usize,
    stats: Arc<Stats>,
    counters: Arc<Counters>,
}

/// A chatting device: sends on its timer, acks every push, reads every answer.
async fn chat_device(d: ChatDevice) {
    let ChatDevice { who, ws, route, recipients, first, period, size, stats, counters } = d;
    let (mut tx, mut rx) = ws.split();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = ticks.tick(), if !stats.stopped() => {
                // The tick may come after the stop, the select having been entered before it.
                if stats.stopped() {
                    continue;
                }
                // Expected before the write: the drain at the end then waits
                // for a send that was under way when sending stopped.
                counters.expected.fetch_add(recipients, Ordering::Relaxed);
                if tx.send(&route, &stats::body(size)).await.is_err() {
                    return stats.error(|| "send failed".into());
                }
                stats.sent();
            }
            incoming = rx.next_acking() => match incoming {
                None => return closed_early(&stats),
                Some((Incoming::Delivery(at), id)) => {
                    stats.delivered(who, at);
                    let Some(id) = id else { continue };
                    if tx.command(format!(r#"{{"action":"ack","messageId":"{id}"}}"#)).await.is_err() {
                        return stats.error(|| "ack failed".into());
                    }
                    counters.acks.fetch_add(1, Ordering::Relaxed);
                }
                Some((Incoming::Failure(frame), _)) => stats.error(|| frame),
                Some(_) => {}
            }
        }
    }
}

struct SlowReader {
    index: usize,
    url: String,
    query: String,
    /// The connection made during set-up; later ones it makes itself.
    first: Option<Ws>,
    delay: Duration,
    shape: Shape,
    stats: Arc<Stats>,
    counters: Arc<Counters>,
}

/// A slow reader: never reads, keeps sending `sync`; once a write fails
/// (the server cut it off and reset the socket) it reconnects and stalls again.
async fn slow_reader(s: SlowReader) {
    let SlowReader { index, url, query, mut first, delay, shape, stats, counters } = s;
    tokio::time::sleep(delay).await;
    while !stats.stopped() {
        let ws = match first.take() {
            Some(ws) => ws,
            None => match Ws::connect_slow_link(&url, &query, shape.receive_buffer, SLOW_LINK_MSS).await {
                Ok(ws) => ws,
                Err(_) => {
                    counters.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        // The read half is held, never polled: the socket stays open and unread.
        let (mut tx, _unread) = ws.split();
        let stalled = Instant::now();
        counters.stalled(index, Some(stalled));
        counters.slow_connected.fetch_add(1, Ordering::Relaxed);
        let mut ticks = tokio::time::interval(shape.sync_interval);
        let mut syncs = 0;
        let cut_off = loop {
            ticks.tick().await;
            if stats.stopped() {
                break false;
            }
            if tx.command(SYNC.to_owned()).await.is_err() {
                break true;
            }
            syncs += 1;
        };
        counters.slow_connected.fetch_sub(1, Ordering::Relaxed);
        counters.stalled(index, None);
        if cut_off {
            counters.cut_offs.fetch_add(1, Ordering::Relaxed);
            counters.slow_cut_offs[index].fetch_add(1, Ordering::Relaxed);
            let stall = Stall { slow_reader: index, seconds: stalled.elapsed().as_secs_f64(), syncs };
            counters.stalls.lock().unwrap_or_else(|e| e.into_inner()).push(stall);
        }
    }
}

fn header() -> String {
    format!(
        "{:>6}  {:>7}  {:>7}  {:>7}  {:>6}  {:>7}  {:>6}  {:>6}  {:>7}  {:>11}  {:>7}  {:>4}  {:>8}",
        "t s",
        "RSS MB",
        "anon",
        "file",
        "fds",
        "data MB",
        "CPU %",
        "other",
        "sent/s",
        "delivered/s",
        "acks/s",
        "slow",
        "cut-offs"
    )
}

fn row_text(s: &SoakSample) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let rate = |v: Option<f64>| v.map_or("-".to_owned(), human);
    format!(
        "{:>6.0}  {:>7}  {:>7}  {:>7}  {:>6}  {:>7}  {:>6}  {:>6}  {:>7}  {:>11}  {:>7}  {:>4}  {:>8}{}",
        s.t_s,
        opt(s.rss_mb, 1),
        opt(s.rss_anon_mb, 1),
        opt(s.rss_file_mb, 1),
        s.open_fds.map_or("-".to_owned(), |n| n.to_string()),
        opt(s.data_mb, 1),
        opt(s.server_cpu_percent, 0),
        opt(s.other_cpu_percent, 0),
        rate(s.sent_per_s),
        rate(s.delivered_per_s),
        rate(s.acks_per_s),
        s.slow_connected,
        s.cut_offs,
        if s.warmup { "  (warm-up)" } else { "" }
    )
}

/// The samples and the verdict, as printed after the summary table.
pub fn text(r: &SoakResult) -> String {
    let mut out = String::new();
    let footprint = |f: &Footprint| {
        format!(
            "RSS {} MB (anonymous {}), {} fds",
            f.rss_mb.map_or("-".to_owned(), |v| format!("{v:.1}")),
            f.rss_anon_mb.map_or("-".to_owned(), |v| format!("{v:.1}")),
            f.open_fds.map_or("-".to_owned(), |n| n.to_string())
        )
    };
    let _ = writeln!(
        out,
        "\nserver idle: {}; all connected, before traffic: {}; after the clients left: {}",
        footprint(&r.idle),
        footprint(&r.connected),
        footprint(&r.after_close)
    );
    let _ = writeln!(out, "{}", header());
    for s in &r.samples {
        let _ = writeln!(out, "{}", row_text(s));
    }
    let seconds = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} s"));
    let _ = writeln!(
        out,
        "slow readers: {} cut-offs seen ({} reconnects failed), {} never cut off; stall to cut-off p50 {}, max {}; \
         longest still stalled at the end {}",
        r.cut_offs,
        r.reconnect_failures,
        r.slow_never_cut_off,
        seconds(r.stall_seconds_p50),
        seconds(r.stall_seconds_max),
        seconds(r.stalled_at_end_max_s)
    );
    if let Some(longest) = r.stalls.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds)) {
        let _ = writeln!(
            out,
            "longest stall: slow reader s{}, {:.1} s, {} unread syncs written meanwhile",
            longest.slow_reader, longest.seconds, longest.syncs
        );
    }
    let _ = writeln!(
        out,
        "server log: {} cut off past the byte cap, {} stalled, {} other",
        r.server_cut_offs_byte_cap, r.server_cut_offs_stalled, r.server_cut_offs_other
    );
    let _ = writeln!(out, "verdict: {}", r.verdict);
    out
}

/// The soak's lines in "targets (courier)".
pub fn checks(r: &SoakResult, target: &TargetResult) -> Vec<Check> {
    let caveat = (r.connections != 10_000 || r.slow_readers != 100).then(|| {
        format!(
            "the soak is for 10000 connections and 100 slow readers; this run: {} and {}",
            r.connections, r.slow_readers
        )
    });
    let check = |goal: String, value: String, met: bool| Check { goal, value, met, caveat: caveat.clone() };
    let seconds = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} s"));
    let mut checks = vec![
        check(
            format!(
                "RSS flat: mean of the last third after warm-up within +{:.0} % of the first third's",
                RSS_GROWTH_LIMIT * 100.0
            ),
            match (r.rss_first_third_mb, r.rss_last_third_mb, r.rss_growth_percent) {
                (Some(a), Some(b), Some(g)) => format!("{a:.1} -> {b:.1} MB ({g:+.1} %)"),
                _ => "too few samples after warm-up".to_owned(),
            },
            r.rss_flat,
        ),
        check(
            format!("open fds within the idle server's + one per connection + {FD_SLACK}"),
            format!(
                "at most {} (limit {})",
                r.fds_max.map_or("-".to_owned(), |n| n.to_string()),
                r.fds_limit.map_or("-".to_owned(), |n| n.to_string())
            ),
            r.fds_bounded,
        ),
        check(
            format!("open fds back to the idle server's (+ {FD_SLACK}) after the clients left"),
            format!(
                "{} (idle {})",
                r.after_close.open_fds.map_or("-".to_owned(), |n| n.to_string()),
                r.idle.open_fds.map_or("-".to_owned(), |n| n.to_string())
            ),
            r.fds_released,
        ),
        check(
            format!(
                "no chatting device cut off or refused, nothing undelivered {} s after sending stopped",
                GRACE.as_secs()
            ),
            format!(
                "{} errors, {} undelivered ({} still missing after 3 s{})",
                target.errors,
                target.undelivered,
                r.undelivered_after_3s.unwrap_or(0),
                r.drain_seconds.map(|s| format!(", all in after {s:.1} s")).unwrap_or_default()
            ),
            target.errors == 0 && target.undelivered == 0,
        ),
    ];
    if r.slow_readers > 0 {
        checks.push(check(
            "every slow reader cut off (1 MiB queued or 30 s stalled) at least once, and reconnected"
                .to_owned(),
            format!(
                "{} cut-offs, {} slow readers never; stall to cut-off p50 {}, max {}",
                r.cut_offs,
                r.slow_never_cut_off,
                seconds(r.stall_seconds_p50),
                seconds(r.stall_seconds_max)
            ),
            r.cut_offs > 0 && r.slow_never_cut_off == 0,
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chats_cover_every_device_and_have_two_members_at_least() {
        for (connections, members) in [(10, 4), (9, 4), (2, 4), (10_000, 4), (7, 3)] {
            let ranges = chat_ranges(connections, members);
            assert_eq!(ranges.first().map(|r| r.start), Some(0));
            assert_eq!(ranges.last().map(|r| r.end), Some(connections));
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            assert!(ranges.iter().all(|r| r.len() >= 2), "{connections} in chats of {members}: {ranges:?}");
        }
    }

    #[test]
    fn slow_readers_share_no_chat_while_there_are_enough() {
        let mut seen = std::collections::HashSet::new();
        for j in 0..100 {
            let chats = slow_reader_chats(j, 100, 10, 2_500);
            assert_eq!(chats.len(), 10);
            assert!(chats.iter().all(|c| seen.insert(*c)));
        }
    }

    #[test]
    fn rss_that_climbs_is_not_flat() {
        let sample = |t: f64, rss: f64| SoakSample {
            t_s: t,
            rss_mb: Some(rss),
            rss_anon_mb: Some(rss),
            rss_file_mb: Some(0.0),
            open_fds: Some(100),
            data_mb: None,
            server_cpu_percent: None,
            other_cpu_percent: None,
            sent_per_s: None,
            delivered_per_s: None,
            acks_per_s: None,
            slow_connected: 0,
            cut_offs: 0,
            warmup: t < 10.0,
        };
        let base = SoakResult {
            connections: 90,
            idle: Footprint { rss_mb: Some(10.0), rss_anon_mb: Some(8.0), open_fds: Some(8) },
            after_close: Footprint { rss_mb: Some(10.0), rss_anon_mb: Some(8.0), open_fds: Some(8) },
            ..SoakResult::default()
        };
        let mut flat = SoakResult {
            samples: (0..=12).map(|i| sample(f64::from(i) * 5.0, 100.0)).collect(),
            ..base.clone()
        };
        judge(&mut flat);
        assert!(flat.rss_flat && flat.fds_bounded && flat.fds_released, "{}", flat.verdict);
        assert!(flat.verdict.starts_with("FLAT"));

        let mut climbing = SoakResult {
            samples: (0..=12).map(|i| sample(f64::from(i) * 5.0, 100.0 + 5.0 * f64::from(i))).collect(),
            ..base
        };
        judge(&mut climbing);
        assert!(!climbing.rss_flat, "{}", climbing.verdict);
        assert!(climbing.rss_slope_mb_per_min.is_some_and(|s| (s - 60.0).abs() < 1e-6));
    }
}
