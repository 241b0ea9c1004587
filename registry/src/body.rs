//! Response bodies read to what was asked: whole bodies within a limit, exact lengths,
//! `Content-Range`, a prefix of an answer that ignored `Range`, streams handed over as they
//! arrive.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap};

use crate::error::{Error, Result, Target};

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A parsed `Content-Range: bytes start-end/total` (`total` is `None` for `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    /// Inclusive.
    pub end: u64,
    pub total: Option<u64>,
}

pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    // end == u64::MAX would overflow every length computed from it.
    if end < start || end == u64::MAX || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    target: &Target,
    limit: usize,
) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(target, "reading the response body", e))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(Error::bad(
                target,
                format!("response body larger than {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads exactly `expected` bytes: fewer is [`Error::Truncated`], more is an error too.
pub(crate) async fn read_exact(
    mut resp: reqwest::Response,
    target: &Target,
    expected: u64,
) -> Result<Bytes> {
    let cap = usize::try_from(expected)
        .map_err(|_| Error::bad(target, "range too large for this machine"))?;
    let mut buf = BytesMut::with_capacity(cap.min(64 << 20));
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(target, "reading the response body", e))?
    {
        if buf.len() + chunk.len() > cap {
            return Err(Error::bad(
                target,
                format!("server sent more than the {expected} bytes asked for"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.len() < cap {
        return Err(Error::Truncated {
            target: target.clone(),
            expected,
            got: buf.len() as u64,
        });
    }
    Ok(buf.freeze())
}

/// Streams exactly `expected` bytes of a body into `sink`.
pub(crate) async fn stream_exact(
    mut resp: reqwest::Response,
    target: &Target,
    expected: u64,
    sink: &StreamSink<'_>,
) -> Result<()> {
    let mut at = 0u64;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::transport(target, "reading the response body", e))?
    {
        if at + chunk.len() as u64 > expected {
            return Err(Error::bad(
                target,
                format!("server sent more than the {expected} bytes asked for"),
            ));
        }
        let n = chunk.len() as u64;
        sink.deliver(at, chunk);
        at += n;
    }
    if at < expected {
        return Err(Error::Truncated {
            target: target.clone(),
            expected,
            got: at,
        });
    }
    Ok(())
}

/// Reads the first `need` bytes of a body and drops the rest unread.
pub(crate) async fn read_prefix(
    mut resp: reqwest::Response,
    target: &Target,
    need: u64,
) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(need as usize);
    while (buf.len() as u64) < need {
        match resp
            .chunk()
            .await
            .map_err(|e| Error::transport(target, "reading the response body", e))?
        {
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => {
                return Err(Error::Truncated {
                    target: target.clone(),
                    expected: need,
                    got: buf.len() as u64,
                });
            }
        }
    }
    buf.truncate(need as usize);
    Ok(buf.freeze())
}

/// What a range read does with the body: collect it, or hand it over as it arrives.
pub(crate) enum Body<'a> {
    Collect,
    Stream(StreamSink<'a>),
}

pub(crate) struct StreamSink<'a> {
    on_data: &'a (dyn Fn(Bytes) + Send + Sync),
    /// Bytes of the range handed over so far, across retries.
    delivered: AtomicU64,
}

impl<'a> StreamSink<'a> {
    pub(crate) fn new(on_data: &'a (dyn Fn(Bytes) + Send + Sync)) -> Self {
        StreamSink {
            on_data,
            delivered: AtomicU64::new(0),
        }
    }

    /// Hands over what of `data` (which starts `at` bytes into the range) is new.
    pub(crate) fn deliver(&self, at: u64, data: Bytes) {
        let done = self.delivered.load(Ordering::Relaxed);
        let end = at + data.len() as u64;
        if end > done {
            let skip = done.saturating_sub(at) as usize;
            (self.on_data)(data.slice(skip..));
            self.delivered.store(end, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 0-99/1234"),
            Some(ContentRange {
                start: 0,
                end: 99,
                total: Some(1234)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*"),
            Some(ContentRange {
                start: 5,
                end: 5,
                total: None
            })
        );
        for bad in [
            "bytes 10-5/100",
            "bytes 0-18446744073709551615/*",
            "bytes 0-100/100",
            "items 0-1/2",
            "bytes */100",
            "bytes 0-1",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
