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
use crate::transport::{OutMessage, Receiver};

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
        self.send_all(vec![msg]).await
    }
    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<(), TransportError> {
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
}

fn start(runtime: Arc<dyn Runtime>, tweak: impl FnOnce(&mut SidecarConfig)) -> Loop {
    let mut cfg = SidecarConfig::new("a", "ns", "/nonexistent");
    tweak(&mut cfg);
    let t = Recording::default();
    let mut deps = Deps::new(Arc::new(t.clone()), Metrics::new("asya_actor"));
    deps.runtime = Some(runtime);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg, deps, stop.clone()));
    Loop { t, task, stop }
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
