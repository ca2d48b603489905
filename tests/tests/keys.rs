//! The key directory (protocol version 2): uploadKeys, getKeys and
//! listDevices, one-time prekeys claimed at most once and within the claim
//! limits, and the keysLow and deviceList pushes.

mod v2;

use std::collections::BTreeSet;

use courier_tests::{QUIET, Server, WAIT, next_of_type};
use serde_json::{Value, json};
use v2::{
    clear_of_the_hour, create_chat, device_list, key_count, ok, one_time_keys, publish, refusal, refused,
    signed, sorted,
};

/// `getKeys` for one device of `user`: that device's bundle.
async fn claim(client: &courier_tests::client::Client, user: &str, device: &str) -> Value {
    let data = ok(client, "getKeys", json!({ "userId": user, "deviceId": device })).await;
    let devices = data["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "one bundle for {user}/{device}: {data}");
    devices[0].clone()
}

/// The one-time prekey of a bundle, which must carry one.
fn one_time(bundle: &Value) -> (String, String) {
    let key = &bundle["oneTimePreKey"];
    assert!(key.is_object(), "a one-time prekey was handed out: {bundle}");
    (key["keyId"].as_str().unwrap().to_owned(), key["publicKey"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn the_first_upload_must_carry_an_identity_key_and_a_signed_prekey() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    assert_eq!(ok(&bob, "uploadKeys", json!({})).await, json!({ "oneTimePreKeys": 0 }), "nothing yet");

    let otks = one_time_keys(0..3, "otk");
    let spk = signed("s1", "spk");
    for (what, upload) in [
        ("one-time prekeys alone", json!({ "oneTimePreKeys": otks })),
        ("no signed prekey", json!({ "identityKey": "K1", "oneTimePreKeys": otks })),
        ("no identity key", json!({ "signedPreKey": spk, "oneTimePreKeys": otks })),
        ("a fallback key alone", json!({ "fallbackKey": signed("f1", "fb") })),
    ] {
        assert_eq!(refusal(&bob, "uploadKeys", upload).await, "BAD_REQUEST", "{what}");
    }
    assert_eq!(key_count(&bob).await, 0, "a refused upload stores nothing");
    let listed = ok(&bob, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(listed, json!({ "devices": [] }), "the device is not ready");

    let first = json!({ "identityKey": "K1", "signedPreKey": spk, "oneTimePreKeys": otks });
    assert_eq!(ok(&bob, "uploadKeys", first).await, json!({ "oneTimePreKeys": 3 }));
    let listed = ok(&bob, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(listed, json!({ "devices": [{ "deviceId": "phone", "identityKey": "K1" }] }));

    // Once ready, each part may come alone.
    let more = json!({ "oneTimePreKeys": one_time_keys(3..5, "otk") });
    assert_eq!(ok(&bob, "uploadKeys", more).await, json!({ "oneTimePreKeys": 5 }));
    ok(&bob, "uploadKeys", json!({ "fallbackKey": signed("f1", "fb1") })).await;
    ok(&bob, "uploadKeys", json!({ "identityKey": "K1" })).await;
    assert_eq!(key_count(&bob).await, 5);

    // A new signed prekey or fallback key replaces the old one.
    ok(
        &bob,
        "uploadKeys",
        json!({ "signedPreKey": signed("s2", "spk2"), "fallbackKey": signed("f2", "fb2") }),
    )
    .await;
    let bundle = claim(&bob, "bob", "phone").await;
    assert_eq!(bundle["identityKey"], "K1");
    assert_eq!(bundle["signedPreKey"], signed("s2", "spk2"));
    assert_eq!(bundle["fallbackKey"], signed("f2", "fb2"));
}

#[tokio::test]
async fn the_identity_key_is_set_once_per_device() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    publish(&bob, "K1", 2).await;

    let other = json!({
        "identityKey": "K2",
        "signedPreKey": signed("s2", "spk2"),
        "oneTimePreKeys": one_time_keys(10..20, "new"),
    });
    assert_eq!(refusal(&bob, "uploadKeys", other).await, "FORBIDDEN");
    assert_eq!(key_count(&bob).await, 2, "the refused upload stored none of its keys");
    let bundle = claim(&bob_laptop, "bob", "phone").await;
    assert_eq!(bundle["identityKey"], "K1");
    assert_eq!(bundle["signedPreKey"], signed("s1", "spk-K1"), "nor its signed prekey");

    // Remove the device and add it again: then it takes a new identity.
    bob_laptop.remove_device("phone").await.expect("removeDevice");
    let bob = server.connect("bob", "phone").await;
    publish(&bob, "K2", 0).await;
    let listed = ok(&bob_laptop, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(listed, json!({ "devices": [{ "deviceId": "phone", "identityKey": "K2" }] }));
}

#[tokio::test]
async fn key_sizes_are_checked_and_a_refused_upload_stores_nothing() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let good = |identity: Value, spk: Value, otks: Value, fallback: Value| json!({ "identityKey": identity, "signedPreKey": spk, "oneTimePreKeys": otks, "fallbackKey": fallback });
    let key = |id: &str, public: &str, signature: &str| json!({ "keyId": id, "publicKey": public, "signature": signature });
    let otk = |id: &str, public: &str| json!([{ "keyId": id, "publicKey": public }]);
    let (long, too_long) = ("k".repeat(2048), "k".repeat(2049));
    let (id64, id65) = ("i".repeat(64), "i".repeat(65));
    let spk = key("s1", "spk", "sig");
    let fb = key("f1", "fb", "sig");
    let otks = otk("o1", "otk");

    for (what, upload, expected) in [
        ("an empty identityKey", good(json!(""), spk.clone(), otks.clone(), fb.clone()), "BAD_REQUEST"),
        (
            "a 65-character identityKey",
            good(json!(id65), spk.clone(), otks.clone(), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        ("an empty keyId", good(json!("K"), key("", "spk", "sig"), otks.clone(), fb.clone()), "BAD_REQUEST"),
        (
            "a 65-character keyId",
            good(json!("K"), key(&id65, "spk", "sig"), otks.clone(), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        (
            "an empty publicKey",
            good(json!("K"), key("s1", "", "sig"), otks.clone(), fb.clone()),
            "BAD_REQUEST",
        ),
        (
            "a 2049-character publicKey",
            good(json!("K"), key("s1", &too_long, "sig"), otks.clone(), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        (
            "an empty signature",
            good(json!("K"), key("s1", "spk", ""), otks.clone(), fb.clone()),
            "BAD_REQUEST",
        ),
        (
            "a 2049-character signature",
            good(json!("K"), key("s1", "spk", &too_long), otks.clone(), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        (
            "a 65-character one-time keyId",
            good(json!("K"), spk.clone(), otk(&id65, "otk"), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        (
            "an empty one-time publicKey",
            good(json!("K"), spk.clone(), otk("o1", ""), fb.clone()),
            "BAD_REQUEST",
        ),
        (
            "a 2049-character one-time publicKey",
            good(json!("K"), spk.clone(), otk("o1", &too_long), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
        (
            "a 2049-character fallback signature",
            good(json!("K"), spk.clone(), otks.clone(), key("f1", "fb", &too_long)),
            "LIMIT_EXCEEDED",
        ),
        (
            "101 one-time prekeys in one upload",
            good(json!("K"), spk.clone(), one_time_keys(0..101, "o"), fb.clone()),
            "LIMIT_EXCEEDED",
        ),
    ] {
        assert_eq!(refusal(&bob, "uploadKeys", upload).await, expected, "{what}");
    }
    assert_eq!(key_count(&bob).await, 0, "no refused upload stored a key");
    let listed = ok(&bob, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(listed["devices"], json!([]), "no refused upload made the device ready");

    // Every field at its largest, in characters: 64 two-byte characters fit an identity key.
    let identity = "é".repeat(64);
    let largest = good(
        json!(identity),
        key(&id64, &long, &long),
        json!([{ "keyId": id64, "publicKey": long }]),
        key(&id64, &long, &long),
    );
    assert_eq!(ok(&bob, "uploadKeys", largest).await, json!({ "oneTimePreKeys": 1 }));
    let bundle = claim(&bob, "bob", "phone").await;
    assert_eq!(bundle["identityKey"], identity.as_str(), "stored as given");
    assert_eq!(bundle["signedPreKey"], key(&id64, &long, &long));
    assert_eq!(bundle["oneTimePreKey"], json!({ "keyId": id64, "publicKey": long }));
    let hundred = json!({ "oneTimePreKeys": one_time_keys(0..100, "o") });
    assert_eq!(ok(&bob, "uploadKeys", hundred).await, json!({ "oneTimePreKeys": 100 }), "100 in one upload");
}

#[tokio::test]
async fn a_device_holds_at_most_200_one_time_prekeys_and_ignores_duplicates() {
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    let upload = |ids: std::ops::Range<usize>| json!({ "oneTimePreKeys": one_time_keys(ids, "b") });
    publish(&bob, "K", 100).await;

    // keyIds k50..k99 are stored already: they are ignored and do not count.
    assert_eq!(ok(&bob, "uploadKeys", upload(50..150)).await, json!({ "oneTimePreKeys": 150 }));
    let past = refused(&bob, "uploadKeys", upload(150..250)).await;
    assert_eq!(past["code"], "LIMIT_EXCEEDED", "{past}");
    assert_eq!(key_count(&bob).await, 150, "an upload past 200 stores nothing, not even what would fit");
    assert_eq!(ok(&bob, "uploadKeys", upload(100..200)).await, json!({ "oneTimePreKeys": 200 }));
    assert_eq!(
        ok(&bob, "uploadKeys", upload(0..100)).await,
        json!({ "oneTimePreKeys": 200 }),
        "all duplicates"
    );
    assert_eq!(
        refusal(&bob, "uploadKeys", upload(199..201)).await,
        "LIMIT_EXCEEDED",
        "one new key is one too many"
    );
    assert_eq!(key_count(&bob).await, 200);
}

#[tokio::test]
async fn a_duplicate_key_id_keeps_the_key_first_stored() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    create_chat(&alice, &["bob"], false).await;
    publish(&bob, "K", 2).await;
    let again = json!({ "oneTimePreKeys": one_time_keys(0..2, "replaced") });
    assert_eq!(ok(&bob, "uploadKeys", again).await, json!({ "oneTimePreKeys": 2 }));

    let mut handed: Vec<(String, String)> = Vec::new();
    for _ in 0..2 {
        handed.push(one_time(&claim(&alice, "bob", "phone").await));
    }
    handed.sort();
    let first = vec![("k0".to_owned(), "K-0".to_owned()), ("k1".to_owned(), "K-1".to_owned())];
    assert_eq!(handed, first);
}

#[tokio::test]
async fn keys_are_shown_to_the_users_own_devices_and_to_co_members_only() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    let mallory = server.connect("mallory", "phone").await;
    publish(&bob, "KB", 5).await;
    publish(&mallory, "KM", 5).await;
    // carol shares the chat but has never connected.
    let chat = create_chat(&alice, &["bob", "carol"], false).await;

    let seen = ok(&alice, "getKeys", json!({ "userId": "bob" })).await;
    let devices = seen["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "bob's laptop is not ready: {seen}");
    assert_eq!(devices[0]["deviceId"], "phone");
    assert_eq!(devices[0]["identityKey"], "KB");
    assert_eq!(devices[0]["signedPreKey"], signed("s1", "spk-KB"));
    assert_eq!(devices[0]["fallbackKey"], signed("f1", "fb-KB"));
    let listed = ok(&alice, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(listed, json!({ "devices": [{ "deviceId": "phone", "identityKey": "KB" }] }));
    assert_eq!(ok(&alice, "getKeys", json!({ "userId": "carol" })).await, json!({ "devices": [] }));
    assert_eq!(ok(&alice, "listDevices", json!({ "userId": "carol" })).await, json!({ "devices": [] }));
    // Own devices, in no chat with each other: bob's laptop may look at bob.
    ok(&bob_laptop, "getKeys", json!({ "userId": "bob", "deviceId": "phone" })).await;
    ok(&mallory, "listDevices", json!({ "userId": "mallory" })).await;

    // A stranger and a user who does not exist get the very same answer.
    let stranger = refused(&mallory, "getKeys", json!({ "userId": "bob" })).await;
    assert_eq!(stranger["code"], "FORBIDDEN", "{stranger}");
    let nobody = refused(&mallory, "getKeys", json!({ "userId": "ghost" })).await;
    assert_eq!(nobody, stranger, "whether a user exists cannot be told apart");
    let stranger = refused(&mallory, "listDevices", json!({ "userId": "bob" })).await;
    assert_eq!(stranger["code"], "FORBIDDEN", "{stranger}");
    assert_eq!(refused(&mallory, "listDevices", json!({ "userId": "ghost" })).await, stranger);
    assert_eq!(refusal(&alice, "getKeys", json!({ "userId": "mallory" })).await, "FORBIDDEN");
    assert_eq!(refusal(&alice, "getKeys", json!({ "userId": "ghost" })).await, "FORBIDDEN");
    assert_eq!(key_count(&mallory).await, 5, "nothing of mallory's was claimed");

    // Sharing a chat is what counts, at the time of asking.
    alice.modify(&chat, "bob", "REMOVE").await.expect("remove bob");
    assert_eq!(refusal(&alice, "getKeys", json!({ "userId": "bob" })).await, "FORBIDDEN");
    assert_eq!(refusal(&alice, "listDevices", json!({ "userId": "bob" })).await, "FORBIDDEN");
}

#[tokio::test]
async fn each_one_time_prekey_is_handed_out_once_however_many_claim_at_once() {
    const KEYS: usize = 50;
    const CLAIMERS: usize = 20;
    const CALLS: usize = 3;
    let server = Server::start().await;
    let bob = server.connect("bob", "phone").await;
    publish(&bob, "KB", KEYS).await;
    let names: Vec<String> = (0..CLAIMERS).map(|i| format!("user{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    create_chat(&bob, &refs, false).await;
    let mut claimers = Vec::new();
    for name in &names {
        claimers.push(server.connect(name, "phone").await);
    }

    // Every claimer sends its getKeys at once, over its own socket.
    let calls = claimers.iter().flat_map(|c| {
        (0..CALLS).map(move |_| c.request("getKeys", json!({ "userId": "bob", "deviceId": "phone" })))
    });
    let answers = futures_util::future::join_all(calls).await;

    let mut handed = BTreeSet::new();
    let mut fallbacks = 0;
    for answer in answers {
        let frame = answer.expect("an answer");
        assert_eq!(frame["status"], "SUCCESS", "{frame}");
        let bundle = &frame["data"]["devices"][0];
        assert_eq!(bundle["identityKey"], "KB", "{frame}");
        assert_eq!(bundle["fallbackKey"], signed("f1", "fb-KB"), "{frame}");
        match &bundle["oneTimePreKey"] {
            Value::Null => fallbacks += 1,
            key => {
                let id = key["keyId"].as_str().expect("keyId").to_owned();
                let n = id.strip_prefix('k').expect("a keyId bob uploaded");
                assert_eq!(key["publicKey"], format!("KB-{n}"), "the key uploaded under {id}");
                assert!(handed.insert(id.clone()), "{id} was handed out twice");
            }
        }
    }
    assert_eq!(handed.len(), KEYS, "every key was handed out");
    assert_eq!(fallbacks, CLAIMERS * CALLS - KEYS, "the claims past the last key got the fallback");
    assert_eq!(key_count(&bob).await, 0);
}

#[tokio::test]
async fn a_device_claims_at_most_5_keys_of_one_target_device_an_hour() {
    clear_of_the_hour().await;
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let alice_laptop = server.connect("alice", "laptop").await;
    // The phone, whose keys alice runs out of, sorts between bob's other two devices.
    let bob = server.connect("bob", "phone").await;
    let others = [server.connect("bob", "laptop").await, server.connect("bob", "tablet").await];
    publish(&bob, "KB", 20).await;
    publish(&others[0], "KL", 20).await;
    publish(&others[1], "KT", 20).await;
    create_chat(&alice, &["bob"], false).await;

    for i in 0..5 {
        one_time(&claim(&alice, "bob", "phone").await);
        assert_eq!(key_count(&bob).await, 19 - i);
    }
    let sixth = json!({ "userId": "bob", "deviceId": "phone" });
    assert_eq!(refusal(&alice, "getKeys", sixth.clone()).await, "RATE_LIMITED");
    assert_eq!(key_count(&bob).await, 15, "a refused getKeys claims nothing");
    // Asking for all of bob's devices includes the phone: refused, and the others keep their keys.
    assert_eq!(refusal(&alice, "getKeys", json!({ "userId": "bob" })).await, "RATE_LIMITED");
    for other in &others {
        assert_eq!(key_count(other).await, 20, "nothing claimed from bob's other devices either");
    }

    // The limit is per calling device and per target device; refusals used none of it.
    for (device, other) in ["laptop", "tablet"].into_iter().zip(&others) {
        for _ in 0..5 {
            one_time(&claim(&alice, "bob", device).await);
        }
        assert_eq!(key_count(other).await, 15);
    }
    one_time(&claim(&alice_laptop, "bob", "phone").await);
    assert_eq!(refusal(&alice, "getKeys", sixth).await, "RATE_LIMITED", "still, for alice's phone");
    assert_eq!(key_count(&bob).await, 14);
}

#[tokio::test]
async fn a_device_claims_a_configured_number_of_keys_in_all_an_hour() {
    clear_of_the_hour().await;
    let server = Server::start_with(|c| c.limits.max_claims_per_hour = 4).await;
    let alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let bob_tablet = server.connect("bob", "tablet").await;
    let carol = server.connect("carol", "phone").await;
    publish(&bob, "KB", 10).await;
    publish(&bob_tablet, "KT", 10).await;
    publish(&carol, "KC", 10).await;
    create_chat(&alice, &["bob", "carol"], false).await;

    let both = ok(&alice, "getKeys", json!({ "userId": "bob" })).await;
    assert_eq!(both["devices"].as_array().unwrap().len(), 2, "two claims: {both}");
    claim(&alice, "carol", "phone").await;
    // Three claimed: bob's two devices would make five.
    assert_eq!(refusal(&alice, "getKeys", json!({ "userId": "bob" })).await, "RATE_LIMITED");
    assert_eq!((key_count(&bob).await, key_count(&bob_tablet).await), (9, 9), "the refusal claimed nothing");
    one_time(&claim(&alice, "carol", "phone").await);
    let fifth = json!({ "userId": "bob", "deviceId": "phone" });
    assert_eq!(refusal(&alice, "getKeys", fifth).await, "RATE_LIMITED");
    assert_eq!(key_count(&bob).await, 9);
    assert_eq!(key_count(&carol).await, 8);
}

#[tokio::test]
async fn a_connected_device_is_told_when_a_claim_leaves_it_fewer_than_10_keys() {
    let server = Server::start().await;
    let alice = server.connect("alice", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    let mut bob_laptop = server.connect("bob", "laptop").await;
    publish(&bob, "KB", 11).await;
    publish(&bob_laptop, "KL", 11).await;
    create_chat(&alice, &["bob"], false).await;

    claim(&alice, "bob", "phone").await;
    assert!(next_of_type(&mut bob, "keysLow", QUIET).await.is_none(), "10 left is not fewer than 10");
    claim(&alice, "bob", "phone").await;
    let low = next_of_type(&mut bob, "keysLow", WAIT).await.expect("keysLow at 9");
    assert_eq!(low, json!({ "type": "keysLow", "remaining": 9 }));
    assert!(
        next_of_type(&mut bob_laptop, "keysLow", QUIET).await.is_none(),
        "only the claimed device is told"
    );

    // Not connected: not told, and nothing is kept for later.
    bob.close();
    assert!(bob.closed(WAIT).await.is_some());
    claim(&alice, "bob", "phone").await;
    let mut bob = server.connect("bob", "phone").await;
    assert!(next_of_type(&mut bob, "keysLow", QUIET).await.is_none(), "no keysLow on connect");
    assert!(v2::inbox(&bob).await.is_empty(), "nor in the inbox");
    claim(&alice, "bob", "phone").await;
    let low = next_of_type(&mut bob, "keysLow", WAIT).await.expect("keysLow at 7");
    assert_eq!(low["remaining"], 7);
}

#[tokio::test]
async fn co_members_are_told_when_a_device_becomes_ready_and_when_it_is_removed() {
    let server = Server::start().await;
    let mut alice = server.connect("alice", "phone").await;
    let bob = server.connect("bob", "phone").await;
    let bob_laptop = server.connect("bob", "laptop").await;
    let mut carol = server.connect("carol", "phone").await;
    create_chat(&alice, &["bob"], false).await;
    create_chat(&alice, &["carol"], false).await;

    publish(&bob_laptop, "KL", 1).await;
    let list = device_list(&mut alice, "bob").await.expect("a deviceList when bob's laptop is ready");
    assert_eq!(
        list,
        json!({ "type": "deviceList", "userId": "bob", "devices": [{ "deviceId": "laptop", "identityKey": "KL" }] })
    );
    ok(&bob_laptop, "uploadKeys", json!({ "oneTimePreKeys": one_time_keys(5..9, "KL") })).await;
    assert!(
        next_of_type(&mut alice, "deviceList", QUIET).await.is_none(),
        "more prekeys change no device list"
    );

    publish(&bob, "KB", 1).await;
    let list = device_list(&mut alice, "bob").await.expect("a deviceList when bob's phone is ready");
    assert_eq!(
        sorted(&list["devices"]),
        sorted(&json!([
            { "deviceId": "laptop", "identityKey": "KL" },
            { "deviceId": "phone", "identityKey": "KB" },
        ]))
    );

    bob.remove_device("laptop").await.expect("removeDevice");
    let list = device_list(&mut alice, "bob").await.expect("a deviceList when the laptop is removed");
    assert_eq!(list["devices"], json!([{ "deviceId": "phone", "identityKey": "KB" }]));
    assert!(next_of_type(&mut carol, "deviceList", QUIET).await.is_none(), "carol shares no chat with bob");
}
