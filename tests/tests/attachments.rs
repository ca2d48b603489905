//! Attachments: createAttachment, the signed upload and download URLs,
//! sending attachments, and who may getAttachment.

use std::collections::BTreeMap;
use std::time::Duration;

use courier_local::Config;
use courier_tests::client::Client;
use courier_tests::{ErrorCode, Server, WAIT, code, http, put_upload, sha256_hex, upload, with_param};
use serde_json::{Value, json};

/// Some bytes that are not text: every byte value, a few times.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

fn param(url: &str, key: &str) -> String {
    let (_, query) = url.split_once('?').expect("a query");
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {url}"))
        .to_owned()
}

async fn create(client: &Client, fields: Value) -> Result<Value, ErrorCode> {
    client
        .call::<Value>("createAttachment", fields)
        .await
        .map_err(|e| e.code().unwrap_or_else(|| panic!("{e}")))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn create_attachment_checks_size_hash_and_content_type() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let hash = sha256_hex(b"hello");
    let ok = |size: Value| json!({ "contentType": "image/jpeg", "size": size, "sha256": hash });

    assert_eq!(create(&alice, ok(json!(0))).await.err(), Some(ErrorCode::BadRequest), "size 0");
    let max = 100 * 1024 * 1024;
    create(&alice, ok(json!(max))).await.expect("exactly 100 MiB may be declared");
    assert_eq!(create(&alice, ok(json!(max + 1))).await.err(), Some(ErrorCode::LimitExceeded));
    for bad in [json!(-1), json!("5"), json!(1.5), json!(null)] {
        assert_eq!(create(&alice, ok(bad.clone())).await.err(), Some(ErrorCode::BadRequest), "size {bad}");
    }
    for bad in [&hash[..63], &format!("{hash}0"), &format!("{}zz", &hash[..62]), ""] {
        let fields = json!({ "contentType": "text/plain", "size": 5, "sha256": bad });
        assert_eq!(create(&alice, fields).await.err(), Some(ErrorCode::BadRequest), "sha256 {bad:?}");
    }
    for bad in ["jpeg", "", "image/", "/jpeg", "image/jpeg; charset=\"x\""] {
        let fields = json!({ "contentType": bad, "size": 5, "sha256": hash });
        assert_eq!(create(&alice, fields).await.err(), Some(ErrorCode::BadRequest), "contentType {bad:?}");
    }
    assert_eq!(
        create(&alice, json!({ "size": 5, "sha256": hash })).await.err(),
        Some(ErrorCode::BadRequest),
        "no contentType"
    );
}

#[tokio::test]
async fn create_attachment_answers_an_id_an_upload_url_its_headers_and_an_expiry() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let before = now_ms();
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello")).await.unwrap();
    assert_eq!(created.attachment_id.as_str().len(), 26, "a ULID");
    assert_eq!(
        created.upload_headers,
        BTreeMap::from([
            ("content-type".to_owned(), "text/plain".to_owned()),
            ("x-amz-checksum-sha256".to_owned(), "LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=".to_owned()),
        ]),
        "the checksum header is the base64 of the raw digest"
    );
    let fifteen_minutes = 15 * 60 * 1000;
    assert!(
        (before + fifteen_minutes..=now_ms() + fifteen_minutes).contains(&created.expires_at),
        "expiresAt {} is 15 minutes out",
        created.expires_at
    );
    // Upper-case hex is the same digest.
    let upper = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello").to_uppercase()).await.unwrap();
    assert_eq!(upper.upload_headers, created.upload_headers);
}

#[tokio::test]
async fn an_upload_with_exactly_the_upload_headers_downloads_byte_for_byte() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let bytes = payload(300 * 1024 + 17);

    let created =
        alice.create_attachment("image/png", bytes.len() as u64, &sha256_hex(&bytes)).await.unwrap();
    let put = put_upload(&created, &bytes).await;
    assert_eq!(put.status, 200, "{}", put.text());
    let id = created.attachment_id.to_string();

    let sent = alice
        .send_message_with(json!({ "chatId": chat, "message": "a picture", "attachments": [id] }))
        .await
        .expect("send with the attachment");
    let got = bob.next_message(WAIT).await.expect("the push");
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.attachments.iter().map(|a| a.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    let synced = bob.sync_all().await.unwrap();
    assert_eq!(synced[0].attachments, got.attachments, "sync carries the ids too");

    let link = bob.get_attachment(&id).await.expect("a participant may get it");
    assert_eq!(link.attachment_id.as_str(), id);
    assert_eq!(link.content_type, "image/png");
    assert_eq!(link.size, bytes.len() as u64);
    assert_eq!(link.sha256, sha256_hex(&bytes));
    assert!(link.expires_at > now_ms());
    let download = http::get(&link.download_url).await.unwrap();
    assert_eq!(download.status, 200, "{}", download.text());
    assert_eq!(download.header("content-type"), Some("image/png"));
    assert!(download.body == bytes, "the downloaded bytes differ from the uploaded ones");
}

#[tokio::test]
async fn a_download_is_saved_by_a_browser_never_rendered() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let page = b"<script>alert(document.cookie)</script>";
    let id = upload(&alice, "text/html", page).await;
    let link = alice.get_attachment(&id).await.unwrap();
    let download = http::get(&link.download_url).await.unwrap();
    assert_eq!(download.status, 200, "{}", download.text());
    assert_eq!(download.header("content-disposition"), Some("attachment"));
    if courier_tests::on_aws() {
        // S3 offers no query parameter for it; its objects come from the bucket's origin, not the API's.
        eprintln!("not checked on the AWS backend: X-Content-Type-Options (S3 does not set it)");
    } else {
        assert_eq!(download.header("x-content-type-options"), Some("nosniff"));
    }
    assert_eq!(download.header("content-type"), Some("text/html"), "the type as declared");
    assert_eq!(download.body, page);
}

#[tokio::test]
async fn an_upload_whose_bytes_differ_from_the_declared_hash_is_refused() {
    if courier_tests::moto_cannot_check("an upload's checksum") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello")).await.unwrap();

    let put = put_upload(&created, b"jello").await;
    assert!((400..500).contains(&put.status), "a hash mismatch got HTTP {}", put.status);
    let id = created.attachment_id.to_string();
    let send = json!({ "chatId": chat, "message": "x", "attachments": [id] });
    assert_eq!(code(alice.send_message_with(send).await), ErrorCode::BadRequest);
    assert_eq!(code(alice.get_attachment(&id).await), ErrorCode::NotFound, "nothing was stored");
}

#[tokio::test]
async fn an_upload_of_another_length_is_refused() {
    if courier_tests::moto_cannot_check("an upload's length") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello")).await.unwrap();
    for wrong in [&b"hell"[..], b"hello!", b""] {
        let put = put_upload(&created, wrong).await;
        assert!((400..500).contains(&put.status), "{} bytes for 5 got HTTP {}", wrong.len(), put.status);
    }
    let send = json!({ "chatId": chat, "message": "x", "attachments": [created.attachment_id] });
    assert_eq!(code(alice.send_message_with(send).await), ErrorCode::BadRequest);
}

#[tokio::test]
async fn an_upload_without_the_upload_headers_is_refused() {
    if courier_tests::moto_cannot_check("signed upload headers") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let created = alice.create_attachment("text/plain", 5, &sha256_hex(b"hello")).await.unwrap();
    let checksum = created.upload_headers["x-amz-checksum-sha256"].as_str();
    for headers in [
        vec![("content-type", "text/plain")],
        vec![("x-amz-checksum-sha256", checksum)],
        vec![("content-type", "image/png"), ("x-amz-checksum-sha256", checksum)],
        vec![("content-type", "text/plain"), ("x-amz-checksum-sha256", "bm90IHRoZSBoYXNo")],
    ] {
        let put = http::put(&created.upload_url, &headers, b"hello").await.unwrap();
        assert!((400..500).contains(&put.status), "{headers:?} got HTTP {}", put.status);
    }
    assert_eq!(put_upload(&created, b"hello").await.status, 200, "the right headers still work");
}

#[tokio::test]
async fn a_tampered_url_is_refused_with_403() {
    if courier_tests::moto_cannot_check("URL signatures") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bytes = b"secret bytes";
    let created =
        alice.create_attachment("text/plain", bytes.len() as u64, &sha256_hex(bytes)).await.unwrap();
    let other = alice.create_attachment("text/plain", bytes.len() as u64, &sha256_hex(bytes)).await.unwrap();
    let url = &created.upload_url;
    let headers: Vec<(&str, &str)> =
        created.upload_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let sig = param(url, "sig");
    let flipped = format!("{}{}", &sig[..sig.len() - 1], if sig.ends_with('0') { '1' } else { '0' });
    let later = (param(url, "expires").parse::<i64>().unwrap() + 3_600_000).to_string();
    let other_id = other.attachment_id.as_str();
    for tampered in [
        with_param(url, "sig", &flipped),
        with_param(url, "sig", "zz"),
        with_param(url, "expires", &later),
        url.replace(created.attachment_id.as_str(), other_id),
    ] {
        let put = http::put(&tampered, &headers, bytes).await.unwrap();
        assert_eq!(put.status, 403, "PUT {tampered}");
    }
    assert_eq!(http::get(url).await.unwrap().status, 403, "an upload URL does not download");

    assert_eq!(put_upload(&created, bytes).await.status, 200);
    let link = alice.get_attachment(created.attachment_id.as_str()).await.unwrap();
    let download = &link.download_url;
    assert_eq!(
        http::put(download, &headers, bytes).await.unwrap().status,
        403,
        "a download URL does not upload"
    );
    let sig = param(download, "sig");
    let flipped = format!("{}{}", &sig[..sig.len() - 1], if sig.ends_with('0') { '1' } else { '0' });
    assert_eq!(http::get(&with_param(download, "sig", &flipped)).await.unwrap().status, 403);
    let later = (param(download, "expires").parse::<i64>().unwrap() + 3_600_000).to_string();
    assert_eq!(http::get(&with_param(download, "expires", &later)).await.unwrap().status, 403);
    assert_eq!(http::get(download).await.unwrap().body, bytes, "the genuine URL works");
}

#[tokio::test]
async fn a_url_stripped_of_its_signature_is_refused_with_403() {
    if courier_tests::moto_cannot_check("URL signatures") {
        return;
    }
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let id = upload(&alice, "text/plain", b"private").await;
    let link = alice.get_attachment(&id).await.unwrap();
    let created = alice.create_attachment("text/plain", 7, &sha256_hex(b"private")).await.unwrap();
    let headers: Vec<(&str, &str)> =
        created.upload_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // As S3 answers a presigned URL without its signature: 403, not a parse error.
    let bare_upload = created.upload_url.split('?').next().unwrap();
    assert_eq!(
        http::put(bare_upload, &headers, b"private").await.unwrap().status,
        403,
        "PUT without a query"
    );
    let bare_download = link.download_url.split('?').next().unwrap();
    assert_eq!(http::get(bare_download).await.unwrap().status, 403, "GET without a query");
    let no_sig = format!("{bare_download}?expires={}", param(&link.download_url, "expires"));
    assert_eq!(http::get(&no_sig).await.unwrap().status, 403, "GET without sig");
}

#[tokio::test]
async fn an_expired_url_is_refused_with_403() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
    let bytes = b"expiring";

    // Upload with the default 15 minutes, then restart with URLs that last 1 ms.
    let server = Server::start_in(config.clone()).await;
    let alice = server.connect("alice", "phone").await;
    let id = upload(&alice, "text/plain", bytes).await;
    alice.close();
    server.stop().await;

    let mut short = config;
    short.limits.url_ttl_ms = 1;
    let server = Server::start_in(short).await;
    let alice = server.connect("alice", "phone").await;
    let created =
        alice.create_attachment("text/plain", bytes.len() as u64, &sha256_hex(bytes)).await.unwrap();
    let link = alice.get_attachment(&id).await.unwrap();
    // Let both URLs' 1 ms run out.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(link.expires_at < now_ms() && created.expires_at < now_ms());

    assert_eq!(put_upload(&created, bytes).await.status, 403, "an expired upload URL");
    assert_eq!(http::get(&link.download_url).await.unwrap().status, 403, "an expired download URL");
    server.stop().await;
}

#[tokio::test]
async fn send_message_takes_only_the_senders_completed_uploads() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let send = |ids: Vec<String>| json!({ "chatId": chat, "message": "x", "attachments": ids });

    let pending = alice.create_attachment("text/plain", 3, &sha256_hex(b"abc")).await.unwrap();
    let pending = pending.attachment_id.to_string();
    assert_eq!(
        code(alice.send_message_with(send(vec![pending])).await),
        ErrorCode::BadRequest,
        "not uploaded"
    );

    let bobs = upload(&bob, "text/plain", b"bob's").await;
    assert_eq!(
        code(alice.send_message_with(send(vec![bobs.clone()])).await),
        ErrorCode::BadRequest,
        "bob's upload"
    );
    let unknown = "01JGGMXKBVV37E3S3E28JT97KB".to_owned();
    assert_eq!(
        code(alice.send_message_with(send(vec![unknown])).await),
        ErrorCode::BadRequest,
        "no such upload"
    );

    let mine = upload(&alice, "text/plain", b"alice's").await;
    assert_eq!(
        code(alice.send_message_with(send(vec![mine.clone(), bobs.clone()])).await),
        ErrorCode::BadRequest,
        "one bad attachment refuses the message"
    );
    assert!(bob.sync_all().await.unwrap().is_empty(), "nothing was sent");
    assert_eq!(
        code(bob.get_attachment(&mine).await),
        ErrorCode::Forbidden,
        "a refused message shares nothing"
    );
    alice.send_message_with(send(vec![mine.clone()])).await.expect("her own completed upload");

    // A recipient who may download alice's attachment still cannot send it on.
    let bob_chat = bob.create_chat(&["carol"], "d").await.unwrap();
    bob.get_attachment(&mine).await.expect("bob may get it");
    let forward = json!({ "chatId": bob_chat, "message": "fwd", "attachments": [mine] });
    assert_eq!(code(bob.send_message_with(forward).await), ErrorCode::BadRequest);
}

#[tokio::test]
async fn a_message_carries_at_most_10_attachments() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..11u8 {
        ids.push(upload(&alice, "application/octet-stream", &[i; 3]).await);
    }
    let eleven = json!({ "chatId": chat, "message": "x", "attachments": ids });
    assert_eq!(code(alice.send_message_with(eleven).await), ErrorCode::LimitExceeded);
    let ten = json!({ "chatId": chat, "message": "x", "attachments": ids[..10] });
    alice.send_message_with(ten).await.expect("10 attachments");
    let inbox = bob.sync_all().await.unwrap();
    assert_eq!(inbox.len(), 1);
    let got: Vec<&str> = inbox[0].attachments.iter().map(|a| a.as_str()).collect();
    assert_eq!(got, ids[..10].iter().map(String::as_str).collect::<Vec<_>>(), "in the order sent");
}

#[tokio::test]
async fn get_attachment_is_for_the_uploader_and_members_of_a_chat_it_was_sent_in() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let carol = server.connect("carol", "phone").await;
    let dave = server.connect("dave", "phone").await;
    let id = upload(&alice, "text/plain", b"shared later").await;

    alice.get_attachment(&id).await.expect("the uploader may, before sending it anywhere");
    assert_eq!(code(bob.get_attachment(&id).await), ErrorCode::Forbidden, "not shared yet");

    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let other = alice.create_chat(&["carol"], "d").await.unwrap();
    alice.send_message(&other, "no attachment here").await.unwrap();
    alice.send_message_with(json!({ "chatId": chat, "message": "x", "attachments": [id] })).await.unwrap();

    let link = bob.get_attachment(&id).await.expect("a participant of the chat");
    assert_eq!(http::get(&link.download_url).await.unwrap().body, b"shared later");
    assert_eq!(
        code(carol.get_attachment(&id).await),
        ErrorCode::Forbidden,
        "in a chat with alice, not that one"
    );
    alice.modify(&chat, "dave", "ADD").await.unwrap();
    dave.get_attachment(&id).await.expect("a participant who joined later");
    assert_eq!(code(alice.get_attachment("01JGGMXKBVV37E3S3E28JT97KB").await), ErrorCode::NotFound);
    let missing = alice.request("getAttachment", json!({})).await.unwrap();
    assert_eq!(missing["error"]["code"], "BAD_REQUEST");
}

#[tokio::test]
async fn a_retry_shares_only_what_the_first_send_carried() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let chat = alice.create_chat(&["bob"], "c").await.unwrap();
    let private = upload(&alice, "text/plain", b"not for bob").await;

    let first = alice
        .send_message_with(json!({ "chatId": chat, "message": "hi", "clientMessageId": "k" }))
        .await
        .unwrap();
    // A "retry" that adds an attachment is the first message again: no message carries it.
    let retry = alice
        .send_message_with(
            json!({ "chatId": chat, "message": "hi", "clientMessageId": "k", "attachments": [private] }),
        )
        .await
        .unwrap();
    assert_eq!(retry.message_id, first.message_id);
    let inbox = bob.sync_all().await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert!(inbox[0].attachments.is_empty(), "the delivered message carries no attachment");
    assert_eq!(
        code(bob.get_attachment(&private).await),
        ErrorCode::Forbidden,
        "no message in bob's chats carried it"
    );
}
