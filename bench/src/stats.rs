//! Counters, latency histograms and the progress line that every scenario shares.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Histograms are sharded so that receiver tasks on different threads rarely
/// wait on each other's lock.
const SHARDS: usize = 16;
/// Latencies are kept in nanoseconds, from 1 µs to 100 s, to 3 significant digits.
const LOWEST_NS: u64 = 1_000;
const HIGHEST_NS: u64 = 100_000_000_000;

/// The instant every timestamp in a message body counts from.
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench started, on the monotonic clock. Sender and
/// receiver live in this one process, so their clocks are the same clock.
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The body of a bench message: the send instant, padded to `size` bytes.
/// Only digits and `x`, so it needs no escaping in JSON or MQTT.
pub fn body(size: usize) -> String {
    let mut text = format!("ts={};", now_ns());
    while text.len() < size {
        text.push('x');
    }
    text
}

/// The send instant in a received frame, wherever the server put the body.
pub fn sent_at(frame: &[u8]) -> Option<u64> {
    let at = frame.windows(3).position(|w| w == b"ts=")? + 3;
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut any = false;
    for digit in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        any = true;
    }
    any.then_some(value)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3).expect("valid histogram bounds")
}

/// What one run of one target counts.
pub struct Stats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// FAILURE answers, failed sends, dropped connections.
    pub errors: AtomicU64,
    /// Latencies are kept only while this is set: after warm-up, before the end.
    pub recording: AtomicBool,
    /// Set to stop senders.
    pub stop: AtomicBool,
    first_error: Mutex<Option<String>>,
    shards: Vec<Mutex<Histogram<u64>>>,
    /// Wakes a windowed sender when deliveries come in.
    pub delivered: tokio::sync::Notify,
}

impl Stats {
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            delivered: tokio::sync::Notify::new(),
        })
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// A message sent at `sent_ns` arrived now at receiver number `who`.
    pub fn delivered(&self, who: usize, sent_ns: u64) {
        let latency = now_ns().saturating_sub(sent_ns);
        self.received.fetch_add(1, Ordering::Relaxed);
        if self.recording.load(Ordering::Relaxed) {
            let mut shard = self.shards[who % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
            shard.saturating_record(latency.max(LOWEST_NS));
        }
        self.delivered.notify_one();
    }

    pub fn error(&self, what: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(what());
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All shards merged.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            all.add(&*shard.lock().unwrap_or_else(|e| e.into_inner())).expect("same bounds");
        }
        all
    }
}

/// Send-to-receive latency, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// (percentile, ms) points for the plot, from p0 to the last one the samples support.
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        // Points evenly spaced in "nines" (x = -log10(1 - q)), up to p99.99 or
        // as far as the sample count allows.
        let nines_max = (h.len() as f64).log10().clamp(1.0, 4.0);
        let curve = (0..=80)
            .map(|i| f64::from(i) / 80.0 * nines_max)
            .map(|nines| {
                let q = 1.0 - 10f64.powf(-nines);
                (q * 100.0, ms(h.value_at_quantile(q)))
            })
            .collect();
        Some(Latency {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1e6,
            curve,
        })
    }
}

/// Prints sent/received counts and the receive rate on stderr until dropped.
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
    terminal: bool,
}

impl Progress {
    pub fn start(label: String, stats: Arc<Stats>) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        // A terminal gets one line rewritten in place; a log gets a line every 2 s.
        let every = if terminal { Duration::from_millis(250) } else { Duration::from_secs(2) };
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(every).await;
                let received = stats.received.load(Ordering::Relaxed);
                let rate = (received - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), received);
                let line = format!(
                    "  {label}  {:5.1}s  sent {}  received {}  errors {}  {}/s",
                    started.elapsed().as_secs_f64(),
                    stats.sent.load(Ordering::Relaxed),
                    received,
                    stats.errors.load(Ordering::Relaxed),
                    human(rate),
                );
                let mut err = std::io::stderr().lock();
                if terminal {
                    let _ = write!(err, "\r{line:<100}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        });
        Progress { task, terminal }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if self.terminal {
            eprint!("\r{:<100}\r", "");
        }
    }
}

/// 12345.6 -> "12.3k".
pub fn human(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_instant_is_found_in_any_envelope() {
        let text = body(40);
        assert_eq!(text.len(), 40);
        let ts = sent_at(text.as_bytes()).unwrap();
        let courier = format!(r#"{{"type":"newMessage","chatId":"01J","message":"{text}","timestamp":1}}"#);
        assert_eq!(sent_at(courier.as_bytes()), Some(ts));
        assert_eq!(sent_at(br#"{"type":"response","status":"SUCCESS"}"#), None);
    }
}
