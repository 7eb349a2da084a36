//! AMQP 0-9-1 framing and the methods this transport uses: encode what the client sends,
//! decode what the broker sends. No I/O. Field tables and values come from
//! `amq-protocol-types` (the rest of `amq-protocol` does not build for `wasm32-wasip2`).

use amq_protocol_types::generation::gen_field_table;
use amq_protocol_types::parsing::parse_field_table;
use amq_protocol_types::{AMQPValue, FieldTable};

/// Sent first on a new connection.
pub const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
/// Frames up to this size are always accepted (spec: frame-min-size).
pub const FRAME_MIN_SIZE: u32 = 4096;
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Frame header (type, channel, size) plus the end octet.
pub const FRAME_OVERHEAD: usize = 8;
const CLASS_BASIC: u16 = 60;

/// Malformed input from the broker, or a value that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(pub String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(what: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(what.into()))
}

// ---------------------------------------------------------------------------------------
// Encoding

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn short(&mut self, s: &str) -> Result<&mut Self, CodecError> {
        let Ok(n) = u8::try_from(s.len()) else {
            return err(format!(
                "{:?}... is longer than 255 bytes (an AMQP short string)",
                s.chars().take(40).collect::<String>()
            ));
        };
        self.0.push(n);
        self.0.extend_from_slice(s.as_bytes());
        Ok(self)
    }
    fn long(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    fn table(&mut self, t: &FieldTable) -> Result<&mut Self, CodecError> {
        let (bytes, _) = cookie_factory::gen(gen_field_table(t), Vec::new())
            .map_err(|e| CodecError(format!("field table: {e:?}")))?;
        self.0.extend_from_slice(&bytes);
        Ok(self)
    }
}

/// Append one frame.
fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// A method the client sends.
#[derive(Debug, Clone)]
pub enum Out<'a> {
    StartOk {
        user: &'a str,
        password: &'a str,
    },
    TuneOk {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    Open {
        vhost: &'a str,
    },
    Close {
        code: u16,
        text: &'a str,
    },
    CloseOk,
    ChannelOpen,
    ChannelCloseOk,
    ConfirmSelect,
    Qos {
        prefetch: u16,
    },
    Consume {
        queue: &'a str,
    },
    ExchangeDeclare {
        name: &'a str,
        kind: &'a str,
        passive: bool,
    },
    QueueDeclare {
        name: &'a str,
        passive: bool,
        args: &'a FieldTable,
    },
    QueueBind {
        queue: &'a str,
        exchange: &'a str,
        key: &'a str,
    },
    Ack {
        tag: u64,
    },
    Nack {
        tag: u64,
        requeue: bool,
    },
    Publish {
        exchange: &'a str,
        key: &'a str,
        mandatory: bool,
    },
}

/// Append the method frame of `m` on `channel`.
pub fn method(out: &mut Vec<u8>, channel: u16, m: &Out<'_>) -> Result<(), CodecError> {
    let mut w = W(Vec::with_capacity(64));
    match m {
        Out::StartOk { user, password } => {
            let mut caps = FieldTable::default();
            for c in [
                "publisher_confirms",
                "consumer_cancel_notify",
                "basic.nack",
                "connection.blocked",
            ] {
                caps.insert(c.into(), AMQPValue::Boolean(true));
            }
            let mut props = FieldTable::default();
            props.insert(
                "product".into(),
                AMQPValue::LongString("asya rabbitmq transport".into()),
            );
            props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
            let mut response = Vec::with_capacity(user.len() + password.len() + 2);
            response.push(0);
            response.extend_from_slice(user.as_bytes());
            response.push(0);
            response.extend_from_slice(password.as_bytes());
            w.u16(10).u16(11).table(&props)?.short("PLAIN")?;
            w.long(&response).short("en_US")?;
        }
        Out::TuneOk {
            channel_max,
            frame_max,
            heartbeat,
        } => {
            w.u16(10)
                .u16(31)
                .u16(*channel_max)
                .u32(*frame_max)
                .u16(*heartbeat);
        }
        Out::Open { vhost } => {
            w.u16(10).u16(40).short(vhost)?.short("")?.u8(0);
        }
        Out::Close { code, text } => {
            w.u16(10).u16(50).u16(*code).short(text)?.u16(0).u16(0);
        }
        Out::CloseOk => {
            w.u16(10).u16(51);
        }
        Out::ChannelOpen => {
            w.u16(20).u16(10).short("")?;
        }
        Out::ChannelCloseOk => {
            w.u16(20).u16(41);
        }
        Out::ConfirmSelect => {
            w.u16(85).u16(10).u8(0);
        }
        Out::Qos { prefetch } => {
            w.u16(60).u16(10).u32(0).u16(*prefetch).u8(0);
        }
        Out::Consume { queue } => {
            // consumer tag chosen by the broker; no-local, no-ack, exclusive, no-wait off.
            w.u16(60).u16(20).u16(0).short(queue)?.short("")?.u8(0);
            w.table(&FieldTable::default())?;
        }
        Out::ExchangeDeclare {
            name,
            kind,
            passive,
        } => {
            // bits: passive, durable, auto-delete, internal, no-wait
            let bits = u8::from(*passive) | 0b10;
            w.u16(40).u16(10).u16(0).short(name)?.short(kind)?.u8(bits);
            w.table(&FieldTable::default())?;
        }
        Out::QueueDeclare {
            name,
            passive,
            args,
        } => {
            // bits: passive, durable, exclusive, auto-delete, no-wait
            let bits = u8::from(*passive) | 0b10;
            w.u16(50).u16(10).u16(0).short(name)?.u8(bits).table(args)?;
        }
        Out::QueueBind {
            queue,
            exchange,
            key,
        } => {
            w.u16(50).u16(20).u16(0).short(queue)?.short(exchange)?;
            w.short(key)?.u8(0).table(&FieldTable::default())?;
        }
        Out::Ack { tag } => {
            w.u16(60).u16(80).u64(*tag).u8(0);
        }
        Out::Nack { tag, requeue } => {
            // bits: multiple, requeue
            w.u16(60).u16(120).u64(*tag).u8(u8::from(*requeue) << 1);
        }
        Out::Publish {
            exchange,
            key,
            mandatory,
        } => {
            // bits: mandatory, immediate
            w.u16(60).u16(40).u16(0).short(exchange)?.short(key)?;
            w.u8(u8::from(*mandatory));
        }
    }
    frame(out, FRAME_METHOD, channel, &w.0);
    Ok(())
}

/// Append a heartbeat frame.
pub fn heartbeat(out: &mut Vec<u8>) {
    frame(out, FRAME_HEARTBEAT, 0, &[]);
}

/// Basic-class message properties (only those this transport reads or writes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub headers: Option<FieldTable>,
    pub delivery_mode: Option<u8>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    pub timestamp: Option<u64>,
}

/// Append the content header and body frames of a message (after its `basic.publish`),
/// bodies split to fit `frame_max`.
pub fn content(
    out: &mut Vec<u8>,
    channel: u16,
    frame_max: u32,
    props: &Properties,
    body: &[u8],
) -> Result<(), CodecError> {
    let mut w = W(Vec::with_capacity(64));
    let mut flags = 0u16;
    let mut p = W(Vec::with_capacity(64));
    if let Some(v) = &props.content_type {
        flags |= 1 << 15;
        p.short(v)?;
    }
    if let Some(v) = &props.headers {
        flags |= 1 << 13;
        p.table(v)?;
    }
    if let Some(v) = props.delivery_mode {
        flags |= 1 << 12;
        p.u8(v);
    }
    if let Some(v) = &props.expiration {
        flags |= 1 << 8;
        p.short(v)?;
    }
    if let Some(v) = &props.message_id {
        flags |= 1 << 7;
        p.short(v)?;
    }
    if let Some(v) = props.timestamp {
        flags |= 1 << 6;
        p.u64(v);
    }
    w.u16(CLASS_BASIC).u16(0).u64(body.len() as u64).u16(flags);
    w.0.extend_from_slice(&p.0);
    frame(out, FRAME_HEADER, channel, &w.0);
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for part in body.chunks(chunk) {
        frame(out, FRAME_BODY, channel, part);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Decoding

struct R<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.b.len() - self.i < n {
            return err("truncated method or header frame");
        }
        let s = &self.b[self.i..self.i + n];
        self.i += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn short(&mut self) -> Result<String, CodecError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn long(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn table(&mut self) -> Result<FieldTable, CodecError> {
        let rest = &self.b[self.i..];
        let (left, t) = parse_field_table(rest)
            .map_err(|e| CodecError(format!("malformed field table: {e}")))?;
        self.i += rest.len() - left.len();
        Ok(t)
    }
}

/// A method the broker sends.
#[derive(Debug, Clone, PartialEq)]
pub enum In {
    Start {
        mechanisms: String,
    },
    Tune {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    OpenOk,
    Close {
        code: u16,
        text: String,
        class: u16,
        method: u16,
    },
    CloseOk,
    Blocked {
        reason: String,
    },
    Unblocked,
    ChannelOpenOk,
    ChannelClose {
        code: u16,
        text: String,
        class: u16,
        method: u16,
    },
    ChannelCloseOk,
    ExchangeDeclareOk,
    QueueDeclareOk {
        queue: String,
        messages: u32,
        consumers: u32,
    },
    QueueBindOk,
    QosOk,
    ConsumeOk {
        tag: String,
    },
    /// The broker cancelled the consumer (its queue was deleted).
    Cancel {
        tag: String,
    },
    Return {
        code: u16,
        text: String,
        exchange: String,
        key: String,
    },
    Deliver {
        tag: u64,
        redelivered: bool,
        key: String,
    },
    Ack {
        tag: u64,
        multiple: bool,
    },
    Nack {
        tag: u64,
        multiple: bool,
    },
    ConfirmSelectOk,
    /// Anything else (ignored by the client).
    Other {
        class: u16,
        method: u16,
    },
}

/// One frame from the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method {
        channel: u16,
        method: In,
    },
    Header {
        channel: u16,
        size: u64,
        props: Properties,
    },
    Body {
        channel: u16,
        data: Vec<u8>,
    },
    Heartbeat,
}

fn decode_method(p: &[u8]) -> Result<In, CodecError> {
    let mut r = R { b: p, i: 0 };
    let (class, id) = (r.u16()?, r.u16()?);
    Ok(match (class, id) {
        (10, 10) => {
            let _version = (r.u8()?, r.u8()?);
            let _props = r.table()?;
            In::Start {
                mechanisms: String::from_utf8_lossy(r.long()?).into_owned(),
            }
        }
        (10, 30) => In::Tune {
            channel_max: r.u16()?,
            frame_max: r.u32()?,
            heartbeat: r.u16()?,
        },
        (10, 41) => In::OpenOk,
        (10, 50) => In::Close {
            code: r.u16()?,
            text: r.short()?,
            class: r.u16()?,
            method: r.u16()?,
        },
        (10, 51) => In::CloseOk,
        (10, 60) => In::Blocked { reason: r.short()? },
        (10, 61) => In::Unblocked,
        (20, 11) => In::ChannelOpenOk,
        (20, 40) => In::ChannelClose {
            code: r.u16()?,
            text: r.short()?,
            class: r.u16()?,
            method: r.u16()?,
        },
        (20, 41) => In::ChannelCloseOk,
        (40, 11) => In::ExchangeDeclareOk,
        (50, 11) => In::QueueDeclareOk {
            queue: r.short()?,
            messages: r.u32()?,
            consumers: r.u32()?,
        },
        (50, 21) => In::QueueBindOk,
        (60, 11) => In::QosOk,
        (60, 21) => In::ConsumeOk { tag: r.short()? },
        (60, 30) => In::Cancel { tag: r.short()? },
        (60, 50) => In::Return {
            code: r.u16()?,
            text: r.short()?,
            exchange: r.short()?,
            key: r.short()?,
        },
        (60, 60) => {
            let _consumer = r.short()?;
            let tag = r.u64()?;
            let redelivered = r.u8()? & 1 == 1;
            let _exchange = r.short()?;
            In::Deliver {
                tag,
                redelivered,
                key: r.short()?,
            }
        }
        (60, 80) => In::Ack {
            tag: r.u64()?,
            multiple: r.u8()? & 1 == 1,
        },
        (60, 120) => In::Nack {
            tag: r.u64()?,
            multiple: r.u8()? & 1 == 1,
        },
        (85, 11) => In::ConfirmSelectOk,
        (class, method) => In::Other { class, method },
    })
}

fn decode_header(p: &[u8]) -> Result<(u64, Properties), CodecError> {
    let mut r = R { b: p, i: 0 };
    let _class = r.u16()?;
    let _weight = r.u16()?;
    let size = r.u64()?;
    let flags = r.u16()?;
    let mut props = Properties::default();
    let has = |bit: u16| flags & (1 << bit) != 0;
    if has(15) {
        props.content_type = Some(r.short()?);
    }
    if has(14) {
        r.short()?; // content-encoding
    }
    if has(13) {
        props.headers = Some(r.table()?);
    }
    if has(12) {
        props.delivery_mode = Some(r.u8()?);
    }
    if has(11) {
        r.u8()?; // priority
    }
    if has(10) {
        r.short()?; // correlation-id
    }
    if has(9) {
        r.short()?; // reply-to
    }
    if has(8) {
        props.expiration = Some(r.short()?);
    }
    if has(7) {
        props.message_id = Some(r.short()?);
    }
    if has(6) {
        props.timestamp = Some(r.u64()?);
    }
    // type, user-id, app-id, cluster-id: not read.
    Ok((size, props))
}

/// Parse one frame from the start of `buf`: `Ok(None)` when more bytes are needed, else
/// the frame and how many bytes it took. Frames larger than `frame_max` are an error.
pub fn parse_frame(buf: &[u8], frame_max: u32) -> Result<Option<(Frame, usize)>, CodecError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > frame_max.max(FRAME_MIN_SIZE) as usize {
        return err(format!(
            "frame of {size} bytes exceeds the negotiated frame-max {frame_max}"
        ));
    }
    let total = 7 + size + 1;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return err("frame does not end with 0xCE (stream out of sync)");
    }
    let p = &buf[7..7 + size];
    let f = match kind {
        FRAME_METHOD => Frame::Method {
            channel,
            method: decode_method(p)?,
        },
        FRAME_HEADER => {
            let (size, props) = decode_header(p)?;
            Frame::Header {
                channel,
                size,
                props,
            }
        }
        FRAME_BODY => Frame::Body {
            channel,
            data: p.to_vec(),
        },
        FRAME_HEARTBEAT => Frame::Heartbeat,
        k => return err(format!("unknown frame type {k}")),
    };
    Ok(Some((f, total)))
}

/// An integer header value of any AMQP integer type.
pub fn int_value(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut buf: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some((f, n)) = parse_frame(buf, 131_072).unwrap() {
            out.push(f);
            buf = &buf[n..];
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        out
    }

    #[test]
    fn start_ok_carries_plain_credentials() {
        let mut out = Vec::new();
        method(
            &mut out,
            0,
            &Out::StartOk {
                user: "guest",
                password: "pw",
            },
        )
        .unwrap();
        assert_eq!(&out[..3], &[1, 0, 0]);
        assert_eq!(*out.last().unwrap(), 0xCE);
        let tail = b"\x05PLAIN\x00\x00\x00\x09\x00guest\x00pw\x05en_US\xCE";
        assert!(out.ends_with(tail), "{out:?}");
    }

    #[test]
    fn publish_content_splits_bodies_and_round_trips_properties() {
        let mut headers = FieldTable::default();
        headers.insert("x-asya-attempts".into(), AMQPValue::LongInt(3));
        let props = Properties {
            content_type: Some("application/json".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            expiration: Some("700".into()),
            message_id: Some("m-1".into()),
            timestamp: Some(1_700_000_000),
        };
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        method(
            &mut out,
            1,
            &Out::Publish {
                exchange: "",
                key: "asya-ns-a",
                mandatory: true,
            },
        )
        .unwrap();
        content(&mut out, 1, 4096, &props, &body).unwrap();
        let got = frames(&out);
        // method + header + ceil(10000 / 4088) bodies
        assert_eq!(got.len(), 2 + 3);
        assert!(matches!(
            &got[0],
            Frame::Method {
                channel: 1,
                method: In::Other {
                    class: 60,
                    method: 40
                }
            }
        ));
        let Frame::Header {
            size, props: back, ..
        } = &got[1]
        else {
            panic!("{:?}", got[1]);
        };
        assert_eq!(*size, 10_000);
        assert_eq!(back, &props);
        let joined: Vec<u8> = got[2..]
            .iter()
            .flat_map(|f| match f {
                Frame::Body { data, .. } => data.clone(),
                f => panic!("{f:?}"),
            })
            .collect();
        assert_eq!(joined, body);
    }

    #[test]
    fn decodes_broker_methods() {
        let mut p = Vec::new();
        // basic.deliver: consumer tag, delivery tag 7, redelivered, exchange, routing key
        p.extend_from_slice(&[0, 60, 0, 60, 3, b'c', b't', b'g']);
        p.extend_from_slice(&7u64.to_be_bytes());
        p.extend_from_slice(&[1, 4, b'a', b's', b'y', b'a', 1, b'a']);
        let mut buf = Vec::new();
        frame(&mut buf, FRAME_METHOD, 1, &p);
        // basic.ack multiple, tag 9
        let mut a = vec![0, 60, 0, 80];
        a.extend_from_slice(&9u64.to_be_bytes());
        a.push(1);
        frame(&mut buf, FRAME_METHOD, 1, &a);
        heartbeat(&mut buf);
        // channel.close 404
        let c = [
            0, 20, 0, 40, 1, 148, 4, b'g', b'o', b'n', b'e', 0, 50, 0, 10,
        ];
        frame(&mut buf, FRAME_METHOD, 1, &c);
        assert_eq!(
            frames(&buf),
            vec![
                Frame::Method {
                    channel: 1,
                    method: In::Deliver {
                        tag: 7,
                        redelivered: true,
                        key: "a".into()
                    }
                },
                Frame::Method {
                    channel: 1,
                    method: In::Ack {
                        tag: 9,
                        multiple: true
                    }
                },
                Frame::Heartbeat,
                Frame::Method {
                    channel: 1,
                    method: In::ChannelClose {
                        code: 404,
                        text: "gone".into(),
                        class: 50,
                        method: 10
                    }
                },
            ]
        );
    }

    #[test]
    fn partial_and_corrupt_frames() {
        let mut buf = Vec::new();
        heartbeat(&mut buf);
        assert_eq!(parse_frame(&buf[..5], 4096).unwrap(), None);
        assert_eq!(parse_frame(&buf[..7], 4096).unwrap(), None);
        buf[7] = 0;
        assert!(parse_frame(&buf, 4096).is_err());
        // Oversized frame announced.
        let big = [3u8, 0, 1, 0, 1, 0, 0];
        assert!(parse_frame(&big, 4096).is_err());
    }

    #[test]
    fn queue_declare_encodes_dead_letter_arguments() {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString("asya-ns-a".into()),
        );
        let mut out = Vec::new();
        method(
            &mut out,
            1,
            &Out::QueueDeclare {
                name: "asya-ns-a.delay",
                passive: false,
                args: &args,
            },
        )
        .unwrap();
        let p = &out[7..out.len() - 1];
        assert_eq!(&p[..6], &[0, 50, 0, 10, 0, 0]);
        assert_eq!(p[6] as usize, "asya-ns-a.delay".len());
        let mut r = R { b: p, i: 7 + 15 };
        assert_eq!(r.u8().unwrap(), 0b10, "durable, not passive");
        assert_eq!(r.table().unwrap(), args);
        assert!(method(
            &mut out,
            1,
            &Out::Consume {
                queue: &"q".repeat(256)
            }
        )
        .is_err());
    }

    #[test]
    fn int_values_of_any_width() {
        assert_eq!(int_value(&AMQPValue::LongLongInt(5)), Some(5));
        assert_eq!(int_value(&AMQPValue::ShortUInt(5)), Some(5));
        assert_eq!(int_value(&AMQPValue::Boolean(true)), None);
    }
}
