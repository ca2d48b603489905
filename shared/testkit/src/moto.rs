//! A throwaway moto server for the DynamoDB adapter's tests: started on a free port, killed on drop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{Credentials, Region, SharedCredentialsProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use courier_aws::{Names, schema};

use crate::Meter;

/// How long moto may take to answer its first request (it imports a lot of Python).
const STARTUP: Duration = Duration::from_secs(60);

/// A running `moto_server`.
pub struct MotoServer {
    child: Child,
    endpoint: String,
}

impl std::fmt::Debug for MotoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotoServer").field("endpoint", &self.endpoint).finish()
    }
}

/// `$COURIER_VENV/bin/moto_server` (what scripts/test installs), else the first on PATH.
fn moto_executable() -> Option<PathBuf> {
    let venv = std::env::var_os("COURIER_VENV").map(|v| PathBuf::from(v).join("bin").join("moto_server"));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|dir| dir.join("moto_server")).collect::<Vec<_>>())
        .unwrap_or_default();
    venv.into_iter().chain(on_path).find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Whether something on `port` answers an HTTP request.
async fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).await.is_ok() && &head == b"HTTP/"
}

impl MotoServer {
    /// Starts moto on a free port and waits until it answers.
    pub async fn start() -> Self {
        let exe = moto_executable().unwrap_or_else(|| {
            panic!("moto_server not found: run scripts/test, which installs it into .venv")
        });
        let mut failures = Vec::new();
        // Another process may take the port between our probe and moto's bind: try a few.
        for _ in 0..3 {
            let port = free_port();
            // A shell keeps moto on a leash: when our end of its stdin closes
            // (on drop, or because this process died however it died), the
            // shell kills moto, so no server outlives its tests.
            let leash = r#""$0" -H 127.0.0.1 -p "$1" & moto=$!; cat >/dev/null; kill "$moto"; wait"#;
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(leash)
                .arg(&exe)
                .arg(port.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
            let started = Instant::now();
            loop {
                if answers_http(port).await {
                    return Self { child, endpoint: format!("http://127.0.0.1:{port}") };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    failures.push(format!("port {port}: moto_server exited with {status}"));
                    break;
                }
                if started.elapsed() > STARTUP {
                    drop(child.stdin.take());
                    let _ = child.wait();
                    failures.push(format!("port {port}: no answer within {STARTUP:?}"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto_server did not start: {}", failures.join("; "));
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An SDK config aimed at this server: fixed region and test credentials,
    /// nothing read from the environment or profile files.
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "testing", "testing", None, None, "moto",
            )))
            .build()
    }

    /// A DynamoDB client that counts the requests it sends, by operation.
    pub fn counted_dynamodb(&self) -> (aws_sdk_dynamodb::Client, Calls) {
        let meter = Meter::new();
        let config =
            aws_sdk_dynamodb::config::Builder::from(&self.sdk_config()).interceptor(meter.clone()).build();
        (aws_sdk_dynamodb::Client::from_conf(config), Calls(meter))
    }

    /// Creates every table under `prefix` and returns their names.
    pub async fn tables(&self, prefix: &str) -> Names {
        let names =
            Names::prefixed(prefix, &format!("{}/123456789012/{prefix}-jobs", self.endpoint), &self.endpoint);
        let client = aws_sdk_dynamodb::Client::new(&self.sdk_config());
        schema::create_tables(&client, &names).await.expect("creating the tables on moto");
        names
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Closing the leash makes the shell stop moto and exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One moto for a whole test process (each user takes its own prefix),
/// stopped when the process ends.
pub async fn shared() -> &'static MotoServer {
    static SHARED: tokio::sync::OnceCell<MotoServer> = tokio::sync::OnceCell::const_new();
    SHARED.get_or_init(MotoServer::start).await
}

/// The DynamoDB requests a [`Meter`] counted, by operation (`PutItem`...).
#[derive(Clone, Debug, Default)]
pub struct Calls(Meter);

impl Calls {
    /// The counts so far, resetting them.
    pub fn take(&self) -> BTreeMap<String, usize> {
        self.0.take().requests_to("DynamoDB").into_iter().map(|(op, n)| (op, n as usize)).collect()
    }
}
