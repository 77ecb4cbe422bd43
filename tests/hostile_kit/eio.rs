//! A bare engine.io v4 client on HTTP long-polling, speaking Socket.IO v5 packets as text: enough to
//! authenticate like a legacy agent and then send what socket.io-client never would.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const NAMESPACE: &str = "/v1/dmr-agent-events";
pub const SEND_EVENT: &str = "dmr:agents:message-to-dmr-server";
const SEPARATOR: char = '\u{1e}';

pub struct Eio {
    http: reqwest::Client,
    url: String,
    /// Socket.IO packets received and not yet taken, in order.
    pub received: Vec<String>,
    /// Whether the server closed the engine.io session (or the transport failed).
    pub closed: bool,
}

/// The engine.io handshake; `None` if the server refused it (its status).
pub async fn open(http: &reqwest::Client, server: SocketAddr) -> Result<Eio, u16> {
    let base = format!("http://{server}/socket.io/?EIO=4&transport=polling");
    let r = http.get(&base).send().await.map_err(|_| 0u16)?;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let open: Value = text
        .strip_prefix('0')
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or(status)?;
    let sid = open["sid"].as_str().ok_or(status)?;
    Ok(Eio {
        http: http.clone(),
        url: format!("{base}&sid={sid}"),
        received: Vec::new(),
        closed: false,
    })
}

impl Eio {
    /// POSTs raw bytes as one polling payload; the HTTP status.
    pub async fn post_raw(&self, body: Vec<u8>) -> u16 {
        match self.http.post(&self.url).body(body).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Sends engine.io packets (joined by the record separator).
    pub async fn send(&self, packets: &[String]) -> u16 {
        let joined = packets.join(&SEPARATOR.to_string());
        self.post_raw(joined.into_bytes()).await
    }

    /// The Socket.IO CONNECT to the namespace with `auth`.
    pub fn connect_packet(auth: &Value) -> String {
        format!("40{NAMESPACE},{auth}")
    }

    /// An EVENT with ack id `ack`.
    pub fn event_packet(ack: u32, event: &str, data: &Value) -> String {
        format!("42{NAMESPACE},{ack}{}", json!([event, data]))
    }

    /// Sends `packets` while a long-poll is already waiting, as socket.io-client does: a server
    /// that answers and then closes the session at once (a refusal) can only be heard this way.
    pub async fn send_while_polling(&mut self, packets: &[String]) -> u16 {
        let (http, url) = (self.http.clone(), self.url.clone());
        let waiting = tokio::spawn(async move { http.get(&url).timeout(Duration::from_secs(30)).send().await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = self.send(packets).await;
        let answer = waiting.await.expect("poll task");
        self.take(answer).await;
        status
    }

    /// One long-poll; answers pings; marks `closed` on a close packet or a refused poll.
    async fn poll(&mut self) {
        let answer = self.http.get(&self.url).timeout(Duration::from_secs(30)).send().await;
        self.take(answer).await;
    }

    async fn take(&mut self, answer: reqwest::Result<reqwest::Response>) {
        let r = match answer {
            Ok(r) if r.status().is_success() => r,
            other => {
                if std::env::var("EIO_DEBUG").is_ok() {
                    eprintln!("poll refused: {other:?}");
                }
                self.closed = true;
                return;
            }
        };
        let text = r.text().await.unwrap_or_default();
        if std::env::var("EIO_DEBUG").is_ok() {
            eprintln!("poll: {text:?}");
        }
        for packet in text.split(SEPARATOR) {
            match packet.chars().next() {
                Some('2') => {
                    self.send(&["3".to_owned()]).await;
                }
                Some('1') => self.closed = true,
                Some('4') => self.received.push(packet[1..].to_owned()),
                _ => {}
            }
        }
    }

    /// Polls until a received Socket.IO packet satisfies `want` (returned, and taken), the session
    /// closes, or `timeout` passes.
    pub async fn wait_for(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.received.iter().position(|p| want(p)) {
                return Some(self.received.remove(i));
            }
            if self.closed || Instant::now() > deadline {
                return None;
            }
            let _ = tokio::time::timeout_at(deadline.into(), self.poll()).await;
        }
    }

    /// The server's `dmr:error` event (why it refuses), waiting up to `timeout`.
    pub async fn refusal(&mut self, timeout: Duration) -> Option<Value> {
        let prefix = format!("2{NAMESPACE},[\"dmr:error\"");
        let packet = self.wait_for(timeout, |p| p.starts_with(&prefix)).await?;
        let json = packet.strip_prefix(&format!("2{NAMESPACE},"))?;
        serde_json::from_str::<Value>(json).ok()?.get(1).cloned()
    }

    /// The ack with id `ack`, waiting up to `timeout`.
    pub async fn ack(&mut self, ack: u32, timeout: Duration) -> Option<Value> {
        let prefix = format!("3{NAMESPACE},{ack}[");
        let packet = self.wait_for(timeout, |p| p.starts_with(&prefix)).await?;
        serde_json::from_str::<Value>(&packet[prefix.len() - 1..])
            .ok()?
            .get(0)
            .cloned()
    }
}
