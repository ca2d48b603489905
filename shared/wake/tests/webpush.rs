//! Web Push against an independent receiver: scripts/webpush-receiver.py decrypts with Python's http_ece and checks VAPID with `cryptography`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{Platform, PushRegistration, Wakeups, WebPushKeys, Woken};
use courier_wake::{VapidKey, Wakers, WebPushOptions, WebPushSender, collapse_key};
use serde_json::Value;

const SUBJECT: &str = "mailto:wake-test@example.com";
/// Short, so the hanging endpoint costs the run little; long enough for a loaded machine's 201.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The receiver, running; it exits when its stdin closes, so dropping this stops it.
struct Receiver {
    child: Child,
    endpoint: String,
    keys: WebPushKeys,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `$COURIER_VENV/bin/python` (what scripts/test exports), else the repo's `.venv`.
fn venv_python() -> PathBuf {
    let venv =
        std::env::var_os("COURIER_VENV").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv"));
    let python = venv.join("bin").join("python");
    assert!(
        python.is_file(),
        "{} not found: run scripts/test, which makes the venv and installs http-ece into it",
        python.display()
    );
    python
}

impl Receiver {
    fn start() -> Self {
        let python = venv_python();
        let mut child = Command::new(&python)
            .arg(repo_root().join("scripts/webpush-receiver.py"))
            .args(["--timeout", "300"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Ok(subscription) = serde_json::from_str::<Value>(&line) else {
            let _ = child.kill();
            panic!(
                "scripts/webpush-receiver.py did not start (its error is above): \
                 run scripts/test, which installs http-ece and cryptography into the venv"
            );
        };
        let text = |field: &str| subscription[field].as_str().unwrap().to_owned();
        Self {
            endpoint: text("endpoint"),
            keys: WebPushKeys { p256dh: text("p256dh"), auth: text("auth") },
            child,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("{}{name}", self.endpoint)
    }

    /// What the receiver made of the requests named `name`.
    async fn received(&self, name: &str) -> Vec<Value> {
        let base = self.endpoint.trim_end_matches("push/");
        let all: Vec<Value> = serde_json::from_str(
            &reqwest::get(format!("{base}received")).await.unwrap().text().await.unwrap(),
        )
        .unwrap();
        all.into_iter().filter(|r| r["name"] == name).collect()
    }
}

fn sender() -> WebPushSender {
    let options = WebPushOptions { timeout: TIMEOUT, public_hosts_only: false, ..WebPushOptions::default() };
    WebPushSender::new(VapidKey::generate(SUBJECT).unwrap(), options).unwrap()
}

#[tokio::test]
async fn the_receiver_decrypts_a_content_free_wake_up_and_verifies_its_vapid_token() {
    let receiver = Receiver::start();
    let sender = sender();
    let endpoint = receiver.url("ok-1");

    let woken = sender.send(&endpoint, &receiver.keys).await;

    let records = receiver.received("ok-1").await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["ok"], true, "the receiver refused it: {}", record["error"]);
    assert_eq!(record["status"], 201);
    assert_eq!(woken.unwrap(), Woken::Sent);
    assert_eq!(record["payload"], r#"{"type":"wake"}"#);
    let vapid = &record["vapid"];
    assert_eq!(vapid["k"], sender.vapid_key().public_key());
    assert_eq!(vapid["claims"]["sub"], SUBJECT);
    // The origin with its port: RFC 8292's `aud`.
    assert_eq!(vapid["claims"]["aud"], receiver.endpoint.trim_end_matches("/push/"));
    let headers = &record["headers"];
    assert_eq!(headers["urgency"], "high");
    assert_eq!(headers["ttl"], (28 * 24 * 60 * 60).to_string());
    assert_eq!(headers["topic"], collapse_key(&endpoint));
    assert_eq!(headers["content-encoding"], "aes128gcm");
}

#[tokio::test]
async fn a_wake_up_encrypted_for_other_keys_does_not_decrypt() {
    // The receiver is no rubber stamp: keys of another subscription fail.
    let receiver = Receiver::start();
    let other = Receiver::start();
    assert_eq!(sender().send(&receiver.url("ok-other-keys"), &other.keys).await.unwrap(), Woken::Sent);
    let records = receiver.received("ok-other-keys").await;
    assert_eq!(records[0]["ok"], false);
    assert!(records[0]["error"].as_str().unwrap().starts_with("decrypt:"), "{}", records[0]["error"]);
}

#[tokio::test]
async fn push_service_answers_map_to_gone_and_retryable_errors() {
    let receiver = Receiver::start();
    let sender = sender();

    assert_eq!(sender.send(&receiver.url("gone-1"), &receiver.keys).await.unwrap(), Woken::Gone);

    let failed = sender.send(&receiver.url("fail-1"), &receiver.keys).await.unwrap_err();
    assert!(failed.is_retryable(), "{failed}");

    let started = Instant::now();
    let hung = sender.send(&receiver.url("hang-1"), &receiver.keys).await.unwrap_err();
    let waited = started.elapsed();
    assert!(hung.is_retryable(), "{hung}");
    assert!(waited >= TIMEOUT && waited < TIMEOUT + Duration::from_secs(5), "gave up after {waited:?}");

    // Each was well formed: the answers came from the names, not from refusals.
    for name in ["gone-1", "fail-1", "hang-1"] {
        let records = receiver.received(name).await;
        assert_eq!(records.len(), 1, "{name}: {records:?}");
        assert_eq!(records[0]["ok"], true, "{name}: {}", records[0]["error"]);
    }
}

#[tokio::test]
async fn a_refusal_is_not_retried() {
    // forbid-* answers 403, as push services do to a VAPID key that is not
    // the one the browser subscribed with: retrying cannot cure it.
    let receiver = Receiver::start();
    let refused = sender().send(&receiver.url("forbid-1"), &receiver.keys).await.unwrap_err();
    assert!(!refused.is_retryable(), "{refused}");
    assert_eq!(receiver.received("forbid-1").await[0]["status"], 403);
}

#[tokio::test]
async fn wakers_check_and_wake_a_local_subscription() {
    let receiver = Receiver::start();
    let wakers = Wakers::new(Some(sender()), None);
    assert!(wakers.serves(Platform::WebPush));
    assert!(
        !wakers.serves(Platform::Fcm)
            && !wakers.serves(Platform::Apns)
            && !wakers.serves(Platform::ApnsSandbox)
    );

    let registration = PushRegistration {
        platform: Platform::WebPush,
        address: receiver.url("ok-wakers"),
        keys: Some(receiver.keys.clone()),
        endpoint: None,
    };
    let registration = wakers.prepare(registration, None).await.unwrap();
    let (user, device) = (UserId::try_from("alice").unwrap(), DeviceId::try_from("laptop").unwrap());
    assert_eq!(wakers.wake(&user, &device, &registration).await.unwrap(), Woken::Sent);
    assert_eq!(receiver.received("ok-wakers").await[0]["payload"], r#"{"type":"wake"}"#);

    let no_keys = PushRegistration { keys: None, ..registration.clone() };
    assert!(matches!(wakers.prepare(no_keys, None).await, Err(courier_core::Error::BadRequest(_))));
    let fcm =
        PushRegistration { platform: Platform::Fcm, address: "token".into(), keys: None, endpoint: None };
    assert!(matches!(wakers.prepare(fcm, None).await, Err(courier_core::Error::BadRequest(_))));
}
