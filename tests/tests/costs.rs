//! What each command costs on AWS. courier-local runs on its AWS backend (the
//! deployed adapters and handlers, on moto) with a `Meter` on every AWS
//! client; each command runs once, in a realistic state, and the requests it
//! causes (its Lambda's, and the stream's and the queue's consumers') must be
//! exactly the expected ones: a change that adds a call fails here, and one
//! that removes a call updates the numbers here and in docs/cost.md.
//!
//! Run with `-- --nocapture` to see the table that docs/cost.md is made of.
//! Always on the AWS backend, whatever COURIER_E2E_BACKEND says: it needs
//! moto (scripts/test installs it; COURIER_VENV points at it).
//!
//! Keys, ciphertexts and key shares are a real Olm + Megolm client's
//! (vodozemac, as in tests/tests/e2ee.rs), so the item sizes, and the units
//! they cost, are those of a deployed client.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use courier_core::ids::{DeviceId, UserId};
use courier_core::protocol::RecipientDevice;
use courier_core::service::devices_digest;
use courier_local::Backend;
use courier_testkit::{Meter, Usage, moto};
use courier_tests::client::Client;
use courier_tests::{Server, WAIT, next_of_type, put_upload, sha256_hex};
use serde_json::{Value, json};
use vodozemac::Curve25519PublicKey;
use vodozemac::megolm::{GroupSession, SessionConfig as MegolmConfig};
use vodozemac::olm::{Account, SessionConfig as OlmConfig};

/// API Gateway meters WebSocket messages in 32 KB steps.
const APIGW_CHUNK: usize = 32 * 1024;
/// Members of the group, each with one device online.
const GROUP: usize = 100;
/// How long a measurement waits for the requests it expects (the stream and
/// queue pollers run a little after the answer).
const SETTLE: Duration = Duration::from_secs(20);
/// After the expected requests arrived: how long nothing more may arrive.
const QUIET: Duration = Duration::from_millis(600);

/// A user id as an identity provider issues them (Cognito's `sub` is a UUID).
fn user(n: usize) -> String {
    format!("7c9e6679-7425-40de-944b-{n:012}")
}

const DEVICE: &str = "a41f0c29e7d3b85e";

/// A typical chat message: 100 characters.
fn text(n: usize) -> String {
    let head = format!("message {n}: ");
    format!("{head}{}", "x".repeat(100 - head.len()))
}

/// The API Gateway messages of one frame.
fn frames(len: usize) -> u64 {
    len.div_ceil(APIGW_CHUNK).max(1) as u64
}

/// What a client may send in one frame (PROTOCOL.md: 32 KiB).
const MAX_FRAME: usize = 32 * 1024;
/// The frames a Megolm key share to 99 devices takes: each device's Olm
/// pre-key message is about 0.8 KB, so 99 of them do not fit in one.
const KEY_SHARE_FRAMES: usize = 3;

/// A device's first `uploadKeys` as the Olm client of tests/tests/e2ee.rs
/// makes it: the Curve25519 identity key, the fallback key as the signed
/// prekey (its signature `ED25519KEY.SIGNATURE`), `one_time` one-time
/// prekeys. Marks them published, as the client does once they are stored.
fn first_keys(account: &mut Account, one_time: usize) -> Value {
    let identity = account.curve25519_key().to_base64();
    account.generate_fallback_key();
    let (key_id, public) = account.fallback_key().into_iter().next().expect("a fallback key");
    let public = public.to_base64();
    let signature = account.sign(format!("courier-signed-prekey\n{identity}\n{public}"));
    account.generate_one_time_keys(one_time);
    let one_time: Vec<Value> = account
        .one_time_keys()
        .into_iter()
        .map(|(id, key)| json!({ "keyId": id.to_base64(), "publicKey": key.to_base64() }))
        .collect();
    account.mark_keys_as_published();
    json!({
        "identityKey": identity,
        "signedPreKey": {
            "keyId": key_id.to_base64(),
            "publicKey": public,
            "signature": format!("{}.{}", account.ed25519_key().to_base64(), signature.to_base64()),
        },
        "oneTimePreKeys": one_time,
    })
}

/// The `message` of an encrypted chat message: message `n`'s text as
/// Megolm ciphertext, with the session that made it (tests/tests/e2ee.rs).
fn sealed(session: &mut GroupSession, n: usize) -> String {
    let ciphertext = session.encrypt(text(n)).to_base64();
    json!({ "sessionId": session.session_id(), "ciphertext": ciphertext }).to_string()
}

/// A Megolm session key shared with one device: the room key in an Olm
/// pre-key message, as the first message of a new Olm session on one of
/// the device's one-time prekeys is.
fn key_share(sender: &Account, recipient: &mut Account, chat: &str, session: &GroupSession) -> String {
    recipient.generate_one_time_keys(1);
    let one_time: Curve25519PublicKey =
        *recipient.one_time_keys().values().next().expect("a one-time prekey");
    recipient.mark_keys_as_published();
    let mut olm = sender
        .create_outbound_session(OlmConfig::version_1(), recipient.curve25519_key(), one_time)
        .expect("an Olm session");
    let room_key = json!({
        "chatId": chat,
        "sessionId": session.session_id(),
        "sessionKey": session.session_key().to_base64(),
    });
    let message = olm.encrypt(room_key.to_string()).expect("Olm encrypt");
    serde_json::to_string(&message).expect("json")
}

/// The devices digest of an encrypted send to these (userId, account) devices.
fn digest<'a>(devices: impl IntoIterator<Item = (&'a String, &'a Account)>) -> String {
    let devices: Vec<RecipientDevice> = devices
        .into_iter()
        .map(|(user, account)| RecipientDevice {
            user_id: UserId::try_from(user.as_str()).expect("a userId"),
            device_id: DeviceId::try_from(DEVICE).expect("a deviceId"),
            identity_key: account.curve25519_key().to_base64(),
        })
        .collect();
    devices_digest(&devices)
}

/// What one command is expected to cause, besides its own frames.
struct Expect {
    /// Requests by `Service.Operation`. SQS.ReceiveMessage is a ceiling
    /// (the queue's poller may take two jobs in one receive), and empty
    /// receives are not counted.
    requests: &'static [(&'static str, u64)],
    read_units: f64,
    write_units: f64,
    /// API Gateway messages from PostToConnection.
    pushes: u64,
}

/// One measured command: its usage and the frames it cost at the gateway.
struct Measured {
    name: &'static str,
    usage: Usage,
    /// Inbound frames plus route responses, in API Gateway messages.
    frames: u64,
    /// Lambda invocations: the route's (and the authorizer's on $connect),
    /// fanout once per stored message, deliver once per non-empty receive.
    lambdas: u64,
    /// Delayed safety-net checks the run happened to need (counted apart).
    raced: u64,
}

/// The usage without what no command causes: empty receives.
fn billed(mut usage: Usage) -> Usage {
    usage.requests.retain(|op, _| !op.ends_with("(empty)"));
    usage.sqs_empty_receives = 0;
    usage
}

fn count(usage: &Usage, op: &str) -> u64 {
    usage.requests.get(op).copied().unwrap_or(0)
}

/// Removes the safety net's delayed check, should the Messages stream have
/// reached fanout before the send path marked the message fanned out (the
/// race is real, and rare: it costs a delayed SQS job and one more read).
fn without_race(mut usage: Usage) -> (Usage, u64) {
    let raced = usage.sqs_delayed_sends;
    if raced == 0 {
        return (usage, 0);
    }
    for op in ["SQS.SendMessage", "SQS.ReceiveMessage", "SQS.DeleteMessage", "DynamoDB.GetItem"] {
        if let Some(n) = usage.requests.get_mut(op) {
            *n -= raced.min(*n);
        }
    }
    usage.requests.retain(|_, n| *n > 0);
    usage.sqs_requests = usage.sqs_requests.saturating_sub(3 * raced);
    usage.sqs_delayed_sends = 0;
    if let Some(units) = usage.read_units.get_mut("Messages") {
        *units -= raced as f64;
    }
    usage.read_units.retain(|_, u| *u > 0.0);
    (usage, raced)
}

/// Whether every expected request has arrived and every job sent is done.
fn arrived(usage: &Usage, expect: &Expect) -> bool {
    let jobs_done = count(usage, "SQS.DeleteMessage") >= count(usage, "SQS.SendMessage");
    jobs_done
        && expect.requests.iter().all(|(op, n)| match *op {
            "SQS.ReceiveMessage" => count(usage, op) >= 1,
            _ => count(usage, op) >= *n,
        })
}

/// Waits until the expected requests arrived and then nothing for [`QUIET`],
/// takes the usage and checks it against `expect`, noting any difference in
/// `mismatches`. `lambdas` are the invocations besides deliver's: the
/// route's, the authorizer's, fanout's for a stored message.
async fn measure(
    meter: &Meter,
    mismatches: &mut Vec<String>,
    name: &'static str,
    frames: u64,
    lambdas: u64,
    expect: &Expect,
) -> Measured {
    let started = Instant::now();
    let mut seen = billed(meter.peek());
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = billed(meter.peek());
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
            continue;
        }
        let (settled, _) = without_race(now.clone());
        let race_open = now.sqs_delayed_sends > 0 && !arrived(&now, expect);
        if (arrived(&settled, expect) && !race_open && quiet_since.elapsed() >= QUIET)
            || started.elapsed() > SETTLE
        {
            break;
        }
    }
    let (usage, raced) = without_race(billed(meter.take()));

    let mut expected: BTreeMap<String, u64> =
        expect.requests.iter().map(|(op, n)| ((*op).to_owned(), *n)).collect();
    // The queue's poller takes one job or several per receive.
    if let (Some(ceiling), Some(got)) =
        (expected.get("SQS.ReceiveMessage").copied(), usage.requests.get("SQS.ReceiveMessage").copied())
        && (1..=ceiling).contains(&got)
    {
        expected.insert("SQS.ReceiveMessage".into(), got);
    }
    let mut wrong = Vec::new();
    if usage.requests != expected {
        wrong.push(format!("requests {:?}, expected {expected:?}", usage.requests));
    }
    // When the stream won the race, fanout's first read found the row before
    // the mark shrank it: that read may cost a unit more per 4 KB of it.
    let read_units = match usage.read_units_total() {
        got if raced > 0 && got > expect.read_units && got - expect.read_units <= 2.0 * raced as f64 => {
            expect.read_units
        }
        got => got,
    };
    let checks = [
        ("read units", read_units, expect.read_units),
        ("write units", usage.write_units_total(), expect.write_units),
        ("push messages", usage.push_messages as f64, expect.pushes as f64),
        ("items of a guessed size", usage.unsized_items as f64, 0.0),
    ];
    for (what, got, want) in checks {
        if got != want {
            wrong.push(format!("{what} {got}, expected {want}"));
        }
    }
    if !wrong.is_empty() {
        mismatches.push(format!("{name}: {}\n    ({usage}; delayed checks {raced})", wrong.join("; ")));
    }
    let lambdas = lambdas + count(&usage, "SQS.ReceiveMessage");
    Measured { name, usage, frames, lambdas, raced }
}

/// Waits until every job sent has run (the safety net's delayed checks
/// too) and the meter has been quiet for a while: what set the state up is
/// no command's. Then forgets what it counted.
async fn settle(meter: &Meter) {
    let mut seen = billed(meter.peek());
    let started = Instant::now();
    loop {
        tokio::time::sleep(QUIET).await;
        let now = billed(meter.peek());
        let jobs_done = count(&now, "SQS.DeleteMessage") >= count(&now, "SQS.SendMessage");
        if (now == seen && jobs_done && started.elapsed() >= Duration::from_secs(1))
            || started.elapsed() > 3 * SETTLE
        {
            break;
        }
        seen = now;
    }
    meter.take();
}

/// Sends one command and returns its `data`, with the API Gateway messages
/// of the frame in and the route response out.
async fn command(client: &Client, action: &str, fields: Value) -> (Value, u64) {
    let mut inbound = fields.clone();
    inbound["action"] = json!(action);
    inbound["requestId"] = json!("r1");
    let response = client.request(action, fields).await.unwrap_or_else(|e| panic!("{action}: {e}"));
    assert_eq!(response["status"], "SUCCESS", "{action}: {response}");
    let messages = frames(inbound.to_string().len()) + frames(response.to_string().len());
    (response["data"].clone(), messages)
}

/// The table docs/cost.md shows.
fn table(rows: &[Measured]) -> String {
    let mut out = String::new();
    out.push_str("| command | DynamoDB requests | RRU | WRU | SQS requests | PostToConnection | API Gateway messages | Lambda invocations |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let u = &row.usage;
        let ops = |service: &str| {
            u.requests_to(service).iter().map(|(op, n)| format!("{op} {n}")).collect::<Vec<_>>().join(", ")
        };
        let mut dynamodb = ops("DynamoDB");
        if dynamodb.is_empty() {
            dynamodb = "-".into();
        }
        let sqs = ops("SQS");
        let posts = count(u, "ApiGatewayManagementApi.PostToConnection");
        let s3 = ops("S3");
        let _ = writeln!(
            out,
            "| {} | {}{} | {} | {} | {}{} | {} | {} | {} |",
            row.name,
            dynamodb,
            if s3.is_empty() { String::new() } else { format!("; S3: {s3}") },
            u.read_units_total(),
            u.write_units_total(),
            u.sqs_requests,
            if sqs.is_empty() { String::new() } else { format!(" ({sqs})") },
            posts,
            row.frames + u.push_messages,
            row.lambdas,
        );
    }
    out.push_str("\nUnits by table:\n\n");
    for row in rows {
        let units = |by: &BTreeMap<String, f64>| {
            by.iter().map(|(t, u)| format!("{t} {u}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            out,
            "- {}: read {}; write {}",
            row.name,
            units(&row.usage.read_units),
            units(&row.usage.write_units)
        );
    }
    out
}

#[tokio::test]
async fn each_command_costs_what_docs_cost_md_says() {
    let moto = moto::shared().await;
    let meter = Meter::new();
    let prefix = format!("cost{:x}", std::process::id());
    let server = Server::start_with(|config| {
        config.backend = Backend::Aws { prefix, sdk: Some(Box::new(moto.sdk_config())) };
        config.watcher = Some(std::sync::Arc::new(meter.clone()));
        // Fifty sends in a row is a test, not abuse.
        config.rate_limit.capacity = 1000.0;
    })
    .await;
    // Provisioning, the first clean-up and the pollers' first calls are no
    // command's: wait until the meter has been quiet for a while (a fixed
    // second was too short on a busy machine).
    settle(&meter).await;
    let mut rows = Vec::new();
    let mut mismatches = Vec::new();
    let (alice, bob) = (user(1), user(2));

    // ---- connections: a user's first device, then a known device coming back
    let mut a = server.connect(&alice, DEVICE).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "$connect (a user's first device)",
            0,
            2,
            // The Queries: the live devices, the pending inbox to claim, and
            // the inbox and group positions a device of this id may have left.
            &Expect {
                requests: &[
                    ("DynamoDB.GetItem", 3),
                    ("DynamoDB.PutItem", 1),
                    ("DynamoDB.Query", 4),
                    ("DynamoDB.TransactWriteItems", 1),
                ],
                read_units: 7.0,
                write_units: 5.0,
                pushes: 0,
            },
        )
        .await,
    );
    let b = server.connect(&bob, DEVICE).await;
    meter.take();
    b.close();
    drop(b);
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "$disconnect",
            0,
            1,
            &Expect {
                requests: &[("DynamoDB.GetItem", 1), ("DynamoDB.UpdateItem", 1)],
                read_units: 1.0,
                write_units: 1.0,
                pushes: 0,
            },
        )
        .await,
    );
    let mut b = server.connect(&bob, DEVICE).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "$connect (known device)",
            0,
            2,
            &Expect {
                requests: &[("DynamoDB.GetItem", 1), ("DynamoDB.PutItem", 1), ("DynamoDB.UpdateItem", 1)],
                read_units: 1.0,
                write_units: 2.0,
                pushes: 0,
            },
        )
        .await,
    );

    // ---- a 1:1 chat, both users with one device online
    let (data, f) = command(&a, "createChat", json!({ "participants": [bob], "name": "lunch" })).await;
    let chat = data["chatId"].as_str().unwrap().to_owned();
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "createChat (1:1)",
            f,
            1,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 2),
                    ("DynamoDB.BatchWriteItem", 1),
                    ("DynamoDB.PutItem", 1),
                    ("DynamoDB.Query", 2),
                ],
                read_units: 2.0,
                write_units: 5.0,
                pushes: 2,
            },
        )
        .await,
    );
    next_of_type(&mut a, "chatUpdate", WAIT).await.expect("alice's chatUpdate");
    next_of_type(&mut b, "chatUpdate", WAIT).await.expect("bob's chatUpdate");

    let send = |n: usize, chat: &str| json!({ "chatId": chat, "message": text(n), "clientMessageId": format!("3f2b8c1e-5a7d-4e9f-b6c0-{n:012}") });
    let (_, f) = command(&a, "sendMessage", send(0, &chat)).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (1:1)",
            f,
            2,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.BatchWriteItem", 1),
                    ("DynamoDB.GetItem", 2),
                    ("DynamoDB.Query", 2),
                    ("DynamoDB.PutItem", 2),
                    ("DynamoDB.UpdateItem", 1),
                ],
                read_units: 4.0,
                write_units: 4.0,
                pushes: 1,
            },
        )
        .await,
    );
    let mut ids = vec![b.next_message(WAIT).await.expect("bob's push").message_id.to_string()];

    // bob's inbox fills to a page: 49 more (not measured one by one).
    for n in 1..50 {
        command(&a, "sendMessage", send(n, &chat)).await;
        ids.push(b.next_message(WAIT).await.expect("bob's push").message_id.to_string());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    meter.take();

    let (data, f) = command(&b, "sync", json!({ "limit": 50 })).await;
    assert_eq!(data["messages"].as_array().map(Vec::len), Some(50));
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sync (a page of 50)",
            f,
            1,
            // The device's group positions (none), then its inbox rows.
            &Expect { requests: &[("DynamoDB.Query", 2)], read_units: 7.0, write_units: 0.0, pushes: 0 },
        )
        .await,
    );
    let (data, f) = command(&b, "ack", json!({ "messageIds": ids })).await;
    assert_eq!(data["acked"], 50);
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "ack (50 messages, 1:1)",
            f,
            1,
            // The device's group positions (none: no pointer lookups), the
            // deletes, then the delivered marker: moved once for the chat,
            // and pushed to the chat's other devices (the chat read for its
            // participants, their devices looked up).
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.DeleteItem", 50),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 3),
                    ("DynamoDB.UpdateItem", 1),
                ],
                read_units: 4.0,
                write_units: 51.0,
                pushes: 1,
            },
        )
        .await,
    );

    let (_, f) = command(&a, "listChats", json!({})).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "listChats (1 chat)",
            f,
            1,
            &Expect {
                requests: &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.Query", 1)],
                read_units: 1.5,
                write_units: 0.0,
                pushes: 0,
            },
        )
        .await,
    );

    // ---- media: create, upload (the client's PUT to S3), send, fetch
    let photo = vec![7u8; 200 * 1024];
    let (data, f) = command(
        &a,
        "createAttachment",
        json!({ "contentType": "image/jpeg", "size": photo.len(), "sha256": sha256_hex(&photo) }),
    )
    .await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "createAttachment (the day's first)",
            f,
            1,
            // The day's first: the quota's update of today's use fails its
            // condition (no use yet today), then starts the day. Later ones
            // of the day make one UpdateItem. The row costs 2 WRU: its
            // `byUploader` index entry (deleteAccount finds it there).
            &Expect {
                requests: &[("DynamoDB.PutItem", 1), ("DynamoDB.UpdateItem", 2)],
                read_units: 0.0,
                write_units: 4.0,
                pushes: 0,
            },
        )
        .await,
    );
    let created: courier_core::protocol::AttachmentCreated = serde_json::from_value(data).unwrap();
    // The client's PUT goes to S3 itself: no request of ours, but a PUT on the bill.
    assert_eq!(put_upload(&created, &photo).await.status, 200);
    let attachment = created.attachment_id.to_string();
    meter.take();
    let mut with = send(50, &chat);
    with["attachments"] = json!([attachment]);
    let (_, f) = command(&a, "sendMessage", with).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (1:1, one attachment)",
            f,
            2,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.BatchWriteItem", 1),
                    ("DynamoDB.GetItem", 3),
                    ("DynamoDB.Query", 2),
                    ("DynamoDB.PutItem", 2),
                    ("DynamoDB.UpdateItem", 2),
                    ("S3.HeadObject", 1),
                ],
                read_units: 5.0,
                write_units: 5.0,
                pushes: 1,
            },
        )
        .await,
    );
    b.next_message(WAIT).await.expect("bob's push");
    let (_, f) = command(&b, "getAttachment", json!({ "attachmentId": attachment })).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "getAttachment (a recipient)",
            f,
            1,
            &Expect {
                requests: &[("DynamoDB.GetItem", 3), ("S3.HeadObject", 1)],
                read_units: 3.0,
                write_units: 0.0,
                pushes: 0,
            },
        )
        .await,
    );

    // ---- receipts and typing in the 1:1 chat: bob reads what he has acked
    // (his ack moved the delivered marker first, as a client that acks on
    // arrival does), alice starts typing.
    let (_, f) = command(&b, "markRead", json!({ "chatId": chat, "upTo": ids[49] })).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "markRead (1:1)",
            f,
            1,
            // The chat, the markers (delivered is ahead already: the first
            // update fails its condition and costs its unit, the second moves
            // read and the private read), the participants' devices, one push.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 2),
                    ("DynamoDB.UpdateItem", 2),
                ],
                read_units: 3.0,
                write_units: 2.0,
                pushes: 1,
            },
        )
        .await,
    );
    let (_, f) = command(&a, "typing", json!({ "chatId": chat, "state": "start" })).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "typing (1:1)",
            f,
            1,
            // The chat, the other participant's devices, one push; nothing stored.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 1),
                ],
                read_units: 2.0,
                write_units: 0.0,
                pushes: 1,
            },
        )
        .await,
    );

    // ---- the key directory and an encrypted 1:1 chat. alice publishes her
    // keys while in one chat (with bob), who is told by a deviceList push.
    let mut alice_olm = Account::new();
    let (data, f) = command(&a, "uploadKeys", first_keys(&mut alice_olm, 100)).await;
    assert_eq!(data["oneTimePreKeys"], 100);
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "uploadKeys (a device's first, 100 one-time prekeys)",
            f,
            1,
            // The store's share (docs/cost.md: keyIds looked up, the bundle read,
            // two transactions, the count read back), then the deviceList push:
            // alice's chats (the index, then the rows), her ready devices (Devices
            // and Keys), the connected devices of everyone in them.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 2),
                    ("DynamoDB.BatchGetItem", 2),
                    ("DynamoDB.GetItem", 2),
                    ("DynamoDB.Query", 5),
                    ("DynamoDB.TransactWriteItems", 2),
                ],
                read_units: 107.5,
                write_units: 204.0,
                pushes: 2,
            },
        )
        .await,
    );
    // bob publishes too, from his phone and from a laptop; alice opens an
    // encrypted chat with him and asks for his keys, as a client does
    // before its first message to a device.
    let mut bob_olm = Account::new();
    command(&b, "uploadKeys", first_keys(&mut bob_olm, 100)).await;
    let laptop = "b7d2e90c14f3a658";
    let bob_laptop = server.connect(&bob, laptop).await;
    command(&bob_laptop, "uploadKeys", first_keys(&mut Account::new(), 100)).await;
    let (data, _) =
        command(&a, "createChat", json!({ "participants": [bob], "name": "sealed", "encrypted": true }))
            .await;
    let secret = data["chatId"].as_str().unwrap().to_owned();
    settle(&meter).await;
    let (data, f) = command(&a, "getKeys", json!({ "userId": bob })).await;
    assert_eq!(data["devices"].as_array().map(Vec::len), Some(2));
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "getKeys (a user with 2 ready devices)",
            f,
            1,
            // alice's chats (who may see whose keys), bob's ready devices, the
            // three claim counters in one transaction, and per device a claim:
            // the count taken down, ten candidates read, one deleted.
            &Expect {
                requests: &[
                    ("DynamoDB.BatchGetItem", 1),
                    ("DynamoDB.DeleteItem", 2),
                    ("DynamoDB.Query", 5),
                    ("DynamoDB.TransactWriteItems", 1),
                    ("DynamoDB.UpdateItem", 2),
                ],
                read_units: 6.5,
                write_units: 10.0,
                pushes: 0,
            },
        )
        .await,
    );
    let (data, f) = command(&a, "listDevices", json!({ "userId": bob })).await;
    assert_eq!(data["devices"].as_array().map(Vec::len), Some(2));
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "listDevices (a user with 2 ready devices)",
            f,
            1,
            // alice's chats, bob's ready devices.
            &Expect {
                requests: &[("DynamoDB.BatchGetItem", 1), ("DynamoDB.Query", 3)],
                read_units: 4.5,
                write_units: 0.0,
                pushes: 0,
            },
        )
        .await,
    );
    // Back to one device each, as the rest of the table has it.
    command(&b, "removeDevice", json!({ "deviceId": laptop })).await;
    drop(bob_laptop);
    settle(&meter).await;
    // alice's Megolm session for the chat: its key to bob's phone over Olm,
    // then a message.
    let mut alice_megolm = GroupSession::new(MegolmConfig::version_1());
    let body = key_share(&alice_olm, &mut bob_olm, &secret, &alice_megolm);
    let share = |to: Vec<Value>, n: usize| json!({ "messages": to, "clientMessageId": format!("9d1e4c7a-2b6f-4a8e-b3d5-{n:012}") });
    let (_, f) = command(
        &a,
        "sendToDevices",
        share(vec![json!({ "userId": bob, "deviceId": DEVICE, "body": body })], 0),
    )
    .await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendToDevices (a Megolm key to 1 device)",
            f,
            1,
            // alice's chats, bob's ready devices, then the store's share: the
            // claim of the clientMessageId holding the batch, the inbox row, the
            // claim let go of the batch. The body (an Olm pre-key message, 0.8 KB)
            // makes the inbox row just over 1 KB: 2 WRU, and as much for the
            // claim's put and for its update.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.BatchGetItem", 1),
                    ("DynamoDB.BatchWriteItem", 1),
                    ("DynamoDB.PutItem", 1),
                    ("DynamoDB.Query", 3),
                    ("DynamoDB.UpdateItem", 1),
                ],
                read_units: 4.5,
                write_units: 6.0,
                pushes: 1,
            },
        )
        .await,
    );
    let mut m = send(60, &secret);
    m["message"] = json!(sealed(&mut alice_megolm, 60));
    m["devices"] = json!(digest([(&bob, &bob_olm)]));
    let (_, f) = command(&a, "sendMessage", m).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (encrypted 1:1)",
            f,
            2,
            // As in a plain chat, with the participants' key bundles read too
            // (the device check needs their identity keys).
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 1),
                    ("DynamoDB.BatchWriteItem", 1),
                    ("DynamoDB.GetItem", 2),
                    ("DynamoDB.Query", 4),
                    ("DynamoDB.PutItem", 2),
                    ("DynamoDB.UpdateItem", 1),
                ],
                read_units: 6.0,
                write_units: 4.0,
                pushes: 1,
            },
        )
        .await,
    );

    // ---- a group of 100, each member with one device online
    let members: Vec<String> = (100..100 + GROUP).map(user).collect();
    let mut clients = Vec::with_capacity(GROUP);
    for m in &members {
        clients.push(server.connect(m, DEVICE).await);
    }
    // Each member's device is ready (keys published before the group
    // exists, so no one else is told yet; no one-time prekeys, which no
    // command below reads).
    let mut accounts: Vec<Account> = Vec::with_capacity(GROUP);
    for c in &clients {
        let mut account = Account::new();
        command(c, "uploadKeys", first_keys(&mut account, 0)).await;
        accounts.push(account);
    }
    settle(&meter).await;
    let others: Vec<&String> = members[1..].iter().collect();
    let (data, f) =
        command(&clients[0], "createChat", json!({ "participants": others, "name": "everyone" })).await;
    let group = data["chatId"].as_str().unwrap().to_owned();
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "createChat (100 members)",
            f,
            1,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 100),
                    ("DynamoDB.BatchWriteItem", 4),
                    ("DynamoDB.PutItem", 1),
                    ("DynamoDB.Query", 100),
                ],
                read_units: 100.0,
                write_units: 207.0,
                pushes: 100,
            },
        )
        .await,
    );
    for c in clients.iter_mut() {
        next_of_type(c, "chatUpdate", WAIT).await.expect("every member's chatUpdate");
    }
    // The first message of a group makes each recipient device's position
    // in the chat (shared/aws/src/dynamo/shared.rs); the next ones find
    // them. Either way the message is stored once, with a pointer (1 WRU),
    // instead of 99 inbox rows, for two reads of the 99 positions: at the
    // send (eventually consistent: 49.5 RRU), and by the two delivery jobs
    // to learn who still holds it (consistent: 99 RRU, as the inbox rows were).
    let (first, f) = command(&clients[0], "sendMessage", send(999, &group)).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (a 100-member group's first)",
            f,
            2,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.BatchGetItem", 3),
                    ("DynamoDB.GetItem", 4),
                    ("DynamoDB.Query", 100),
                    ("DynamoDB.PutItem", 3),
                    ("DynamoDB.UpdateItem", 100),
                    ("SQS.DeleteMessage", 2),
                    ("SQS.ReceiveMessage", 2),
                    ("SQS.SendMessage", 2),
                ],
                read_units: 254.5,
                write_units: 113.0,
                pushes: 99,
            },
        )
        .await,
    );
    let mut group_ids = vec![first["messageId"].as_str().unwrap().to_owned()];
    for c in clients.iter_mut().skip(1) {
        c.next_message(WAIT).await.expect("every other member's push");
    }
    settle(&meter).await;
    let (_, f) = command(&clients[0], "sendMessage", send(1000, &group)).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (100-member group)",
            f,
            2,
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.BatchGetItem", 3),
                    ("DynamoDB.GetItem", 4),
                    ("DynamoDB.Query", 100),
                    ("DynamoDB.PutItem", 3),
                    ("DynamoDB.UpdateItem", 1),
                    ("SQS.DeleteMessage", 2),
                    ("SQS.ReceiveMessage", 2),
                    ("SQS.SendMessage", 2),
                ],
                read_units: 254.5,
                write_units: 14.0,
                pushes: 99,
            },
        )
        .await,
    );
    for (i, c) in clients.iter_mut().enumerate().skip(1) {
        let pushed = c.next_message(WAIT).await.expect("every other member's push");
        if i == 1 {
            group_ids.push(pushed.message_id.to_string());
        }
    }

    // ---- receipts and typing in the group. Every member's inbox fills to
    // 50 of its messages (not measured), member 1 acks them and reads.
    for n in 2..50 {
        let (data, _) = command(&clients[0], "sendMessage", send(1000 + n, &group)).await;
        group_ids.push(data["messageId"].as_str().unwrap().to_owned());
    }
    for c in clients.iter_mut().skip(1) {
        for _ in 2..50 {
            c.next_message(WAIT).await.expect("every other member's push");
        }
    }
    settle(&meter).await;
    let (data, f) = command(&clients[1], "ack", json!({ "messageIds": group_ids })).await;
    assert_eq!(data["acked"], 50);
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "ack (50 messages, 100-member group)",
            f,
            1,
            // The device's positions (a Query), the 50 ids' pointers (an
            // eventually consistent BatchGetItem, 25 RRU), one position update
            // (2 WRU) instead of 50 inbox deletes. As in the 1:1 chat, the
            // marker moves once for the 50 and is pushed to the 99 others
            // (the 6.5 KB chat row, 100 device lookups).
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.BatchGetItem", 1),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 101),
                    ("DynamoDB.UpdateItem", 2),
                ],
                read_units: 128.0,
                write_units: 3.0,
                pushes: 99,
            },
        )
        .await,
    );
    let newest = group_ids.last().unwrap().clone();
    let (_, f) = command(&clients[1], "markRead", json!({ "chatId": group, "upTo": newest })).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "markRead (100-member group)",
            f,
            1,
            // As in the 1:1 chat, to 99 other devices.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 100),
                    ("DynamoDB.UpdateItem", 2),
                ],
                read_units: 102.0,
                write_units: 2.0,
                pushes: 99,
            },
        )
        .await,
    );
    // Everyone else reads too, so that each of the 100 has markers (one
    // at a time: each makes 100 reads and 99 pushes, and moto is slow).
    for (_, c) in clients.iter().enumerate().filter(|(i, _)| *i != 1) {
        command(c, "markRead", json!({ "chatId": group, "upTo": newest })).await;
    }
    settle(&meter).await;
    let (data, f) = command(&clients[1], "getReceipts", json!({ "chatId": group })).await;
    assert_eq!(data["receipts"].as_array().map(Vec::len), Some(GROUP));
    assert!(data["receipts"].as_array().unwrap().iter().all(|r| r["read"] == json!(newest)));
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "getReceipts (100-member group)",
            f,
            1,
            // The chat, then 100 receipt rows in one Query (18 KB).
            &Expect {
                requests: &[("DynamoDB.GetItem", 1), ("DynamoDB.Query", 1)],
                read_units: 7.0,
                write_units: 0.0,
                pushes: 0,
            },
        )
        .await,
    );
    let (_, f) = command(&clients[1], "typing", json!({ "chatId": group, "state": "start" })).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "typing (100-member group)",
            f,
            1,
            // The chat, the 99 others' devices, 99 pushes.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.GetItem", 1),
                    ("DynamoDB.Query", 99),
                ],
                read_units: 101.0,
                write_units: 0.0,
                pushes: 99,
            },
        )
        .await,
    );

    // ---- an encrypted group of the same 100: the sender's Megolm key to
    // the 99 other devices (each an Olm pre-key message, as when it is first
    // shared), as many to a frame as fit in 32 KiB, then a message.
    let (data, _) = command(
        &clients[0],
        "createChat",
        json!({ "participants": others, "name": "everyone, sealed", "encrypted": true }),
    )
    .await;
    let sealed_group = data["chatId"].as_str().unwrap().to_owned();
    settle(&meter).await;
    let mut megolm = GroupSession::new(MegolmConfig::version_1());
    let (sender, recipients) = accounts.split_at_mut(1);
    let shares: Vec<Value> = members[1..]
        .iter()
        .zip(recipients.iter_mut())
        .map(|(member, account)| {
            let body = key_share(&sender[0], account, &sealed_group, &megolm);
            json!({ "userId": member, "deviceId": DEVICE, "body": body })
        })
        .collect();
    let mut batches: Vec<Vec<Value>> = vec![Vec::new()];
    for item in shares {
        let mut with = batches.last().unwrap().clone();
        with.push(item.clone());
        let mut frame = share(with, 1);
        frame["action"] = json!("sendToDevices");
        frame["requestId"] = json!("r1000");
        if frame.to_string().len() > MAX_FRAME {
            batches.push(vec![item]);
        } else {
            batches.last_mut().unwrap().push(item);
        }
    }
    println!(
        "a key share: {} bytes a device; 99 devices in {} frames",
        batches[0][0]["body"].as_str().unwrap().len(),
        batches.len()
    );
    assert_eq!(batches.len(), KEY_SHARE_FRAMES, "frames of a key share to 99 devices");
    let mut f = 0;
    for (n, batch) in batches.into_iter().enumerate() {
        f += command(&clients[0], "sendToDevices", share(batch, 100 + n)).await.1;
    }
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendToDevices (a Megolm key to 99 devices, in 3 frames)",
            f,
            KEY_SHARE_FRAMES as u64,
            // Per frame of 33: the sender's chats (two 100-member chats, 4 RRU),
            // the 33 users' ready devices (66 Queries), a claim holding the
            // 33 bodies (about 35 KB: 35 WRU to put, as much to let go of them),
            // 33 inbox rows of 2 WRU; then 33 pushes.
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.BatchGetItem", 3),
                    ("DynamoDB.BatchWriteItem", 6),
                    ("DynamoDB.PutItem", 3),
                    ("DynamoDB.Query", 201),
                    ("DynamoDB.UpdateItem", 3),
                ],
                read_units: 211.5,
                write_units: 406.0,
                pushes: 99,
            },
        )
        .await,
    );
    // Its first message makes the positions (as in the plain group): not measured.
    let sealed_send = |n: usize, megolm: &mut GroupSession| {
        let mut m = send(n, &sealed_group);
        m["message"] = json!(sealed(megolm, n));
        m["devices"] = json!(digest(members[1..].iter().zip(&accounts[1..])));
        m
    };
    command(&clients[0], "sendMessage", sealed_send(1999, &mut megolm)).await;
    for c in clients.iter_mut().skip(1) {
        c.next_message(WAIT).await.expect("every other member's push");
    }
    settle(&meter).await;
    let (_, f) = command(&clients[0], "sendMessage", sealed_send(2000, &mut megolm)).await;
    rows.push(
        measure(
            &meter,
            &mut mismatches,
            "sendMessage (encrypted 100-member group)",
            f,
            2,
            // As in the plain group, with 100 key bundles read (100 Queries on Keys).
            &Expect {
                requests: &[
                    ("ApiGatewayManagementApi.PostToConnection", 99),
                    ("DynamoDB.BatchGetItem", 3),
                    ("DynamoDB.GetItem", 4),
                    ("DynamoDB.Query", 200),
                    ("DynamoDB.PutItem", 3),
                    ("DynamoDB.UpdateItem", 1),
                    ("SQS.DeleteMessage", 2),
                    ("SQS.ReceiveMessage", 2),
                    ("SQS.SendMessage", 2),
                ],
                read_units: 354.5,
                write_units: 16.0,
                pushes: 99,
            },
        )
        .await,
    );
    for c in clients.iter_mut().skip(1) {
        c.next_message(WAIT).await.expect("every other member's push");
    }

    let raced: u64 = rows.iter().map(|r| r.raced).sum();
    println!("\n{}", table(&rows));
    if raced > 0 {
        println!("(the stream reached fanout before the send path's mark {raced} time(s); counted apart)");
    }
    server.stop().await;
    assert!(
        mismatches.is_empty(),
        "counts changed; update this test and docs/cost.md:\n{}",
        mismatches.join("\n")
    );
}
