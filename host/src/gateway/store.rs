//! Task stores: in memory (local mesh, tests) and NATS JetStream key-value (production;
//! survives a gateway restart).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::task::Task;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task store {op}: {message}")]
    Backend { op: &'static str, message: String },
    #[error("task store: corrupt record {id}: {source}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

fn backend(op: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        op,
        message: e.to_string(),
    }
}

/// Where tasks live. The gateway serialises updates of one task; stores only load and save.
#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError>;
    async fn put(&self, task: &Task) -> Result<(), StoreError>;
    /// Every task (the gateway filters).
    async fn list(&self) -> Result<Vec<Task>, StoreError>;
}

/// Default time a finished task is kept (`ASYA_GATEWAY_RETENTION`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default cap on tasks held by the memory store (`ASYA_GATEWAY_MAX_TASKS`).
pub const DEFAULT_MAX_TASKS: usize = 100_000;

/// In-memory store. Bounded twice: a finished task is dropped `retention` after it
/// finished, and past `max_tasks` the oldest finished task goes first (the oldest task of
/// any state when none has finished).
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    retention: Duration,
    max_tasks: usize,
}

#[derive(Default)]
struct MemoryInner {
    tasks: HashMap<String, Entry>,
    /// Every task by insertion order.
    order: BTreeMap<u64, String>,
    /// Finished tasks by the time they finished.
    finished: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

struct Entry {
    task: Task,
    seq: u64,
    finished_at: Option<Instant>,
}

impl MemoryInner {
    fn remove(&mut self, id: &str) {
        if let Some(e) = self.tasks.remove(id) {
            self.order.remove(&e.seq);
            if let Some(at) = e.finished_at {
                self.finished.remove(&(at, e.seq));
            }
        }
    }

    /// Drop finished tasks older than `retention`, then the oldest ones past `max_tasks`.
    fn sweep(&mut self, now: Instant, retention: Duration, max_tasks: usize) -> usize {
        let mut dropped = 0;
        while let Some((&(at, _), id)) = self.finished.first_key_value() {
            if now.saturating_duration_since(at) < retention {
                break;
            }
            let id = id.clone();
            self.remove(&id);
            dropped += 1;
        }
        while self.tasks.len() > max_tasks {
            let oldest = match self.finished.first_key_value() {
                Some((_, id)) => id.clone(),
                None => match self.order.first_key_value() {
                    Some((_, id)) => id.clone(),
                    None => break,
                },
            };
            self.remove(&oldest);
            dropped += 1;
        }
        dropped
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_limits(DEFAULT_RETENTION, DEFAULT_MAX_TASKS)
    }
}

impl MemoryStore {
    /// A store with the default bounds (24 h retention, 100,000 tasks).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store keeping finished tasks for `retention` and at most `max_tasks` tasks.
    pub fn with_limits(retention: Duration, max_tasks: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(MemoryInner::default()),
            retention,
            max_tasks: max_tasks.max(1),
        }
    }

    /// Tasks held now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("task map").tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expired(&self, e: &Entry, now: Instant) -> bool {
        e.finished_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.retention)
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task map");
        match inner.tasks.get(id) {
            Some(e) if self.expired(e, now) => {
                inner.remove(id);
                Ok(None)
            }
            Some(e) => Ok(Some(e.task.clone())),
            None => Ok(None),
        }
    }

    async fn put(&self, task: &Task) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task map");
        let inner = &mut *inner;
        let is_final = task.status.is_final();
        match inner.tasks.get_mut(&task.id) {
            Some(e) => {
                e.task = task.clone();
                if is_final && e.finished_at.is_none() {
                    e.finished_at = Some(now);
                    inner.finished.insert((now, e.seq), task.id.clone());
                }
            }
            None => {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                inner.order.insert(seq, task.id.clone());
                let finished_at = is_final.then_some(now);
                if let Some(at) = finished_at {
                    inner.finished.insert((at, seq), task.id.clone());
                }
                inner.tasks.insert(
                    task.id.clone(),
                    Entry {
                        task: task.clone(),
                        seq,
                        finished_at,
                    },
                );
            }
        }
        let dropped = inner.sweep(now, self.retention, self.max_tasks);
        if dropped > 0 {
            tracing::debug!(
                dropped,
                held = inner.tasks.len(),
                "task store: expired or evicted tasks"
            );
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Task>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("task map");
        inner.sweep(now, self.retention, self.max_tasks);
        Ok(inner.tasks.values().map(|e| e.task.clone()).collect())
    }
}

/// NATS JetStream key-value store (bucket per namespace, one key per task).
pub struct KvStore {
    kv: async_nats::jetstream::kv::Store,
}

/// Bound on every KV round trip.
const KV_TIMEOUT: Duration = Duration::from_secs(5);

impl KvStore {
    /// Open bucket `bucket` on `client` with the default retention (24 h).
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<KvStore, StoreError> {
        KvStore::open_with_retention(client, bucket, DEFAULT_RETENTION).await
    }

    /// Open (create when missing, else update) bucket `bucket` on `client`; a key is
    /// removed by the server `retention` after its last write (the bucket's `max_age`).
    pub async fn open_with_retention(
        client: async_nats::Client,
        bucket: &str,
        retention: Duration,
    ) -> Result<KvStore, StoreError> {
        let js = async_nats::jetstream::new(client);
        let kv = tokio::time::timeout(
            KV_TIMEOUT,
            js.create_or_update_key_value(async_nats::jetstream::kv::Config {
                bucket: bucket.to_owned(),
                description: "asya gateway tasks".into(),
                history: 1,
                max_age: retention,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| backend("create bucket", e))?
        .map_err(|e| backend("create bucket", e))?;
        Ok(KvStore { kv })
    }

    /// KV keys allow `[-/_=.a-zA-Z0-9]`; task ids are uuids, others are hex-escaped.
    fn key(id: &str) -> String {
        if id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            format!("t.{id}")
        } else {
            let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
            format!("x.{hex}")
        }
    }
}

#[async_trait]
impl TaskStore for KvStore {
    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let v = tokio::time::timeout(KV_TIMEOUT, self.kv.get(Self::key(id)))
            .await
            .map_err(|e| backend("get", e))?
            .map_err(|e| backend("get", e))?;
        match v {
            None => Ok(None),
            Some(b) if b.is_empty() => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    id: id.to_owned(),
                    source,
                }),
        }
    }

    async fn put(&self, task: &Task) -> Result<(), StoreError> {
        let body = Bytes::from(serde_json::to_vec(task).expect("task serialises"));
        tokio::time::timeout(KV_TIMEOUT, self.kv.put(Self::key(&task.id), body))
            .await
            .map_err(|e| backend("put", e))?
            .map_err(|e| backend("put", e))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Task>, StoreError> {
        let mut keys = tokio::time::timeout(KV_TIMEOUT, self.kv.keys())
            .await
            .map_err(|e| backend("keys", e))?
            .map_err(|e| backend("keys", e))?;
        let mut out = Vec::new();
        let mut names = Vec::new();
        while let Ok(Some(k)) = tokio::time::timeout(KV_TIMEOUT, keys.next()).await {
            names.push(k.map_err(|e| backend("keys", e))?);
        }
        for k in names {
            if let Some(b) = tokio::time::timeout(KV_TIMEOUT, self.kv.get(k.clone()))
                .await
                .map_err(|e| backend("get", e))?
                .map_err(|e| backend("get", e))?
            {
                if let Ok(t) = serde_json::from_slice::<Task>(&b) {
                    out.push(t);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::task::TaskStatus;

    fn task(id: &str, status: TaskStatus) -> Task {
        let mut t = Task::new(id.into(), id.into(), None, vec!["a".into()], None);
        t.status = status;
        t
    }

    #[tokio::test]
    async fn memory_store_drops_oldest_finished_then_oldest() {
        let s = MemoryStore::with_limits(Duration::from_secs(3600), 3);
        for id in ["a", "b", "c"] {
            s.put(&task(id, TaskStatus::Running)).await.unwrap();
        }
        s.put(&task("b", TaskStatus::Succeeded)).await.unwrap();
        s.put(&task("d", TaskStatus::Running)).await.unwrap();
        assert!(s.get("b").await.unwrap().is_none());
        for id in ["a", "c", "d"] {
            assert!(s.get(id).await.unwrap().is_some(), "{id}");
        }
        s.put(&task("e", TaskStatus::Running)).await.unwrap();
        assert!(s.get("a").await.unwrap().is_none());
        assert_eq!(s.len(), 3);
        // Updating a held task does not evict anything.
        s.put(&task("c", TaskStatus::Failed)).await.unwrap();
        assert_eq!(s.len(), 3);
    }

    #[tokio::test]
    async fn memory_store_expires_finished_tasks_only() {
        let s = MemoryStore::with_limits(Duration::from_millis(50), 100);
        s.put(&task("done", TaskStatus::Succeeded)).await.unwrap();
        s.put(&task("running", TaskStatus::Running)).await.unwrap();
        assert!(s.get("done").await.unwrap().is_some());
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.get("done").await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.get("running").await.unwrap().is_some());
        assert_eq!(s.list().await.unwrap().len(), 1);
    }
}
