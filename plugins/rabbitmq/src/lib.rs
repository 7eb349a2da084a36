//! Asya transport over RabbitMQ, speaking AMQP 0-9-1 from inside the component (see
//! README.md for the configuration, the layout and the guarantees).
//!
//! - the original Asya's layout: durable topic exchange (`asya`), durable queue
//!   `asya-<ns>-<actor>` bound with routing key `<actor>`, persistent messages whose body
//!   is the envelope JSON;
//! - `send` publishes to the queue by name (default exchange, `mandatory`) in confirm mode
//!   and returns once the broker confirmed every message;
//! - `receive` consumes with `basic.qos` prefetch and manual acks; deliveries the broker
//!   pushed beyond `max` wait in the component for the next call;
//! - `nack(delay)` republishes the message to `<queue>.delay` (per-message TTL, dead-letter
//!   back to the queue) and acks it; `nack(0)` requeues it;
//! - duplicates (same message id) within a bounded window are acked and dropped by the
//!   consumer: RabbitMQ itself does not deduplicate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amq_protocol_types::{AMQPValue, FieldTable};
use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{log, Config, Error};

pub mod amqp;
mod conn;

use amqp::{Frame, In, Out, Properties};
use conn::{Conn, Fail, Params, CHANNEL};

/// Header carrying how many deliveries a message had before it was republished by a
/// delayed `nack`.
pub const ATTEMPTS_HEADER: &str = "x-asya-attempts";
/// Suffix of the per-queue delay queue (`.` cannot appear in an actor name).
pub const DELAY_SUFFIX: &str = ".delay";

/// Parsed configuration (README.md).
#[derive(Debug, Clone)]
struct Settings {
    params: Params,
    exchange: String,
    /// `basic.qos` prefetch; 0 = the host's prefetch (the first receive's `max`).
    prefetch: u16,
    declare: bool,
    namespace: Option<String>,
    dedup_window: usize,
    dedup_ttl: Duration,
    /// Bound of one broker round trip (declares, confirms).
    op_timeout: Duration,
}

impl Settings {
    fn parse(c: &Config) -> Result<Settings, Error> {
        let v = c.value();
        if !(v.is_object() || v.is_null()) {
            return Err(Error::new("config must be a JSON object"));
        }
        let num = |k: &str, d: u64| match v.get(k) {
            None | Some(asya_sdk::serde_json::Value::Null) => Ok(d),
            Some(n) => n
                .as_u64()
                .ok_or_else(|| Error::new(format!("config {k:?} must be a non-negative integer"))),
        };
        let declare = match v.get("declare") {
            None | Some(asya_sdk::serde_json::Value::Null) => true,
            Some(b) => b
                .as_bool()
                .ok_or_else(|| Error::new("config \"declare\" must be true or false"))?,
        };
        let prefetch = num("prefetch", 0)?;
        let heartbeat_s = num("heartbeat_s", 60)?;
        let op_timeout = num("op_timeout_ms", 4_000)?;
        if op_timeout == 0 {
            return Err(Error::new(
                "config \"op_timeout_ms\" must be greater than zero",
            ));
        }
        let s = Settings {
            params: Params {
                address: c.str_or("address", "127.0.0.1:5672")?,
                vhost: c.str_or("vhost", "/")?,
                user: c.str_or("user", "guest")?,
                password: c.str_or("password", "guest")?,
                heartbeat_s: u16::try_from(heartbeat_s)
                    .map_err(|_| Error::new("config \"heartbeat_s\" must be at most 65535"))?,
                timeout: Duration::from_millis(op_timeout),
            },
            exchange: c.str_or("exchange", "asya")?,
            prefetch: u16::try_from(prefetch)
                .map_err(|_| Error::new("config \"prefetch\" must be at most 65535"))?,
            declare,
            namespace: Some(c.str_or("namespace", "")?).filter(|s| !s.is_empty()),
            dedup_window: num("dedup_window", 10_000)? as usize,
            dedup_ttl: Duration::from_millis(num("dedup_ttl_ms", 600_000)?),
            op_timeout: Duration::from_millis(op_timeout),
        };
        if s.exchange.is_empty() {
            return Err(Error::new("config \"exchange\" must not be empty"));
        }
        Ok(s)
    }
}

/// The binding key of `queue`: its actor (`asya-<namespace>-<actor>` → `<actor>`). Without
/// a configured namespace the namespace is taken to end at the first `-`.
pub fn routing_key<'a>(queue: &'a str, namespace: Option<&str>) -> &'a str {
    let Some(rest) = queue.strip_prefix("asya-") else {
        return queue;
    };
    let actor = match namespace {
        Some(ns) => rest.strip_prefix(ns).and_then(|r| r.strip_prefix('-')),
        None => rest.split_once('-').map(|(_, a)| a),
    };
    actor.filter(|a| !a.is_empty()).unwrap_or(queue)
}

/// How many times a message has been delivered, this delivery included: deliveries before
/// a delayed `nack` republished it ([`ATTEMPTS_HEADER`]) + 1 + the broker's redelivery
/// count (`x-delivery-count` on quorum queues, else 1 when the `redelivered` flag is set).
pub fn delivery_count(props: &Properties, redelivered: bool) -> u32 {
    let header = |k: &str| {
        props
            .headers
            .as_ref()
            .and_then(|h| h.inner().get(k))
            .and_then(amqp::int_value)
    };
    let prior = header(ATTEMPTS_HEADER).unwrap_or(0);
    let broker = header("x-delivery-count").unwrap_or(i64::from(redelivered));
    (prior.max(0) + 1 + broker.max(0)).min(i64::from(u32::MAX)) as u32
}

// ---------------------------------------------------------------------------------------
// Deduplication window

/// Message ids settled recently (acked) or being worked on, per consumer. A delivery whose
/// id is in the window is a duplicate: it is acked and not handed to the host.
#[derive(Debug)]
pub struct Dedup {
    cap: usize,
    ttl: Duration,
    acked: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
    inflight: HashMap<String, u32>,
}

impl Dedup {
    pub fn new(cap: usize, ttl: Duration) -> Dedup {
        Dedup {
            cap,
            ttl,
            acked: HashMap::new(),
            order: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    fn on(&self) -> bool {
        self.cap > 0 && !self.ttl.is_zero()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= self.cap && now.duration_since(*at) < self.ttl {
                break;
            }
            if self.acked.get(id) == Some(at) {
                self.acked.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// Whether `id` was acked within the window or is being worked on.
    pub fn is_duplicate(&mut self, id: &str, now: Instant) -> bool {
        if !self.on() {
            return false;
        }
        self.expire(now);
        self.acked.contains_key(id) || self.inflight.contains_key(id)
    }

    /// A delivery with `id` was handed out.
    pub fn start(&mut self, id: &str) {
        if self.on() {
            *self.inflight.entry(id.to_owned()).or_default() += 1;
        }
    }

    /// A delivery with `id` went back to the broker (nack, lost connection).
    pub fn release(&mut self, id: &str) {
        if let Some(n) = self.inflight.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(id);
            }
        }
    }

    /// A delivery with `id` was acked.
    pub fn acked(&mut self, id: &str, now: Instant) {
        if !self.on() {
            return;
        }
        self.release(id);
        self.acked.insert(id.to_owned(), now);
        self.order.push_back((id.to_owned(), now));
        self.expire(now);
    }

    /// Every delivery in flight went back to the broker.
    pub fn release_all(&mut self) {
        self.inflight.clear();
    }
}

// ---------------------------------------------------------------------------------------
// The transport

/// A message received in full.
#[derive(Debug)]
struct Msg {
    tag: u64,
    redelivered: bool,
    props: Properties,
    body: Vec<u8>,
}

/// A message whose content frames are still arriving.
#[derive(Debug)]
enum Partial {
    Deliver {
        tag: u64,
        redelivered: bool,
        props: Option<(u64, Properties)>,
        body: Vec<u8>,
    },
    Return {
        key: String,
        text: String,
        size: Option<u64>,
        got: u64,
    },
}

/// An open connection and what belongs to it.
struct Live {
    conn: Conn,
    declared: HashSet<String>,
    exchange_declared: bool,
    consuming: Option<String>,
    cancelled: bool,
    ready: VecDeque<Msg>,
    partial: Option<Partial>,
    /// Handed to the host, not settled: delivery tag → message.
    inflight: HashMap<u64, Msg>,
    next_seq: u64,
    unconfirmed: HashSet<u64>,
    refused: usize,
    returned: Vec<(String, String)>,
    reply: Option<In>,
    blocked: Option<String>,
}

impl Live {
    fn new(conn: Conn) -> Live {
        Live {
            conn,
            declared: HashSet::new(),
            exchange_declared: false,
            consuming: None,
            cancelled: false,
            ready: VecDeque::new(),
            partial: None,
            inflight: HashMap::new(),
            next_seq: 1,
            unconfirmed: HashSet::new(),
            refused: 0,
            returned: Vec::new(),
            reply: None,
            blocked: None,
        }
    }

    /// Apply one frame from the broker.
    fn dispatch(&mut self, f: Frame) -> Result<(), Fail> {
        match f {
            Frame::Heartbeat => {}
            Frame::Method { method, .. } => match method {
                In::Close { code, text, .. } => {
                    let _ = self.conn.send(0, &Out::CloseOk);
                    return Err(Fail::Closed { code, text });
                }
                In::ChannelClose { code, text, .. } => {
                    let _ = self.conn.send(CHANNEL, &Out::ChannelCloseOk);
                    return Err(Fail::Closed { code, text });
                }
                In::Blocked { reason } => self.blocked = Some(reason),
                In::Unblocked => self.blocked = None,
                In::Deliver {
                    tag, redelivered, ..
                } => {
                    self.partial = Some(Partial::Deliver {
                        tag,
                        redelivered,
                        props: None,
                        body: Vec::new(),
                    })
                }
                In::Return { text, key, .. } => {
                    self.partial = Some(Partial::Return {
                        key,
                        text,
                        size: None,
                        got: 0,
                    })
                }
                In::Ack { tag, multiple } => self.confirm(tag, multiple, false),
                In::Nack { tag, multiple } => self.confirm(tag, multiple, true),
                In::Cancel { .. } => {
                    self.consuming = None;
                    self.cancelled = true;
                }
                m => self.reply = Some(m),
            },
            Frame::Header { size, props, .. } => match &mut self.partial {
                Some(Partial::Deliver { props: p, .. }) => *p = Some((size, props)),
                Some(Partial::Return { size: s, .. }) => *s = Some(size),
                None => return Err(Fail::Io("content header without a method".into())),
            },
            Frame::Body { data, .. } => match &mut self.partial {
                Some(Partial::Deliver { body, .. }) => body.extend_from_slice(&data),
                Some(Partial::Return { got, .. }) => *got += data.len() as u64,
                None => return Err(Fail::Io("content body without a method".into())),
            },
        }
        // A message is complete once its body has the size its header announced.
        let done = match &self.partial {
            Some(Partial::Deliver {
                props: Some((size, _)),
                body,
                ..
            }) => body.len() as u64 >= *size,
            Some(Partial::Return {
                size: Some(size),
                got,
                ..
            }) => got >= size,
            _ => false,
        };
        if done {
            match self.partial.take() {
                Some(Partial::Deliver {
                    tag,
                    redelivered,
                    props: Some((_, props)),
                    body,
                }) => self.ready.push_back(Msg {
                    tag,
                    redelivered,
                    props,
                    body,
                }),
                Some(Partial::Return { key, text, .. }) => self.returned.push((key, text)),
                _ => {}
            }
        }
        Ok(())
    }

    fn confirm(&mut self, tag: u64, multiple: bool, refused: bool) {
        let before = self.unconfirmed.len();
        if multiple {
            self.unconfirmed.retain(|s| *s > tag);
        } else {
            self.unconfirmed.remove(&tag);
        }
        if refused {
            self.refused += before - self.unconfirmed.len();
        }
    }

    /// Read and apply frames until `until` holds or `deadline` passes (`Ok(false)`).
    fn pump_until(
        &mut self,
        deadline: Instant,
        until: impl Fn(&Live) -> bool,
    ) -> Result<bool, Fail> {
        while !until(self) {
            match self.conn.next_frame(deadline)? {
                Some(f) => self.dispatch(f)?,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Apply every frame already read (no socket reads).
    fn pump_buffered(&mut self) -> Result<(), Fail> {
        while let Some(f) = self.conn.buffered_frame()? {
            self.dispatch(f)?;
        }
        Ok(())
    }

    /// Send a synchronous method and wait for its reply.
    fn rpc(&mut self, m: &Out<'_>, timeout: Duration, what: &str) -> Result<In, Fail> {
        self.reply = None;
        self.conn.send(CHANNEL, m)?;
        if !self.pump_until(Instant::now() + timeout, |l| l.reply.is_some())? {
            return Err(Fail::Timeout(format!(
                "no reply to {what} within {timeout:?}"
            )));
        }
        Ok(self.reply.take().expect("checked above"))
    }

    /// Publish `msgs` (`(routing key, properties, body)` to the default exchange) and wait
    /// until the broker confirmed each one.
    fn publish_confirmed(
        &mut self,
        msgs: &[(&str, Properties, &[u8])],
        timeout: Duration,
    ) -> Result<(), Op> {
        let mut out = Vec::with_capacity(msgs.iter().map(|m| m.2.len() + 128).sum());
        self.refused = 0;
        self.returned.clear();
        for (key, props, body) in msgs {
            amqp::method(
                &mut out,
                CHANNEL,
                &Out::Publish {
                    exchange: "",
                    key,
                    mandatory: true,
                },
            )
            .map_err(|e| Op::Fail(Error::new(format!("rabbitmq publish to {key}: {e}"))))?;
            amqp::content(&mut out, CHANNEL, self.conn.frame_max, props, body)
                .map_err(|e| Op::Fail(Error::new(format!("rabbitmq publish to {key}: {e}"))))?;
            self.unconfirmed.insert(self.next_seq);
            self.next_seq += 1;
        }
        self.conn.write(&out).map_err(conn("publish"))?;
        let deadline = Instant::now() + timeout;
        match self.pump_until(deadline, |l| l.unconfirmed.is_empty()) {
            Ok(true) => {}
            Ok(false) => {
                // Confirms still owed: the channel's state is unknown, start afresh.
                let why = match &self.blocked {
                    Some(r) => format!(" (the broker blocks publishers: {r})"),
                    None => String::new(),
                };
                return Err(Op::Conn(
                    "publish".into(),
                    Fail::Timeout(format!(
                        "{} of {} messages not confirmed within {timeout:?}{why}",
                        self.unconfirmed.len(),
                        msgs.len()
                    )),
                ));
            }
            Err(e) => return Err(Op::Conn("publish".into(), e)),
        }
        if let Some((key, text)) = self.returned.first() {
            let key = key.clone();
            self.declared.remove(&key);
            return Err(Op::Fail(Error::retryable(format!(
                "rabbitmq: {} message(s) returned unroutable ({text}): no queue {key:?}",
                self.returned.len()
            ))));
        }
        if self.refused > 0 {
            return Err(Op::Fail(Error::retryable(format!(
                "rabbitmq: the broker refused {} message(s) (basic.nack)",
                self.refused
            ))));
        }
        Ok(())
    }
}

/// Why an operation stopped: the connection broke (reconnect) or a definite failure.
enum Op {
    Conn(String, Fail),
    Fail(Error),
}

fn conn(what: impl Into<String>) -> impl FnOnce(Fail) -> Op {
    move |e| Op::Conn(what.into(), e)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct RabbitMq {
    cfg: Settings,
    live: Option<Live>,
    /// Connections opened so far; delivery tags name theirs.
    generation: u64,
    dedup: Dedup,
}

impl RabbitMq {
    fn connect_live(&mut self) -> Result<(), Error> {
        if self.live.is_some() {
            return Ok(());
        }
        let c = Conn::open(&self.cfg.params).map_err(|e| {
            let msg = format!(
                "rabbitmq connect to {} vhost {:?}: {e}",
                self.cfg.params.address, self.cfg.params.vhost
            );
            match e {
                Fail::Closed { .. } => Error::new(msg),
                _ => Error::retryable(msg),
            }
        })?;
        self.generation += 1;
        self.live = Some(Live::new(c));
        Ok(())
    }

    /// Drop the connection: its unsettled deliveries go back to the broker.
    fn drop_live(&mut self) {
        if self.live.take().is_some() {
            self.dedup.release_all();
        }
    }

    /// Run `f` on the live connection; when the connection broke, reconnect and run it
    /// once more if `retry` (the operation is safe to repeat).
    fn with_live<R>(
        &mut self,
        retry: bool,
        mut f: impl FnMut(&mut Live, &Settings, &mut Dedup, u64) -> Result<R, Op>,
    ) -> Result<R, Error> {
        for attempt in 0..2 {
            self.connect_live()?;
            let live = self.live.as_mut().expect("connected above");
            match f(live, &self.cfg, &mut self.dedup, self.generation) {
                Ok(r) => return Ok(r),
                Err(Op::Fail(e)) => return Err(e),
                Err(Op::Conn(what, e)) => {
                    self.drop_live();
                    let retryable = !matches!(
                        e,
                        Fail::Closed {
                            code: 403 | 530,
                            ..
                        }
                    );
                    let msg = format!("rabbitmq {what}: {e}");
                    // A refusal or a timeout would only repeat (and a timeout must leave
                    // the host's call deadline room).
                    // 320 CONNECTION_FORCED: the broker is shutting down or an operator
                    // closed the connection; a new one may work at once.
                    let again = match &e {
                        Fail::Io(_) => true,
                        Fail::Closed { code, .. } => *code == 320,
                        Fail::Timeout(_) => false,
                    };
                    if !retry || attempt == 1 || !again {
                        return Err(if retryable {
                            Error::retryable(msg)
                        } else {
                            Error::new(msg)
                        });
                    }
                }
            }
        }
        unreachable!("the loop returns")
    }
}

/// Make sure `queue` exists on this connection: declare it durable and bind it to the
/// exchange with its actor as the key, or (`declare: false`) check it passively.
fn ensure_queue(live: &mut Live, cfg: &Settings, queue: &str) -> Result<(), Op> {
    if live.declared.contains(queue) {
        return Ok(());
    }
    let t = cfg.op_timeout;
    let none = FieldTable::default();
    let what = || format!("declare queue {queue:?}");
    if cfg.declare {
        if !live.exchange_declared {
            live.rpc(
                &Out::ExchangeDeclare {
                    name: &cfg.exchange,
                    kind: "topic",
                    passive: false,
                },
                t,
                "exchange.declare",
            )
            .map_err(conn(format!("declare exchange {:?}", cfg.exchange)))?;
            live.exchange_declared = true;
        }
        live.rpc(
            &Out::QueueDeclare {
                name: queue,
                passive: false,
                args: &none,
            },
            t,
            "queue.declare",
        )
        .map_err(conn(what()))?;
        let key = routing_key(queue, cfg.namespace.as_deref());
        live.rpc(
            &Out::QueueBind {
                queue,
                exchange: &cfg.exchange,
                key,
            },
            t,
            "queue.bind",
        )
        .map_err(conn(format!(
            "bind queue {queue:?} to exchange {:?} with key {key:?}",
            cfg.exchange
        )))?;
    } else {
        live.rpc(
            &Out::QueueDeclare {
                name: queue,
                passive: true,
                args: &none,
            },
            t,
            "queue.declare",
        )
        .map_err(|e| {
            Op::Conn(
                format!(
                    "queue {queue:?} (declare is false: the operator must create it, or set \"declare\": true)"
                ),
                e,
            )
        })?;
    }
    live.declared.insert(queue.to_owned());
    Ok(())
}

/// The delay queue of `queue`: messages expire (per-message TTL) and are dead-lettered
/// back to `queue` through the default exchange.
fn ensure_delay_queue(live: &mut Live, cfg: &Settings, queue: &str) -> Result<String, Op> {
    let name = format!("{queue}{DELAY_SUFFIX}");
    if live.declared.contains(&name) {
        return Ok(name);
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    live.rpc(
        &Out::QueueDeclare {
            name: &name,
            passive: false,
            args: &args,
        },
        cfg.op_timeout,
        "queue.declare",
    )
    .map_err(conn(format!("declare delay queue {name:?}")))?;
    live.declared.insert(name.clone());
    Ok(name)
}

/// Tags are `<connection generation>:<delivery tag>`.
fn split_tag(tag: &str) -> Result<(u64, u64), Error> {
    tag.split_once(':')
        .and_then(|(g, t)| Some((g.parse().ok()?, t.parse().ok()?)))
        .ok_or_else(|| Error::new(format!("malformed delivery tag {tag:?}")))
}

impl RabbitMq {
    /// The in-flight message of `tag` on the current connection.
    fn settle(&mut self, tag: &str) -> Result<(u64, &mut Live), Error> {
        let (generation, dtag) = split_tag(tag)?;
        match self.live.as_mut() {
            Some(live) if generation == self.generation => {
                if live.inflight.contains_key(&dtag) {
                    Ok((dtag, live))
                } else {
                    Err(Error::new(format!(
                        "delivery {tag} is not pending (already settled)"
                    )))
                }
            }
            _ => Err(Error::new(format!(
                "delivery {tag} belongs to a closed connection; the broker delivers it again"
            ))),
        }
    }
}

impl Transport for RabbitMq {
    fn connect(config: &Config) -> Result<Self, Error> {
        let cfg = Settings::parse(config)?;
        let mut t = RabbitMq {
            dedup: Dedup::new(cfg.dedup_window, cfg.dedup_ttl),
            cfg,
            live: None,
            generation: 0,
        };
        t.connect_live()?;
        Ok(t)
    }

    fn receive(&mut self, queue: &str, max: u32, wait: Duration) -> Result<Vec<Delivery>, Error> {
        if max == 0 {
            // Only declare the queue (or check it: `declare: false`), without consuming
            // (`asya-host provision`).
            return self.with_live(true, |live, cfg, _, _| {
                ensure_queue(live, cfg, queue).map(|()| Vec::new())
            });
        }
        let max = max as usize;
        let deadline = Instant::now() + wait;
        self.with_live(true, |live, cfg, dedup, generation| {
            match live.consuming.as_deref() {
                Some(q) if q == queue => {}
                Some(q) => {
                    return Err(Op::Fail(Error::new(format!(
                        "this connection consumes {q:?}, not {queue:?}"
                    ))))
                }
                None => {
                    if live.cancelled {
                        live.cancelled = false;
                        live.declared.remove(queue);
                    }
                    ensure_queue(live, cfg, queue)?;
                    let prefetch = match cfg.prefetch {
                        0 => u16::try_from(max).unwrap_or(u16::MAX),
                        n => n,
                    };
                    live.rpc(&Out::Qos { prefetch }, cfg.op_timeout, "basic.qos")
                        .map_err(conn("basic.qos"))?;
                    live.rpc(&Out::Consume { queue }, cfg.op_timeout, "basic.consume")
                        .map_err(conn(format!("consume {queue:?}")))?;
                    live.consuming = Some(queue.to_owned());
                }
            }
            loop {
                live.pump_buffered().map_err(conn("receive"))?;
                if live.cancelled {
                    return Err(Op::Fail(Error::retryable(format!(
                        "rabbitmq: the broker cancelled the consumer of {queue:?} (queue deleted?)"
                    ))));
                }
                let now = Instant::now();
                let mut out = Vec::new();
                let mut dup_acks = Vec::new();
                while out.len() < max {
                    let Some(m) = live.ready.pop_front() else {
                        break;
                    };
                    let id = m.props.message_id.clone();
                    if let Some(id) = &id {
                        if dedup.is_duplicate(id, now) {
                            if log::enabled(log::Level::Debug) {
                                log::log(
                                    log::Level::Debug,
                                    &format!(
                                        "duplicate message id {id:?} on {queue:?} dropped (acked, not delivered)"
                                    ),
                                );
                            }
                            amqp::method(&mut dup_acks, CHANNEL, &Out::Ack { tag: m.tag })
                                .map_err(|e| Op::Fail(Error::new(e.0)))?;
                            continue;
                        }
                        dedup.start(id);
                    }
                    out.push(Delivery {
                        tag: format!("{generation}:{}", m.tag),
                        body: m.body.clone(),
                        delivery_count: delivery_count(&m.props, m.redelivered),
                        message_id: id,
                    });
                    live.inflight.insert(m.tag, m);
                }
                if !dup_acks.is_empty() {
                    live.conn.write(&dup_acks).map_err(conn("ack duplicates"))?;
                }
                if !out.is_empty() {
                    return Ok(out);
                }
                match live.conn.next_frame(deadline).map_err(conn("receive"))? {
                    Some(f) => live.dispatch(f).map_err(conn("receive"))?,
                    None => return Ok(Vec::new()),
                }
            }
        })
    }

    fn send(&mut self, messages: Vec<Outgoing>) -> Result<(), Error> {
        if messages.is_empty() {
            return Ok(());
        }
        let ts = now_secs();
        self.with_live(true, |live, cfg, _, _| {
            live.keep_alive_and_drain()?;
            for m in &messages {
                ensure_queue(live, cfg, &m.queue)?;
            }
            let batch: Vec<(&str, Properties, &[u8])> = messages
                .iter()
                .map(|m| {
                    (
                        m.queue.as_str(),
                        Properties {
                            content_type: Some("application/json".into()),
                            headers: None,
                            delivery_mode: Some(2),
                            expiration: None,
                            message_id: Some(m.message_id.clone()),
                            timestamp: Some(ts),
                        },
                        m.body.as_slice(),
                    )
                })
                .collect();
            live.publish_confirmed(&batch, cfg.op_timeout)
        })
    }

    fn ack(&mut self, tag: &str) -> Result<(), Error> {
        let (dtag, live) = self.settle(tag)?;
        let sent = live.conn.send(CHANNEL, &Out::Ack { tag: dtag });
        let msg = live.inflight.remove(&dtag);
        match sent {
            Ok(()) => {
                if let Some(id) = msg.and_then(|m| m.props.message_id) {
                    self.dedup.acked(&id, Instant::now());
                }
                Ok(())
            }
            Err(e) => {
                self.drop_live();
                Err(Error::retryable(format!("rabbitmq ack {tag}: {e}")))
            }
        }
    }

    fn nack(&mut self, tag: &str, delay: Duration) -> Result<(), Error> {
        let (dtag, _) = self.settle(tag)?;
        let delay_ms = delay.as_millis();
        let result = (|| -> Result<(), Op> {
            let cfg = self.cfg.clone();
            let live = self.live.as_mut().expect("settle checked");
            if delay_ms == 0 {
                live.conn
                    .send(
                        CHANNEL,
                        &Out::Nack {
                            tag: dtag,
                            requeue: true,
                        },
                    )
                    .map_err(conn("nack"))?;
                return Ok(());
            }
            let queue = live.consuming.clone().unwrap_or_default();
            let delay_queue = ensure_delay_queue(live, &cfg, &queue)?;
            let m = live.inflight.get(&dtag).expect("settle checked");
            let mut headers = m.props.headers.clone().unwrap_or_default();
            let mut kept = FieldTable::default();
            for (k, v) in &headers {
                if k.as_str() != "x-delivery-count" && k.as_str() != ATTEMPTS_HEADER {
                    kept.insert(k.clone(), v.clone());
                }
            }
            headers = kept;
            headers.insert(
                ATTEMPTS_HEADER.into(),
                AMQPValue::LongLongInt(i64::from(delivery_count(&m.props, m.redelivered))),
            );
            let props = Properties {
                headers: Some(headers),
                delivery_mode: Some(2),
                expiration: Some(delay_ms.to_string()),
                ..m.props.clone()
            };
            let body = m.body.clone();
            live.publish_confirmed(&[(delay_queue.as_str(), props, &body)], cfg.op_timeout)?;
            live.conn
                .send(CHANNEL, &Out::Ack { tag: dtag })
                .map_err(conn("ack after delayed republish"))?;
            Ok(())
        })();
        let live = self.live.as_mut().expect("settle checked");
        match result {
            Ok(()) => {
                if let Some(id) = live.inflight.remove(&dtag).and_then(|m| m.props.message_id) {
                    self.dedup.release(&id);
                }
                Ok(())
            }
            Err(Op::Fail(e)) => Err(e),
            Err(Op::Conn(what, e)) => {
                self.drop_live();
                Err(Error::retryable(format!("rabbitmq {what}: {e}")))
            }
        }
    }

    fn in_progress(&mut self, tag: &str) -> Result<(), Error> {
        // RabbitMQ has no per-delivery deadline to extend: an unacked delivery stays with
        // its consumer until the channel closes or `consumer_timeout` passes (README.md).
        // The call keeps the connection alive while the host works on the delivery (the
        // host makes no other call on it then): a heartbeat when one is due, and whatever
        // the broker sent meanwhile is read (its heartbeats, further deliveries).
        let (_, live) = self.settle(tag)?;
        let kept =
            live.conn
                .keep_alive()
                .and_then(|()| match live.conn.next_frame(Instant::now())? {
                    Some(f) => live.dispatch(f).and_then(|()| live.pump_buffered()),
                    None => Ok(()),
                });
        kept.map_err(|e| {
            self.drop_live();
            Error::retryable(format!("rabbitmq in-progress {tag}: {e}"))
        })
    }

    fn close(&mut self) {
        // Unsettled deliveries go back to the queue when the connection closes.
        if let Some(live) = self.live.take() {
            live.conn.close(Duration::from_secs(1));
        }
    }
}

impl Live {
    /// Heartbeat if due, and apply frames that arrived between calls.
    fn keep_alive_and_drain(&mut self) -> Result<(), Op> {
        self.conn.keep_alive().map_err(conn("heartbeat"))?;
        self.pump_buffered().map_err(conn("read"))
    }
}

asya_sdk::export_transport!(RabbitMq);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_key_is_the_actor() {
        assert_eq!(routing_key("asya-ns-a", None), "a");
        assert_eq!(routing_key("asya-ns-x-sink", None), "x-sink");
        assert_eq!(routing_key("asya-my-ns-x-sink", Some("my-ns")), "x-sink");
        assert_eq!(routing_key("asya-other-b", Some("my-ns")), "asya-other-b");
        assert_eq!(routing_key("plain", None), "plain");
        assert_eq!(routing_key("asya-ns-", None), "asya-ns-");
    }

    #[test]
    fn delivery_count_from_headers_and_flag() {
        let mut p = Properties::default();
        assert_eq!(delivery_count(&p, false), 1);
        assert_eq!(delivery_count(&p, true), 2);
        let mut h = FieldTable::default();
        h.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(2));
        p.headers = Some(h.clone());
        assert_eq!(delivery_count(&p, false), 3);
        assert_eq!(delivery_count(&p, true), 4);
        // Quorum queues count redeliveries exactly.
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(3));
        p.headers = Some(h);
        assert_eq!(delivery_count(&p, true), 6);
    }

    #[test]
    fn dedup_window_drops_acked_and_inflight_ids_until_evicted() {
        let t0 = Instant::now();
        let mut d = Dedup::new(2, Duration::from_secs(10));
        assert!(!d.is_duplicate("a", t0));
        d.start("a");
        assert!(d.is_duplicate("a", t0), "in flight");
        d.release("a");
        assert!(!d.is_duplicate("a", t0), "released by a nack");
        d.start("a");
        d.acked("a", t0);
        assert!(d.is_duplicate("a", t0), "acked");
        d.acked("b", t0);
        d.acked("c", t0);
        assert!(!d.is_duplicate("a", t0), "evicted by the cap");
        assert!(d.is_duplicate("c", t0));
        assert!(
            !d.is_duplicate("c", t0 + Duration::from_secs(11)),
            "expired"
        );
        d.start("x");
        d.release_all();
        assert!(!d.is_duplicate("x", t0));
        let mut off = Dedup::new(0, Duration::from_secs(10));
        off.start("a");
        off.acked("a", t0);
        assert!(!off.is_duplicate("a", t0));
    }

    #[test]
    fn settings_defaults_and_errors() {
        let s = Settings::parse(&Config::parse("{}").unwrap()).unwrap();
        assert_eq!(s.params.address, "127.0.0.1:5672");
        assert_eq!(s.params.vhost, "/");
        assert_eq!(s.exchange, "asya");
        assert!(s.declare);
        assert_eq!(s.prefetch, 0);
        for bad in [
            r#"{"declare": "yes"}"#,
            r#"{"prefetch": 70000}"#,
            r#"{"exchange": ""}"#,
            r#"{"op_timeout_ms": 0}"#,
            "[1]",
        ] {
            assert!(
                Settings::parse(&Config::parse(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tags_name_their_connection() {
        assert_eq!(split_tag("3:17").unwrap(), (3, 17));
        assert!(split_tag("17").is_err());
    }
}
