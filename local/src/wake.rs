//! Wake-ups from courier-local: its push senders, and the page at `/push/` that subscribes a browser.
//!
//! Web Push goes straight to the subscription's push service, signed with
//! a VAPID key that lives in the data dir, so browsers subscribed once stay
//! subscribed across restarts. FCM and APNs go to a push gateway when one
//! is configured; without one, `registerPush` refuses them. The page is a
//! tool for trying wake-ups by hand: it subscribes the browser with the
//! server's public key and prints the `registerPush` frame to paste.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use courier_wake::{GatewayOptions, GatewaySender, VapidKey, Wakers, WebPushOptions, WebPushSender};

use crate::Config;
use crate::config::VAPID_KEY_FILE;

/// The `Wakeups` adapter of this server, and the VAPID public key browsers subscribe with.
pub struct Wake {
    pub wakers: Arc<Wakers>,
    pub public_key: String,
}

/// Builds the senders: Web Push with the data dir's VAPID key (made on the
/// first start), and the push gateway if one is configured.
///
/// Listening on loopback, Web Push also takes `http://127.0.0.1:PORT`
/// endpoints, as the protocol allows the local server for tests. Reachable
/// by others, it keeps the deployed rule (https, public hosts only): an
/// endpoint is a URL a client picks and the server then POSTs to, and no
/// client should be able to point it into this machine's network.
pub fn senders(config: &Config, addr: SocketAddr) -> anyhow::Result<Wake> {
    std::fs::create_dir_all(&config.data_dir)?;
    let key = VapidKey::load_or_generate(&config.data_dir.join(VAPID_KEY_FILE), &config.push.subject)?;
    let public_key = key.public_key().to_owned();
    let options = WebPushOptions {
        timeout: config.push.timeout,
        public_hosts_only: !addr.ip().to_canonical().is_loopback(),
        ..WebPushOptions::default()
    };
    let web_push = WebPushSender::new(key, options)?;
    let gateway = match &config.push.gateway_url {
        Some(url) => {
            let options =
                GatewayOptions { bearer: config.push.gateway_secret.clone(), timeout: config.push.timeout };
            Some(GatewaySender::new(url, options)?)
        }
        None => None,
    };
    tracing::info!(vapid_public_key = %public_key, gateway = gateway.is_some(), "wake-ups: web push on");
    Ok(Wake { wakers: Arc::new(Wakers::new(Some(web_push), gateway)), public_key })
}

/// `GET /push/` (the page), `/push/sw.js` (its service worker) and
/// `/push/vapid-public-key` (the key, base64url, for clients of their own).
pub fn routes(public_key: String) -> Router {
    let key: Arc<str> = public_key.into();
    Router::new()
        .route("/push", get(|| async { Redirect::permanent("/push/") }))
        .route("/push/", get(|| async { text("text/html; charset=utf-8", PAGE) }))
        .route("/push/sw.js", get(|| async { text("text/javascript; charset=utf-8", SERVICE_WORKER) }))
        .route(
            "/push/vapid-public-key",
            get(move || {
                let key = key.clone();
                async move { text("text/plain; charset=utf-8", &key) }
            }),
        )
}

fn text(content_type: &'static str, body: &str) -> Response {
    // No caching: a restarted server on a new data dir has a new key.
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-store")], body.to_owned()).into_response()
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width">
<title>Courier: wake this browser</title>
<style>body{font:16px system-ui,sans-serif;max-width:46em;margin:2em auto;padding:0 1em}pre{background:#f4f4f4;padding:1em;white-space:pre-wrap;word-break:break-all}</style>
<h1>Wake this browser</h1>
<p>Subscribes this browser to Web Push with this server's VAPID key. Paste the
frame below into the WebSocket of the device to wake, then disconnect that
device and send it a message: a notification appears here, saying only that
there is something to sync.</p>
<p><button id="subscribe">Subscribe</button></p>
<pre id="frame">Not subscribed yet.</pre>
<h2>Wake-ups received</h2>
<ul id="log"></ul>
<script>
const frame = document.getElementById("frame");
const log = document.getElementById("log");

function bytes(base64url) {
  const text = atob(base64url.replace(/-/g, "+").replace(/_/g, "/"));
  return Uint8Array.from(text, (c) => c.charCodeAt(0));
}

async function subscribe() {
  if (!("serviceWorker" in navigator) || !("PushManager" in window)) {
    throw new Error("this browser has no Web Push (or the page is not on https or localhost)");
  }
  const key = (await (await fetch("/push/vapid-public-key")).text()).trim();
  const registration = await navigator.serviceWorker.register("/push/sw.js", { scope: "/push/" });
  await navigator.serviceWorker.ready;
  if ((await Notification.requestPermission()) !== "granted") {
    throw new Error("notifications are not allowed for this page");
  }
  let subscription = await registration.pushManager.getSubscription();
  // A subscription made with another server's key would be refused by the push service.
  if (subscription) await subscription.unsubscribe();
  subscription = await registration.pushManager.subscribe({
    userVisibleOnly: true,
    applicationServerKey: bytes(key),
  });
  const { endpoint, keys } = subscription.toJSON();
  frame.textContent = JSON.stringify({
    action: "registerPush",
    platform: "webpush",
    subscription: { endpoint, keys: { p256dh: keys.p256dh, auth: keys.auth } },
  });
}

document.getElementById("subscribe").onclick = () =>
  subscribe().catch((e) => (frame.textContent = "Failed: " + e.message));

navigator.serviceWorker?.addEventListener("message", (event) => {
  const item = document.createElement("li");
  item.textContent = new Date(event.data.at).toLocaleTimeString() + ": " + event.data.payload;
  log.prepend(item);
});
</script>
"#;

const SERVICE_WORKER: &str = r#"// Courier's wake-up carries nothing but {"type":"wake"}: an app would sync now.
self.addEventListener("push", (event) => {
  const payload = event.data ? event.data.text() : "";
  event.waitUntil((async () => {
    // userVisibleOnly: every push shows a notification.
    await self.registration.showNotification("Courier", {
      body: "Something new to sync",
      tag: "courier-wake",
    });
    for (const client of await self.clients.matchAll({ includeUncontrolled: true })) {
      client.postMessage({ payload, at: Date.now() });
    }
  })());
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil(self.clients.openWindow("/push/"));
});
"#;
