//! The gateway (SPEC §9): creates tasks, publishes their first envelope, tracks progress
//! from sidecar reports and answers "where is my task?" over HTTP.
//!
//! - [`Gateway`]: the library API (`asya-host up` uses it in process).
//! - [`serve`]: the HTTP API (`POST /tasks`, `GET /tasks[/{id}[/stream|/trace]]`,
//!   `POST /tasks/{id}/cancel`, internal `POST /reports`), and [`mcp`] at `/mcp`.
//! - [`store`]: task stores (memory, NATS JetStream KV).
//! - [`HttpReporter`]: how a standalone sidecar reports (`ASYA_GATEWAY_URL`).
//! - [`otlp`]: one span per hop over OTLP/HTTP JSON (`OTEL_EXPORTER_OTLP_ENDPOINT`).
//! - [`cli`]: `asya-host gateway | trace | send`.

pub mod cli;
pub mod client;
mod http;
pub mod mcp;
pub mod otlp;
pub mod reporter;
pub mod store;
pub mod task;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::envelope::{
    now_rfc3339, sump_payload, unparseable_envelope, unparseable_envelope_id, Envelope, ErrorInfo,
    Phase, Reason, Route, HEADER_TRACEPARENT, HEADER_TRACE_ID,
};
use crate::transport::{OutMessage, QueueName, Transport, TransportError};

pub use client::HttpReporter;
pub use http::{serve, serve_with, ServeOptions, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT};
pub use reporter::WireReport;
pub use store::{KvStore, MemoryStore, StoreError, TaskStore};
pub use task::{HopEntry, Task, TaskStatus, TaskView};

/// Named routes: flow name → actors.
pub type Flows = BTreeMap<String, Vec<String>>;

/// Default cap on a submitted payload (`ASYA_GATEWAY_MAX_PAYLOAD_BYTES`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// The longest task `timeout` accepted (366 days): a deadline must stay a valid date.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Actors a submitted route may name.
pub const MAX_ROUTE_ACTORS: usize = 1024;

/// Reports queued for tracking before new ones are dropped (and counted).
const REPORT_QUEUE: usize = 4096;
/// Events buffered per SSE subscriber before it lags.
const EVENT_BUFFER: usize = 1024;

/// Why a flow file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("cannot read flow file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("flow file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Load the `[flows]` table of a TOML file (`name = ["a", "b"]`); other keys are ignored.
pub fn load_flows(path: &Path) -> Result<Flows, FlowsError> {
    let text = std::fs::read_to_string(path).map_err(|source| FlowsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_flows(&text).map_err(|message| FlowsError::Invalid {
        path: path.display().to_string(),
        message,
    })
}

/// Parse the `[flows]` table of TOML text.
pub fn parse_flows(text: &str) -> Result<Flows, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        flows: BTreeMap<String, toml::Value>,
    }
    let file: File = toml::from_str(text).map_err(|e| e.to_string().replace('\n', " "))?;
    let mut flows = Flows::new();
    for (name, v) in file.flows {
        let actors: Vec<String> = match v {
            toml::Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    toml::Value::String(s) => Ok(s),
                    other => Err(format!("flow {name}: actor {other} is not a string")),
                })
                .collect::<Result<_, _>>()?,
            // The mesh's richer form: `[flows.name] actors = [...]`.
            toml::Value::Table(t) => match t.get("actors").or_else(|| t.get("route")) {
                Some(toml::Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("flow {name}: actor {i} is not a string"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("flow {name}: expected a list of actors")),
            },
            _ => return Err(format!("flow {name}: expected a list of actors")),
        };
        validate_route(&actors).map_err(|e| format!("flow {name}: {e}"))?;
        flows.insert(name, actors);
    }
    Ok(flows)
}

fn validate_route(actors: &[String]) -> Result<(), String> {
    if actors.is_empty() {
        return Err("route is empty".into());
    }
    for a in actors {
        crate::config::validate_actor_name("route", a).map_err(|e| e.message)?;
    }
    Ok(())
}

/// A task to create.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubmitRequest {
    #[serde(default)]
    pub flow: Option<String>,
    #[serde(default)]
    pub route: Option<Vec<String>>,
    #[serde(default)]
    pub payload: Value,
    /// Over HTTP: `"timeout": "30s"` or seconds as a number.
    #[serde(default, with = "timeout_serde")]
    pub timeout: Option<Duration>,
}

mod timeout_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum T {
            Secs(f64),
            Text(String),
        }
        let out_of_range = || {
            serde::de::Error::custom(format!(
                "timeout: must be more than 0 and at most {} seconds (366 days)",
                super::MAX_TIMEOUT.as_secs()
            ))
        };
        match Option::<T>::deserialize(d)? {
            None => Ok(None),
            Some(T::Secs(s)) if s > 0.0 && s <= super::MAX_TIMEOUT.as_secs_f64() => {
                Ok(Some(Duration::from_secs_f64(s)))
            }
            Some(T::Secs(_)) => Err(out_of_range()),
            Some(T::Text(t)) => match crate::config::parse_duration(&t) {
                Ok(d) if !d.is_zero() && d <= super::MAX_TIMEOUT => Ok(Some(d)),
                Ok(_) => Err(out_of_range()),
                Err(e) => Err(serde::de::Error::custom(format!(
                    "timeout: {t:?} is not a duration (e.g. \"30s\" or seconds as a number): {e}"
                ))),
            },
        }
    }
}

/// Why a gateway call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unknown flow {0:?}")]
    UnknownFlow(String),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("task {id} not found: unknown, or finished more than {retention} ago and removed (ASYA_GATEWAY_RETENTION)")]
    NotFound { id: String, retention: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot publish the first envelope: {0}")]
    Transport(#[from] TransportError),
    /// The task is not in a state that allows this (resume of a task that is not paused).
    #[error("{0}")]
    Conflict(String),
}

/// One update of a task, as streamed over SSE.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEvent {
    pub task_id: String,
    /// `progress`, `upstream` or `final`.
    pub kind: &'static str,
    pub data: Value,
}

/// Creates and tracks tasks. Cheap to share (`Arc`).
pub struct Gateway {
    store: Arc<dyn TaskStore>,
    transport: Arc<dyn Transport>,
    namespace: String,
    flows: Flows,
    sink: String,
    sump: String,
    max_payload: AtomicUsize,
    /// How long finished tasks are kept (for messages; the store enforces it).
    retention: std::sync::Mutex<Duration>,
    /// Serialises read-modify-write of task records.
    update: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    reports: mpsc::Sender<WireReport>,
    dropped: AtomicU64,
    /// Canceled task ids for sidecars in this process ([`Gateway::canceled`]).
    canceled: Arc<crate::cancel::Canceled>,
    /// Where canceled ids are announced to standalone sidecars (NATS KV).
    cancel_bucket: std::sync::OnceLock<async_nats::jetstream::kv::Store>,
}

impl Gateway {
    /// A gateway publishing on `transport` in `namespace`. Must be called inside a tokio
    /// runtime (it spawns the task that applies reports).
    pub fn new(
        store: Arc<dyn TaskStore>,
        transport: Arc<dyn Transport>,
        namespace: String,
        flows: Flows,
        sink: String,
        sump: String,
    ) -> Arc<Gateway> {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let gw = Arc::new(Gateway {
            store,
            transport,
            namespace,
            flows,
            sink,
            sump,
            max_payload: AtomicUsize::new(DEFAULT_MAX_PAYLOAD_BYTES),
            retention: std::sync::Mutex::new(store::DEFAULT_RETENTION),
            update: tokio::sync::Mutex::new(()),
            events,
            reports: tx,
            dropped: AtomicU64::new(0),
            canceled: crate::cancel::Canceled::new(),
            cancel_bucket: std::sync::OnceLock::new(),
        });
        tokio::spawn(apply_reports(Arc::downgrade(&gw), rx));
        gw
    }

    /// Cap on a submitted payload's JSON size.
    pub fn set_max_payload_bytes(&self, n: usize) {
        self.max_payload.store(n, Ordering::Relaxed);
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    /// How long the store keeps finished tasks (named in "not found" answers).
    pub fn set_retention(&self, retention: Duration) {
        *self.retention.lock().unwrap_or_else(|p| p.into_inner()) = retention;
    }

    /// The "not found" error for `id`.
    pub fn not_found(&self, id: &str) -> GatewayError {
        let retention = *self.retention.lock().unwrap_or_else(|p| p.into_inner());
        GatewayError::NotFound {
            id: id.to_owned(),
            retention: humantime::format_duration(retention).to_string(),
        }
    }

    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Reports dropped because the tracking queue was full.
    pub fn dropped_reports(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Create a task and publish its first envelope.
    pub async fn submit(&self, req: SubmitRequest) -> Result<TaskView, GatewayError> {
        let route = match (req.flow.as_deref(), req.route) {
            (Some(_), Some(_)) => {
                return Err(GatewayError::BadRequest(
                    "give either flow or route, not both".into(),
                ))
            }
            (None, None) => {
                return Err(GatewayError::BadRequest("flow or route is required".into()))
            }
            (Some(f), None) => self
                .flows
                .get(f)
                .cloned()
                .ok_or_else(|| GatewayError::UnknownFlow(f.to_owned()))?,
            (None, Some(r)) => {
                if r.len() > MAX_ROUTE_ACTORS {
                    return Err(GatewayError::BadRequest(format!(
                        "route: {} actors (at most {MAX_ROUTE_ACTORS})",
                        r.len()
                    )));
                }
                validate_route(&r).map_err(|e| GatewayError::BadRequest(format!("route: {e}")))?;
                r
            }
        };
        if req.timeout.is_some_and(|t| t.is_zero() || t > MAX_TIMEOUT) {
            return Err(GatewayError::BadRequest(format!(
                "timeout: must be more than 0 and at most {} seconds (366 days)",
                MAX_TIMEOUT.as_secs()
            )));
        }
        let payload = serde_json::to_string(&req.payload).expect("a JSON value serialises");
        let limit = self.max_payload_bytes();
        if payload.len() > limit {
            return Err(GatewayError::PayloadTooLarge {
                size: payload.len(),
                limit,
            });
        }
        let uuid = uuid::Uuid::new_v4();
        let id = uuid.to_string();
        let trace_id = uuid.simple().to_string();
        let deadline_at = match req.timeout {
            None => None,
            Some(t) => {
                let d = chrono::Duration::from_std(t)
                    .ok()
                    .and_then(|t| chrono::Utc::now().checked_add_signed(t))
                    .ok_or_else(|| GatewayError::BadRequest("timeout: out of range".to_owned()))?;
                Some(d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            }
        };
        let task = Task::new(
            id.clone(),
            trace_id.clone(),
            req.flow.clone(),
            route.clone(),
            deadline_at.clone(),
        );
        let mut env = Envelope::new(
            id.clone(),
            Route {
                prev: Vec::new(),
                curr: route[0].clone(),
                next: route[1..].to_vec(),
            },
            serde_json::value::RawValue::from_string(payload).expect("serialised JSON"),
        );
        env.headers.insert_str(HEADER_TRACE_ID, &trace_id);
        env.headers
            .insert_str(HEADER_TRACEPARENT, &traceparent(&trace_id));
        let st = env.status_mut();
        st.phase = Some(Phase::Pending);
        st.created_at = Some(task.created_at.clone());
        st.updated_at = Some(task.created_at.clone());
        st.deadline_at = deadline_at;
        {
            let _g = self.update.lock().await;
            self.store.put(&task).await?;
        }
        let sent = match QueueName::new(&self.namespace, &route[0]) {
            Ok(queue) => {
                let msg = OutMessage {
                    queue,
                    id: format!("{id}:submit"),
                    body: Bytes::from(env.to_vec()),
                };
                self.transport.send(msg).await
            }
            Err(e) => Err(TransportError::Queue {
                queue: route[0].clone(),
                message: e.to_string(),
            }),
        };
        if let Err(e) = sent {
            let _g = self.update.lock().await;
            let mut t = task;
            t.status = TaskStatus::Failed;
            t.error = Some(crate::envelope::ErrorInfo::new(
                "TransportError",
                e.to_string(),
            ));
            t.updated_at = now_rfc3339();
            let _ = self.store.put(&t).await;
            return Err(e.into());
        }
        debug!(task_id = %id, trace_id = %trace_id, actor = %route[0], "task submitted");
        let view = task.view();
        self.emit(&id, "progress", &view);
        Ok(view)
    }

    /// The task's current view (a task whose deadline passed long ago without a final
    /// report is failed with Timeout on read).
    pub async fn get(&self, id: &str) -> Option<TaskView> {
        self.get_task(id).await.map(|t| t.view())
    }

    /// The stored task, timeline included.
    pub async fn get_task(&self, id: &str) -> Option<Task> {
        let t = match self.store.get(id).await {
            Ok(t) => t?,
            Err(e) => {
                warn!(task_id = %id, error = %e, "task store read failed");
                return None;
            }
        };
        if !t.status.is_final() && t.clone().expire(expiry_grace()) {
            return self.update_task(id, |t| t.expire(expiry_grace())).await;
        }
        let now = chrono::Utc::now();
        if t.clone().pause_expire(now) {
            return self.update_task(id, |t| t.pause_expire(now)).await;
        }
        Some(t)
    }

    /// Consume the namespace's `x-pause` queue until `stop`: each parked frame is stored in
    /// its task's record (the task store: NATS KV survives restarts), and only then acked;
    /// every [`PAUSE_SWEEP`] a paused task past its pause timeout is failed with Timeout.
    /// `asya-host gateway` and `up` run it; several gateways may share the queue.
    pub fn spawn_parking(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let gw = Arc::downgrade(self);
        let transport = self.transport.clone();
        let queues = QueueName::new(&self.namespace, PAUSE_QUEUE_ACTOR)
            .and_then(|pause| Ok((pause, QueueName::new(&self.namespace, &self.sump)?)));
        tokio::spawn(async move {
            let (queue, sump) = match queues {
                Ok(q) => q,
                Err(e) => {
                    warn!(error = %e, "no pause or sump queue: paused tasks cannot be resumed");
                    return;
                }
            };
            // Sidecars publish there: make sure it exists (transports that create queues on
            // demand, as NATS, need nothing).
            if let Err(e) = transport.ensure_queues(std::slice::from_ref(&queue)).await {
                warn!(%queue, error = %e, "cannot make sure the pause queue exists");
            }
            let mut rx = loop {
                match transport.subscribe(&queue, 16).await {
                    Ok(rx) => break rx,
                    Err(e) => {
                        warn!(%queue, error = %e, "cannot consume the pause queue; trying again")
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            };
            let mut sweep = tokio::time::interval(PAUSE_SWEEP);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sweep.tick() => match gw.upgrade() {
                        Some(gw) => gw.sweep_pauses().await,
                        None => return,
                    },
                    d = rx.recv() => match d {
                        Ok(d) => {
                            let Some(g) = gw.upgrade() else { return };
                            let settled = match g.park(&d.body, &sump).await {
                                Ok(()) => d.acker.ack().await,
                                Err(e) => {
                                    warn!(error = %e, "cannot park a paused frame; it is redelivered");
                                    d.acker.nack(Duration::from_secs(1)).await
                                }
                            };
                            if let Err(e) = settled {
                                debug!(error = %e, "settling a parked frame failed");
                            }
                        }
                        Err(TransportError::Closed) => return,
                        Err(e) => {
                            warn!(error = %e, "pause queue receive failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                }
            }
        })
    }

    /// Store one frame from `x-pause` in its task. A message that is not an envelope, or a
    /// frame of a task this gateway's store does not know, goes to x-sump with the reason
    /// (one bad message costs that message, nothing else). `Err`: try again later (the store
    /// or the broker failed).
    async fn park(&self, body: &[u8], sump: &QueueName) -> Result<(), ParkError> {
        let env = match Envelope::parse(body) {
            Ok(e) => e,
            Err(e) => {
                let input = unparseable_envelope(body, &e);
                let error = input.status.as_ref().and_then(|s| s.error.clone());
                return self.unparkable(body, input, e.reason(), error, sump).await;
            }
        };
        let Some(id) = self
            .resolve(&env.id, env.parent_id.as_deref(), &env.trace_id())
            .await
        else {
            let error = ErrorInfo::new(
                "UnknownTask",
                format!(
                    "a paused frame (envelope {}, trace {}) of a task this gateway does not know: it cannot be resumed",
                    env.id,
                    env.trace_id()
                ),
            );
            return self
                .unparkable(body, env, Reason::ValidationError, Some(error), sump)
                .await;
        };
        let meta = env.headers.value(HEADER_PAUSE).unwrap_or(Value::Null);
        let text = String::from_utf8_lossy(body).into_owned();
        let _g = self.update.lock().await;
        let Some(mut t) = self.store.get(&id).await? else {
            return Ok(());
        };
        if t.park(text, meta, chrono::Utc::now()) {
            self.store.put(&t).await?;
            debug!(task_id = %id, "task paused; frame parked");
            self.emit(&id, "progress", &t.view());
        }
        Ok(())
    }

    /// An x-pause message that cannot be parked, to x-sump: failed with `reason` and `error`,
    /// the payload in the x-sump shape (SPEC §5), under a message id derived from the bytes (a
    /// redelivered copy is deduplicated).
    async fn unparkable(
        &self,
        body: &[u8],
        mut env: Envelope,
        reason: Reason,
        error: Option<ErrorInfo>,
        sump: &QueueName,
    ) -> Result<(), ParkError> {
        let message = error.as_ref().map_or("", |e| e.message.as_str());
        warn!(envelope_id = %env.id, reason = reason.code(), error = message, "an x-pause message cannot be parked; it goes to x-sump");
        let now = now_rfc3339();
        let st = env.status_mut();
        st.phase = Some(Phase::Failed);
        st.reason = Some(reason);
        st.actor = Some(PAUSE_QUEUE_ACTOR.to_owned());
        st.created_at.get_or_insert_with(|| now.clone());
        st.updated_at = Some(now);
        st.error.clone_from(&error);
        env.payload = sump_payload(reason.code(), error.as_ref(), &env.payload);
        self.transport
            .send(OutMessage {
                queue: sump.clone(),
                id: format!("{}:x-pause:sump", unparseable_envelope_id(body)),
                body: Bytes::from(env.to_vec()),
            })
            .await
            .map_err(ParkError::Sump)
    }

    /// Fail every paused task past its pause timeout.
    async fn sweep_pauses(&self) {
        let now = chrono::Utc::now();
        let tasks = match self.store.list().await {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "pause sweep: cannot list tasks");
                return;
            }
        };
        for t in tasks {
            if t.status == TaskStatus::Paused && t.clone().pause_expire(now) {
                self.update_task(&t.id, |t| t.pause_expire(now)).await;
            }
        }
    }

    /// Resume a paused task: `input` (a JSON object) is merged into the parked frame's
    /// payload (shallow: each top-level key of `input` replaces the payload's; a null
    /// payload becomes `input`), `x-asya-pause` is removed, the deadline moves later by the
    /// time spent paused, and the frame is published to its `route.curr` actor (x-sink when
    /// the route had ended). [`GatewayError::Conflict`] when the task is not paused (a
    /// second resume, a finished task) or its pause timed out.
    pub async fn resume(&self, id: &str, input: Value) -> Result<TaskView, GatewayError> {
        let Value::Object(input) = input else {
            return Err(GatewayError::BadRequest(
                "input: must be a JSON object".into(),
            ));
        };
        let _g = self.update.lock().await;
        let mut t = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| self.not_found(id))?;
        let now = chrono::Utc::now();
        if t.pause_expire(now) {
            self.store.put(&t).await?;
            self.emit(id, "final", &t.view());
        }
        let parked = match (&t.parked, t.status) {
            (Some(p), TaskStatus::Paused) => p.clone(),
            (_, status) => {
                return Err(GatewayError::Conflict(format!(
                    "task {id} is {}, not paused",
                    status.as_str()
                )))
            }
        };
        let mut env = Envelope::parse(parked.as_bytes())
            .map_err(|e| GatewayError::Conflict(format!("the parked frame cannot be used: {e}")))?;
        let merged = match serde_json::from_str::<Value>(env.payload.get()) {
            Ok(Value::Object(mut m)) => {
                m.extend(input);
                Value::Object(m)
            }
            Ok(Value::Null) => Value::Object(input),
            _ => {
                return Err(GatewayError::BadRequest(
                    "the parked payload is not a JSON object: input cannot be merged into it"
                        .into(),
                ))
            }
        };
        env.payload = serde_json::value::RawValue::from_string(merged.to_string())
            .expect("a JSON value serialises");
        env.headers.remove(HEADER_PAUSE);
        // The SLA clock was frozen while paused.
        let paused_for = t
            .paused_at
            .as_deref()
            .and_then(|p| chrono::DateTime::parse_from_rfc3339(p).ok())
            .map(|p| (now - p.with_timezone(&chrono::Utc)).max(chrono::Duration::zero()))
            .unwrap_or_else(chrono::Duration::zero);
        let shift = |d: &str| {
            chrono::DateTime::parse_from_rfc3339(d)
                .ok()
                .and_then(|d| d.with_timezone(&chrono::Utc).checked_add_signed(paused_for))
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        };
        let st = env.status_mut();
        st.phase = Some(Phase::Pending);
        st.reason = None;
        st.updated_at = Some(now_rfc3339());
        if let Some(d) = st.deadline_at.as_deref().and_then(shift) {
            st.deadline_at = Some(d);
        }
        if let Some(d) = t.deadline_at.as_deref().and_then(shift) {
            t.deadline_at = Some(d);
        }
        let dest = if env.route.curr.is_empty() {
            self.sink.clone()
        } else {
            env.route.curr.clone()
        };
        let queue = QueueName::new(&self.namespace, &dest).map_err(|e| TransportError::Queue {
            queue: dest.clone(),
            message: e.to_string(),
        })?;
        self.transport
            .send(OutMessage {
                queue,
                id: format!("{}:resume:{}", env.id, t.resumed + 1),
                body: Bytes::from(env.to_vec()),
            })
            .await?;
        t.resumed += 1;
        t.parked = None;
        t.paused_at = None;
        t.pause_until = None;
        t.pause_metadata = None;
        t.status = TaskStatus::Running;
        t.current_actor_name = Some(dest);
        t.updated_at = now_rfc3339();
        self.store.put(&t).await?;
        let view = t.view();
        self.emit(id, "progress", &view);
        debug!(task_id = %id, "task resumed");
        Ok(view)
    }

    /// Tasks matching the filters, newest first.
    pub async fn list(
        &self,
        status: Option<TaskStatus>,
        flow: Option<&str>,
        since: Option<chrono::DateTime<chrono::Utc>>,
        limit: usize,
    ) -> Result<Vec<TaskView>, GatewayError> {
        let mut tasks: Vec<Task> = self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|t| status.is_none_or(|s| t.status == s))
            .filter(|t| flow.is_none_or(|f| t.flow.as_deref() == Some(f)))
            .filter(|t| {
                since.is_none_or(|s| {
                    chrono::DateTime::parse_from_rfc3339(&t.created_at)
                        .map(|c| c.with_timezone(&chrono::Utc) >= s)
                        .unwrap_or(false)
                })
            })
            .collect();
        tasks.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        tasks.truncate(limit);
        Ok(tasks.iter().map(Task::view).collect())
    }

    /// Cancel a task that has not finished: its status becomes `canceled` at once, and its
    /// id is announced to the sidecars ([`crate::cancel`]), which send its envelopes to
    /// x-sink as canceled instead of calling their runtimes (calls already running finish;
    /// later reports only append to the timeline).
    pub async fn cancel(&self, id: &str) -> Result<TaskView, GatewayError> {
        let t = self
            .update_task(id, |t| t.cancel())
            .await
            .ok_or_else(|| self.not_found(id))?;
        if t.status == TaskStatus::Canceled {
            self.canceled.insert(&t.id);
            if let Some(kv) = self.cancel_bucket.get() {
                if let Err(e) = crate::cancel::announce(kv, &t.id).await {
                    warn!(task_id = %t.id, error = %e, "cannot announce the cancel to the sidecars");
                }
            }
        }
        Ok(t.view())
    }

    /// Canceled task ids, for sidecars running in this process (`asya-host up`): give it to
    /// their [`crate::SidecarBuilder::canceled`].
    pub fn canceled(&self) -> Arc<crate::cancel::Canceled> {
        self.canceled.clone()
    }

    /// Announce canceled ids in this NATS KV bucket too (standalone sidecars on NATS watch
    /// it; see [`crate::cancel::open_bucket`]). Only the first call counts.
    pub fn set_cancel_bucket(&self, kv: async_nats::jetstream::kv::Store) {
        let _ = self.cancel_bucket.set(kv);
    }

    /// Wait until the task is final (succeeded, failed or canceled) or `timeout` passes;
    /// returns the last view seen.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Option<TaskView> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.events.subscribe();
        loop {
            let view = self.get(id).await;
            match &view {
                Some(v) if v.status.is_final() => return view,
                _ => {}
            }
            // Wake on any event of this task (or after a short bound, for reports applied
            // by another gateway sharing the store).
            let wait = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
                async {
                    loop {
                        match rx.recv().await {
                            Ok(e) if e.task_id == id => return,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                },
            )
            .await;
            if wait.is_err() && tokio::time::Instant::now() >= deadline {
                return self.get(id).await;
            }
        }
    }

    /// Updates of every task, in the order they were applied.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<TaskEvent>> {
        self.events.subscribe()
    }

    /// A reporter for sidecars and end actors running in this process.
    pub fn reporter(self: &Arc<Self>) -> Arc<dyn crate::sidecar::Reporter> {
        Arc::new(reporter::InProcess {
            gw: Arc::downgrade(self),
        })
    }

    /// Queue a report for tracking (never blocks; drops and counts when full).
    pub fn enqueue(&self, r: WireReport) {
        if self.reports.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn emit(&self, id: &str, kind: &'static str, data: &impl Serialize) {
        let _ = self.events.send(Arc::new(TaskEvent {
            task_id: id.to_owned(),
            kind,
            data: serde_json::to_value(data).unwrap_or(Value::Null),
        }));
    }

    /// Load, change and save one task under the update lock; emits `progress` / `final`
    /// when `change` returns true.
    async fn update_task(&self, id: &str, change: impl FnOnce(&mut Task) -> bool) -> Option<Task> {
        let _g = self.update.lock().await;
        let mut t = match self.store.get(id).await {
            Ok(Some(t)) => t,
            Ok(None) => return None,
            Err(e) => {
                warn!(task_id = %id, error = %e, "task store read failed");
                return None;
            }
        };
        let was_final = t.status.is_final();
        if change(&mut t) {
            if let Err(e) = self.store.put(&t).await {
                warn!(task_id = %id, error = %e, "task store write failed; update lost");
            }
            let view = t.view();
            let kind = if !was_final && view.status.is_final() {
                "final"
            } else {
                "progress"
            };
            if !was_final {
                self.emit(id, kind, &view);
            }
        }
        Some(t)
    }

    /// The task a report belongs to: by trace id (the task's uuid), else by envelope id,
    /// else by parent id.
    async fn resolve(
        &self,
        envelope_id: &str,
        parent_id: Option<&str>,
        trace_id: &str,
    ) -> Option<String> {
        let mut candidates = Vec::with_capacity(3);
        if let Ok(u) = uuid::Uuid::parse_str(trace_id) {
            candidates.push(u.to_string());
        }
        candidates.push(envelope_id.to_owned());
        if let Some(p) = parent_id {
            candidates.push(p.to_owned());
        }
        for c in candidates {
            if let Ok(Some(_)) = self.store.get(&c).await {
                return Some(c);
            }
        }
        None
    }

    /// Apply one report (in order of arrival).
    pub async fn apply(&self, r: WireReport) {
        match r {
            WireReport::Hop { trace_id, hop } => {
                let Some(id) = self
                    .resolve(
                        &hop.entry.envelope_id,
                        hop.entry.parent_id.as_deref(),
                        &trace_id,
                    )
                    .await
                else {
                    debug!(envelope_id = %hop.entry.envelope_id, %trace_id, "hop of an unknown task");
                    return;
                };
                self.update_task(&id, |t| {
                    t.apply_hop(hop);
                    true
                })
                .await;
            }
            WireReport::Final { trace_id, fin } => {
                let Some(id) = self
                    .resolve(&fin.envelope_id, fin.parent_id.as_deref(), &trace_id)
                    .await
                else {
                    debug!(envelope_id = %fin.envelope_id, %trace_id, "final of an unknown task");
                    return;
                };
                self.update_task(&id, |t| {
                    t.apply_final(fin);
                    true
                })
                .await;
            }
            WireReport::Upstream {
                envelope_id,
                trace_id,
                actor,
                payload,
            } => {
                let Some(id) = self.resolve(&envelope_id, None, &trace_id).await else {
                    return;
                };
                self.emit(
                    &id,
                    "upstream",
                    &serde_json::json!({"actor": actor, "envelope_id": envelope_id, "payload": payload}),
                );
            }
        }
    }

    pub fn sink(&self) -> &str {
        &self.sink
    }

    pub fn sump(&self) -> &str {
        &self.sump
    }
}

/// Why a paused frame could not be settled now (it is redelivered).
#[derive(Debug, thiserror::Error)]
enum ParkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot send it to x-sump: {0}")]
    Sump(TransportError),
}

/// The sibling queue where sidecars park paused frames (`asya-<ns>-x-pause`).
pub const PAUSE_QUEUE_ACTOR: &str = "x-pause";
/// The header that pauses a task (its value: the pause metadata).
pub const HEADER_PAUSE: &str = "x-asya-pause";
/// How often the gateway looks for paused tasks past their pause timeout (they are also
/// failed when read).
pub const PAUSE_SWEEP: Duration = Duration::from_secs(5);

/// How long after its deadline a task without a final report is failed on read.
fn expiry_grace() -> chrono::Duration {
    chrono::Duration::seconds(30)
}

/// W3C traceparent of a task: its root span id is the low half of the trace id.
pub fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{}-01", root_span_id(trace_id))
}

/// The gateway's root span id for `trace_id` (hop spans are its children).
pub fn root_span_id(trace_id: &str) -> String {
    if trace_id.len() == 32 {
        trace_id[16..].to_owned()
    } else {
        "0000000000000001".to_owned()
    }
}

async fn apply_reports(gw: Weak<Gateway>, mut rx: mpsc::Receiver<WireReport>) {
    while let Some(r) = rx.recv().await {
        let Some(gw) = gw.upgrade() else { return };
        gw.apply(r).await;
    }
}
