//! What each fuzz target runs on one input: shared by the targets in
//! `fuzz/fuzz_targets/` and by `functions/tests/fuzz_regressions.rs`, which
//! replays every kept input through the same functions under `cargo test`.
//! Each crate that includes it names the Lambda edge `crate::lambda`: the
//! fuzz crate compiles its source in, the test imports `courier_aws::lambda`.
//!
//! Each function takes the bytes libFuzzer hands over and panics only on a
//! bug: a panic in Courier's code, or an answer that breaks the edge's
//! promise (a reply that is not a JSON FAILURE frame, say). The ones that
//! need the service share one `Courier` per process over the embedded
//! adapters (SQLite and files in a temp dir, a push port that drops every
//! frame), seeded with a chat and two connected devices that the seed
//! inputs (`events/*.json`) name, so that their commands get past the
//! lookups into the service.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use aws_lambda_events::dynamodb::Event as StreamEvent;
use aws_lambda_events::encodings::Body;
use aws_lambda_events::sqs::SqsEvent;
use courier_core::auth::Verifier;
use courier_core::dispatch;
use courier_core::domain::{Caller, Chat, DAY_MS, Limits, Member};
use courier_core::ids::{ChatId, ConnectionId, DeviceId, UserId};
use courier_core::ports::{Clock, Posted, Push, SystemClock, Unwired};
use courier_core::protocol::{Command, ErrorCode, Request};
use courier_core::{Courier, Ports};
use courier_embedded::{Durability, FileBlobs, SqliteStore};
use serde_json::Value;

use crate::lambda::{self, WsEvent, WsResponse};

/// What a target runs on one input.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/corpus/`, `fuzz/artifacts/` and
/// `fuzz/regressions/` name their folders.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame", frame),
    ("lambda_event", lambda_event),
    ("stream_event", stream_event),
    ("sqs_event", sqs_event),
    ("token", token),
    ("jwks", jwks),
];

/// The chat of events/*.json, with alice (its admin) and bob in it.
const CHAT: &str = "01KB7J0V40M9S346Q3D25VT4F5";
/// alice's phone's connection in events/*.json.
const ALICE_CONNECTION: &str = "Xy1AbcdEFgoCE2Q=";
const BOB_CONNECTION: &str = "Xy1BbcdEFgoCE2Q=";
/// The secret events/authorizer.json's token is signed with.
const EVENTS_SECRET: &[u8] = b"courier-events-secret";
/// A JWKS with one key of each kind `Verifier::from_jwks` takes: `r1`
/// (RS256, made for the seeds in fuzz/corpus/token/, its private half not
/// kept) and `k1` (ES256, the key of courier-core's auth tests). The token
/// corpus holds a token signed with each, for carol.
const JWKS: &str = r#"{"keys":[
 {"kty":"RSA","kid":"r1","use":"sig","alg":"RS256","e":"AQAB","n":"rK1f7-x7L_WZPBRL-z6AZ5lxoyr2jl0NDLUOEiQhfSkpobdnjJgF54qQscrPhKg7kWBkdM3N4V56Buq_qnQvuBhJ0hT6xBrt49IoKGTYqm3Vx-GW0u4a2yRURJSJOprBDOzcq-M6nyatdnLtfJBoyqB2SRxDoaosIuW5XuJf3WSBj4mg_JOmOtNKrhxgCq19JbfS2KZ_43ZuIJb21teT9IeeVmOuY3ICiekKkaSWPzFhX2aK_S-RqV6pVE0Tk1H04W0EDQfbIGhhKrvF71aYzlMZhsaLl3XPEdDxk3Pop6w4alKoZV1joy3fCUhtVs9TUh6jE9QuBXI8SwNwO1_s8w"},
 {"kty":"EC","crv":"P-256","kid":"k1","use":"sig","x":"Fdpi5g4iWbnoZ7K96ptTgaBSOumF1pF-Al3DSxDdcac","y":"mXVf1N3NjSUjonaLa1NUD0Ibt0C3_ado9JnA_aHcddU"}
]}"#;
/// The seed tokens live until 2100: far past a deployed verifier's day, so
/// these accept any lifetime, to let a valid token reach the `sub` check.
const ANY_LIFETIME: Duration = Duration::from_secs(u64::MAX / 4);

/// A client frame: the one-pass parse, the refusals that echo what they can
/// (`unrouted`, `refusal`), then the command itself as alice on her phone.
pub fn frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let request = serde_json::from_str::<Request>(text);
    failure_frame(&dispatch::unrouted(text));
    failure_frame(&dispatch::refusal(text, ErrorCode::RateLimited, "rate limit reached: slow down"));
    // A frame that does not parse gets the FAILURE `unrouted` gave, from
    // the same parse, and nothing of the service runs.
    let Ok(request) = request else { return };
    let world = world();
    let caller = Caller {
        user: id(UserId::try_from("alice")),
        device: id(DeviceId::try_from("phone")),
        connection: id(ConnectionId::try_from(ALICE_CONNECTION)),
    };
    if let Some(answer) = world.run(dispatch::dispatch(&world.courier, &caller, text)) {
        response_frame(&answer);
    }
    world.restore_after(&request.command);
}

/// An API Gateway WebSocket event, as the route's function gets it: the
/// `$default` function's answer, then the event's own route; and, where the
/// input is an authorizer's REQUEST event, the $connect authorizer.
pub fn lambda_event(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<ApiGatewayCustomAuthorizerRequestTypeRequest>(data) {
        static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
            Verifier::hs256(EVENTS_SECRET).expect("a secret").with_max_lifetime(ANY_LIFETIME)
        });
        if let Ok(response) = lambda::authorizer(&VERIFIER, &request) {
            let _ = lambda::authorizer_context(&response);
        }
    }
    let Ok(mut event) = serde_json::from_slice::<WsEvent>(data) else { return };
    fresh_bucket(&mut event);
    ws_response(&lambda::default(event.clone()), true);
    let world = world();
    let command = event.body.as_deref().and_then(|body| serde_json::from_str::<Request>(body).ok());
    let route = event.request_context.route_key.clone().unwrap_or_default();
    let response = world.run(lambda::route(&world.courier, event));
    // $connect and $disconnect answer with a status alone.
    ws_response(&response, route != lambda::CONNECT && route != lambda::DISCONNECT);
    if let Some(request) = command {
        world.restore_after(&request.command);
    }
}

/// A DynamoDB Streams batch from the Messages table, through `fanout`.
pub fn stream_event(data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<StreamEvent>(data) else { return };
    let records = event.records.len();
    let world = world();
    let response = world.run(lambda::fanout(&world.courier, event, Duration::from_secs(60)));
    assert!(response.batch_item_failures.len() <= records, "more failures than records");
}

/// An SQS batch of jobs, through `deliver`.
pub fn sqs_event(data: &[u8]) {
    let Ok(event) = serde_json::from_slice::<SqsEvent>(data) else { return };
    let records = event.records.len();
    let world = world();
    let response = world.run(lambda::deliver(&world.courier, event));
    assert!(response.batch_item_failures.len() <= records, "more failures than records");
}

/// A token, as the $connect authorizer reads it from the query string: an
/// HS256 verifier and a JWKS one (RS256 and ES256 keys, issuer and audience
/// required).
pub fn token(data: &[u8]) {
    static HS256: LazyLock<Verifier> =
        LazyLock::new(|| Verifier::hs256(EVENTS_SECRET).expect("a secret").with_max_lifetime(ANY_LIFETIME));
    static SET: LazyLock<Verifier> = LazyLock::new(|| {
        Verifier::from_jwks(JWKS)
            .expect("the fuzz JWKS")
            .with_issuer("https://idp.example")
            .with_audience("courier")
            .with_max_lifetime(ANY_LIFETIME)
    });
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = HS256.verify(token);
    let _ = SET.verify(token);
}

/// A JWKS document, as a deployment configures it, then a token that names
/// each of its keys, so a key that loads is also used: the signature check
/// runs on whatever the document's numbers are.
pub fn jwks(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(verifier) = Verifier::from_jwks(text) else { return };
    let Ok(Value::Object(document)) = serde_json::from_str::<Value>(text) else { return };
    let Some(Value::Array(keys)) = document.get("keys") else { return };
    let b64 = |json: &str| base64_url(json.as_bytes());
    let claims = b64(r#"{"sub":"carol","exp":4102444800}"#);
    for key in keys {
        let Some(kid) = key.get("kid").and_then(Value::as_str) else { continue };
        for alg in ["RS256", "ES256"] {
            let header = serde_json::json!({ "alg": alg, "kid": kid }).to_string();
            // A signature of the right size for a 2048-bit RSA key or a P-256 one.
            let signature = base64_url(&[0x5a; 256][..if alg == "RS256" { 256 } else { 64 }]);
            let _ = verifier.verify(&format!("{}.{claims}.{signature}", b64(&header)));
        }
    }
}

/// Unpadded base64url, as JWTs carry their parts.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A frame refused before any service call: a JSON FAILURE response whose
/// action is at most 64 characters.
fn failure_frame(frame: &str) {
    let value = response_frame(frame);
    assert_eq!(value["status"], "FAILURE", "a refusal that is no FAILURE: {frame}");
    assert!(value["error"]["code"].is_string(), "a FAILURE without a code: {frame}");
}

/// Any answer to a client frame: a JSON response frame with a string action
/// of at most 64 characters.
fn response_frame(frame: &str) -> Value {
    let value: Value =
        serde_json::from_str(frame).unwrap_or_else(|e| panic!("an answer that is not JSON ({e})"));
    assert_eq!(value["type"], "response", "an answer that is no response: {frame}");
    let action = value["action"].as_str().unwrap_or_else(|| panic!("an answer without an action: {frame}"));
    assert!(action.chars().count() <= 64, "an answer that echoes a long action: {frame}");
    value
}

/// A route response: a status, and for the command and `$default` routes
/// either nothing (the answer went as a push) or one frame of text.
fn ws_response(response: &WsResponse, carries_frames: bool) {
    assert!((200..600).contains(&response.status_code), "status {}", response.status_code);
    match &response.body {
        None => {}
        Some(Body::Text(text)) if carries_frames => drop(response_frame(text)),
        Some(other) => panic!("an unexpected route response body: {other:?}"),
    }
}

/// Gives the event's connection a bucket of its own, so the rate limit
/// (a bucket per connection id, in the process) does not refuse every
/// input after the first fifty that share an id, and an input runs the same
/// way each time. Ids too long to extend keep theirs, and go on exercising
/// the refusal.
fn fresh_bucket(event: &mut WsEvent) {
    static EXECS: AtomicU64 = AtomicU64::new(0);
    if let Some(connection) = &mut event.request_context.connection_id
        && ConnectionId::try_from(connection.as_str()).is_ok()
        && connection.len() <= 40
    {
        connection.push_str(&format!("~{:x}", EXECS.fetch_add(1, Ordering::Relaxed)));
    }
}

fn id<T>(id: Result<T, String>) -> T {
    id.expect("a valid fixture id")
}

/// The process's Courier, its runtime and its fixture.
struct World {
    courier: Courier,
    runtime: tokio::runtime::Runtime,
    fixture: Chat,
}

fn world() -> &'static World {
    static WORLD: LazyLock<World> = LazyLock::new(World::open);
    &WORLD
}

/// A push port for a process with no clients: every frame is delivered.
struct NoPush;

#[async_trait]
impl Push for NoPush {
    async fn post(&self, _: &ConnectionId, _: &str) -> courier_core::Result<Posted> {
        Ok(Posted::Sent)
    }

    async fn close(&self, _: &ConnectionId) -> courier_core::Result<()> {
        Ok(())
    }
}

impl World {
    fn open() -> World {
        let dir = state_dir();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = SqliteStore::open(&dir.join("courier.db"), Durability::Process, clock.clone())
            .expect("the fuzz database");
        let blobs = FileBlobs::open(&dir.join("blobs"), "http://blobs.fuzz.invalid").expect("the blob dir");
        let ports: Ports =
            courier_embedded::ports(&store, &blobs, Arc::new(NoPush), Arc::new(Unwired), clock.clone());
        // The daily quotas would run out over a long run and turn every
        // send into the same refusal; everything else is as deployed.
        let limits = Limits {
            max_pending_bytes_per_day: 1 << 40,
            max_attachment_bytes_per_day: 1 << 40,
            ..Limits::default()
        };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a tokio runtime");
        let now = clock.now();
        let member = |user: &str| Member { user: id(UserId::try_from(user)), joined_at: now - DAY_MS };
        let fixture = Chat {
            id: id(ChatId::try_from(CHAT)),
            name: "lunch".into(),
            members: vec![member("alice"), member("bob")],
            admins: vec![id(UserId::try_from("alice"))],
            created_at: now - DAY_MS,
            version: 0,
            encrypted: false,
        };
        let world = World { courier: Courier::new(ports, limits), runtime, fixture };
        world.run(world.courier.ports().chats.create_chat(&world.fixture)).expect("the fixture chat");
        world.reconnect();
        world
    }

    fn run<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Puts back what a command may have taken from the fixture (a member,
    /// a device, the whole of alice's account), so that later inputs meet
    /// the same state.
    fn restore_after(&self, command: &Command) {
        match command {
            Command::ModifyChatParticipants(_) => self.restore_members(),
            Command::RemoveDevice(_) => self.reconnect(),
            Command::DeleteAccount(_) => {
                self.restore_members();
                self.reconnect();
            }
            _ => {}
        }
    }

    fn restore_members(&self) {
        let chats = &self.courier.ports().chats;
        if let Ok(Some(chat)) = self.run(chats.chat(&self.fixture.id))
            && chat.members != self.fixture.members
        {
            let restored = Chat { version: chat.version + 1, ..self.fixture.clone() };
            let _ = self.run(chats.update_chat(&restored, chat.version));
        }
    }

    /// Binds alice's phone and bob's laptop to their connections, past the
    /// device limit if the inputs registered others.
    fn reconnect(&self) {
        let devices = &self.courier.ports().devices;
        let now = self.courier.ports().clock.now();
        for (user, device, connection) in
            [("alice", "phone", ALICE_CONNECTION), ("bob", "laptop", BOB_CONNECTION)]
        {
            let (user, device) = (id(UserId::try_from(user)), id(DeviceId::try_from(device)));
            let connection = id(ConnectionId::try_from(connection));
            let _ = self.run(devices.connect(&user, &device, &connection, now, usize::MAX, 0));
        }
    }
}

/// A folder of this process's own under the temp dir, and those of fuzz
/// processes that have ended removed (libFuzzer ends a run with exit(), so
/// nothing is dropped: the next process cleans up).
fn state_dir() -> PathBuf {
    const PREFIX: &str = "courier-fuzz-";
    let temp = std::env::temp_dir();
    if Path::new("/proc/self").exists()
        && let Ok(entries) = std::fs::read_dir(&temp)
    {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = temp.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the fuzz state dir");
    dir
}
