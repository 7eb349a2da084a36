//! Server-sent events from a streaming handler: `downstream` (a frame), `upstream`
//! (progress), `error` (the handler failed mid-stream), `done` (last).

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;
use tokio::time::Instant;

use super::http::{Body, Conn};
use super::{ErrorBody, RuntimeError};
use crate::envelope::{ErrorInfo, Frame};

/// One event of the stream.
#[derive(Debug)]
pub enum SseEvent {
    Downstream(Box<Frame>),
    Upstream(Value),
    Error(ErrorInfo),
    Done,
}

/// An SSE response being read.
pub struct SseStream {
    body: Body,
    buf: BytesMut,
    deadline: Instant,
    max_event: usize,
    finished: bool,
    // The connection the stream arrives on (not pooled again).
    conn: Conn,
}

impl std::fmt::Debug for SseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseStream")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl SseStream {
    pub(super) fn new(conn: Conn, body: Body, deadline: Instant, max_event: usize) -> Self {
        SseStream {
            body,
            buf: BytesMut::new(),
            deadline,
            max_event,
            finished: false,
            conn,
        }
    }

    /// The next complete event already in the buffer, if any.
    fn buffered(&mut self) -> Option<Result<Option<SseEvent>, RuntimeError>> {
        if self.finished {
            return Some(Ok(None));
        }
        while let Some(raw) = take_event(&mut self.buf) {
            match parse_event(&raw) {
                Err(e) => return Some(Err(e)),
                Ok(None) => continue,
                Ok(Some(ev)) => {
                    if matches!(ev, SseEvent::Done) {
                        self.finished = true;
                    }
                    return Some(Ok(Some(ev)));
                }
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl super::EventStream for SseStream {
    async fn next(&mut self) -> Result<Option<SseEvent>, RuntimeError> {
        loop {
            if let Some(ev) = self.buffered() {
                return ev;
            }
            if self.buf.len() > self.max_event {
                return Err(RuntimeError::BodyTooLarge(self.max_event));
            }
            let timeout = self.deadline.saturating_duration_since(Instant::now());
            let next = self.body.next(&mut self.conn);
            let piece = tokio::time::timeout_at(self.deadline, next)
                .await
                .map_err(|_| RuntimeError::Timeout(timeout))??;
            match piece {
                None => {
                    return Err(RuntimeError::Malformed(
                        "event stream ended before the done event".into(),
                    ))
                }
                Some(data) => self.buf.extend_from_slice(&data),
            }
        }
    }

    fn next_buffered(&mut self) -> Option<Result<Option<SseEvent>, RuntimeError>> {
        self.buffered()
    }
}

/// Split off one complete event (terminated by a blank line), if buffered.
fn take_event(buf: &mut BytesMut) -> Option<Bytes> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                let ev = buf.split_to(i).freeze();
                buf.advance(2);
                return Some(ev);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                let ev = buf.split_to(i).freeze();
                buf.advance(3);
                return Some(ev);
            }
        }
        i += 1;
    }
    None
}

fn parse_event(raw: &[u8]) -> Result<Option<SseEvent>, RuntimeError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| RuntimeError::Malformed("event stream is not UTF-8".into()))?;
    let mut event = "message";
    let mut data = String::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = value,
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
    }
    let bad = |what: &str, e: serde_json::Error| {
        RuntimeError::Malformed(format!("{what} event data is not valid: {e}"))
    };
    Ok(Some(match event {
        "downstream" => SseEvent::Downstream(Box::new(
            serde_json::from_str(&data).map_err(|e| bad("downstream", e))?,
        )),
        "upstream" => {
            let v: Value = serde_json::from_str(&data).map_err(|e| bad("upstream", e))?;
            SseEvent::Upstream(match v {
                Value::Object(mut m) if m.contains_key("payload") => {
                    m.remove("payload").unwrap_or_default()
                }
                other => other,
            })
        }
        "error" => {
            let body: ErrorBody = serde_json::from_str(&data).map_err(|e| bad("error", e))?;
            SseEvent::Error(body.into_info("ProcessingError"))
        }
        "done" => SseEvent::Done,
        // Unknown event types are ignored, as SSE clients do.
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_on_blank_lines() {
        let mut b = BytesMut::from(&b"event: a\ndata: 1\n\nevent: b\r\ndata: 2\r\n\r\npartial"[..]);
        assert_eq!(&take_event(&mut b).unwrap()[..], b"event: a\ndata: 1");
        assert_eq!(&take_event(&mut b).unwrap()[..], b"event: b\r\ndata: 2\r");
        assert!(take_event(&mut b).is_none());
        assert_eq!(&b[..], b"partial");
    }

    #[test]
    fn parses_each_event_kind() {
        let ev = parse_event(
            b"event: downstream\ndata: {\"route\":{\"prev\":[\"a\"],\"curr\":\"\"},\"payload\":1}",
        )
        .unwrap();
        assert!(matches!(ev, Some(SseEvent::Downstream(_))));
        let ev = parse_event(b"event: upstream\ndata: {\"payload\": {\"pct\": 50}}").unwrap();
        assert!(matches!(ev, Some(SseEvent::Upstream(v)) if v["pct"] == 50));
        let ev = parse_event(b"event: error\ndata: {\"error\":\"processing_error\",\"details\":{\"message\":\"boom\",\"type\":\"ValueError\"}}").unwrap();
        assert!(
            matches!(ev, Some(SseEvent::Error(e)) if e.kind == "ValueError" && e.message == "boom")
        );
        assert!(matches!(
            parse_event(b"event: done\ndata: {}").unwrap(),
            Some(SseEvent::Done)
        ));
        assert!(parse_event(b"event: downstream\ndata: {oops").is_err());
        assert!(parse_event(b": comment").unwrap().is_none());
    }
}
