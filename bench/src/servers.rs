//! Starting and stopping the servers under test, and reading their CPU time and memory from /proc.

use std::io::BufRead;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// Which server a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Courier,
    Relay,
    Mosquitto,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Courier => "courier",
            Target::Relay => "relay",
            Target::Mosquitto => "mosquitto",
        }
    }
}

/// How the bench reaches a server: a WebSocket base URL or an MQTT port.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Ws(String),
    Mqtt(u16),
}

/// A server under test: one the bench started (and will stop), or one it was pointed at.
pub struct Server {
    pub target: Target,
    pub endpoint: Endpoint,
    child: Option<Child>,
    /// Data dir or config dir; removed when the server is dropped.
    _dir: Option<tempfile::TempDir>,
    /// What the server logged that a run reports.
    pub log: Arc<ServerLog>,
}

/// Courier's cut-offs of clients that cannot keep up, as its log reports
/// them (protocol v2: past 1 MiB queued, or no write progress for 30 s).
/// Read from the text of the warning, so best effort: the soak's own count
/// is of the cut-offs its slow readers saw.
#[derive(Debug, Default)]
pub struct ServerLog {
    pub cut_off_bytes: AtomicU64,
    pub cut_off_stalled: AtomicU64,
    pub cut_off_other: AtomicU64,
}

impl ServerLog {
    /// Cut-off lines past this many are counted and not echoed: a soak makes hundreds.
    const ECHOED: u64 = 3;

    pub fn cut_offs(&self) -> u64 {
        [&self.cut_off_bytes, &self.cut_off_stalled, &self.cut_off_other]
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Echoes the server's stderr on ours, counting its cut-off lines on the way.
    fn follow(self: Arc<Self>, stderr: ChildStderr) {
        let mut lines = std::io::BufReader::new(stderr);
        let mut line = Vec::new();
        while matches!(lines.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            if text.contains("client cut off") {
                let counter = if text.contains("byte cap") {
                    &self.cut_off_bytes
                } else if text.contains("stalled") {
                    &self.cut_off_stalled
                } else {
                    &self.cut_off_other
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let seen = self.cut_offs();
                if seen <= Self::ECHOED {
                    eprintln!("{text}");
                } else if seen == Self::ECHOED + 1 {
                    eprintln!("(further \"client cut off\" lines from the server are counted, not shown)");
                }
            } else {
                eprintln!("{text}");
            }
            line.clear();
        }
    }
}

/// What `Server::start` needs to know.
pub struct Launch<'a> {
    pub durability: &'a str,
    pub secret: &'a str,
}

impl Server {
    /// A Courier someone else runs: its CPU and memory are unknown to us.
    pub fn external(url: &str) -> Server {
        Server {
            target: Target::Courier,
            endpoint: Endpoint::Ws(url.to_owned()),
            child: None,
            _dir: None,
            log: Arc::default(),
        }
    }

    pub fn start(target: Target, launch: &Launch) -> anyhow::Result<Server> {
        let port = free_port()?;
        let dir = tempfile::Builder::new().prefix(&format!("courier-bench-{}-", target.name())).tempdir()?;
        let mut command = match target {
            Target::Courier => {
                let mut c = Command::new(binary("courier-local", "courier-local")?);
                c.env("COURIER_ADDR", format!("127.0.0.1:{port}"))
                    .env("COURIER_DATA_DIR", dir.path())
                    .env("COURIER_JWT_SECRET", launch.secret)
                    .env("COURIER_DURABILITY", launch.durability)
                    // The bench measures the server, not its per-connection
                    // token bucket (20 frames/s by default).
                    .env("COURIER_RATE_BURST", "1000000000")
                    .env("COURIER_RATE_PER_SECOND", "1000000000")
                    // Quiet unless asked: COURIER_LOG passes through, to trace a run.
                    .env("COURIER_LOG", std::env::var("COURIER_LOG").unwrap_or_else(|_| "warn".into()));
                c
            }
            Target::Relay => {
                let mut c = Command::new(binary("courier-relay", "courier-bench")?);
                c.arg("--addr").arg(format!("127.0.0.1:{port}"));
                c
            }
            Target::Mosquitto => {
                let exe = which("mosquitto").context(
                    "mosquitto is not installed: `apt-get update && apt-get install -y mosquitto` \
                     (or leave it out with --target courier,relay)",
                )?;
                let config = dir.path().join("mosquitto.conf");
                std::fs::write(&config, mosquitto_config(port, dir.path()))?;
                let mut c = Command::new(exe);
                c.arg("-c").arg(&config);
                c
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", target.name()))?;
        let log = Arc::<ServerLog>::default();
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || log.follow(stderr));
        }
        let mut server = Server {
            target,
            endpoint: match target {
                Target::Mosquitto => Endpoint::Mqtt(port),
                _ => Endpoint::Ws(format!("ws://127.0.0.1:{port}")),
            },
            child: Some(child),
            _dir: Some(dir),
            log,
        };
        server.wait_listening(port)?;
        Ok(server)
    }

    fn wait_listening(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("{} exited before listening: {status}", self.target.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("{} did not listen on port {port} within 15 s", self.target.name())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's CPU time and memory now; `None` for a server we did not start.
    pub fn sample(&self) -> Option<Sample> {
        Sample::of(self.pid()?)
    }

    /// Bytes of the files in the server's data dir (Courier: its SQLite
    /// database, WAL and blobs); `None` for a server we did not start.
    pub fn data_bytes(&self) -> Option<u64> {
        fn size(path: &Path) -> u64 {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => std::fs::read_dir(path)
                    .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
                    .unwrap_or(0),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        Some(size(self._dir.as_ref()?.path()))
    }

    /// How many file descriptors the server holds open now; `None` for a server we did not start.
    pub fn open_fds(&self) -> Option<u64> {
        Some(std::fs::read_dir(format!("/proc/{}/fd", self.pid()?)).ok()?.count() as u64)
    }

    /// Stops the server: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Stock Mosquitto but for what the comparison needs: persistent sessions
/// stored under our temp dir, a queue long enough for the backlog scenario
/// (the stock `max_queued_messages` is 1000: past it, messages for an
/// offline client are dropped), and Nagle off: stock, a PUBLISH that follows
/// a PUBACK on the same socket waits for the client's delayed ACK (up to
/// 40 ms), which would make Mosquitto a straw man.
fn mosquitto_config(port: u16, dir: &Path) -> String {
    format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {}/\n\
         max_queued_messages 1000000\n\
         set_tcp_nodelay true\n\
         # When started as root, Mosquitto would switch to user `mosquitto`, who cannot write our temp dir.\n\
         user root\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n",
        dir.display()
    )
}

/// A port nothing listens on now (the server binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A release binary of this workspace: next to the running bench, else in
/// the workspace's target/release, else built there now with cargo.
fn binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name(name);
    if beside.is_file() {
        return Ok(beside);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("bench/ has a parent")?;
    let built = workspace.join("target/release").join(name);
    if built.is_file() {
        return Ok(built);
    }
    eprintln!("{name} is not built; running `cargo build --release -p {package}`");
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", package])
        .current_dir(workspace)
        .status()
        .context("running cargo")?;
    if !status.success() || !built.is_file() {
        bail!("could not build {name} (cargo build --release -p {package})");
    }
    Ok(built)
}

/// A process's CPU time and memory at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    at: Instant,
    cpu_seconds: f64,
    pub rss_kb: u64,
    /// The parts of `rss_kb`: anonymous memory (the heap: what a leak grows),
    /// and pages of mapped files and shared memory (Courier maps its SQLite
    /// database, so these grow with the data it reads).
    pub rss_anon_kb: u64,
    pub rss_file_kb: u64,
    pub peak_rss_kb: u64,
}

impl Sample {
    pub fn of(pid: u32) -> Option<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Some(Sample {
            at: Instant::now(),
            cpu_seconds: cpu_seconds(pid)?,
            rss_kb: kb("VmRSS:"),
            rss_anon_kb: kb("RssAnon:"),
            rss_file_kb: kb("RssFile:") + kb("RssShmem:"),
            peak_rss_kb: kb("VmHWM:"),
        })
    }

    pub fn self_now() -> Option<Sample> {
        Sample::of(std::process::id())
    }

    /// CPU use between two samples, in percent of one core.
    pub fn cpu_percent(&self, later: &Sample) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 { 0.0 } else { (later.cpu_seconds - self.cpu_seconds) / wall * 100.0 }
    }
}

/// The CPU use of the server, of the bench itself and of the whole machine at
/// one instant; two of them give each one's share of a window.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    at: Instant,
    pub server: Option<Sample>,
    bench: Option<Sample>,
    /// When, and the machine's busy CPU seconds from /proc/stat.
    machine: Option<(Instant, f64)>,
}

/// Percent of one core over a window: 200 is both cores of a 2-core machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub server: Option<f64>,
    pub bench: Option<f64>,
    /// Everything else on the machine: another build or test run skews the figures.
    pub other: Option<f64>,
}

impl Probe {
    pub fn take(server: &Server) -> Probe {
        Probe {
            at: Instant::now(),
            server: server.sample(),
            bench: Sample::self_now(),
            machine: machine_busy().map(|b| (Instant::now(), b)),
        }
    }

    pub fn seconds_since(&self, earlier: &Probe) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64()
    }

    pub fn usage(&self, later: &Probe) -> Usage {
        let server = self.server.zip(later.server).map(|(a, b)| a.cpu_percent(&b));
        let bench = self.bench.zip(later.bench).map(|(a, b)| a.cpu_percent(&b));
        let machine = self.machine.zip(later.machine).map(|((t0, b0), (t1, b1))| {
            let wall = t1.duration_since(t0).as_secs_f64();
            if wall > 0.0 { (b1 - b0) / wall * 100.0 } else { 0.0 }
        });
        // Unknown when the server is not ours: it would be counted as "other".
        let other = machine.zip(server).map(|(m, s)| (m - s - bench.unwrap_or(0.0)).max(0.0));
        Usage { server, bench, other }
    }
}

/// Busy CPU seconds of the whole machine (all but idle and iowait), from
/// /proc/stat's 10 ms ticks: good enough over windows of seconds.
fn machine_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let all: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((all - idle) as f64 / clock_ticks() as f64)
}

/// USER_HZ, the unit of /proc/stat (100 on Linux, but ask).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// CPU time of every live thread of `pid`, in nanoseconds summed from
/// /proc/PID/task/*/schedstat. /proc/PID/stat counts in 10 ms ticks, too
/// coarse for a 100 ms backlog drain; a thread that exits mid-window takes its
/// time with it, but the servers' threads live as long as they do.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(nanos as f64 / 1e9)
}
