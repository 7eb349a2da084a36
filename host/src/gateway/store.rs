//! Task stores: in memory (local mesh, tests) and NATS JetStream key-value (production;
//! survives a gateway restart).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

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

/// In-memory store.
#[derive(Default)]
pub struct MemoryStore {
    tasks: Mutex<HashMap<String, Task>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn get(&self, id: &str) -> Result<Option<Task>, StoreError> {
        Ok(self.tasks.lock().expect("task map").get(id).cloned())
    }
    async fn put(&self, task: &Task) -> Result<(), StoreError> {
        self.tasks
            .lock()
            .expect("task map")
            .insert(task.id.clone(), task.clone());
        Ok(())
    }
    async fn list(&self) -> Result<Vec<Task>, StoreError> {
        Ok(self
            .tasks
            .lock()
            .expect("task map")
            .values()
            .cloned()
            .collect())
    }
}

/// NATS JetStream key-value store (bucket per namespace, one key per task).
pub struct KvStore {
    kv: async_nats::jetstream::kv::Store,
}

/// Bound on every KV round trip.
const KV_TIMEOUT: Duration = Duration::from_secs(5);

impl KvStore {
    /// Open (create when missing) bucket `bucket` on `client`.
    pub async fn open(client: async_nats::Client, bucket: &str) -> Result<KvStore, StoreError> {
        let js = async_nats::jetstream::new(client);
        let kv = match tokio::time::timeout(KV_TIMEOUT, js.get_key_value(bucket)).await {
            Ok(Ok(kv)) => kv,
            _ => tokio::time::timeout(
                KV_TIMEOUT,
                js.create_key_value(async_nats::jetstream::kv::Config {
                    bucket: bucket.to_owned(),
                    description: "asya gateway tasks".into(),
                    history: 1,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| backend("create bucket", e))?
            .map_err(|e| backend("create bucket", e))?,
        };
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
