//! NATS JetStream transport (SPEC §8). Layout and operations: `NATS.md` next to this file.
//!
//! - Namespace `N` is one work-queue stream `asya-N` over the subjects `asya.N.>`.
//! - Queue `asya-N-A` is the subject `asya.N.A`, consumed by the durable pull consumer `A`
//!   of that stream (filter `asya.N.A`, explicit ack, unlimited redelivery: the host counts
//!   deliveries and sends an envelope to x-sump itself once `Delivery::attempt` exceeds
//!   `ASYA_RESILIENCY_MAX_ATTEMPTS`).
//! - Publishes carry `Nats-Msg-Id` = [`OutMessage::id`]; the stream drops a second publish of
//!   the same id within its duplicate window, so a redelivered input produces no duplicates.
//! - Acks wait for the server's confirmation; nacks carry the retry delay; an unsettled
//!   delivery that is dropped is nacked without delay.
//! - A delivery gives its prefetch slot back when its settling starts, so the pull request
//!   for the next message goes out while the ack is still being confirmed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{
    Acker, Delivery, OutMessage, QueueName, Receiver, Sent, Transport, TransportError,
    TransportKind,
};
use crate::config::{ConfigError, Reader, Source, Var};
use crate::metrics::Metrics;
use crate::queue::EndActors;

/// Variables of the NATS transport.
pub mod vars {
    use crate::config::Var;

    pub const URL: Var = Var::new(
        "ASYA_NATS_URL",
        "nats://127.0.0.1:4222",
        "server URL(s), comma-separated for a cluster",
    );
    pub const CREDS: Var = Var::optional("ASYA_NATS_CREDS", "a .creds file (JWT + nkey seed)");
    pub const NKEY: Var = Var::optional("ASYA_NATS_NKEY", "an nkey seed (SU...)");
    pub const USER: Var = Var::optional("ASYA_NATS_USER", "user name (with ASYA_NATS_PASSWORD)");
    pub const PASSWORD: Var = Var::optional("ASYA_NATS_PASSWORD", "password (with ASYA_NATS_USER)");
    pub const TOKEN: Var = Var::optional("ASYA_NATS_TOKEN", "authentication token");
    pub const TLS_CA: Var = Var::optional(
        "ASYA_NATS_TLS_CA",
        "PEM file of CA certificates to trust (implies TLS)",
    );
    pub const TLS_CERT: Var = Var::optional(
        "ASYA_NATS_TLS_CERT",
        "PEM client certificate for mutual TLS (with ASYA_NATS_TLS_KEY)",
    );
    pub const TLS_KEY: Var = Var::optional(
        "ASYA_NATS_TLS_KEY",
        "PEM client key for mutual TLS (with ASYA_NATS_TLS_CERT)",
    );
    pub const TLS_REQUIRED: Var = Var::new(
        "ASYA_NATS_TLS_REQUIRED",
        "false",
        "refuse to connect without TLS",
    );
    pub const CONNECT_TIMEOUT: Var = Var::new(
        "ASYA_NATS_CONNECT_TIMEOUT",
        "5s",
        "timeout of one connection attempt",
    );
    pub const DUPLICATE_WINDOW: Var = Var::new(
        "ASYA_NATS_DUPLICATE_WINDOW",
        "2m",
        "stream duplicate window (dedup of Nats-Msg-Id); longer than the ack wait",
    );
    pub const ACK_WAIT: Var = Var::new(
        "ASYA_NATS_ACK_WAIT",
        "30s",
        "an unacked delivery is redelivered after this long",
    );
    pub const MAX_DELIVER: Var = Var::new(
        "ASYA_NATS_MAX_DELIVER",
        "-1",
        "consumer max deliveries; -1 = unlimited, the host decides",
    );
    pub const MAX_ACK_PENDING: Var = Var::new(
        "ASYA_NATS_MAX_ACK_PENDING",
        "1024",
        "consumer-wide cap on unacked deliveries (all replicas of an actor)",
    );
    pub const REPLICAS: Var = Var::new(
        "ASYA_NATS_REPLICAS",
        "1",
        "stream replicas (1, or 3/5 in a cluster)",
    );
    pub const STORAGE: Var = Var::new(
        "ASYA_NATS_STORAGE",
        "file",
        "stream storage: file or memory",
    );
    pub const STARTUP_TIMEOUT: Var = Var::new(
        "ASYA_NATS_STARTUP_TIMEOUT",
        "60s",
        "how long start-up and provision retry creating the stream and consumer (a cluster electing a leader); not ready meanwhile",
    );

    /// Every variable of the NATS transport, in `--help` order.
    pub const ALL: &[Var] = &[
        URL,
        CREDS,
        NKEY,
        USER,
        PASSWORD,
        TOKEN,
        TLS_CA,
        TLS_CERT,
        TLS_KEY,
        TLS_REQUIRED,
        CONNECT_TIMEOUT,
        DUPLICATE_WINDOW,
        ACK_WAIT,
        MAX_DELIVER,
        MAX_ACK_PENDING,
        REPLICAS,
        STORAGE,
        STARTUP_TIMEOUT,
    ];
}

/// How long one pull request waits on the server for messages. No idle heartbeat: in
/// async-nats 0.51 a heartbeat consumed by `Batch::poll_next` returns `Pending` without
/// re-registering the waker, so a message arriving after it sits unseen until the batch's
/// client-side timeout (measured: a nak'd redelivery lost until ack_wait). A lost pull
/// request (server restart) is renewed on reconnect instead.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Pause after the first failed pull; doubled per failure in a row up to [`PULL_RETRY_MAX`].
const PULL_RETRY: Duration = Duration::from_millis(100);
const PULL_RETRY_MAX: Duration = Duration::from_secs(2);
/// Bound on one JetStream API request while retrying (the client's own is 10 s): during a
/// leader election a request can go unanswered, and waiting for the next try is cheaper.
const API_TRY: Duration = Duration::from_secs(2);
/// Backoff of start-up (stream and consumer) retries.
const SETUP_RETRY: Duration = Duration::from_millis(100);
const SETUP_RETRY_MAX: Duration = Duration::from_secs(2);
/// Backoff of publishes answered "no responders" (the stream has no leader right now).
const PUBLISH_RETRY: Duration = Duration::from_millis(50);
const PUBLISH_RETRY_MAX: Duration = Duration::from_millis(500);

/// Typed configuration of the NATS transport.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsConfig {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub nkey: Option<String>,
    pub user_password: Option<(String, String)>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
    pub connect_timeout: Duration,
    pub duplicate_window: Duration,
    pub ack_wait: Duration,
    /// `-1` = unlimited.
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub replicas: usize,
    pub storage: stream::StorageType,
    /// Retry budget for creating the stream and consumer (`ASYA_NATS_STARTUP_TIMEOUT`).
    pub startup_timeout: Duration,
}

impl NatsConfig {
    /// The variables' defaults, for a server at `url`.
    pub fn new(url: &str) -> Self {
        let unset: [(&str, &str); 0] = [];
        NatsConfig {
            url: url.to_owned(),
            ..NatsConfig::from_source(&unset).expect("the defaults of ASYA_NATS_* are valid")
        }
    }

    /// Read every `ASYA_NATS_*` variable from `src`.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let r = Reader(src);
        let err = |var: Var, message: String| var.error(message);
        let url = r.string(vars::URL);
        for part in url.split(',') {
            let p = part.trim();
            if p.is_empty() || p.contains(char::is_whitespace) {
                return Err(err(vars::URL, format!("invalid server list {url:?}")));
            }
        }
        let user_password = match (r.raw(vars::USER), r.raw(vars::PASSWORD)) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    vars::PASSWORD,
                    format!("is required when {} is set", vars::USER),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    vars::USER,
                    format!("is required when {} is set", vars::PASSWORD),
                ))
            }
        };
        let tls_client = match (r.raw(vars::TLS_CERT), r.raw(vars::TLS_KEY)) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    vars::TLS_KEY,
                    format!("is required when {} is set", vars::TLS_CERT),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    vars::TLS_CERT,
                    format!("is required when {} is set", vars::TLS_KEY),
                ))
            }
        };
        let auth_count = [
            r.raw(vars::CREDS).is_some(),
            r.raw(vars::NKEY).is_some(),
            user_password.is_some(),
            r.raw(vars::TOKEN).is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if auth_count > 1 {
            return Err(err(
                vars::CREDS,
                format!(
                    "set only one of {}, {}, {}/{} and {}",
                    vars::CREDS,
                    vars::NKEY,
                    vars::USER,
                    vars::PASSWORD,
                    vars::TOKEN
                ),
            ));
        }
        let storage = match r.string(vars::STORAGE).to_ascii_lowercase().as_str() {
            "file" => stream::StorageType::File,
            "memory" => stream::StorageType::Memory,
            other => {
                return Err(err(
                    vars::STORAGE,
                    format!("unknown storage {other:?} (use file or memory)"),
                ))
            }
        };
        let cfg = NatsConfig {
            url,
            creds: r.raw(vars::CREDS).map(PathBuf::from),
            nkey: r.raw(vars::NKEY),
            user_password,
            token: r.raw(vars::TOKEN),
            tls_ca: r.raw(vars::TLS_CA).map(PathBuf::from),
            tls_client,
            tls_required: r.bool(vars::TLS_REQUIRED)?,
            connect_timeout: r.duration(vars::CONNECT_TIMEOUT)?,
            duplicate_window: r.duration(vars::DUPLICATE_WINDOW)?,
            ack_wait: r.duration(vars::ACK_WAIT)?,
            max_deliver: r.parse(vars::MAX_DELIVER)?,
            max_ack_pending: r.parse(vars::MAX_ACK_PENDING)?,
            replicas: r.parse(vars::REPLICAS)?,
            storage,
            startup_timeout: r.duration(vars::STARTUP_TIMEOUT)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks, one-line errors naming the variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |var: Var, message: String| Err(var.error(message));
        if self.ack_wait < Duration::from_millis(100) {
            return err(vars::ACK_WAIT, "must be at least 100ms".into());
        }
        // A redelivered input must republish its outputs while their ids are remembered.
        if self.duplicate_window <= self.ack_wait {
            return err(
                vars::DUPLICATE_WINDOW,
                format!(
                    "must be longer than {} ({:?}) so a redelivered input cannot duplicate its outputs",
                    vars::ACK_WAIT,
                    self.ack_wait
                ),
            );
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            return err(
                vars::MAX_DELIVER,
                "must be -1 (unlimited) or at least 1".into(),
            );
        }
        if self.max_ack_pending < 1 {
            return err(vars::MAX_ACK_PENDING, "must be at least 1".into());
        }
        if !(1..=5).contains(&self.replicas) {
            return err(vars::REPLICAS, "must be between 1 and 5".into());
        }
        if self.connect_timeout.is_zero() {
            return err(vars::CONNECT_TIMEOUT, "must be greater than zero".into());
        }
        if self.startup_timeout.is_zero() {
            return err(vars::STARTUP_TIMEOUT, "must be greater than zero".into());
        }
        Ok(())
    }
}

/// Where a queue lives in JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `asya-<ns>`
    pub stream: String,
    /// `asya.<ns>.<actor>`
    pub subject: String,
    /// durable consumer name: `<actor>`
    pub consumer: String,
}

impl Location {
    /// The JetStream layout of `queue`: stream `asya-<ns>`, subject `asya.<ns>.<actor>`,
    /// consumer `<actor>` (the name's parts are valid subject tokens by construction).
    pub fn of(queue: &QueueName) -> Location {
        let (ns, actor) = (queue.namespace(), queue.actor());
        Location {
            stream: format!("asya-{ns}"),
            subject: format!("asya.{ns}.{actor}"),
            consumer: actor.to_owned(),
        }
    }
}

fn broker(
    context: &'static str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> TransportError {
    TransportError::broker(context, e)
}

/// A JetStream connection. Cheap to clone.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Streams known to exist (skip the create call).
    streams: Mutex<HashSet<String>>,
    /// Notified after every (re)connect: waiting pulls were forgotten by the server.
    reconnected: Arc<Notify>,
    /// Counts retries against the broker once metrics are attached.
    retries: Retries,
}

impl NatsTransport {
    /// Connect with `cfg`.
    pub async fn connect(cfg: NatsConfig) -> Result<Self, TransportError> {
        cfg.validate()
            .map_err(|e| broker("invalid NATS configuration", e))?;
        let reconnected = Arc::new(Notify::new());
        let notify = reconnected.clone();
        let mut opts = async_nats::ConnectOptions::new()
            .name("asya-host")
            .connection_timeout(cfg.connect_timeout)
            .max_reconnects(None)
            .require_tls(cfg.tls_required)
            .reconnect_delay_callback(|attempts| {
                // 0, 50ms, 100ms, ... capped at 2s: a restarted server is found quickly.
                Duration::from_millis((attempts as u64).saturating_mul(50).min(2000))
            })
            .event_callback(move |event| {
                let notify = notify.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            info!("connected to NATS");
                            notify.notify_waiters();
                        }
                        async_nats::Event::Disconnected => warn!("disconnected from NATS"),
                        other => debug!(event = %other, "NATS event"),
                    }
                }
            });
        if let Some(path) = &cfg.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| broker("cannot read ASYA_NATS_CREDS", e))?;
        }
        if let Some(seed) = &cfg.nkey {
            opts = opts.nkey(seed.clone());
        }
        if let Some((u, p)) = &cfg.user_password {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &cfg.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let servers: Vec<&str> = cfg.url.split(',').map(str::trim).collect();
        let client = opts
            .connect(servers)
            .await
            .map_err(|e| broker("cannot connect to NATS", e))?;
        let js = jetstream::new(client.clone());
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                cfg,
                client,
                js,
                streams: Mutex::new(HashSet::new()),
                reconnected,
                retries: Retries::default(),
            }),
        })
    }

    pub fn config(&self) -> &NatsConfig {
        &self.inner.cfg
    }

    /// The underlying client (tests, benchmarks).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    fn stream_config(&self, loc: &Location) -> stream::Config {
        let ns_subjects = match loc.subject.rsplit_once('.') {
            Some((prefix, _)) => format!("{prefix}.>"),
            None => format!("{}.>", loc.subject),
        };
        stream::Config {
            name: loc.stream.clone(),
            description: Some("asya actor queues (one subject per actor)".into()),
            subjects: vec![ns_subjects],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: self.inner.cfg.storage,
            num_replicas: self.inner.cfg.replicas,
            duplicate_window: self.inner.cfg.duplicate_window,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        }
    }

    fn consumer_config(&self, loc: &Location) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(loc.consumer.clone()),
            description: Some(format!("asya actor {}", loc.consumer)),
            filter_subject: loc.subject.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.inner.cfg.ack_wait,
            max_deliver: self.inner.cfg.max_deliver,
            max_ack_pending: self.inner.cfg.max_ack_pending,
            max_waiting: 512,
            num_replicas: self.inner.cfg.replicas,
            ..Default::default()
        }
    }

    /// Create or update the namespace stream of `loc` (idempotent).
    async fn ensure_stream(&self, loc: &Location, force: bool) -> Result<(), TransportError> {
        if !force
            && self
                .inner
                .streams
                .lock()
                .expect("streams lock")
                .contains(&loc.stream)
        {
            return Ok(());
        }
        self.inner
            .js
            .create_or_update_stream(self.stream_config(loc))
            .await
            .map_err(|e| TransportError::Queue {
                queue: loc.stream.clone(),
                message: format!("cannot create or update the stream: {e}"),
            })?;
        self.inner
            .streams
            .lock()
            .expect("streams lock")
            .insert(loc.stream.clone());
        Ok(())
    }

    /// Create or update the stream and the durable consumer of `queue` (idempotent),
    /// retrying with backoff while the broker does not answer, for up to
    /// `ASYA_NATS_STARTUP_TIMEOUT`.
    async fn ensure_queue(
        &self,
        queue: &QueueName,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        let loc = Location::of(queue);
        self.setup_retrying(queue.as_str(), || self.ensure_queue_once(&loc))
            .await
    }

    /// Run `attempt` (one create-or-update) until it succeeds, each try bounded by
    /// [`API_TRY`], backing off between tries, for up to `ASYA_NATS_STARTUP_TIMEOUT`.
    async fn setup_retrying<T, F, Fut>(
        &self,
        what: &str,
        mut attempt: F,
    ) -> Result<T, TransportError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, TransportError>>,
    {
        let budget = self.inner.cfg.startup_timeout;
        let deadline = Instant::now() + budget;
        let mut backoff = Backoff::new(SETUP_RETRY, SETUP_RETRY_MAX);
        let mut outage = Outage::new("setup", what, &self.inner.retries);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = match tokio::time::timeout(left.min(API_TRY), attempt()).await {
                Ok(Ok(v)) => {
                    outage.recovered();
                    return Ok(v);
                }
                Ok(Err(e)) => e,
                Err(_) => broker("JetStream API request", "timed out"),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                return Err(TransportError::Queue {
                    queue: what.to_owned(),
                    message: format!(
                        "{e} (retried for {budget:?}, {}; raise it if the cluster needs longer to elect a leader)",
                        vars::STARTUP_TIMEOUT.name
                    ),
                });
            }
            outage.failed(&e);
            tokio::time::sleep(delay).await;
        }
    }

    /// One try of [`Self::ensure_queue`].
    async fn ensure_queue_once(
        &self,
        loc: &Location,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        let loc = loc.clone();
        self.ensure_stream(&loc, false).await?;
        let stream = self
            .inner
            .js
            .get_stream(&loc.stream)
            .await
            .map_err(|e| broker("cannot open the stream", e))?;
        stream
            .create_consumer(self.consumer_config(&loc))
            .await
            .map_err(|e| TransportError::Queue {
                queue: loc.stream.clone(),
                message: format!("cannot create or update consumer {}: {e}", loc.consumer),
            })
    }

    async fn publish(
        &self,
        msg: &OutMessage,
    ) -> Result<jetstream::context::PublishAckFuture, TransportError> {
        let loc = Location::of(&msg.queue);
        let rejected = |message: String| TransportError::Rejected {
            queue: msg.queue.to_string(),
            message,
        };
        // The fallible constructor: `From<&str>` asserts on CR/LF (ids are validated before
        // they get here; this keeps a bug from becoming a panic).
        let id =
            <async_nats::HeaderValue as std::str::FromStr>::from_str(&msg.id).map_err(|e| {
                rejected(format!(
                    "message id {:?} is not a header value: {e}",
                    msg.id
                ))
            })?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(msg.body.clone())
            .header(async_nats::header::NATS_MESSAGE_ID, id);
        self.inner
            .js
            .send_publish(loc.subject, publish)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => rejected(format!(
                    "{e} (the NATS server's max_payload; raise it in the server configuration or send less)"
                )),
                _ => broker("publish failed", e),
            })
    }

    /// Publish all, then wait for every PubAck. Returns the messages whose stream did not
    /// exist (no responders) and those the stream dropped as duplicates.
    async fn publish_all(&self, msgs: &[OutMessage]) -> Result<Published, TransportError> {
        let mut acks = Vec::with_capacity(msgs.len());
        for m in msgs {
            acks.push(self.publish(m).await?);
        }
        let mut out = Published::default();
        let mut first_err = None;
        for (i, ack) in acks.into_iter().enumerate() {
            match ack.await {
                Ok(ack) if ack.duplicate => out.duplicates.push(i),
                Ok(_) => {}
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                    out.missing.push(i)
                }
                Err(e) => {
                    first_err.get_or_insert(TransportError::Queue {
                        queue: msgs[i].queue.to_string(),
                        message: format!("publish not acknowledged: {e}"),
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Publishes answered "no responders": the namespace stream does not exist yet, or it
    /// has no leader (a cluster electing one). Create the stream (once, then only while it
    /// is not known to exist; each try bounded by [`API_TRY`]) and publish them again with
    /// backoff — the same `Nats-Msg-Id`, so nothing is stored twice — for up to half of
    /// `ASYA_NATS_ACK_WAIT` (the input is not redelivered meanwhile).
    async fn republish_missing(
        &self,
        mut pending: Vec<(usize, OutMessage)>,
        sent: &mut Sent,
    ) -> Result<(), TransportError> {
        let budget = self.inner.cfg.ack_wait / 2;
        let deadline = Instant::now() + budget;
        let mut backoff = Backoff::new(PUBLISH_RETRY, PUBLISH_RETRY_MAX);
        let first_queue = pending[0].1.queue.to_string();
        let mut outage = Outage::new("publish", &first_queue, &self.inner.retries);
        let mut first = true;
        loop {
            let mut streams: Vec<Location> = Vec::new();
            for (_, m) in &pending {
                let loc = Location::of(&m.queue);
                if !streams.iter().any(|l| l.stream == loc.stream) {
                    streams.push(loc);
                }
            }
            for loc in streams {
                if !first && self.stream_known(&loc.stream) {
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left.min(API_TRY), self.ensure_stream(&loc, true)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(stream = %loc.stream, error = %e, "stream not created"),
                    Err(_) => debug!(stream = %loc.stream, "stream create or update timed out"),
                }
            }
            first = false;
            let msgs: Vec<OutMessage> = pending.iter().map(|(_, m)| m.clone()).collect();
            let out = self.publish_all(&msgs).await?;
            sent.duplicates
                .extend(out.duplicates.iter().map(|&i| pending[i].0));
            if out.missing.is_empty() {
                outage.recovered();
                return Ok(());
            }
            pending = out
                .missing
                .into_iter()
                .map(|i| pending[i].clone())
                .collect();
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                return Err(TransportError::Queue {
                    queue: pending[0].1.queue.to_string(),
                    message: format!(
                        "no stream accepted this subject within {budget:?} (the stream is missing, or its cluster has no leader)"
                    ),
                });
            }
            outage.failed(&"no responders (no stream, or its leader is being elected)");
            tokio::time::sleep(delay).await;
        }
    }

    fn stream_known(&self, stream: &str) -> bool {
        self.inner
            .streams
            .lock()
            .expect("streams lock")
            .contains(stream)
    }
}

/// What one round of publishes came to.
#[derive(Debug, Default)]
struct Published {
    /// Answered "no responders" (no stream, or no leader).
    missing: Vec<usize>,
    /// Dropped by the stream as duplicates.
    duplicates: Vec<usize>,
}

/// Create the stream and the durable consumers of `actors` of `namespace` and of its end
/// actors `ends` (`asya-host provision`, `asya-host up --transport nats`). Idempotent;
/// existing streams and consumers are updated to the configuration.
pub async fn provision(
    cfg: NatsConfig,
    namespace: &str,
    actors: &[String],
    ends: &EndActors,
) -> Result<Vec<Location>, ProvisionError> {
    let queues = provision_queues(namespace, actors, ends)?;
    let t = NatsTransport::connect(cfg).await?;
    let mut out = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let loc = Location::of(q);
        // Update the stream once per run so changed settings (duplicate window) apply.
        if i == 0 {
            t.setup_retrying(&loc.stream, || t.ensure_stream(&loc, true))
                .await?;
        }
        t.ensure_queue(q).await?;
        out.push(loc);
    }
    Ok(out)
}

/// The queues [`provision`] creates: the actors', then the end actors'.
fn provision_queues(
    namespace: &str,
    actors: &[String],
    ends: &EndActors,
) -> Result<Vec<QueueName>, crate::queue::InvalidName> {
    ends.with_actors(actors.iter().map(String::as_str))
        .iter()
        .map(|a| QueueName::new(namespace, a))
        .collect()
}

/// Why `provision` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Name(#[from] crate::queue::InvalidName),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

#[async_trait]
impl Transport for NatsTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Nats
    }

    async fn subscribe(
        &self,
        queue: &QueueName,
        prefetch: usize,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        let consumer = self.ensure_queue(queue).await?;
        let prefetch = prefetch.max(1);
        let permits = Arc::new(Semaphore::new(prefetch));
        let (tx, rx) = mpsc::channel(prefetch);
        let task = tokio::spawn(pull_loop(
            consumer,
            permits,
            tx,
            self.inner.reconnected.clone(),
            queue.to_string(),
            self.inner.retries.clone(),
        ));
        Ok(Box::new(NatsReceiver {
            rx,
            task,
            client: self.inner.client.clone(),
            ack_wait: self.inner.cfg.ack_wait,
        }))
    }

    async fn send(&self, msg: OutMessage) -> Result<(), TransportError> {
        self.send_all(vec![msg]).await.map(|_| ())
    }

    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<Sent, TransportError> {
        let out = self.publish_all(&msgs).await?;
        let mut sent = Sent {
            duplicates: out.duplicates,
        };
        if out.missing.is_empty() {
            return Ok(sent);
        }
        let retry = out
            .missing
            .into_iter()
            .map(|i| (i, msgs[i].clone()))
            .collect();
        self.republish_missing(retry, &mut sent).await?;
        Ok(sent)
    }

    /// The server's `max_payload` (headers count against it too; the sidecar's x-sump copy
    /// keeps well below it).
    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.inner.client.server_info().max_payload)
    }

    async fn ensure_queues(&self, queues: &[QueueName]) -> Result<(), TransportError> {
        for q in queues {
            self.ensure_queue(q).await?;
        }
        Ok(())
    }

    fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// `num_pending + num_ack_pending` of the queue's durable consumer, read from the
    /// stream leader (consumer info is answered by the leader, so a follower's stale
    /// count is never used); `None` while the stream or the consumer does not exist.
    async fn queue_depth(&self, queue: &QueueName) -> Result<Option<u64>, TransportError> {
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        let loc = Location::of(queue);
        let stream = self
            .inner
            .js
            .get_stream_no_info(&loc.stream)
            .await
            .map_err(|e| broker("cannot open the stream", e))?;
        match stream.consumer_info(&loc.consumer).await {
            Ok(info) => Ok(Some(info.num_pending + info.num_ack_pending as u64)),
            Err(e) if matches!(e.kind(), Kind::NotFound | Kind::StreamNotFound) => Ok(None),
            Err(e) => Err(broker("cannot read the consumer's counts", e)),
        }
    }

    fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.inner.retries.0.set(metrics);
    }
}

/// A pulled message and the prefetch slot it occupies.
type Pulled = (jetstream::Message, OwnedSemaphorePermit);

/// Pull messages while slots are free: one pull request for all free slots, a new one when
/// it completes, expires, or the connection was re-established.
async fn pull_loop(
    consumer: consumer::Consumer<consumer::pull::Config>,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Pulled>,
    reconnected: Arc<Notify>,
    queue: String,
    retries: Retries,
) {
    // A consumer without a leader answers at once (503): back off, or we spin.
    let mut backoff = Backoff::new(PULL_RETRY, PULL_RETRY_MAX);
    let mut outage = Outage::new("pull", &queue, &retries);
    loop {
        let first = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = tx.closed() => return,
        };
        let mut held = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            held.push(p);
        }
        let reconnect = reconnected.notified();
        tokio::pin!(reconnect);
        reconnect.as_mut().enable();
        let batch = consumer
            .batch()
            .max_messages(held.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                drop(held);
                outage.failed(&e);
                if !pull_pause(&mut backoff, &tx).await {
                    return;
                }
                continue;
            }
        };
        let mut failed = None;
        loop {
            let next = tokio::select! {
                n = batch.next() => n,
                _ = &mut reconnect => {
                    // The server forgot this pull request. Hand out what already arrived
                    // (dropping it would only delay it by ack_wait), then pull anew.
                    debug!(%queue, "reconnected; renewing the pull request");
                    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
                        let Some(permit) = held.pop() else { break };
                        if tx.send((msg, permit)).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                _ = tx.closed() => return,
            };
            match next {
                None => break,
                Some(Ok(msg)) => {
                    outage.recovered();
                    backoff.reset();
                    let permit = held.pop().expect("one slot per requested message");
                    if tx.send((msg, permit)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) => {
                drop(held);
                outage.failed(&e);
                if !pull_pause(&mut backoff, &tx).await {
                    return;
                }
            }
            None => {
                outage.recovered();
                backoff.reset();
            }
        }
    }
}

/// After a failed pull: wait the next backoff step. False when the receiver is gone.
async fn pull_pause(backoff: &mut Backoff, tx: &mpsc::Sender<Pulled>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(backoff.next_delay()) => true,
        _ = tx.closed() => false,
    }
}

/// Exponential backoff: `initial`, doubled per step, capped at `max`.
struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            next: initial,
            max,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The `asya_transport_retries_total{operation}` counter, once metrics are attached.
#[derive(Clone, Default)]
struct Retries(Arc<std::sync::OnceLock<Arc<Metrics>>>);

impl Retries {
    fn inc(&self, operation: &'static str) {
        if let Some(m) = self.0.get() {
            m.transport_retries
                .get_or_create(&crate::metrics::Operation { operation })
                .inc();
        }
    }
}

/// One run of failures of an operation against the broker: a WARN when it starts (one per
/// outage, not per retry), every retry counted, an INFO when it ends. Start-up retries also
/// log their progress every [`Outage::PROGRESS`].
struct Outage<'a> {
    operation: &'static str,
    what: String,
    retries: &'a Retries,
    since: Option<Instant>,
    last_progress: Instant,
    count: u64,
}

impl<'a> Outage<'a> {
    const PROGRESS: Duration = Duration::from_secs(5);

    fn new(operation: &'static str, what: &str, retries: &'a Retries) -> Self {
        Outage {
            operation,
            what: what.to_owned(),
            retries,
            since: None,
            last_progress: Instant::now(),
            count: 0,
        }
    }

    fn failed(&mut self, error: &dyn std::fmt::Display) {
        self.retries.inc(self.operation);
        self.count += 1;
        let now = Instant::now();
        match self.since {
            None => {
                self.since = Some(now);
                self.last_progress = now;
                warn!(operation = self.operation, target = %self.what, %error, "NATS not answering; retrying with backoff");
            }
            Some(since) => {
                if self.operation == "setup" && now - self.last_progress >= Self::PROGRESS {
                    self.last_progress = now;
                    info!(operation = self.operation, target = %self.what, %error, waited = ?(now - since), retries = self.count, "still waiting for NATS");
                } else {
                    debug!(operation = self.operation, target = %self.what, %error, "retrying");
                }
            }
        }
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            info!(operation = self.operation, target = %self.what, waited = ?since.elapsed(), retries = self.count, "NATS answering again");
            self.count = 0;
        }
    }
}

struct NatsReceiver {
    rx: mpsc::Receiver<Pulled>,
    task: tokio::task::JoinHandle<()>,
    client: async_nats::Client,
    ack_wait: Duration,
}

impl Drop for NatsReceiver {
    fn drop(&mut self) {
        self.task.abort();
        // Messages pulled but never handed out: give them back now rather than after ack_wait.
        self.rx.close();
        while let Ok((msg, permit)) = self.rx.try_recv() {
            drop(self.acker(msg, permit));
        }
    }
}

impl NatsReceiver {
    fn acker(&self, msg: jetstream::Message, permit: OwnedSemaphorePermit) -> NatsAcker {
        NatsAcker {
            reply: msg.message.reply.clone(),
            client: self.client.clone(),
            ack_wait: self.ack_wait,
            settled: false,
            permit: Some(permit),
        }
    }
}

#[async_trait]
impl Receiver for NatsReceiver {
    async fn recv(&mut self) -> Result<Delivery, TransportError> {
        // Cancel-safe: `mpsc::Receiver::recv` loses nothing when dropped.
        let (msg, permit) = self.rx.recv().await.ok_or(TransportError::Closed)?;
        let attempt = msg
            .info()
            .map(|i| u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let body = msg.message.payload.clone();
        Ok(Delivery {
            body,
            attempt,
            acker: Box::new(self.acker(msg, permit)),
        })
    }
}

/// Settles one delivery through its reply subject.
struct NatsAcker {
    reply: Option<async_nats::Subject>,
    client: async_nats::Client,
    ack_wait: Duration,
    settled: bool,
    /// The prefetch slot; given back when settling starts, so the next pull request goes
    /// out while this delivery's ack is still being confirmed.
    permit: Option<OwnedSemaphorePermit>,
}

impl NatsAcker {
    fn reply(&self) -> Result<async_nats::Subject, TransportError> {
        self.reply
            .clone()
            .ok_or_else(|| broker("settle", "message has no reply subject"))
    }

    /// Send `kind` and wait for the server's confirmation, retrying across a reconnect
    /// until `within` elapsed (the server keeps pending deliveries across restarts).
    async fn confirm(&self, kind: AckKind, within: Duration) -> Result<(), TransportError> {
        let reply = self.reply()?;
        let deadline = Instant::now() + within;
        // Several short tries rather than one long one: a request sent just before a
        // connection drops gets no answer, and one try must not use up the whole budget.
        let per_try = (within / 6).clamp(Duration::from_millis(200), Duration::from_secs(2));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let try_for = left.min(per_try).max(Duration::from_millis(50));
            let r = tokio::time::timeout(
                try_for,
                self.client.request(reply.clone(), Bytes::from(kind)),
            )
            .await;
            let e: TransportError = match r {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => broker("acknowledgement not confirmed", e),
                Err(_) => broker("acknowledgement not confirmed", "timed out"),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay >= deadline {
                return Err(e);
            }
            debug!(error = %e, "retrying acknowledgement");
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.settled = true;
        self.permit = None;
        // Retry for most of ack_wait: past it the server redelivers anyway.
        self.confirm(AckKind::Ack, self.ack_wait.mul_f64(0.8)).await
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.settled = true;
        self.permit = None;
        let kind = if delay.is_zero() {
            AckKind::Nak(None)
        } else {
            AckKind::Nak(Some(delay))
        };
        // A lost nak only means redelivery after ack_wait instead of `delay`.
        self.confirm(kind, Duration::from_secs(2)).await
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        self.client
            .publish(self.reply()?, Bytes::from(AckKind::Progress))
            .await
            .map_err(|e| broker("in-progress ack failed", e))
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.ack_wait / 2)
    }
}

impl Drop for NatsAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped unsettled (shutdown, aborted worker): redeliver now, not after ack_wait.
        if let (Some(reply), Ok(rt)) = (self.reply.take(), tokio::runtime::Handle::try_current()) {
            let client = self.client.clone();
            rt.spawn(async move {
                let _ = client.publish(reply, Bytes::from(AckKind::Nak(None))).await;
                let _ = client.flush().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let l = Location::of(&QueueName::new("prod-eu", "text-clean").unwrap());
        assert_eq!(l.stream, "asya-prod-eu");
        assert_eq!(l.subject, "asya.prod-eu.text-clean");
        assert_eq!(l.consumer, "text-clean");
        let l = Location::of(&QueueName::new("other", "x-sink").unwrap());
        assert_eq!(l.subject, "asya.other.x-sink");
    }

    #[test]
    fn provision_queues_end_with_the_configured_end_actors() {
        let ends = EndActors {
            sink: "done".into(),
            sump: "x-sump".into(),
        };
        let qs = provision_queues("n", &["a".into(), "x-sump".into()], &ends).unwrap();
        let names: Vec<String> = qs.iter().map(|q| q.to_string()).collect();
        assert_eq!(names, ["asya-n-a", "asya-n-x-sump", "asya-n-done"]);
        assert!(provision_queues("n", &["a.b".into()], &ends).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let steps: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(steps, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn config_errors_name_the_variable() {
        let c = NatsConfig::from_source(&[("ASYA_NAMESPACE", "n")]).unwrap();
        assert_eq!(c, NatsConfig::new("nats://127.0.0.1:4222"));
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.max_deliver, -1);
        for (var, val, named) in [
            (vars::USER, "u", vars::PASSWORD),
            (vars::ACK_WAIT, "5m", vars::DUPLICATE_WINDOW),
            (vars::ACK_WAIT, "soon", vars::ACK_WAIT),
            (vars::MAX_DELIVER, "0", vars::MAX_DELIVER),
            (vars::STORAGE, "disk", vars::STORAGE),
            (vars::TLS_CERT, "c.pem", vars::TLS_KEY),
            (vars::REPLICAS, "7", vars::REPLICAS),
            (vars::STARTUP_TIMEOUT, "0s", vars::STARTUP_TIMEOUT),
        ] {
            let e = NatsConfig::from_source(&[(var.name, val)]).unwrap_err();
            assert_eq!(e.var, named, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
        let e = NatsConfig::from_source(&[(vars::TOKEN.name, "t"), (vars::CREDS.name, "/x")])
            .unwrap_err();
        assert_eq!(e.var, vars::CREDS);
    }
}
