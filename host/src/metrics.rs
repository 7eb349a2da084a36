//! Every metric name lives here (SPEC §6). Label values are bounded: queue names, fixed
//! enums, plugin names — never envelope ids.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueTransport {
    pub queue: String,
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueStatus {
    pub queue: String,
    pub status: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ProcessedStatus {
    /// Routed onwards or to x-sink.
    Success,
    /// Ended in x-sump (or x-sink with a failed phase).
    Error,
    /// Handed back to the queue for a retry.
    Retry,
}

impl ProcessedStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessedStatus::Success => "success",
            ProcessedStatus::Error => "error",
            ProcessedStatus::Retry => "retry",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Sent {
    pub destination_queue: String,
    pub message_type: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MessageType {
    Routing,
    Sink,
    Sump,
    Retry,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Routing => "routing",
            MessageType::Sink => "sink",
            MessageType::Sump => "sump",
            MessageType::Retry => "retry",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueReason {
    pub queue: String,
    pub reason: &'static str,
}

/// `reason` label of `messages_failed_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum FailReason {
    ParseError,
    ValidationError,
    RouteMismatch,
    RuntimeError,
    TransportError,
    Timeout,
    SlaExpired,
    PolicyRejected,
    MaxRetriesExhausted,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::ParseError => "parse_error",
            FailReason::ValidationError => "validation_error",
            FailReason::RouteMismatch => "route_mismatch",
            FailReason::RuntimeError => "runtime_error",
            FailReason::TransportError => "transport_error",
            FailReason::Timeout => "timeout",
            FailReason::SlaExpired => "sla_expired",
            FailReason::PolicyRejected => "policy_rejected",
            FailReason::MaxRetriesExhausted => "max_retries_exhausted",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

/// Label of `ready`: one readiness check of `/readyz` (`runtime:<actor>`, `transport`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestTransport {
    pub destination_queue: String,
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    pub kind: &'static str,
    pub outcome: &'static str,
}

/// Label of `asya_transport_retries_total`: `setup`, `publish` or `pull`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    pub operation: &'static str,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 50 µs .. ~15 min
    Histogram::new(exponential_buckets(0.00005, 2.5, 19))
}

fn plugin_histogram() -> Histogram {
    // 1 µs .. ~1 s
    Histogram::new(exponential_buckets(0.000001, 2.5, 16))
}

fn size_histogram() -> Histogram {
    // 64 B .. 256 MiB
    Histogram::new(exponential_buckets(64.0, 4.0, 12))
}

/// All metrics of one process. Several in-process sidecars share one (labels tell them apart).
pub struct Metrics {
    registry: Registry,
    pub received: Family<QueueTransport, Counter>,
    pub processed: Family<QueueStatus, Counter>,
    pub sent: Family<Sent, Counter>,
    pub failed: Family<QueueReason, Counter>,
    pub processing_duration: HistFamily<QueueLabel>,
    pub runtime_duration: HistFamily<QueueLabel>,
    pub receive_duration: HistFamily<QueueTransport>,
    pub send_duration: HistFamily<DestTransport>,
    pub message_size: HistFamily<Direction>,
    pub active: Family<QueueLabel, Gauge>,
    pub runtime_id_mismatch: Family<QueueLabel, Counter>,
    /// Outputs the broker dropped as duplicates of a message it already had.
    pub duplicates_suppressed: Family<QueueLabel, Counter>,
    /// Panics caught in a worker (a bug: the delivery was failed, the worker kept going).
    pub worker_panics: Family<QueueLabel, Counter>,
    /// Times the runtime became unreachable (socket gone, connection refused or lost).
    pub runtime_outages: Family<QueueLabel, Counter>,
    pub messages_canceled: Family<QueueLabel, Counter>,
    pub plugin_calls: Family<PluginLabels, Counter>,
    pub plugin_duration: HistFamily<PluginLabels>,
    /// Pending + unacked messages of a queue, refreshed by `crate::queue_depth`.
    pub queue_depth: Family<QueueLabel, Gauge>,
    /// 1 while a readiness check passes (set when `/metrics` is scraped).
    pub ready: Family<CheckLabel, Gauge>,
    /// Retries against the broker, by operation (NATS transport).
    pub transport_retries: Family<Operation, Counter>,
}

impl Metrics {
    /// Register every metric; actor metrics are prefixed with `namespace` (`asya_actor`).
    pub fn new(namespace: &str) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let received = Family::default();
        let processed = Family::default();
        let sent = Family::default();
        let failed = Family::default();
        let processing_duration = HistFamily::new_with_constructor(duration_histogram as fn() -> _);
        let runtime_duration = HistFamily::new_with_constructor(duration_histogram as fn() -> _);
        let receive_duration = HistFamily::new_with_constructor(duration_histogram as fn() -> _);
        let send_duration = HistFamily::new_with_constructor(duration_histogram as fn() -> _);
        let message_size = HistFamily::new_with_constructor(size_histogram as fn() -> _);
        let active = Family::default();
        let runtime_id_mismatch = Family::default();
        let duplicates_suppressed = Family::default();
        let worker_panics = Family::default();
        let runtime_outages = Family::default();
        let messages_canceled = Family::default();
        let plugin_calls = Family::default();
        let plugin_duration = HistFamily::new_with_constructor(plugin_histogram as fn() -> _);
        let queue_depth = Family::default();
        let ready = Family::default();
        let transport_retries = Family::default();
        let n = |s: &str| format!("{namespace}_{s}");
        registry.register(
            n("messages_received"),
            "Messages received from the actor's queue",
            received.clone(),
        );
        registry.register(
            n("messages_processed"),
            "Messages fully handled, by outcome",
            processed.clone(),
        );
        registry.register(
            n("messages_sent"),
            "Messages published, by destination and type",
            sent.clone(),
        );
        registry.register(
            n("messages_failed"),
            "Messages that failed, by reason",
            failed.clone(),
        );
        registry.register(
            n("processing_duration_seconds"),
            "Receive to last send",
            processing_duration.clone(),
        );
        registry.register(
            n("runtime_execution_duration_seconds"),
            "Runtime call only",
            runtime_duration.clone(),
        );
        registry.register(
            n("queue_receive_duration_seconds"),
            "Time waiting in receive",
            receive_duration.clone(),
        );
        registry.register(
            n("queue_send_duration_seconds"),
            "Publish until accepted",
            send_duration.clone(),
        );
        registry.register(
            n("message_size_bytes"),
            "Message sizes (received, sent)",
            message_size.clone(),
        );
        registry.register(n("active_messages"), "Envelopes in flight", active.clone());
        registry.register(
            n("runtime_request_id_mismatch"),
            "Runtime responses whose X-Request-Id did not match",
            runtime_id_mismatch.clone(),
        );
        registry.register(
            n("duplicates_suppressed"),
            "Outputs the broker dropped as duplicates (a redelivered input republishing them)",
            duplicates_suppressed.clone(),
        );
        registry.register(
            n("worker_panics"),
            "Panics caught while handling a delivery (a bug; the delivery was failed)",
            worker_panics.clone(),
        );
        registry.register(
            n("runtime_outages"),
            "Times the runtime became unreachable; consumption paused until it was back",
            runtime_outages.clone(),
        );
        registry.register(
            n("messages_canceled"),
            "Envelopes of a canceled task sent to x-sink without calling the runtime",
            messages_canceled.clone(),
        );
        registry.register(
            "asya_plugin_calls",
            "Plugin calls, by plugin, kind and outcome",
            plugin_calls.clone(),
        );
        registry.register(
            "asya_plugin_call_duration_seconds",
            "Plugin call duration",
            plugin_duration.clone(),
        );
        registry.register(
            n("queue_depth"),
            "Messages of the queue not yet acknowledged (pending + delivered unacked)",
            queue_depth.clone(),
        );
        registry.register(
            n("ready"),
            "1 while the readiness check passes, 0 otherwise (as /readyz)",
            ready.clone(),
        );
        registry.register(
            "asya_transport_retries",
            "Retries against the broker (start-up, publish, pull), by operation",
            transport_retries.clone(),
        );
        Arc::new(Metrics {
            queue_depth,
            ready,
            registry,
            received,
            processed,
            sent,
            failed,
            processing_duration,
            runtime_duration,
            receive_duration,
            send_duration,
            message_size,
            active,
            runtime_id_mismatch,
            duplicates_suppressed,
            worker_panics,
            runtime_outages,
            messages_canceled,
            plugin_calls,
            plugin_duration,
            transport_retries,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }

    /// Record one plugin call.
    pub fn plugin_call(
        &self,
        plugin: &str,
        kind: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        let l = PluginLabels {
            plugin: plugin.to_owned(),
            kind,
            outcome,
        };
        self.plugin_duration
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        self.plugin_calls.get_or_create(&l).inc();
    }
}

/// Handles for one actor, resolved once so the hot path does not build label sets.
#[derive(Clone)]
pub struct ActorMetrics {
    pub metrics: Arc<Metrics>,
    pub queue: String,
    pub transport: &'static str,
    pub received: Counter,
    pub processed_success: Counter,
    pub processed_error: Counter,
    pub processed_retry: Counter,
    pub processing_duration: Histogram,
    pub runtime_duration: Histogram,
    pub receive_duration: Histogram,
    pub size_received: Histogram,
    pub size_sent: Histogram,
    pub active: Gauge,
    pub id_mismatch: Counter,
    pub duplicates: Counter,
    pub panics: Counter,
    pub outages: Counter,
    pub canceled: Counter,
    /// The `sent` / `send_duration` handles of the destinations seen so far (a family lookup
    /// hashes and allocates its label set: twice per output otherwise).
    sent_handles: Arc<std::sync::Mutex<Vec<SentHandles>>>,
}

struct SentHandles {
    queue: String,
    kind: MessageType,
    sent: Counter,
    duration: Histogram,
}

/// Destinations whose handles [`ActorMetrics::sent`] keeps (routes to more actors than this
/// look the rest up each time).
const SENT_HANDLES: usize = 64;

impl ActorMetrics {
    pub fn new(metrics: Arc<Metrics>, queue: &str, transport: &'static str) -> Self {
        let q = || QueueLabel {
            queue: queue.to_owned(),
        };
        let qs = |status: ProcessedStatus| QueueStatus {
            queue: queue.to_owned(),
            status: status.as_str(),
        };
        let qt = QueueTransport {
            queue: queue.to_owned(),
            transport,
        };
        // One statement per handle: `get_or_create` returns a read guard on the family, and
        // a second, new label set in the same statement would wait for the write lock forever.
        let received = metrics.received.get_or_create(&qt).clone();
        let processed_success = metrics
            .processed
            .get_or_create(&qs(ProcessedStatus::Success))
            .clone();
        let processed_error = metrics
            .processed
            .get_or_create(&qs(ProcessedStatus::Error))
            .clone();
        let processed_retry = metrics
            .processed
            .get_or_create(&qs(ProcessedStatus::Retry))
            .clone();
        let processing_duration = metrics.processing_duration.get_or_create(&q()).clone();
        let runtime_duration = metrics.runtime_duration.get_or_create(&q()).clone();
        let receive_duration = metrics.receive_duration.get_or_create(&qt).clone();
        let size_received = metrics
            .message_size
            .get_or_create(&Direction {
                direction: "received",
            })
            .clone();
        let size_sent = metrics
            .message_size
            .get_or_create(&Direction { direction: "sent" })
            .clone();
        let active = metrics.active.get_or_create(&q()).clone();
        let id_mismatch = metrics.runtime_id_mismatch.get_or_create(&q()).clone();
        let duplicates = metrics.duplicates_suppressed.get_or_create(&q()).clone();
        let panics = metrics.worker_panics.get_or_create(&q()).clone();
        let outages = metrics.runtime_outages.get_or_create(&q()).clone();
        let canceled = metrics.messages_canceled.get_or_create(&q()).clone();
        ActorMetrics {
            duplicates,
            panics,
            outages,
            canceled,
            received,
            processed_success,
            processed_error,
            processed_retry,
            processing_duration,
            runtime_duration,
            receive_duration,
            size_received,
            size_sent,
            active,
            id_mismatch,
            queue: queue.to_owned(),
            transport,
            metrics,
            sent_handles: Default::default(),
        }
    }

    pub fn failed(&self, reason: FailReason) {
        self.metrics
            .failed
            .get_or_create(&QueueReason {
                queue: self.queue.clone(),
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn sent(
        &self,
        destination_queue: &str,
        message_type: MessageType,
        took: Duration,
        bytes: usize,
    ) {
        self.size_sent.observe(bytes as f64);
        let mut cache = self.sent_handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = cache
            .iter()
            .find(|h| h.kind == message_type && h.queue == destination_queue)
        {
            h.sent.inc();
            h.duration.observe(took.as_secs_f64());
            return;
        }
        // One statement per handle (see `new`).
        let sent = self
            .metrics
            .sent
            .get_or_create(&Sent {
                destination_queue: destination_queue.to_owned(),
                message_type: message_type.as_str(),
            })
            .clone();
        let duration = self
            .metrics
            .send_duration
            .get_or_create(&DestTransport {
                destination_queue: destination_queue.to_owned(),
                transport: self.transport,
            })
            .clone();
        sent.inc();
        duration.observe(took.as_secs_f64());
        if cache.len() < SENT_HANDLES {
            cache.push(SentHandles {
                queue: destination_queue.to_owned(),
                kind: message_type,
                sent,
                duration,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `prefix`.
    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn sent_counts_each_destination_and_kind_through_its_cached_handles() {
        let m = Metrics::new("asya_actor");
        let a = ActorMetrics::new(m.clone(), "asya-ns-a", "memory");
        let ms = Duration::from_millis(1);
        a.sent("asya-ns-b", MessageType::Routing, ms, 10);
        a.sent("asya-ns-b", MessageType::Routing, ms, 10);
        a.sent("asya-ns-x-sink", MessageType::Sink, ms, 10);
        // A second handle set on the same family shares the counters.
        a.clone().sent("asya-ns-b", MessageType::Routing, ms, 10);
        let text = m.encode();
        let sent = |queue: &str, kind: &str| {
            sample(
                &text,
                &format!(
                    "asya_actor_messages_sent_total{{destination_queue=\"{queue}\",message_type=\"{kind}\"}}"
                ),
            )
        };
        assert_eq!(sent("asya-ns-b", "routing"), Some(3.0), "{text}");
        assert_eq!(sent("asya-ns-x-sink", "sink"), Some(1.0), "{text}");
        assert_eq!(sent("asya-ns-b", "sink"), None, "{text}");
    }
}
