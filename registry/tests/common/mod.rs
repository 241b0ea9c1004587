//! A small HTTP/1.1 server for tests: every answer, fault and stall is chosen per request
//! by the test, and every request is recorded. One request per connection.

#![allow(dead_code)] // each test binary uses a different part of it

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }

    pub fn query(&self, key: &str) -> Vec<String> {
        let Some((_, q)) = self.target.split_once('?') else {
            return Vec::new();
        };
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| percent_decode(v))
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub enum Reply {
    /// A complete answer; Content-Length is added (for HEAD, the length given).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Advertises the whole body's length but sends only `send` bytes, then closes.
    Cut {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        send: usize,
    },
    /// Closes the connection without answering.
    Close,
    /// Sends headers and `prefix` of a longer body, then never sends more.
    Stall {
        status: u16,
        headers: Vec<(String, String)>,
        prefix: Vec<u8>,
        declared_len: usize,
    },
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply::Full {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        Reply::Full {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        }
    }
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

pub struct FakeServer {
    /// `127.0.0.1:PORT`
    pub host: String,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Body bytes the server managed to write, over all answers.
    pub bytes_sent: Arc<AtomicU64>,
    _shutdown: watch::Sender<bool>,
}

impl FakeServer {
    /// Serves with `handler(request, index)`, `index` counting requests from 0.
    pub async fn start(handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = watch::channel(false);
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, sent) = (requests.clone(), bytes_sent.clone());
        tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
                    _ = stop.changed() => return,
                };
                let (handler, reqs, sent, rx) =
                    (handler.clone(), reqs.clone(), sent.clone(), rx.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, handler, reqs, sent, rx).await;
                });
            }
        });
        Self {
            host,
            requests,
            bytes_sent,
            _shutdown: tx,
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    pub fn count(&self, pred: impl Fn(&Request) -> bool) -> usize {
        self.requests().iter().filter(|r| pred(r)).count()
    }
}

async fn serve(
    mut stream: TcpStream,
    handler: Arc<Handler>,
    reqs: Arc<Mutex<Vec<Request>>>,
    sent: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end + 4..].to_vec();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let mut chunk = vec![0u8; 65536];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let request = Request {
        method: method.clone(),
        target,
        headers,
        body,
    };
    let index = {
        let mut r = reqs.lock().expect("lock");
        r.push(request.clone());
        r.len() - 1
    };
    let reply = handler(&request, index);
    let head_only = method == "HEAD";
    match reply {
        Reply::Close => Ok(()),
        Reply::Full {
            status,
            headers,
            body,
        } => {
            write_head(&mut stream, status, &headers, body.len()).await?;
            if !head_only {
                write_counted(&mut stream, &body, &sent).await?;
            }
            stream.shutdown().await
        }
        Reply::Cut {
            status,
            headers,
            body,
            send,
        } => {
            write_head(&mut stream, status, &headers, body.len()).await?;
            write_counted(&mut stream, &body[..send.min(body.len())], &sent).await?;
            // A clean FIN mid-body: what was sent arrives, then the body ends early.
            stream.shutdown().await
        }
        Reply::Stall {
            status,
            headers,
            prefix,
            declared_len,
        } => {
            write_head(&mut stream, status, &headers, declared_len).await?;
            write_counted(&mut stream, &prefix, &sent).await?;
            stream.flush().await?;
            // Hold the connection open until the server is dropped.
            let _ = stop.changed().await;
            Ok(())
        }
    }
}

async fn write_head(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    len: usize,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    let has_len = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await
}

async fn write_counted(
    stream: &mut TcpStream,
    data: &[u8],
    sent: &AtomicU64,
) -> std::io::Result<()> {
    for chunk in data.chunks(16 * 1024) {
        stream.write_all(chunk).await?;
        sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// Parses `bytes=a-b,c-d` into inclusive pairs.
pub fn parse_range(value: &str) -> Vec<(u64, u64)> {
    value
        .trim()
        .strip_prefix("bytes=")
        .unwrap_or("")
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.trim().split_once('-')?;
            // `a-` runs to the end of the blob.
            let b = if b.is_empty() {
                u64::MAX
            } else {
                b.parse().ok()?
            };
            Some((a.parse().ok()?, b))
        })
        .collect()
}

/// Answers a blob GET as a correct server would: 206 for the range asked, 200 without Range.
pub fn serve_blob(req: &Request, blob: &[u8]) -> Reply {
    let size = blob.len();
    let ranges = req.header("range").map(parse_range).unwrap_or_default();
    match ranges.as_slice() {
        [] => Reply::with(
            200,
            &[("Content-Type", "application/octet-stream")],
            blob.to_vec(),
        ),
        [(a, b), ..] => {
            let (a, b) = (*a as usize, (*b as usize).min(size - 1));
            Reply::with(
                206,
                &[("Content-Range", &format!("bytes {a}-{b}/{size}"))],
                blob[a..=b].to_vec(),
            )
        }
    }
}

/// Test data: testkit's one generator of incompressible bytes.
#[allow(unused_imports)] // each test binary uses a different part of this module
pub use testkit::image::noise as pseudo_random;
