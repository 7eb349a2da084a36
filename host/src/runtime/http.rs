//! HTTP/1.1 on one Unix-socket connection to the runtime (SPEC §3), client side: a request
//! written with one `write`, the answer's head parsed by `httparse`, its body framed by
//! `Content-Length`, the chunked transfer coding (chunk sizes parsed by `httparse`) or the
//! end of the connection (HTTP/1.0, or no length given).
//!
//! Why not hyper's client (which the host used before): one runtime call is on every
//! envelope's path, and hyper's dispatcher, header map and body channel cost ~18 k
//! instructions per call (callgrind) — on a slow 2-core VM ~15–20 µs, a third of the whole
//! raw round trip (docs/NOTES.md, "The runtime client without hyper"). The runtime protocol
//! needs one request at a time per connection, a handful of headers and three body framings;
//! this is that and nothing more. hyper still serves and calls everything else (admin,
//! gateway).

use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::RuntimeError;

/// Most response-head bytes accepted (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 32;
/// Bytes asked of the socket per read at least.
const READ_CHUNK: usize = 8 * 1024;

/// One keep-alive connection: the socket and what was read from it but not consumed yet.
pub(crate) struct Conn {
    io: UnixStream,
    buf: BytesMut,
    /// The request being written (kept to reuse its allocation).
    out: Vec<u8>,
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// A response's status line and the headers the runtime protocol uses.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: u16,
    /// `Content-Type: text/event-stream`: a streamed answer (SSE).
    pub event_stream: bool,
    /// The `X-Request-Id` the runtime echoed, if any.
    pub request_id: Option<Bytes>,
    framing: Framing,
    /// The connection may carry another request after this response.
    keep_alive: bool,
}

impl Head {
    /// The reader of this response's body.
    pub fn body(&self) -> Body {
        Body {
            state: match self.framing {
                Framing::Length(n) => State::Length(n),
                Framing::Chunked => State::ChunkSize,
                Framing::Close => State::Close,
            },
        }
    }
}

/// A connection failure before any byte of the answer: the runtime is gone or went away
/// (see [`RuntimeError::is_lost`]).
fn lost(e: std::io::Error) -> RuntimeError {
    RuntimeError::Connection(e)
}

fn malformed(what: impl Into<String>) -> RuntimeError {
    RuntimeError::Malformed(what.into())
}

impl Conn {
    pub async fn connect(path: &std::path::Path) -> std::io::Result<Conn> {
        Ok(Conn {
            io: UnixStream::connect(path).await?,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::new(),
        })
    }

    /// Can this pooled connection carry a request? Not when the runtime closed it, or sent
    /// bytes nobody asked for (a late answer). Costs no system call while the socket has
    /// had no event since its last read.
    pub fn is_reusable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => matches!(
                self.io.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Write `POST /invoke` with the envelope: `Host`, the request id, JSON content type and
    /// length, the body — one buffer, one `write`.
    pub async fn send_invoke(
        &mut self,
        envelope: &[u8],
        request_id: &str,
    ) -> Result<(), RuntimeError> {
        let out = &mut self.out;
        out.clear();
        out.reserve(160 + envelope.len());
        out.extend_from_slice(b"POST /invoke HTTP/1.1\r\nhost: localhost\r\nx-request-id: ");
        out.extend_from_slice(request_id.as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(envelope.len()).as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(envelope);
        self.io.write_all(&self.out).await.map_err(lost)
    }

    /// Read more bytes into the buffer; `Ok(0)` at the end of the connection.
    async fn fill(&mut self, at_least: usize) -> std::io::Result<usize> {
        self.buf.reserve(at_least.max(READ_CHUNK));
        self.io.read_buf(&mut self.buf).await
    }

    /// Read and parse the response head (informational 1xx answers are skipped).
    pub async fn read_head(&mut self) -> Result<Head, RuntimeError> {
        // The connection ending before any byte of the answer is a lost runtime; after
        // some, a broken answer.
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some((len, head)) = parse_head(&self.buf)? {
                    self.buf.advance(len);
                    if (100..200).contains(&head.status) && head.status != 101 {
                        continue;
                    }
                    return Ok(head);
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(malformed(format!(
                        "response head is longer than {MAX_HEAD} bytes"
                    )));
                }
            }
            match self.fill(0).await {
                Ok(0) if answered => {
                    return Err(malformed(
                        "the runtime closed the connection in the middle of the response head",
                    ))
                }
                Ok(0) => {
                    return Err(lost(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the runtime closed the connection without answering",
                    )))
                }
                Ok(_) => {}
                Err(e) if answered => {
                    return Err(malformed(format!(
                        "the connection failed in the middle of the response head: {e}"
                    )))
                }
                Err(e) => return Err(lost(e)),
            }
        }
    }

    /// The whole body of `head`'s response, at most `max` bytes. Returns it and whether the
    /// connection can carry another request.
    pub async fn read_body(
        &mut self,
        head: &Head,
        max: usize,
    ) -> Result<(Bytes, bool), RuntimeError> {
        if let Framing::Length(n) = head.framing {
            // One piece, no copy: wait until all of it is buffered.
            if n > max {
                return Err(RuntimeError::BodyTooLarge(max));
            }
            while self.buf.len() < n {
                let want = n - self.buf.len();
                match self.fill(want).await {
                    Ok(0) => return Err(mid_body_eof()),
                    Ok(_) => {}
                    Err(e) => return Err(mid_body_error(e)),
                }
            }
            let body = self.buf.split_to(n).freeze();
            return Ok((body, head.keep_alive && self.buf.is_empty()));
        }
        let mut reader = head.body();
        let mut body = BytesMut::new();
        while let Some(piece) = reader.next(self).await? {
            if body.len() + piece.len() > max {
                return Err(RuntimeError::BodyTooLarge(max));
            }
            body.extend_from_slice(&piece);
        }
        // (`keep_alive` is false for a body delimited by the end of the connection.)
        Ok((body.freeze(), head.keep_alive && self.buf.is_empty()))
    }
}

fn mid_body_eof() -> RuntimeError {
    malformed("the runtime closed the connection in the middle of the response body")
}

fn mid_body_error(e: std::io::Error) -> RuntimeError {
    malformed(format!(
        "the connection failed in the middle of the response body: {e}"
    ))
}

/// Parse a complete head at the start of `buf`: its length and what it says; `None` while
/// it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, RuntimeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(malformed(format!("response head does not parse: {e}"))),
    };
    let status = resp.code.unwrap_or_default();
    let http10 = resp.version == Some(0);
    let (mut length, mut chunked, mut coded) = (None, false, false);
    let (mut close, mut keep_alive) = (false, false);
    let (mut event_stream, mut request_id) = (false, None);
    for h in resp.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| malformed("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(malformed("several different Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The body is chunked when chunked is the last coding; any other coding leaves
            // it delimited by the end of the connection (RFC 9112 §6.3).
            coded = true;
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            event_stream =
                h.value.len() >= 17 && h.value[..17].eq_ignore_ascii_case(b"text/event-stream");
        } else if name.eq_ignore_ascii_case(super::REQUEST_ID) {
            request_id = Some(Bytes::copy_from_slice(h.value));
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    let keep_alive = framing != Framing::Close && !close && (!http10 || keep_alive);
    Ok(Some((
        len,
        Head {
            status,
            event_stream,
            request_id,
            framing,
            keep_alive,
        },
    )))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(|t| t.trim_ascii())
}

/// Where a body reader is.
#[derive(Debug)]
enum State {
    /// This many bytes are left.
    Length(usize),
    /// Until the connection ends.
    Close,
    ChunkSize,
    /// This many bytes are left of the current chunk.
    ChunkData(usize),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines up to the empty line.
    Trailers,
    Done,
}

/// A response body read piece by piece (for streamed answers, and bodies that are not one
/// `Content-Length` piece).
#[derive(Debug)]
pub(crate) struct Body {
    state: State,
}

impl Body {
    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn next(&mut self, c: &mut Conn) -> Result<Option<Bytes>, RuntimeError> {
        loop {
            match self.state {
                State::Done | State::Length(0) => {
                    self.state = State::Done;
                    return Ok(None);
                }
                State::Length(left) | State::ChunkData(left) => {
                    if c.buf.is_empty() && read(c).await? == 0 {
                        return Err(mid_body_eof());
                    }
                    let n = left.min(c.buf.len());
                    let piece = c.buf.split_to(n).freeze();
                    self.state = match self.state {
                        State::Length(_) => State::Length(left - n),
                        _ if left == n => State::ChunkEnd,
                        _ => State::ChunkData(left - n),
                    };
                    return Ok(Some(piece));
                }
                State::Close => {
                    if c.buf.is_empty() && read(c).await? == 0 {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    return Ok(Some(c.buf.split().freeze()));
                }
                State::ChunkSize => match httparse::parse_chunk_size(&c.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        c.buf.advance(used);
                        self.state = match usize::try_from(size) {
                            Ok(0) => State::Trailers,
                            Ok(n) => State::ChunkData(n),
                            Err(_) => return Err(malformed("chunk size out of range")),
                        };
                    }
                    Ok(httparse::Status::Partial) => need_more(c).await?,
                    Err(_) => return Err(malformed("chunk size does not parse")),
                },
                State::ChunkEnd => {
                    if c.buf.len() < 2 {
                        need_more(c).await?;
                    } else if &c.buf[..2] == b"\r\n" {
                        c.buf.advance(2);
                        self.state = State::ChunkSize;
                    } else {
                        return Err(malformed("chunk data is not followed by CRLF"));
                    }
                }
                State::Trailers => match c.buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        c.buf.advance(2);
                        self.state = State::Done;
                    }
                    Some(end) => c.buf.advance(end + 2),
                    None => need_more(c).await?,
                },
            }
        }
    }
}

/// Read into the buffer; a failure mid-body is a broken answer.
async fn read(c: &mut Conn) -> Result<usize, RuntimeError> {
    c.fill(0).await.map_err(mid_body_error)
}

/// Read into the buffer where the body cannot end yet.
async fn need_more(c: &mut Conn) -> Result<(), RuntimeError> {
    if c.buf.len() > MAX_HEAD {
        return Err(malformed("chunk framing line is too long"));
    }
    match read(c).await? {
        0 => Err(mid_body_eof()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! Framing against a real Unix socket whose other end writes scripted bytes, split at
    //! awkward places.
    use super::*;
    use tokio::net::UnixListener;

    /// A connection whose peer reads one request and answers `parts` (flushed one by one,
    /// with a pause between), then keeps the connection open (`close` false) or closes it.
    async fn answered(parts: Vec<&'static [u8]>, close: bool) -> (Conn, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req).await.unwrap();
            for p in parts {
                s.write_all(p).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            if !close {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
        let mut c = Conn::connect(&path).await.unwrap();
        c.send_invoke(b"{}", "r1").await.unwrap();
        (c, dir)
    }

    async fn whole(
        parts: Vec<&'static [u8]>,
        close: bool,
    ) -> Result<(Head, Bytes, bool), RuntimeError> {
        let (mut c, _dir) = answered(parts, close).await;
        let head = c.read_head().await?;
        let (body, reusable) = c.read_body(&head, 1024).await?;
        Ok((head, body, reusable))
    }

    #[tokio::test]
    async fn content_length_split_across_reads_keeps_the_connection() {
        let (head, body, reusable) = whole(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Le",
                b"ngth: 5\r\nX-Request-Id: r1\r\n\r\nab",
                b"cde",
            ],
            false,
        )
        .await
        .unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.request_id.as_deref(), Some(&b"r1"[..]));
        assert!(!head.event_stream);
        assert_eq!(&body[..], b"abcde");
        assert!(reusable);
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let (_, body, reusable) = whole(
            vec![
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;x=1\r\nabc\r",
                b"\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n",
                b"\r\n",
            ],
            false,
        )
        .await
        .unwrap();
        assert_eq!(&body[..], b"abc0123456789abcdef");
        assert!(reusable);
    }

    #[tokio::test]
    async fn http10_body_ends_with_the_connection_and_is_not_reused() {
        let (head, body, reusable) =
            whole(vec![b"HTTP/1.0 200 OK\r\n\r\n{\"frames\"", b":[]}"], true)
                .await
                .unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&body[..], b"{\"frames\":[]}");
        assert!(!reusable);
    }

    #[tokio::test]
    async fn http10_keep_alive_and_http11_close_are_honoured() {
        let (_, _, reusable) = whole(
            vec![b"HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n"],
            false,
        )
        .await
        .unwrap();
        assert!(reusable, "HTTP/1.0 with keep-alive");
        let (_, _, reusable) = whole(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"],
            false,
        )
        .await
        .unwrap();
        assert!(!reusable, "Connection: close");
    }

    #[tokio::test]
    async fn informational_answers_are_skipped() {
        let (head, body, _) = whole(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}"],
            false,
        )
        .await
        .unwrap();
        assert_eq!(head.status, 500);
        assert_eq!(&body[..], b"{}");
    }

    #[tokio::test]
    async fn closing_before_any_byte_is_lost_and_mid_response_is_malformed() {
        let e = whole(vec![], true).await.unwrap_err();
        assert!(e.is_lost(), "{e}");
        for parts in [
            vec![&b"HTTP/1.1 200 OK\r\nContent-"[..]],
            vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"frames\":"[..]],
            vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"[..]],
        ] {
            let e = whole(parts, true).await.unwrap_err();
            assert!(matches!(e, RuntimeError::Malformed(_)), "{e}");
            assert!(!e.is_lost());
        }
    }

    #[tokio::test]
    async fn broken_framing_is_malformed_and_limits_hold() {
        for parts in [
            vec![&b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..]],
            vec![&b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..]],
            vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..]],
            vec![&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXY"[..]],
            vec![&b"NOT HTTP\r\n\r\n"[..]],
        ] {
            let e = whole(parts, true).await.unwrap_err();
            assert!(matches!(e, RuntimeError::Malformed(_)), "{e}");
        }
        let e = whole(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n"],
            true,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RuntimeError::BodyTooLarge(1024)), "{e}");
        let big: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"[..],
                &[b'x'; 2048],
                b"\r\n0\r\n\r\n",
            ]
            .concat()
            .into_boxed_slice(),
        );
        let e = whole(vec![big], true).await.unwrap_err();
        assert!(matches!(e, RuntimeError::BodyTooLarge(1024)), "{e}");
    }

    #[tokio::test]
    async fn a_pooled_connection_the_runtime_closed_or_wrote_to_is_not_reused() {
        let (mut c, _dir) = answered(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"],
            true,
        )
        .await;
        let head = c.read_head().await.unwrap();
        let (_, reusable) = c.read_body(&head, 1024).await.unwrap();
        assert!(reusable, "the answer itself allows reuse");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!c.is_reusable(), "the peer has closed the connection");

        let (mut c, _dir) = answered(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            ],
            false,
        )
        .await;
        let head = c.read_head().await.unwrap();
        c.read_body(&head, 1024).await.unwrap();
        assert!(c.is_reusable(), "nothing else arrived yet");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!c.is_reusable(), "a late answer arrived");
    }

    #[tokio::test]
    async fn event_stream_is_read_piece_by_piece() {
        let (mut c, _dir) = answered(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"6\r\nevent:\r\n",
                b"2\r\n a\r\n0\r\n\r\n",
            ],
            false,
        )
        .await;
        let head = c.read_head().await.unwrap();
        assert!(head.event_stream);
        let mut body = head.body();
        let mut got = Vec::new();
        while let Some(p) = body.next(&mut c).await.unwrap() {
            got.extend_from_slice(&p);
        }
        assert_eq!(&got[..], b"event: a");
        assert!(body.next(&mut c).await.unwrap().is_none(), "stays ended");
    }
}
