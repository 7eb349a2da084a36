//! In-process queues for the local mesh and tests: the same semantics as a broker
//! (competing consumers, prefetch, ack/nack with delay, redelivery of unacked messages,
//! deduplication by message id), without durability.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{
    Acker, Delivery, OutMessage, QueueName, Receiver, Sent, Transport, TransportError,
    TransportKind,
};

/// How many recent message ids a queue remembers for deduplication.
const DEDUP_WINDOW: usize = 65_536;

#[derive(Debug)]
struct Message {
    body: Bytes,
    attempt: u32,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Message>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
}

impl Queue {
    fn push(&self, msg: Message, front: bool) {
        {
            let mut st = self.state.lock().expect("queue lock");
            if front {
                st.ready.push_front(msg);
            } else {
                st.ready.push_back(msg);
            }
        }
        self.notify.notify_waiters();
    }

    /// Publish with deduplication; returns false when the id was seen recently.
    fn publish(&self, id: String, body: Bytes) -> bool {
        {
            let mut st = self.state.lock().expect("queue lock");
            if !id.is_empty() {
                if !st.seen.insert(id.clone()) {
                    return false;
                }
                st.seen_order.push_back(id);
                if st.seen_order.len() > DEDUP_WINDOW {
                    if let Some(old) = st.seen_order.pop_front() {
                        st.seen.remove(&old);
                    }
                }
            }
            st.ready.push_back(Message { body, attempt: 1 });
        }
        self.notify.notify_waiters();
        true
    }

    fn pop(&self) -> Option<Message> {
        self.state.lock().expect("queue lock").ready.pop_front()
    }

    fn len(&self) -> usize {
        self.state.lock().expect("queue lock").ready.len()
    }
}

/// The in-process broker. Cheap to clone; clones share the queues.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    queues: Arc<Mutex<HashMap<String, Arc<Queue>>>>,
}

impl MemoryTransport {
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        let mut qs = self.queues.lock().expect("queues lock");
        if let Some(q) = qs.get(name) {
            return q.clone();
        }
        qs.entry(name.to_owned()).or_default().clone()
    }

    /// Messages waiting in `queue` (not counting unacked deliveries).
    pub fn depth(&self, queue: impl AsRef<str>) -> usize {
        self.queue(queue.as_ref()).len()
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Memory
    }

    /// Waiting messages only (in-process deliveries are settled within the process).
    async fn queue_depth(&self, queue: &QueueName) -> Result<Option<u64>, TransportError> {
        Ok(Some(self.depth(queue) as u64))
    }

    async fn subscribe(
        &self,
        queue: &QueueName,
        prefetch: usize,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        Ok(Box::new(MemoryReceiver {
            queue: self.queue(queue.as_str()),
            permits: Arc::new(Semaphore::new(prefetch.max(1))),
        }))
    }

    async fn send(&self, msg: OutMessage) -> Result<(), TransportError> {
        self.queue(msg.queue.as_str()).publish(msg.id, msg.body);
        Ok(())
    }

    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<Sent, TransportError> {
        let mut sent = Sent::default();
        for (i, m) in msgs.into_iter().enumerate() {
            if !self.queue(m.queue.as_str()).publish(m.id, m.body) {
                sent.duplicates.push(i);
            }
        }
        Ok(sent)
    }
}

struct MemoryReceiver {
    queue: Arc<Queue>,
    permits: Arc<Semaphore>,
}

#[async_trait]
impl Receiver for MemoryReceiver {
    async fn recv(&mut self) -> Result<Delivery, TransportError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TransportError::Closed)?;
        loop {
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(msg) = self.queue.pop() {
                return Ok(Delivery {
                    body: msg.body.clone(),
                    attempt: msg.attempt,
                    acker: Box::new(MemoryAcker {
                        pending: Some(msg),
                        queue: self.queue.clone(),
                        _permit: permit,
                    }),
                });
            }
            notified.await;
        }
    }
}

/// Holds the message until it is acked; a delivery dropped unacked goes back to the queue
/// (as a broker redelivers when a consumer dies).
struct MemoryAcker {
    pending: Option<Message>,
    queue: Arc<Queue>,
    _permit: OwnedSemaphorePermit,
}

impl MemoryAcker {
    fn redeliver(&mut self, delay: Duration) {
        if let Some(mut msg) = self.pending.take() {
            msg.attempt += 1;
            let queue = self.queue.clone();
            if delay.is_zero() {
                queue.push(msg, true);
            } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.push(msg, false);
                });
            } else {
                queue.push(msg, false);
            }
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.pending = None;
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.redeliver(delay);
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.redeliver(Duration::ZERO);
    }
}
