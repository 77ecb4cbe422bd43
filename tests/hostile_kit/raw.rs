//! HTTP/1.1 over a bare TCP socket: what no well-behaved client library will send.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the server did with a hostile request.
#[derive(Debug)]
pub struct Outcome {
    /// The status line's code, if an answer came.
    pub status: Option<u16>,
    /// The whole answer as text (lossy).
    pub answer: String,
    /// From the first byte sent until the server closed the connection (or answered and closed).
    pub closed_after: Duration,
    /// Bytes the client managed to write.
    pub written: usize,
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(answer.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends `head` at once, then `trickle` one byte per `interval`, then `rest` as fast as the
/// server reads it (in 64 KiB pieces), while reading the answer; stops when the server closes the
/// connection or `give_up` passes (then `closed_after` is `give_up`).
pub async fn attack(
    addr: SocketAddr,
    head: &[u8],
    trickle: &[u8],
    interval: Duration,
    rest: impl Iterator<Item = Vec<u8>> + Send,
    give_up: Duration,
) -> Outcome {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let started = Instant::now();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let so_far = seen.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => so_far.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
        let answer = so_far.lock().unwrap().clone();
        (answer, started.elapsed())
    });
    let mut written = 0usize;
    let writer = async {
        if wr.write_all(head).await.is_err() {
            return;
        }
        written += head.len();
        for b in trickle {
            tokio::time::sleep(interval).await;
            if wr.write_all(std::slice::from_ref(b)).await.is_err() {
                return;
            }
            written += 1;
        }
        for piece in rest {
            if wr.write_all(&piece).await.is_err() {
                return;
            }
            written += piece.len();
        }
        // Everything sent: wait for the server (the reader ends the race).
        std::future::pending::<()>().await;
    };
    let mut reader = reader;
    let done = tokio::time::timeout(give_up, async {
        tokio::select! {
            r = &mut reader => r.ok(),
            // The server stopped reading and closed: its answer may still be on its way to the
            // reader (aborting the reader here lost it, which looked like no answer at all).
            () = writer => (&mut reader).await.ok(),
        }
    })
    .await;
    let (answer, closed_after) = match done {
        Ok(Some(r)) => r,
        _ => {
            reader.abort();
            // Never closed: what it answered anyway.
            (seen.lock().unwrap().clone(), give_up)
        }
    };
    Outcome {
        status: status_of(&answer),
        answer: String::from_utf8_lossy(&answer).into_owned(),
        closed_after,
        written,
    }
}

/// A complete request with `body`, sent at once; the answer.
pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> Outcome {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    head.extend_from_slice(body);
    attack(
        addr,
        &head,
        &[],
        Duration::ZERO,
        std::iter::empty(),
        Duration::from_secs(20),
    )
    .await
}

/// Slowloris: a request line and one header, then one header byte per `interval`, never
/// finishing the headers.
pub async fn slow_headers(addr: SocketAddr, path: &str, interval: Duration, give_up: Duration) -> Outcome {
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Slow: ");
    let trickle = vec![b'a'; 1000];
    attack(addr, head.as_bytes(), &trickle, interval, std::iter::empty(), give_up).await
}

/// Complete headers announcing a body of 1,000 bytes, then one body byte per `interval`.
pub async fn slow_body(
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
    interval: Duration,
    give_up: Duration,
) -> Outcome {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n{extra_headers}\r\n"
    );
    let trickle = vec![b' '; 1000];
    attack(addr, head.as_bytes(), &trickle, interval, std::iter::empty(), give_up).await
}
