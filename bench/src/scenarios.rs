//! The four loads, each run the same way against every target: one-to-one, group, backlog, idle (the soak, Courier's alone, is in soak.rs).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::conn::{Incoming, Mqtt, Route, Rx, Tx, Ws};
use crate::report::TargetResult;
use crate::servers::{Endpoint, Probe, Server, Target, Usage};
use crate::stats::{self, Latency, Stats};

/// What every scenario may need to know.
#[derive(Clone, Debug)]
pub struct Params {
    pub secret: String,
    /// Bytes of each message body.
    pub size: usize,
    /// Connection handshakes in flight at once while setting up.
    pub concurrency: usize,
    /// Courier receivers ack what they are pushed, as a real client does.
    pub acks: bool,
}

/// One device, connected but not yet split into halves.
pub enum Device {
    // Boxed, both: a device is a few hundred bytes and there may be 10,000.
    Ws(Box<Ws>),
    Mqtt(Box<Mqtt>),
}

impl Device {
    pub fn split(self) -> (Tx, Rx) {
        match self {
            Device::Ws(ws) => ws.split(),
            Device::Mqtt(mqtt) => mqtt.split(),
        }
    }

    pub fn ws(&mut self) -> &mut Ws {
        match self {
            Device::Ws(ws) => ws,
            Device::Mqtt(_) => unreachable!("Courier devices are WebSockets"),
        }
    }
}

/// Connects the device called `name`: a Courier user with one device "d", a
/// relay id, or an MQTT client id with a persistent session on `topic`.
async fn open(server: &Server, p: &Params, name: &str, topic: Option<&str>) -> anyhow::Result<Device> {
    Ok(match (&server.endpoint, server.target) {
        (Endpoint::Ws(url), Target::Courier) => {
            let token = courier_core::auth::mint(p.secret.as_bytes(), name, 24 * 3600);
            Device::Ws(Box::new(Ws::connect(url, &format!("token={token}&deviceId=d")).await?))
        }
        (Endpoint::Ws(url), _) => Device::Ws(Box::new(Ws::connect(url, &format!("id={name}")).await?)),
        (Endpoint::Mqtt(port), _) => Device::Mqtt(Box::new(Mqtt::connect(*port, name, topic).await?)),
    })
}

/// Opens `names`, a bounded number of handshakes at a time, in order.
pub async fn open_all(
    server: &Server,
    p: &Params,
    names: &[String],
    topic: impl Fn(&str) -> Option<String>,
    stats: &Stats,
) -> anyhow::Result<Vec<Device>> {
    stream::iter(names)
        .map(|name| {
            let topic = topic(name);
            async move {
                let device = open(server, p, name, topic.as_deref())
                    .await
                    .with_context(|| format!("connecting device {name}"))?;
                // Counted as "sent" so the progress line shows the set-up moving.
                stats.sent();
                Ok::<_, anyhow::Error>(device)
            }
        })
        .buffered(p.concurrency)
        .try_collect()
        .await
}

/// A Courier chat of `creator` with `others`.
pub async fn create_chat(creator: &mut Ws, others: &[String]) -> anyhow::Result<String> {
    let data = creator.call("createChat", json!({ "participants": others, "name": "bench" })).await?;
    data["chatId"].as_str().map(str::to_owned).context("createChat answered without chatId")
}

/// Ids a real client puts in one `ack` frame at most.
const ACK_BATCH: usize = 100;
/// How long a real client lets a pushed message wait for its ack at most.
const ACK_DELAY: Duration = Duration::from_millis(250);

/// The ids pushed to one device and not yet acked, and when they are due.
#[derive(Default)]
struct Acks {
    ids: Vec<String>,
    due: Option<tokio::time::Instant>,
}

impl Acks {
    fn push(&mut self, id: String) {
        self.due.get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELAY);
        self.ids.push(id);
    }

    /// The `ack` frame for everything pending, and nothing pending after.
    fn frame(&mut self) -> String {
        self.due = None;
        let ids = std::mem::take(&mut self.ids);
        json!({ "action": "ack", "messageIds": ids }).to_string()
    }
}

/// What a device sends besides its acks.
enum Sends {
    /// Nothing: a group member, or a sender whose own task sends.
    Nothing,
    /// The next message along the route after each delivery (the closed loop).
    Reply(Route, usize),
    /// A message along the route at each tick (the open loop).
    Ticks(tokio::time::Interval, Route, usize),
}

/// Runs one device until its connection closes: deliveries are timed,
/// FAILUREs counted, and, for a Courier device when `acks`, acked as a real
/// client acks: [`ACK_BATCH`] ids a frame, [`ACK_DELAY`] after the first
/// pending one at most. `tx` is `None` for a device whose sending half
/// another task owns.
async fn device(who: usize, mut tx: Option<Tx>, mut rx: Rx, stats: Arc<Stats>, acks: bool, mut sends: Sends) {
    let mut pending = Acks::default();
    loop {
        let due = pending.due;
        let tick = async {
            match &mut sends {
                Sends::Ticks(ticks, ..) => ticks.tick().await,
                _ => std::future::pending().await,
            }
        };
        let incoming = tokio::select! {
            incoming = rx.next_acking() => incoming,
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                if let Some(tx) = &mut tx && tx.command(pending.frame()).await.is_err() {
                    return stats.error(|| "ack failed".into());
                }
                continue;
            }
            _ = tick => {
                let (Some(tx), Sends::Ticks(_, route, size)) = (&mut tx, &sends) else { continue };
                if stats.stopped() {
                    continue;
                }
                // The send instant is taken here, after the tick, so timer
                // lag is not counted as server latency.
                if tx.send(route, &stats::body(*size)).await.is_err() {
                    return stats.error(|| "send failed".into());
                }
                stats.sent();
                continue;
            }
        };
        match incoming {
            None => break,
            Some((Incoming::Delivery(at), id)) => {
                stats.delivered(who, at);
                let Some(tx) = &mut tx else { continue };
                if let Some(id) = id.filter(|_| acks) {
                    pending.push(id);
                    if pending.ids.len() >= ACK_BATCH && tx.command(pending.frame()).await.is_err() {
                        return stats.error(|| "ack failed".into());
                    }
                }
                if let Sends::Reply(route, size) = &sends
                    && !stats.stopped()
                {
                    if tx.send(route, &stats::body(*size)).await.is_err() {
                        return stats.error(|| "send failed".into());
                    }
                    stats.sent();
                }
            }
            Some((Incoming::Failure(frame), _)) => stats.error(|| frame),
            Some(_) => {}
        }
    }
    closed_early(&stats);
}

/// A connection the server closed mid-run (Courier cuts off a client whose
/// outbox is full, for one) is an error, not a quiet loss.
pub fn closed_early(stats: &Stats) {
    if !stats.stopped() {
        stats.error(|| "the server closed a connection during the run".into());
    }
}

/// Warm-up, then the measured window: counts, CPU and latencies inside it only.
struct Window {
    seconds: f64,
    delivered: u64,
    usage: Usage,
}

async fn measure(server: &Server, stats: &Stats, warmup: Duration, duration: Duration) -> Window {
    tokio::time::sleep(warmup).await;
    let probe = Probe::take(server);
    let received0 = stats.received.load(Ordering::Relaxed);
    let started = Instant::now();
    stats.recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration).await;
    stats.recording.store(false, Ordering::Relaxed);
    let delivered = stats.received.load(Ordering::Relaxed) - received0;
    let seconds = started.elapsed().as_secs_f64();
    Window { seconds, delivered, usage: probe.usage(&Probe::take(server)) }
}

/// Stops the senders and gives in-flight messages `grace` to land.
async fn wind_down(stats: &Stats, expected: impl Fn() -> u64, grace: Duration) {
    stats.stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && stats.received.load(Ordering::Relaxed) < expected() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fill_common(result: &mut TargetResult, stats: &Stats, window: &Window, server: &Server) {
    result.seconds = window.seconds;
    result.sent = stats.sent.load(Ordering::Relaxed);
    result.received = stats.received.load(Ordering::Relaxed);
    result.errors = stats.errors.load(Ordering::Relaxed);
    result.first_error = stats.first_error();
    result.delivered_per_s = Some(window.delivered as f64 / window.seconds);
    result.latency = Latency::of(&stats.histogram());
    result.set_usage(window.usage);
    result.server_cpu_us_per_delivery = window
        .usage
        .server
        .filter(|_| window.delivered > 0)
        .map(|percent| percent / 100.0 * window.seconds * 1e6 / window.delivered as f64);
    result.server_peak_rss_mb = server.sample().map(|s| s.peak_rss_kb as f64 / 1024.0);
}

/// How a one-to-one run sends.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// This many messages a second in all, spread evenly over the devices.
    Open(f64),
    /// Every device keeps this many messages in flight to its peer.
    Closed(usize),
}

/// `pairs` pairs of devices; each device sends to its peer and receives from it.
pub async fn one_to_one(
    server: &Server,
    p: &Params,
    stats: Arc<Stats>,
    pairs: usize,
    load: Load,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<TargetResult> {
    let names: Vec<String> = (0..2 * pairs).map(|i| format!("p{i}")).collect();
    let peer = |i: usize| i ^ 1;
    let mut devices = open_all(server, p, &names, |name| Some(format!("u/{name}")), &stats).await?;

    let routes: Vec<Route> = match server.target {
        Target::Courier => {
            // One chat per pair, created by its even device.
            let chats: Vec<String> = stream::iter(devices.chunks_mut(2).zip(names.chunks(2)))
                .map(|(pair, pair_names)| create_chat(pair[0].ws(), &pair_names[1..]))
                .buffered(p.concurrency)
                .try_collect()
                .await?;
            (0..names.len()).map(|i| Route::Chat(chats[i / 2].clone())).collect()
        }
        Target::Relay => (0..names.len()).map(|i| Route::Relay(json!(names[peer(i)]).to_string())).collect(),
        Target::Mosquitto => {
            (0..names.len()).map(|i| Route::Topic(format!("u/{}", names[peer(i)]))).collect()
        }
    };
    stats.sent.store(0, Ordering::Relaxed);

    let mut tasks = JoinSet::new();
    let senders = devices.len();
    let acks = p.acks;
    for (who, (opened, route)) in devices.into_iter().zip(routes).enumerate() {
        let (mut tx, rx) = opened.split();
        let stats = stats.clone();
        let size = p.size;
        match load {
            Load::Closed(window) => {
                // Each delivery from the peer is answered with the next message
                // to it: `window` messages in flight per connection, always.
                tasks.spawn(async move {
                    for _ in 0..window {
                        if tx.send(&route, &stats::body(size)).await.is_err() {
                            return stats.error(|| "send failed".into());
                        }
                        stats.sent();
                    }
                    device(who, Some(tx), rx, stats, acks, Sends::Reply(route, size)).await;
                });
            }
            Load::Open(rate) => {
                // Each device sends every `senders / rate` seconds, the devices'
                // ticks spread over that period so the load is smooth.
                let period = Duration::from_secs_f64(senders as f64 / rate);
                let offset = period.mul_f64(who as f64 / senders as f64);
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                // Open loop: if we fall behind, catch up rather than slow down.
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                tasks.spawn(device(who, Some(tx), rx, stats, acks, Sends::Ticks(ticks, route, size)));
            }
        }
    }

    let window = measure(server, &stats, warmup, duration).await;
    wind_down(&stats, || stats.sent.load(Ordering::Relaxed), Duration::from_secs(3)).await;
    tasks.abort_all();

    let mut result = TargetResult::new(server.target);
    fill_common(&mut result, &stats, &window, server);
    result.undelivered = result.sent.saturating_sub(result.received);
    Ok(result)
}

/// One sender to a group of `members` (itself included); every other member receives.
pub async fn group(
    server: &Server,
    p: &Params,
    stats: Arc<Stats>,
    members: usize,
    window: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<TargetResult> {
    const TOPIC: &str = "g/bench";
    let names: Vec<String> = (0..members).map(|i| format!("g{i}")).collect();
    let recipients = (members - 1) as u64;
    let mut devices =
        open_all(server, p, &names, |name| (name != "g0").then(|| TOPIC.to_owned()), &stats).await?;
    let others = &names[1..];
    let route = match server.target {
        Target::Courier => Route::Chat(create_chat(devices[0].ws(), others).await?),
        Target::Relay => Route::Relay(json!(others).to_string()),
        Target::Mosquitto => Route::Topic(TOPIC.to_owned()),
    };
    stats.sent.store(0, Ordering::Relaxed);

    let mut tasks = JoinSet::new();
    let mut devices = devices.drain(..);
    let (mut tx, sender_rx) = devices.next().context("a group has a sender")?.split();
    // The sender's own frames (Courier's SUCCESS, MQTT's PUBACK) must be read
    // too; for MQTT that polling is also what writes its publishes out.
    tasks.spawn(device(usize::MAX, None, sender_rx, stats.clone(), false, Sends::Nothing));
    for (who, member) in devices.enumerate() {
        let (tx, rx) = member.split();
        tasks.spawn(device(who, Some(tx), rx, stats.clone(), p.acks, Sends::Nothing));
    }
    let size = p.size;
    let sender_stats = stats.clone();
    tasks.spawn(async move {
        let stats = sender_stats;
        let allowed = window.max(1) as u64 * recipients;
        loop {
            // At most `window` messages not yet received by every member.
            while !stats.stopped()
                && stats.sent.load(Ordering::Relaxed) * recipients
                    > stats.received.load(Ordering::Relaxed) + allowed - recipients
            {
                stats.delivered.notified().await;
            }
            if stats.stopped() {
                break;
            }
            if tx.send(&route, &stats::body(size)).await.is_err() {
                return stats.error(|| "send failed".into());
            }
            stats.sent();
        }
    });

    let measured = measure(server, &stats, warmup, duration).await;
    wind_down(&stats, || stats.sent.load(Ordering::Relaxed) * recipients, Duration::from_secs(3)).await;
    // The sender may be parked waiting for deliveries; wake it to see `stop`.
    stats.delivered.notify_one();
    tasks.abort_all();

    let mut result = TargetResult::new(server.target);
    fill_common(&mut result, &stats, &measured, server);
    result.undelivered = (result.sent * recipients).saturating_sub(result.received);
    Ok(result)
}

/// One offline device is sent `messages`, then connects and drains its inbox.
pub async fn backlog(
    server: &Server,
    p: &Params,
    stats: Arc<Stats>,
    messages: u64,
    window: u64,
) -> anyhow::Result<TargetResult> {
    let mut result = TargetResult::new(server.target);
    if server.target == Target::Relay {
        result.skipped = Some("the relay stores nothing: an offline peer gets nothing".into());
        return Ok(result);
    }
    let inbox = "u/reader";
    // The reader registers once, then goes offline.
    match open(server, p, "reader", Some(inbox)).await? {
        Device::Ws(ws) => ws.close().await,
        Device::Mqtt(mqtt) => mqtt.close().await,
    }
    let mut writer = open(server, p, "writer", None).await?;
    let route = match &mut writer {
        Device::Ws(ws) => Route::Chat(create_chat(ws, &["reader".to_owned()]).await?),
        Device::Mqtt(_) => Route::Topic(inbox.to_owned()),
    };

    // Fill: the writer keeps `window` sends unacknowledged at most, and
    // waits until the server has taken every one (SUCCESS or PUBACK).
    let (mut tx, mut rx) = writer.split();
    let acks = stats.clone();
    let reader = tokio::spawn(async move {
        while let Some(incoming) = rx.next().await {
            match incoming {
                Incoming::Ack => {
                    acks.received.fetch_add(1, Ordering::Relaxed);
                    acks.delivered.notify_one();
                }
                Incoming::Failure(frame) => acks.error(|| frame),
                _ => {}
            }
        }
    });
    let started = Instant::now();
    for _ in 0..messages {
        while stats.sent.load(Ordering::Relaxed) >= stats.received.load(Ordering::Relaxed) + window.max(1) {
            stats.delivered.notified().await;
        }
        tx.send(&route, &stats::body(p.size)).await?;
        stats.sent();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.received.load(Ordering::Relaxed) < messages && stats.errors.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline {
            bail!(
                "the server took {} of {messages} messages in 120 s",
                stats.received.load(Ordering::Relaxed)
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), stats.delivered.notified()).await;
    }
    result.fill_per_s = Some(messages as f64 / started.elapsed().as_secs_f64());
    reader.abort();
    drop(tx);
    // Let the server settle (Courier's fan-out marks, Mosquitto's queue) before timing the drain.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let probe = Probe::take(server);
    let started = Instant::now();
    let drained = match server.target {
        Target::Courier => {
            let Device::Ws(mut ws) = open(server, p, "reader", None).await? else { unreachable!() };
            result.connect_ms = Some(started.elapsed().as_secs_f64() * 1e3);
            let drain_started = Instant::now();
            let drained = drain_courier(&mut ws).await?;
            result.drain_ms = Some(drain_started.elapsed().as_secs_f64() * 1e3);
            // Not timed: is the inbox really empty now?
            let left = ws.call("sync", json!({ "limit": 100 })).await?;
            let left = left["messages"].as_array().map_or(0, Vec::len);
            if left > 0 {
                result.notes.push(format!("{left} messages still in the inbox after the drain"));
            }
            ws.close().await;
            drained
        }
        _ => {
            let Device::Mqtt(mqtt) = open(server, p, "reader", Some(inbox)).await? else { unreachable!() };
            let mqtt = *mqtt;
            result.connect_ms = Some(started.elapsed().as_secs_f64() * 1e3);
            let drain_started = Instant::now();
            let drained = drain_mqtt(mqtt, messages).await?;
            result.drain_ms = Some(drain_started.elapsed().as_secs_f64() * 1e3);
            drained
        }
    };
    let end = Probe::take(server);
    result.sent = stats.sent.load(Ordering::Relaxed);
    result.received = drained;
    result.errors = stats.errors.load(Ordering::Relaxed);
    result.first_error = stats.first_error();
    result.undelivered = messages.saturating_sub(drained);
    result.seconds = started.elapsed().as_secs_f64();
    result.set_usage(probe.usage(&end));
    result.server_peak_rss_mb = end.server.map(|s| s.peak_rss_kb as f64 / 1024.0);
    Ok(result)
}

/// `sync` 100 at a time and `ack` each page, until the cursor is null: the
/// client loop of protocol.md §5. Returns how many messages came.
async fn drain_courier(ws: &mut Ws) -> anyhow::Result<u64> {
    let mut cursor = Value::Null;
    let mut drained = 0;
    // A page's ack goes out with the request for the next page, as a client
    // does that has nothing to wait for (the cursor is a position, so acking
    // skips nothing); the run ends once every ack is answered.
    let mut acking: Option<String> = None;
    loop {
        let sync = ws.request("sync", json!({ "limit": 100, "cursor": cursor })).await?;
        if let Some(ack) = acking.take() {
            ws.answer("ack", &ack).await?;
        }
        let page = ws.answer("sync", &sync).await?;
        let ids: Vec<&Value> =
            page["messages"].as_array().into_iter().flatten().map(|m| &m["messageId"]).collect();
        drained += ids.len() as u64;
        if !ids.is_empty() {
            acking = Some(ws.request("ack", json!({ "messageIds": ids })).await?);
        }
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            if let Some(ack) = acking {
                ws.answer("ack", &ack).await?;
            }
            return Ok(drained);
        }
    }
}

/// The broker pushes the queued messages on reconnect; done when every one
/// has arrived and its PUBACK has gone out.
async fn drain_mqtt(mqtt: Mqtt, messages: u64) -> anyhow::Result<u64> {
    let (_tx, mut rx) = mqtt.split();
    let Rx::Mqtt(events) = &mut rx else { unreachable!() };
    let (mut received, mut acked) = (0u64, 0u64);
    let drain = async {
        while acked < messages {
            match events.poll().await? {
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) => received += 1,
                rumqttc::Event::Outgoing(rumqttc::Outgoing::PubAck(_)) => acked += 1,
                _ => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(120), drain).await {
        Ok(result) => result?,
        Err(_) => bail!("drained {received} of {messages} in 120 s"),
    }
    Ok(received)
}

/// Opens `connections` devices, lets them sit, and reads the server's memory.
pub async fn idle(
    server: &Server,
    p: &Params,
    stats: Arc<Stats>,
    connections: usize,
    hold: Duration,
) -> anyhow::Result<TargetResult> {
    let mut result = TargetResult::new(server.target);
    let before = server.sample();
    let names: Vec<String> = (0..connections).map(|i| format!("i{i}")).collect();
    let started = Instant::now();
    let devices = open_all(server, p, &names, |name| Some(format!("u/{name}")), &stats).await?;
    let seconds = started.elapsed().as_secs_f64();
    // MQTT clients must keep polling to answer keep-alives; WebSockets just sit.
    let mut tasks = JoinSet::new();
    let mut held = Vec::new();
    for (who, opened) in devices.into_iter().enumerate() {
        match opened {
            Device::Mqtt(mqtt) => {
                let (_tx, rx) = mqtt.split();
                tasks.spawn(device(who, None, rx, stats.clone(), false, Sends::Nothing));
            }
            ws => held.push(ws),
        }
    }
    let probe = Probe::take(server);
    tokio::time::sleep(hold).await;
    let end = Probe::take(server);
    result.connections = Some(connections as u64);
    result.connects_per_s = Some(connections as f64 / seconds);
    result.seconds = seconds;
    result.sent = stats.sent.load(Ordering::Relaxed);
    if let (Some(before), Some(now)) = (before, end.server) {
        result.rss_mb = Some(now.rss_kb as f64 / 1024.0);
        result.rss_per_connection_kb =
            Some(now.rss_kb.saturating_sub(before.rss_kb) as f64 / connections as f64);
        result.server_peak_rss_mb = Some(now.peak_rss_kb as f64 / 1024.0);
        result.notes.push(format!("server RSS before connecting: {:.1} MB", before.rss_kb as f64 / 1024.0));
    }
    // While idle, CPU should be near zero: keep-alives and timers only.
    result.set_usage(probe.usage(&end));
    tasks.abort_all();
    drop(held);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_are_due_a_quarter_second_after_the_first_pending_id() {
        let mut acks = Acks::default();
        assert_eq!(acks.due, None, "nothing pending, nothing due");
        let before = tokio::time::Instant::now();
        acks.push("01A".into());
        let due = acks.due.unwrap();
        assert!(due >= before + ACK_DELAY && due <= tokio::time::Instant::now() + ACK_DELAY);
        tokio::time::sleep(Duration::from_millis(5)).await;
        acks.push("01B".into());
        assert_eq!(acks.due, Some(due), "the first pending id sets the deadline");
        let frame: Value = serde_json::from_str(&acks.frame()).unwrap();
        assert_eq!(frame, json!({"action": "ack", "messageIds": ["01A", "01B"]}));
        assert_eq!((acks.ids.len(), acks.due), (0, None), "all acked");
    }
}
