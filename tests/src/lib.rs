//! The end-to-end harness: courier-local on a free port, in-process or as a
//! real process, and connected clients speaking to it over real sockets.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use courier_local::Config;
use courier_shared::auth::{DEV_SECRET, mint};
use courier_shared::client::{Client, ConnectError};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

pub use courier_shared::client;
pub use courier_shared::protocol::ErrorCode;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// courier-local running inside the test process, stopped when dropped.
pub struct Server {
    pub url: String,
    pub http: String,
    pub config: Config,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    /// Starts with the default config changed by `tweak`, in a fresh data dir.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        tweak(&mut config);
        let mut server = Self::start_in(config).await;
        server._dir = Some(dir);
        server
    }

    /// Starts on `config.data_dir` as it is (to test restarts).
    pub async fn start_in(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(courier_local::serve(config.clone(), listener, async {
            let _ = stopped.await;
        }));
        Server {
            url: format!("ws://{addr}"),
            http: format!("http://{addr}"),
            config,
            _dir: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn token(&self, user: &str) -> String {
        mint(self.config.jwt_secret.as_bytes(), user, 3600)
    }

    pub async fn try_connect(&self, user: &str, device: &str) -> Result<Client, ConnectError> {
        Client::connect(&self.url, &self.token(user), device).await
    }

    pub async fn connect(&self, user: &str, device: &str) -> Client {
        self.try_connect(user, device)
            .await
            .unwrap_or_else(|e| panic!("{user}/{device} could not connect: {e}"))
    }

    /// Stops the server the way Ctrl-C does and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The courier-local binary, built if it is not there yet.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join(format!("courier-local{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.ends_with("release");
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "-p", "courier-local"]);
        if release {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo build").success(),
            "building courier-local failed"
        );
    }
    bin
}

/// courier-local as its own process, killed when dropped.
pub struct Process {
    pub url: String,
    pub http: String,
    child: tokio::process::Child,
}

impl Process {
    /// Starts the binary on a free port with its data in `data_dir`.
    pub async fn start(data_dir: &Path) -> Process {
        let mut child = tokio::process::Command::new(binary())
            .env("COURIER_ADDR", "127.0.0.1:0")
            .env("COURIER_DATA_DIR", data_dir)
            .env("COURIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn courier-local");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read stderr") {
                if let Some(rest) = line.split("addr=").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await
        .expect("courier-local did not start in 30 s")
        .expect("courier-local exited before listening");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process {
            url: format!("ws://{addr}"),
            http: format!("http://{addr}"),
            child,
        }
    }

    pub async fn connect(&self, user: &str, device: &str) -> Client {
        Client::connect(&self.url, &mint(DEV_SECRET.as_bytes(), user, 3600), device)
            .await
            .unwrap_or_else(|e| panic!("{user}/{device} could not connect: {e}"))
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid");
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exit in 10 s")
            .expect("wait")
    }
}
