//! Makes gRPC clients that send a socket path as HTTP/2 `:authority` acceptable.
//!
//! containerd dials `unix://PATH` and sends `localhost`, but other clients of a unix
//! socket (grpc-go dialling a bare path, as containerd's snapshotter test suite does,
//! grpc-java, Python) send the path itself. hyper's HTTP/2 server rejects that as a
//! malformed authority and resets every stream. This relay sits between the socket and
//! the gRPC server: it decodes each client header block (HPACK), replaces an
//! `:authority` that is not a valid URI authority with `localhost`, and re-encodes the
//! block with literals only, so the server's header table is never touched. Everything
//! else passes through byte for byte.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames of this size (the protocol's minimum maximum).
const MAX_OUT_FRAME: usize = 16_384;
/// Bounds what a client can make us buffer for one header block.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Wraps one accepted connection; the returned stream is what the gRPC server serves.
pub fn relay<S>(client: S) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, ours) = tokio::io::duplex(256 * 1024);
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut ours_read, ours_write) = tokio::io::split(ours);
    tokio::spawn(async move {
        let mut ours_write = ours_write;
        if let Err(e) = rewrite_client_frames(client_read, &mut ours_write).await {
            tracing::debug!(error = %e, "client connection ended");
        }
        // However the client side ended, the server must see the end of the stream,
        // or it would keep the connection (and a graceful shutdown) waiting forever.
        let _ = ours_write.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut ours_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    server_side
}

async fn rewrite_client_frames<R, W>(mut from: R, to: &mut W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server answer it as it sees fit.
        tokio::io::copy(&mut from, to).await?;
        return Ok(());
    }
    let mut decoder = loona_hpack::Decoder::new();
    loop {
        let mut header = [0u8; 9];
        match from.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (len, kind, flags, stream) = parse_frame_header(&header);
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if kind != FRAME_HEADERS {
            to.write_all(&header).await?;
            to.write_all(&payload).await?;
            to.flush().await?;
            continue;
        }
        let (priority, mut block) = headers_fragment(flags, &payload)?;
        let mut end_headers = flags & FLAG_END_HEADERS != 0;
        while !end_headers {
            let mut next = [0u8; 9];
            from.read_exact(&mut next).await?;
            let (len, kind, cflags, cstream) = parse_frame_header(&next);
            if kind != FRAME_CONTINUATION || cstream != stream {
                return Err(invalid("header block interrupted by another frame"));
            }
            if block.len() + len > MAX_HEADER_BLOCK {
                return Err(invalid("header block too large"));
            }
            let start = block.len();
            block.resize(start + len, 0);
            from.read_exact(&mut block[start..]).await?;
            end_headers = cflags & FLAG_END_HEADERS != 0;
        }
        let fields = decoder
            .decode(&block)
            .map_err(|e| invalid(&format!("undecodable header block: {e:?}")))?;
        let encoded = encode_literals(fields.into_iter().map(|(name, value)| {
            if name == b":authority" && !is_valid_authority(&value) {
                (name, b"localhost".to_vec())
            } else {
                (name, value)
            }
        }));
        write_header_block(to, stream, flags & FLAG_END_STREAM, priority, &encoded).await?;
        to.flush().await?;
    }
}

fn parse_frame_header(h: &[u8; 9]) -> (usize, u8, u8, u32) {
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    (len, h[3], h[4], stream)
}

/// Splits a HEADERS payload into its priority fields (if any) and header block fragment.
fn headers_fragment(flags: u8, payload: &[u8]) -> std::io::Result<(Option<[u8; 5]>, Vec<u8>)> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&n, rest) = body
            .split_first()
            .ok_or_else(|| invalid("empty padded frame"))?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        if body.len() < 5 {
            return Err(invalid("short priority fields"));
        }
        let mut p = [0u8; 5];
        p.copy_from_slice(&body[..5]);
        priority = Some(p);
        body = &body[5..];
    }
    if pad > body.len() {
        return Err(invalid("padding longer than the frame"));
    }
    Ok((priority, body[..body.len() - pad].to_vec()))
}

async fn write_header_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    stream: u32,
    end_stream: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> std::io::Result<()> {
    let room = MAX_OUT_FRAME - priority.map_or(0, |_| 5);
    let first_len = block.len().min(room);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = end_stream | priority.map_or(0, |_| FLAG_PRIORITY);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let mut payload = Vec::with_capacity(first_len + 5);
    if let Some(p) = priority {
        payload.extend_from_slice(&p);
    }
    payload.extend_from_slice(first);
    write_frame(to, FRAME_HEADERS, flags, stream, &payload).await?;
    while !rest.is_empty() {
        let n = rest.len().min(MAX_OUT_FRAME);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame(to, FRAME_CONTINUATION, flags, stream, chunk).await?;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = payload.len();
    let mut header = [0u8; 9];
    header[0] = (len >> 16) as u8;
    header[1] = (len >> 8) as u8;
    header[2] = len as u8;
    header[3] = kind;
    header[4] = flags;
    header[5..9].copy_from_slice(&stream.to_be_bytes());
    to.write_all(&header).await?;
    to.write_all(payload).await
}

/// HPACK "literal header field without indexing, new name" for every field.
fn encode_literals(fields: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        encode_string(&mut out, &name);
        encode_string(&mut out, &value);
    }
    out
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // 7-bit prefix integer, Huffman flag off.
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// What hyper's server accepts as an authority: host[:port], no path characters.
fn is_valid_authority(value: &[u8]) -> bool {
    !value.is_empty()
        && value.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'-'
                        | b'_'
                        | b'~'
                        | b':'
                        | b'['
                        | b']'
                        | b'@'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_encoding_decodes_back() {
        let fields = vec![
            (b":authority".to_vec(), b"localhost".to_vec()),
            (b"x-long".to_vec(), vec![b'a'; 300]),
        ];
        let encoded = encode_literals(fields.clone().into_iter());
        let decoded = loona_hpack::Decoder::new().decode(&encoded).unwrap();
        assert_eq!(decoded, fields);
    }

    #[test]
    fn socket_paths_are_not_authorities() {
        assert!(!is_valid_authority(b"/run/lazysnap/lazysnap.sock"));
        assert!(!is_valid_authority(b"%2Frun%2Fx.sock"));
        assert!(!is_valid_authority(b""));
        assert!(is_valid_authority(b"localhost"));
        assert!(is_valid_authority(b"127.0.0.1:5000"));
    }

    #[test]
    fn padded_and_priority_fragments_are_unwrapped() {
        let payload = [2u8, 0, 0, 0, 1, 16, b'a', b'b', 0, 0];
        let (priority, block) = headers_fragment(FLAG_PADDED | FLAG_PRIORITY, &payload).unwrap();
        assert_eq!(priority, Some([0, 0, 0, 1, 16]));
        assert_eq!(block, b"ab");
        assert!(headers_fragment(FLAG_PADDED, &[9, 1]).is_err());
        assert!(headers_fragment(FLAG_PRIORITY, &[0, 0]).is_err());
    }
}
