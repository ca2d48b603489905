//! The end-to-end harness: courier-local on a free port, in-process or as a
//! real process, and connected clients speaking to it over real sockets.

pub mod http;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use courier_core::auth::{DEV_SECRET, mint};
use courier_core::protocol::AttachmentCreated;
use courier_local::{Backend, Config};
use courier_testkit::client::{CallError, Client, ConnectError};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

pub use courier_core::protocol::ErrorCode;
pub use courier_testkit::client;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// courier-local running inside the test process, stopped when dropped.
pub struct Server {
    pub url: String,
    pub http: String,
    pub config: Config,
    connections: Arc<courier_local::Connections>,
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    /// Starts with the default config changed by `tweak`, in a fresh data dir
    /// (and, on the AWS backend, under fresh table names on the shared moto).
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
        if on_aws() {
            let moto = courier_testkit::moto::shared().await;
            config.backend = Backend::Aws { prefix: fresh_prefix(), sdk: Some(Box::new(moto.sdk_config())) };
        }
        tweak(&mut config);
        let mut server = Self::start_in(config).await;
        server._dir = Some(dir);
        server
    }

    /// Starts on `config.data_dir` as it is (to test restarts).
    pub async fn start_in(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let connections = Arc::new(courier_local::Connections::default());
        let task =
            tokio::spawn(courier_local::serve_with(config.clone(), listener, connections.clone(), async {
                let _ = stopped.await;
            }));
        Server {
            url: format!("ws://{addr}"),
            http: format!("http://{addr}"),
            config,
            connections,
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

    /// The HTTP status of a WebSocket upgrade of `/?{query}`, sent by hand so
    /// that the query can be anything (no deviceId, a malformed one...).
    pub async fn upgrade_status(&self, query: &str) -> u16 {
        upgrade_status(&self.http, query).await
    }

    /// The id of the connection (user, device) is bound to, as the
    /// management API names it. courier-local tells no client its id, so
    /// this reads the device row from the server's database.
    pub fn connection_id(&self, user: &str, device: &str) -> Option<String> {
        self.connections.of_device(user, device).map(String::from)
    }

    /// The server's live connections, as its pushes and the management API see them.
    pub fn connections(&self) -> &Arc<courier_local::Connections> {
        &self.connections
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

/// Whether this run drives the AWS backend (`COURIER_E2E_BACKEND=aws`: the
/// deployed adapters against moto) rather than the embedded one.
pub fn on_aws() -> bool {
    std::env::var("COURIER_E2E_BACKEND").is_ok_and(|b| b == "aws")
}

/// True, with a note, when a check cannot run on the AWS backend because
/// moto does not do what S3 does (it checks no presigned signature, length
/// or checksum). The embedded backend runs every such check.
pub fn moto_cannot_check(what: &str) -> bool {
    if on_aws() {
        eprintln!("not checked on the AWS backend: moto does not verify {what} (S3 does)");
    }
    on_aws()
}

/// A table-name prefix no other test uses.
fn fresh_prefix() -> String {
    format!("e2e{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The courier-local binary, (re)built once per test process so that it is
/// never older than the code under test.
pub fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_binary).clone()
}

fn build_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join(format!("courier-local{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "-p", "courier-local", "--bin", "courier-local"]);
    if on_aws() {
        build.args(["--features", "aws"]);
    }
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().expect("cargo build").success(), "building courier-local failed");
    assert!(bin.exists(), "cargo built no {}", bin.display());
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
        Self::start_env(data_dir, &[]).await
    }

    /// [`Process::start`] with extra environment (settings of courier-local).
    pub async fn start_env(data_dir: &Path, env: &[(&str, &str)]) -> Process {
        let mut command = tokio::process::Command::new(binary());
        command.envs(env.iter().copied());
        if on_aws() {
            // The same data dir means the same tables: a restart finds what the first run wrote.
            let prefix = format!("proc{:016x}", {
                use std::hash::BuildHasher;
                std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(data_dir)
            });
            let moto = courier_testkit::moto::shared().await;
            command
                .env("COURIER_BACKEND", "aws")
                .env("COURIER_AWS_PREFIX", prefix)
                .env("AWS_ENDPOINT_URL", moto.endpoint())
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true");
        }
        let mut child = command
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
        Process { url: format!("ws://{addr}"), http: format!("http://{addr}"), child }
    }

    pub async fn try_connect(&self, user: &str, device: &str) -> Result<Client, ConnectError> {
        Client::connect(&self.url, &mint(DEV_SECRET.as_bytes(), user, 3600), device).await
    }

    pub async fn connect(&self, user: &str, device: &str) -> Client {
        self.try_connect(user, device)
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
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill -TERM");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exit in 10 s")
            .expect("wait")
    }
}

/// Sends `GET /?{query}` as a WebSocket upgrade to the server at `http_base`
/// and returns the status: 101 when upgraded, else the refusal.
pub async fn upgrade_status(http_base: &str, query: &str) -> u16 {
    let response = http::request(
        "GET",
        &format!("{http_base}/?{query}"),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await
    .expect("upgrade request");
    response.status
}

/// The error code of a call that must have failed.
#[track_caller]
pub fn code<T: std::fmt::Debug>(result: Result<T, CallError>) -> ErrorCode {
    match result {
        Ok(value) => panic!("expected a FAILURE, got SUCCESS: {value:?}"),
        Err(CallError::Failure(body)) => body.code,
        Err(other) => panic!("expected a FAILURE, got {other}"),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes).as_slice())
}

/// PUTs `bytes` to a createAttachment's `uploadUrl` with exactly its `uploadHeaders`.
pub async fn put_upload(created: &AttachmentCreated, bytes: &[u8]) -> http::Response {
    let headers: Vec<(&str, &str)> =
        created.upload_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    http::put(&created.upload_url, &headers, bytes).await.expect("PUT to uploadUrl")
}

/// Creates an attachment of `bytes`, uploads it and returns its id.
pub async fn upload(client: &Client, content_type: &str, bytes: &[u8]) -> String {
    let created = client
        .create_attachment(content_type, bytes.len() as u64, &sha256_hex(bytes))
        .await
        .expect("createAttachment");
    let response = put_upload(&created, bytes).await;
    assert_eq!(response.status, 200, "upload refused: {}", response.text());
    created.attachment_id.to_string()
}

/// The next pushed frame whose `type` is `ty`, skipping others.
pub async fn next_of_type(client: &mut Client, ty: &str, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = client.next_frame(left).await?;
        if frame["type"] == ty {
            return Some(frame);
        }
    }
}

/// Headers that sign a management API request with AWS Signature Version 4
/// (service `execute-api`, region us-east-1) by `key` (id, secret) as of
/// `at`, signing `host` and `x-amz-date` as [`http::request`] sends them.
/// Written apart from courier-local's verifier, so that each checks the other.
pub fn sigv4_headers(
    method: &str,
    url: &str,
    body: &[u8],
    key: (&str, &str),
    at: std::time::SystemTime,
) -> Vec<(&'static str, String)> {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    assert!(!path.contains('?'), "the management API takes no query");
    // Every byte but the unreserved ones and '/', so '%' too: the path is encoded once more.
    let path: String = path
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let amz_date = amz_date(at);
    let scope = format!("{}/us-east-1/execute-api/aws4_request", &amz_date[..8]);
    let canonical = format!(
        "{method}\n{path}\n\nhost:{host}\nx-amz-date:{amz_date}\n\nhost;x-amz-date\n{}",
        sha256_hex(body)
    );
    let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
    let mut signing_key = format!("AWS4{}", key.1).into_bytes();
    for part in [&amz_date[..8], "us-east-1", "execute-api", "aws4_request"] {
        signing_key = hmac_sha256(&signing_key, part.as_bytes());
    }
    let signature = hex::encode(hmac_sha256(&signing_key, to_sign.as_bytes()));
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-date, Signature={signature}",
        key.0
    );
    vec![("X-Amz-Date", amz_date), ("Authorization", authorization)]
}

/// HMAC-SHA256 (RFC 2104); every key here is shorter than SHA-256's 64-byte block.
fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    assert!(key.len() <= 64);
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |with: u8| block.map(|b| b ^ with);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(data).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner.as_slice()).finalize().to_vec()
}

/// `20150830T123600Z`: the UTC time SigV4 signs with.
fn amz_date(at: std::time::SystemTime) -> String {
    let secs = at.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `url` with its query parameter `key` set to `value`.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').expect("a signed URL has a query");
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k == key => format!("{k}={value}"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}
