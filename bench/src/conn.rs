//! One bench device's connection, whatever the server: a lean WebSocket for Courier and the relay, an MQTT client for Mosquitto.
//!
//! The hot loop does not use the typed client of courier-shared: it parses
//! every frame into a `serde_json::Value` and hands it over a channel, which
//! on two shared cores would cost the server CPU we are trying to measure.
//! Here a received frame is only scanned for the send instant.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::stats;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Where a device's messages go.
#[derive(Clone, Debug)]
pub enum Route {
    /// A Courier chat: `sendMessage` to it.
    Chat(String),
    /// Relay peers, as the JSON of the frame's `to` (a string or an array).
    Relay(String),
    /// An MQTT topic, published at QoS 1.
    Topic(String),
}

/// What a device sees arrive, as far as the bench cares.
#[derive(Debug)]
pub enum Incoming {
    /// A bench message, sent at this instant (see [`stats::now_ns`]).
    Delivery(u64),
    /// The server took a message: Courier's SUCCESS, MQTT's PUBACK.
    Ack,
    /// Courier's FAILURE, with the frame.
    Failure(String),
    /// Anything else (chatUpdate, SUBACK, pings...).
    Other,
}

/// A connected WebSocket device, before it is split for the hot loop.
pub struct Ws {
    socket: Socket,
    next_request: u64,
}

impl Ws {
    /// Connects to `url` with `query` (`token=..&deviceId=..` or `id=..`).
    pub async fn connect(url: &str, query: &str) -> anyhow::Result<Ws> {
        let url = format!("{}/?{query}", url.trim_end_matches('/'));
        // A small read buffer: 10,000 idle sockets at the default 128 KiB
        // would be the bench's memory, not the server's, but still.
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        // Nagle off on our side, so the load generator adds no delay of its own.
        let (socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .context("WebSocket connect")?;
        Ok(Ws { socket, next_request: 1 })
    }

    /// Connects like [`Ws::connect`] over a socket shaped like a slow client's
    /// link: a receive buffer of `receive_buffer` bytes and a segment size of
    /// `mss`, both set before the handshake. Loopback's 64 KiB segments make
    /// the kernel give the server's side of a socket megabytes of send buffer
    /// (it sizes it from segment size x initial window): a client that stops
    /// reading would have megabytes swallowed before the server saw any
    /// backpressure. An internet path's 1460 bytes makes that ~240 KB.
    pub async fn connect_slow_link(
        url: &str,
        query: &str,
        receive_buffer: u32,
        mss: u32,
    ) -> anyhow::Result<Ws> {
        let authority = url.trim_start_matches("ws://").split('/').next().unwrap_or_default();
        let addr = tokio::net::lookup_host(authority)
            .await?
            .next()
            .with_context(|| format!("no address for {authority}"))?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_recv_buffer_size(receive_buffer)?;
        socket2::SockRef::from(&socket).set_tcp_mss(mss)?;
        let stream = socket.connect(addr).await.context("TCP connect")?;
        stream.set_nodelay(true)?;
        let url = format!("{}/?{query}", url.trim_end_matches('/'));
        let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
        let (socket, _) =
            tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(stream), Some(config))
                .await
                .context("WebSocket connect")?;
        Ok(Ws { socket, next_request: 1 })
    }

    /// Sends a Courier command and waits for its response (pushes in between are skipped).
    pub async fn call(&mut self, action: &str, fields: Value) -> anyhow::Result<Value> {
        let id = self.request(action, fields).await?;
        self.answer(action, &id).await
    }

    /// Sends a Courier command without waiting; returns its requestId for [`Ws::answer`].
    pub async fn request(&mut self, action: &str, fields: Value) -> anyhow::Result<String> {
        let id = format!("b{}", self.next_request);
        self.next_request += 1;
        let mut frame = fields;
        frame["action"] = json!(action);
        frame["requestId"] = json!(id);
        self.socket.send(Message::Text(frame.to_string().into())).await?;
        Ok(id)
    }

    /// Waits for the response to request `id`, skipping whatever comes before it.
    pub async fn answer(&mut self, action: &str, id: &str) -> anyhow::Result<Value> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .with_context(|| format!("no answer to {action} in 30 s"))?
                .context("connection closed")??;
            let Message::Text(text) = message else { continue };
            let frame: Value = serde_json::from_str(&text)?;
            if frame["type"] == "response" && frame["requestId"] == id {
                if frame["status"] != "SUCCESS" {
                    bail!("{action} failed: {frame}");
                }
                return Ok(frame["data"].clone());
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    pub fn split(self) -> (Tx, Rx) {
        let (sink, stream) = self.socket.split();
        (Tx::Ws(sink, 0), Rx::Ws(stream))
    }
}

/// A connected MQTT device: its client handle and the event loop that must be polled.
pub struct Mqtt {
    client: AsyncClient,
    events: EventLoop,
}

impl Mqtt {
    /// Connects with a persistent session (clean_session = false), like a
    /// Courier device whose inbox outlives its connection, and subscribes to
    /// `subscribe` at QoS 1 unless the session already has it.
    pub async fn connect(port: u16, id: &str, subscribe: Option<&str>) -> anyhow::Result<Mqtt> {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(64 * 1024, 64 * 1024)
            .set_request_channel_capacity(1024);
        let (client, mut events) = AsyncClient::new(options, 1024);
        let mut network = events.network_options();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        let session_present = loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = events.poll().await.context("MQTT connect")? {
                break ack.session_present;
            }
        };
        if let Some(topic) = subscribe.filter(|_| !session_present) {
            client.subscribe(topic, QoS::AtLeastOnce).await?;
            loop {
                match events.poll().await.context("MQTT subscribe")? {
                    Event::Incoming(Packet::SubAck(_)) => break,
                    _ => continue,
                }
            }
        }
        Ok(Mqtt { client, events })
    }

    /// Disconnects cleanly; the session (and its queue) stays on the broker.
    pub async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let wait = async {
            while let Ok(event) = self.events.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }

    pub fn split(self) -> (Tx, Rx) {
        (Tx::Mqtt(self.client), Rx::Mqtt(Box::new(self.events)))
    }
}

/// The sending half of a device.
pub enum Tx {
    /// The socket's sink and the next `clientMessageId`.
    Ws(SplitSink<Socket, Message>, u64),
    Mqtt(AsyncClient),
}

impl Tx {
    /// Sends one bench message (see [`stats::body`]) along `route`.
    pub async fn send(&mut self, route: &Route, body: &str) -> anyhow::Result<()> {
        match (self, route) {
            (Tx::Ws(sink, seq), Route::Chat(chat)) => {
                // A client message id on every send, as the protocol asks of real clients.
                *seq += 1;
                let frame = format!(
                    r#"{{"action":"sendMessage","chatId":"{chat}","message":"{body}","clientMessageId":"c{seq}"}}"#
                );
                sink.send(Message::Text(frame.into())).await?;
            }
            (Tx::Ws(sink, _), Route::Relay(to)) => {
                let frame = format!(r#"{{"to":{to},"body":"{body}"}}"#);
                sink.send(Message::Text(frame.into())).await?;
            }
            (Tx::Mqtt(client), Route::Topic(topic)) => {
                client.publish(topic.as_str(), QoS::AtLeastOnce, false, body.as_bytes().to_vec()).await?;
            }
            _ => bail!("route does not fit the connection"),
        }
        Ok(())
    }

    /// Sends one Courier command frame as it is (`ack`, `sync`...), answer unread.
    pub async fn command(&mut self, frame: String) -> anyhow::Result<()> {
        match self {
            Tx::Ws(sink, _) => sink.send(Message::Text(frame.into())).await?,
            Tx::Mqtt(_) => bail!("Courier commands go over WebSockets"),
        }
        Ok(())
    }
}

/// The receiving half of a device.
pub enum Rx {
    Ws(SplitStream<Socket>),
    /// Boxed: an event loop is some 700 bytes, a stream half 8.
    Mqtt(Box<EventLoop>),
}

impl Rx {
    /// The next thing that arrives; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Incoming> {
        match self {
            Rx::Ws(stream) => Some(next_text(stream).await?.map_or(Incoming::Other, |text| classify(&text))),
            Rx::Mqtt(events) => match events.poll().await.ok()? {
                // rumqttc acknowledges the publish itself (QoS 1 PUBACK) on a later poll.
                Event::Incoming(Packet::Publish(publish)) => {
                    Some(stats::sent_at(&publish.payload).map_or(Incoming::Other, Incoming::Delivery))
                }
                Event::Incoming(Packet::PubAck(_)) => Some(Incoming::Ack),
                _ => Some(Incoming::Other),
            },
        }
    }

    /// Like [`Rx::next`], for a Courier client that acks what it is pushed: a
    /// delivery comes with its messageId. WebSockets only.
    pub async fn next_acking(&mut self) -> Option<(Incoming, Option<String>)> {
        let Rx::Ws(stream) = self else { return Some((self.next().await?, None)) };
        let Some(text) = next_text(stream).await? else { return Some((Incoming::Other, None)) };
        let incoming = classify(&text);
        let id = matches!(incoming, Incoming::Delivery(_)).then(|| message_id(text.as_bytes())).flatten();
        Some((incoming, id.map(str::to_owned)))
    }
}

/// The next text frame; `Some(None)` for a frame that is not text, `None` once the socket is gone.
async fn next_text(
    stream: &mut SplitStream<Socket>,
) -> Option<Option<tokio_tungstenite::tungstenite::Utf8Bytes>> {
    match stream.next().await?.ok()? {
        Message::Text(text) => Some(Some(text)),
        Message::Close(_) => None,
        _ => Some(None),
    }
}

fn classify(text: &str) -> Incoming {
    let bytes = text.as_bytes();
    // Order matters: a FAILURE never carries a body, a push never has a status.
    if let Some(at) = stats::sent_at(bytes) {
        Incoming::Delivery(at)
    } else if contains(bytes, br#""status":"SUCCESS""#) {
        Incoming::Ack
    } else if contains(bytes, br#""status":"FAILURE""#) {
        Incoming::Failure(text.to_owned())
    } else {
        Incoming::Other
    }
}

/// The `messageId` of a pushed message, found by scanning (see the module header).
fn message_id(frame: &[u8]) -> Option<&str> {
    const KEY: &[u8] = br#""messageId":""#;
    let start = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = frame[start..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&frame[start..start + len]).ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_is_acked_by_its_message_id() {
        let push = r#"{"type":"newMessage","messageId":"01JDEVV0000000000000000000","chatId":"01J","message":"ts=42;xx"}"#;
        assert!(matches!(classify(push), Incoming::Delivery(42)));
        assert_eq!(message_id(push.as_bytes()), Some("01JDEVV0000000000000000000"));
        assert_eq!(message_id(br#"{"type":"response","status":"SUCCESS"}"#), None);
    }
}
