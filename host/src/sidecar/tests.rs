//! The sidecar loop with a scripted runtime (no process, no socket) on the memory
//! transport: how a plan is applied — one `send_all` per batch of outputs, then the
//! settlement.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::*;
use crate::envelope::Frame;
use crate::runtime::{EventStream, Reply, SseEvent};
use crate::transport::memory::MemoryTransport;
use crate::transport::{OutMessage, Receiver, Sent};

fn q(actor: &str) -> QueueName {
    QueueName::new("ns", actor).unwrap()
}

/// Answers every call with what `answer` makes of the envelope bytes.
struct Scripted<F>(F);

#[async_trait]
impl<F> Runtime for Scripted<F>
where
    F: Fn(&Bytes) -> Result<Reply, RuntimeError> + Send + Sync,
{
    async fn invoke(&self, envelope: Bytes, _deadline: Instant) -> Result<Reply, RuntimeError> {
        (self.0)(&envelope)
    }
    fn reset(&self) {}
    async fn wait_ready(&self, _: &std::path::Path, _: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// A stream whose events arrive in chunks: `next` waits for the next chunk, the rest of a
/// chunk is already buffered.
#[derive(Debug)]
struct Chunks {
    chunks: VecDeque<VecDeque<SseEvent>>,
    current: VecDeque<SseEvent>,
}

#[async_trait]
impl EventStream for Chunks {
    async fn next(&mut self) -> Result<Option<SseEvent>, RuntimeError> {
        if let Some(ev) = self.current.pop_front() {
            return Ok(Some(ev));
        }
        tokio::task::yield_now().await;
        self.current = self.chunks.pop_front().unwrap_or_default();
        Ok(self.current.pop_front())
    }
    fn next_buffered(&mut self) -> Option<Result<Option<SseEvent>, RuntimeError>> {
        self.current.pop_front().map(|ev| Ok(Some(ev)))
    }
}

/// The memory transport, recording the size of every `send_all`.
#[derive(Clone, Default)]
struct Recording {
    inner: MemoryTransport,
    batches: Arc<Mutex<Vec<usize>>>,
}

#[async_trait]
impl Transport for Recording {
    fn kind(&self) -> crate::transport::TransportKind {
        self.inner.kind()
    }
    async fn subscribe(
        &self,
        q: &QueueName,
        n: usize,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        self.inner.subscribe(q, n).await
    }
    async fn send(&self, msg: OutMessage) -> Result<(), TransportError> {
        self.send_all(vec![msg]).await.map(|_| ())
    }
    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<Sent, TransportError> {
        self.batches.lock().unwrap().push(msgs.len());
        self.inner.send_all(msgs).await
    }
}

fn frame_to_sink() -> Frame {
    serde_json::from_str(r#"{"route":{"prev":["a"],"curr":""},"payload":1}"#).unwrap()
}

fn input(id: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{id}","route":{{"curr":"a"}},"payload":1}}"#
    ))
}

struct Loop {
    t: Recording,
    task: tokio::task::JoinHandle<Result<Exit, SidecarError>>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    inflight: Arc<Inflight>,
}

fn start(runtime: Arc<dyn Runtime>, tweak: impl FnOnce(&mut SidecarConfig)) -> Loop {
    let mut cfg = SidecarConfig::new("a", "ns", "/nonexistent");
    tweak(&mut cfg);
    let t = Recording::default();
    let metrics = Metrics::new("asya_actor");
    let mut deps = Deps::new(Arc::new(t.clone()), metrics.clone());
    deps.runtime = Some(runtime);
    let (readiness, inflight) = (deps.readiness.clone(), deps.inflight.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg, deps, stop.clone()));
    Loop {
        t,
        task,
        stop,
        metrics,
        readiness,
        inflight,
    }
}

impl Loop {
    async fn send(&self, body: Bytes) {
        self.t
            .inner
            .send(OutMessage {
                queue: q("a"),
                id: String::new(),
                body,
            })
            .await
            .unwrap();
    }

    /// `n` messages of `queue` (acked), or panic after 5 s.
    async fn take(&self, actor: &str, n: usize) -> Vec<serde_json::Value> {
        let mut rx = self.t.inner.subscribe(&q(actor), n.max(1)).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("message within 5 s")
                .unwrap();
            out.push(serde_json::from_slice(&d.body).unwrap());
            d.acker.ack().await.unwrap();
        }
        out
    }

    /// Wait until the sidecar consumes (its runtime answered).
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.readiness.is_ready() {
            assert!(Instant::now() < deadline, "sidecar not ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn batches(&self) -> Vec<usize> {
        self.t.batches.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn the_ten_outputs_of_a_fan_out_are_published_in_one_batch_then_acked() {
    let rt = Scripted(|_: &Bytes| Ok(Reply::Frames((0..10).map(|_| frame_to_sink()).collect())));
    let l = start(Arc::new(rt), |_| {});
    l.send(input("e1")).await;
    let out = l.take("x-sink", 10).await;
    assert_eq!(out.len(), 10);
    assert_eq!(l.batches(), [10], "one send_all for all ten");
    l.stop.cancel();
    assert_eq!(l.task.await.unwrap().unwrap(), Exit::Shutdown);
    assert_eq!(l.t.inner.depth("asya-ns-a"), 0, "the input was acked");
}

#[tokio::test]
async fn streamed_frames_go_out_in_batches_of_what_has_arrived() {
    let rt = Scripted(|_: &Bytes| {
        let f = || SseEvent::Downstream(Box::new(frame_to_sink()));
        Ok(Reply::Stream(Box::new(Chunks {
            chunks: VecDeque::from([
                VecDeque::from([f(), f(), f()]),
                VecDeque::from([SseEvent::Upstream(serde_json::json!(1)), f()]),
                VecDeque::from([f(), SseEvent::Done]),
            ]),
            current: VecDeque::new(),
        })))
    });
    let l = start(Arc::new(rt), |_| {});
    l.send(input("e1")).await;
    let out = l.take("x-sink", 5).await;
    let ids: std::collections::HashSet<_> = out.iter().map(|v| v["id"].clone()).collect();
    assert_eq!(ids.len(), 5, "fan-out children have distinct ids");
    assert_eq!(l.batches(), [3, 1, 1]);
    l.stop.cancel();
    l.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_timeout_with_crash_on_timeout_sumps_acks_and_exits() {
    let rt = Scripted(|_: &Bytes| Err(RuntimeError::Timeout(Duration::from_secs(1))));
    let l = start(Arc::new(rt), |c| c.resiliency.crash_on_timeout = true);
    l.send(input("e1")).await;
    let exit = tokio::time::timeout(Duration::from_secs(5), l.task)
        .await
        .expect("exits")
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::RuntimeTimeout);
    assert_eq!(l.t.inner.depth("asya-ns-x-sump"), 1);
    assert_eq!(l.t.inner.depth("asya-ns-a"), 0, "acked, not redelivered");
}

#[tokio::test]
async fn a_handler_error_is_retried_by_redelivery_then_sumped() {
    let calls = Arc::new(Mutex::new(0));
    let seen = calls.clone();
    let rt = Scripted(move |_: &Bytes| {
        *seen.lock().unwrap() += 1;
        Ok(Reply::HandlerError(crate::envelope::ErrorInfo::new(
            "ValueError",
            "boom",
        )))
    });
    let l = start(Arc::new(rt), |c| {
        c.resiliency.max_attempts = 3;
        c.resiliency.backoff_initial = Duration::from_millis(1);
        c.resiliency.backoff_max = Duration::from_millis(5);
    });
    l.send(input("e1")).await;
    let out = l.take("x-sump", 1).await;
    assert_eq!(out[0]["status"]["reason"], "MaxRetriesExhausted");
    assert_eq!(out[0]["status"]["attempt"], 3);
    assert_eq!(*calls.lock().unwrap(), 3);
    l.stop.cancel();
    l.task.await.unwrap().unwrap();
}

/// A panic while handling a delivery (here: in the runtime client) is caught: the delivery
/// is retried, then sent to x-sump as received; the panic is counted; the worker goes on.
#[tokio::test]
async fn a_panic_fails_the_delivery_and_the_worker_goes_on() {
    let rt = Scripted(|body: &Bytes| {
        if body.windows(6).any(|w| w == b"poison") {
            panic!("a dependency asserted");
        }
        Ok(Reply::Frames(vec![frame_to_sink()]))
    });
    let l = start(Arc::new(rt), |c| {
        c.resiliency.max_attempts = 2;
        c.resiliency.backoff_initial = Duration::from_millis(1);
    });
    l.send(input("poison")).await;
    l.send(input("fine")).await;
    let sink = l.take("x-sink", 1).await;
    assert_eq!(sink[0]["id"], "fine");
    let sump = l.take("x-sump", 1).await;
    let st = &sump[0]["status"];
    assert_eq!(st["error"]["type"], "SidecarPanic");
    assert!(st["error"]["message"]
        .as_str()
        .unwrap()
        .contains("a dependency asserted"));
    assert!(sump[0]["payload"].as_str().unwrap().contains("poison"));
    let text = l.metrics.encode();
    assert!(
        text.contains(r#"asya_actor_worker_panics_total{queue="asya-ns-a"} 2"#),
        "{text}"
    );
    assert!(l.readiness.is_live());
    l.stop.cancel();
    l.task.await.unwrap().unwrap();
}

/// The memory transport, with an acknowledgement that panics: a panic outside a delivery
/// kills its worker, which `/healthz` then reports.
#[derive(Clone, Default)]
struct PanickyAck(MemoryTransport);

struct Boom;

#[async_trait]
impl crate::transport::Acker for Boom {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        panic!("ack asserted")
    }
    async fn nack(self: Box<Self>, _: Duration) -> Result<(), TransportError> {
        panic!("nack asserted")
    }
}

struct BoomReceiver(Box<dyn Receiver>);

#[async_trait]
impl Receiver for BoomReceiver {
    async fn recv(&mut self) -> Result<Delivery, TransportError> {
        let d = self.0.recv().await?;
        Ok(Delivery {
            acker: Box::new(Boom),
            ..d
        })
    }
}

#[async_trait]
impl Transport for PanickyAck {
    fn kind(&self) -> crate::transport::TransportKind {
        self.0.kind()
    }
    async fn subscribe(
        &self,
        q: &QueueName,
        n: usize,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        Ok(Box::new(BoomReceiver(self.0.subscribe(q, n).await?)))
    }
    async fn send(&self, msg: OutMessage) -> Result<(), TransportError> {
        self.0.send(msg).await
    }
}

#[tokio::test]
async fn a_worker_that_dies_fails_healthz() {
    let cfg = SidecarConfig::new("a", "ns", "/nonexistent");
    let t = PanickyAck::default();
    let mut deps = Deps::new(Arc::new(t.clone()), Metrics::new("asya_actor"));
    deps.runtime = Some(Arc::new(Scripted(|_: &Bytes| {
        Ok(Reply::Frames(vec![frame_to_sink()]))
    })));
    let readiness = deps.readiness.clone();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg, deps, stop.clone()));
    t.0.send(OutMessage {
        queue: q("a"),
        id: String::new(),
        body: input("e1"),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while readiness.is_live() {
        assert!(Instant::now() < deadline, "healthz still passes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!readiness.is_ready());
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A runtime that can be switched off: unreachable on every call and probe while off.
struct Switchable {
    on: Arc<std::sync::atomic::AtomicBool>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl Runtime for Switchable {
    async fn invoke(&self, _: Bytes, _: Instant) -> Result<Reply, RuntimeError> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.on.load(SeqCst) {
            return Err(RuntimeError::Connect {
                path: "/gone.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        }
        self.calls.fetch_add(1, SeqCst);
        Ok(Reply::Frames(vec![frame_to_sink()]))
    }
    fn reset(&self) {}
    async fn wait_ready(&self, _: &std::path::Path, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + timeout;
        while !self.on.load(std::sync::atomic::Ordering::SeqCst) {
            if Instant::now() >= deadline {
                return Err(RuntimeError::NotReady {
                    waited: timeout,
                    reason: "off".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
    async fn reachable(&self, _: &std::path::Path) -> Result<(), String> {
        if self.on.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("off".into())
        }
    }
}

/// An unreachable runtime holds the delivery (not counted, not retried) until it is back;
/// one that stays away makes the sidecar hand the delivery back and stop.
#[tokio::test]
async fn an_unreachable_runtime_holds_the_delivery_until_it_is_back() {
    use std::sync::atomic::Ordering::SeqCst;
    let on = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = Switchable {
        on: on.clone(),
        calls: calls.clone(),
    };
    // Ready at start, off before the delivery arrives.
    on.store(true, SeqCst);
    let l = start(Arc::new(rt), |c| c.ready_timeout = Duration::from_secs(30));
    l.ready().await;
    on.store(false, SeqCst);
    l.send(input("e1")).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while l.readiness.is_ready() || l.inflight.is_empty() {
        assert!(Instant::now() < deadline, "not ready, delivery held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rows = l.inflight.snapshot();
    assert_eq!(rows[0].stage, Stage::WaitingForRuntime);
    on.store(true, SeqCst);
    let out = l.take("x-sink", 1).await;
    assert_eq!(out[0]["id"], "e1");
    assert_eq!(calls.load(SeqCst), 1);
    let text = l.metrics.encode();
    assert!(!text.contains("runtime_error"), "{text}");
    assert!(text.contains(r#"asya_actor_runtime_outages_total{queue="asya-ns-a"} 1"#));
    assert!(l.readiness.is_ready());
    l.stop.cancel();
    l.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_runtime_that_stays_away_hands_the_delivery_back() {
    use std::sync::atomic::Ordering::SeqCst;
    let on = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rt = Switchable {
        on: on.clone(),
        calls: Default::default(),
    };
    let l = start(Arc::new(rt), |c| {
        c.ready_timeout = Duration::from_millis(300)
    });
    l.ready().await;
    on.store(false, SeqCst);
    l.send(input("e1")).await;
    let exit = tokio::time::timeout(Duration::from_secs(5), l.task)
        .await
        .expect("exits")
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::RuntimeLost);
    assert_eq!(l.t.inner.depth("asya-ns-a"), 1, "handed back");
    assert_eq!(l.t.inner.depth("asya-ns-x-sump"), 0);
}

#[tokio::test]
async fn more_frames_than_the_cap_send_the_input_to_sump() {
    let rt = Scripted(|_: &Bytes| Ok(Reply::Frames((0..5).map(|_| frame_to_sink()).collect())));
    let l = start(Arc::new(rt), |c| c.max_frames = 4);
    l.send(input("e1")).await;
    let out = l.take("x-sump", 1).await;
    assert_eq!(out[0]["status"]["error"]["type"], "TooManyFrames");
    assert_eq!(l.t.inner.depth("asya-ns-x-sink"), 0);
    l.stop.cancel();
    l.task.await.unwrap().unwrap();
}
