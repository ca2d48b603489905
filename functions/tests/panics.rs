//! What a handler's panic does under lambda_runtime when panics unwind: it
//! fails that invocation, reported as its error, and the process serves the
//! next one. The bootstraps abort on panic today, for size
//! (functions/.cargo/config.toml says what unwinding costs), so deployed, a
//! panic ends the process; this is what switching buys, and the check that
//! a switch takes effect.
//!
//! The behaviour is checked on a real runtime loop: this test binary runs
//! itself again as a child whose `lambda_runtime::run` polls a fake Runtime
//! API served here (test builds always unwind).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

/// Set in the child's environment: only then does [`runtime_child`] run.
const CHILD: &str = "COURIER_PANIC_TEST_CHILD";
/// How long the child gets to make each call (its build is this binary's).
const WAIT: Duration = Duration::from_secs(30);

/// The child: one runtime loop, as a function binary runs it, over a handler
/// that panics when the event asks it to.
#[tokio::test]
#[ignore = "run by an_unwinding_panic_fails_only_its_invocation"]
async fn runtime_child() -> Result<(), Error> {
    if std::env::var_os(CHILD).is_none() {
        return Ok(());
    }
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        if event.payload["panic"] == true {
            panic!("a bug in one invocation");
        }
        Ok::<Value, Error>(json!({ "served": event.context.request_id }))
    }))
    .await
}

#[test]
fn an_unwinding_panic_fails_only_its_invocation() {
    let api = FakeRuntimeApi::start(vec![
        ("req-1", json!({ "panic": true })),
        ("req-2", json!({ "panic": false })),
    ]);
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", "runtime_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("AWS_LAMBDA_RUNTIME_API", &api.addr)
        .env("AWS_LAMBDA_FUNCTION_NAME", "panics")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the child runtime");

    let first = api.posts.recv_timeout(WAIT);
    let second = api.posts.recv_timeout(WAIT);
    // Still polling for a third event: the panic did not end the process.
    let alive = child.try_wait().expect("child status").is_none();
    child.kill().ok();
    child.wait().ok();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).ok();
    }

    let (path, body) =
        first.unwrap_or_else(|e| panic!("no answer to the first event ({e}); child stderr:\n{stderr}"));
    assert_eq!(path, "/2018-06-01/runtime/invocation/req-1/error", "child stderr:\n{stderr}");
    let error: Value = serde_json::from_str(&body).expect("an error document");
    assert!(
        error["errorMessage"].as_str().is_some_and(|m| m.contains("a bug in one invocation")),
        "the panic's message is the invocation's error: {error}"
    );
    let (path, body) =
        second.unwrap_or_else(|e| panic!("no answer to the second event ({e}); child stderr:\n{stderr}"));
    assert_eq!(path, "/2018-06-01/runtime/invocation/req-2/response", "child stderr:\n{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("a JSON response"), json!({ "served": "req-2" }));
    assert!(alive, "the process exited after the panic; child stderr:\n{stderr}");
}

/// `sam build` runs `cargo lambda build --release` in functions/, so cargo
/// reads functions/.cargo/config.toml; but cargo lambda adds
/// `--config profile.release.panic="abort"`, which beats that file, unless
/// the root Cargo.toml's profile sets `panic` or its release defaults are
/// off. A profile that says "unwind" must come with one of those.
#[test]
fn a_lambda_profile_that_unwinds_is_not_overridden() {
    let panic = value(&read("functions/.cargo/config.toml"), "profile.release", "panic");
    if panic.as_deref() == Some("\"abort\"") {
        return;
    }
    let root_sets_panic = value(&read("Cargo.toml"), "profile.release", "panic").is_some();
    let defaults_off =
        value(&read("functions/Cargo.toml"), "package.metadata.lambda.build", "disable_optimizations")
            .is_some_and(|v| v == "true");
    assert!(
        root_sets_panic || defaults_off,
        "functions/.cargo/config.toml has panic = {panic:?}, but cargo lambda would build with panic=abort: \
         set `panic` in the root Cargo.toml's [profile.release] (cargo lambda then leaves it alone)"
    );
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The raw value of `key` in TOML table `[table]`: enough for flat settings.
fn value(toml: &str, table: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in toml.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_owned();
        } else if current == table
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.split('#').next().unwrap_or_default().trim().to_owned());
        }
    }
    None
}

/// The Lambda Runtime API, as much of it as a runtime loop uses: `next`
/// hands out the queued events, then holds the poll open; `response` and
/// `error` posts are passed on to the test.
struct FakeRuntimeApi {
    addr: String,
    posts: Receiver<(String, String)>,
}

impl FakeRuntimeApi {
    fn start(events: Vec<(&'static str, Value)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let events = Arc::new(Mutex::new(VecDeque::from(events)));
        let (tx, posts) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (events, tx) = (events.clone(), tx.clone());
                std::thread::spawn(move || serve(stream, &events, &tx));
            }
        });
        Self { addr, posts }
    }
}

/// One keep-alive connection: requests one after another until it closes.
fn serve(
    stream: TcpStream,
    events: &Mutex<VecDeque<(&'static str, Value)>>,
    posts: &Sender<(String, String)>,
) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default().to_owned());
        let response = if method == "GET" && path.ends_with("/invocation/next") {
            let Some((id, event)) = events.lock().expect("events").pop_front() else {
                // Nothing more to run: hold the long poll, as Lambda does.
                loop {
                    std::thread::park();
                }
            };
            let deadline = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() + 60_000;
            let body = event.to_string();
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nlambda-runtime-aws-request-id: {id}\r\n\
                 lambda-runtime-deadline-ms: {deadline}\r\n\
                 lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:000000000000:function:panics\r\n\
                 content-length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            posts.send((path, String::from_utf8_lossy(&body).into_owned())).ok();
            "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n".to_owned()
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
