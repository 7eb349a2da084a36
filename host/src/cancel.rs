//! Canceled tasks reaching the actors (issue #19): the gateway announces every canceled task
//! id, each sidecar keeps the ids it learned in a bounded set ([`Canceled`]) and sends an
//! envelope of a canceled task to x-sink (`phase=canceled`) instead of calling its runtime.
//!
//! How the ids travel:
//! - one process (`asya-host up`, the tests): the gateway inserts into the [`Canceled`] set
//!   its sidecars share ([`crate::gateway::Gateway::canceled`]);
//! - NATS: the gateway puts the id into the KV bucket `asya-<namespace>-canceled`
//!   ([`bucket_name`], keys expire after [`KV_MAX_AGE`]); every standalone sidecar on NATS
//!   watches the bucket from its start (the watch delivers the ids already there, so a
//!   restarted sidecar knows them again).
//!
//! Standalone sidecars on a transport component (`ASYA_TRANSPORT=wasm`) learn nothing: for
//! them a cancel only changes the task's status in the gateway.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::envelope::Envelope;

/// Ids held at most by one set; past it the oldest id goes first.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// How long an id is held (a task's envelopes do not outlive the gateway's retention).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the NATS bucket keeps an id.
pub const KV_MAX_AGE: Duration = DEFAULT_TTL;

/// A bounded set of canceled task ids: at most `capacity` ids, each for at most `ttl`.
pub struct Canceled {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
}

#[derive(Default)]
struct Inner {
    ids: HashMap<String, Instant>,
    /// Insertion order (an id inserted again keeps its first place).
    order: VecDeque<(Instant, String)>,
}

impl Inner {
    fn sweep(&mut self, now: Instant, ttl: Duration, capacity: usize) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < ttl && self.order.len() <= capacity {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.ids.remove(&id);
        }
    }
}

impl Canceled {
    /// A set with the default bounds (100,000 ids, 24 h).
    pub fn new() -> Arc<Canceled> {
        Canceled::with_limits(DEFAULT_CAPACITY, DEFAULT_TTL)
    }

    pub fn with_limits(capacity: usize, ttl: Duration) -> Arc<Canceled> {
        Arc::new(Canceled {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            ttl,
        })
    }

    /// Remember that task `id` was canceled.
    pub fn insert(&self, id: &str) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.ids.contains_key(id) {
            return;
        }
        inner.ids.insert(id.to_owned(), now);
        inner.order.push_back((now, id.to_owned()));
        inner.sweep(now, self.ttl, self.capacity);
    }

    pub fn contains(&self, id: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.ids.get(id).is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Ids held now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `env` belongs to a canceled task: its envelope id (the task id for the first
    /// envelope), or its trace id read as a uuid (the gateway's task id, carried by every
    /// envelope of the task, fan-out children included), or its parent id.
    /// Checked for every delivery: one lock, and nothing parsed while the set is empty.
    pub fn holds_task_of(&self, env: &Envelope) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.ids.is_empty() {
            return false;
        }
        let held = |id: &str| inner.ids.get(id).is_some_and(|at| at.elapsed() < self.ttl);
        held(&env.id)
            || uuid::Uuid::parse_str(&env.trace_id()).is_ok_and(|u| held(&u.to_string()))
            || env.parent_id.as_deref().is_some_and(held)
    }
}

/// The NATS KV bucket of canceled task ids of `namespace`.
pub fn bucket_name(namespace: &str) -> String {
    format!("asya-{namespace}-canceled")
}

/// Bound on opening the bucket and on one put.
const KV_TIMEOUT: Duration = Duration::from_secs(5);

/// Open (create when missing) the bucket of canceled ids of `namespace`.
pub async fn open_bucket(
    client: async_nats::Client,
    namespace: &str,
) -> Result<async_nats::jetstream::kv::Store, String> {
    let js = async_nats::jetstream::new(client);
    let cfg = async_nats::jetstream::kv::Config {
        bucket: bucket_name(namespace),
        description: "asya canceled task ids".into(),
        history: 1,
        max_age: KV_MAX_AGE,
        ..Default::default()
    };
    tokio::time::timeout(KV_TIMEOUT, js.create_or_update_key_value(cfg))
        .await
        .map_err(|e| format!("open bucket {}: {e}", bucket_name(namespace)))?
        .map_err(|e| format!("open bucket {}: {e}", bucket_name(namespace)))
}

/// KV keys allow `[-/_=.a-zA-Z0-9]` (task ids are uuids); other ids are not announced.
fn is_key(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Announce task `id` as canceled in the bucket.
pub async fn announce(kv: &async_nats::jetstream::kv::Store, id: &str) -> Result<(), String> {
    if !is_key(id) {
        return Err(format!("task id {id:?} cannot be a KV key"));
    }
    tokio::time::timeout(KV_TIMEOUT, kv.put(id, bytes::Bytes::from_static(b"1")))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Fill `set` from the bucket until `stop`: the ids already there first, then every new one;
/// the watch is opened again after a failure.
pub fn watch(
    kv: async_nats::jetstream::kv::Store,
    set: Arc<Canceled>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let watch = tokio::select! {
                _ = stop.cancelled() => return,
                w = kv.watch_with_history(">") => w,
            };
            match watch {
                Ok(mut w) => loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = w.next() => n,
                    };
                    match next {
                        Some(Ok(entry)) => {
                            if entry.operation == async_nats::jetstream::kv::Operation::Put {
                                debug!(task_id = %entry.key, "task canceled");
                                set.insert(&entry.key);
                            }
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "canceled-task watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => warn!(error = %e, "cannot watch canceled tasks; trying again"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_capacity_ids_oldest_first() {
        let s = Canceled::with_limits(2, DEFAULT_TTL);
        s.insert("a");
        s.insert("b");
        s.insert("a");
        assert!(s.contains("a") && s.contains("b"));
        s.insert("c");
        assert!(!s.contains("a"));
        assert!(s.contains("b") && s.contains("c"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn forgets_ids_after_the_ttl() {
        let s = Canceled::with_limits(10, Duration::from_millis(20));
        s.insert("a");
        assert!(s.contains("a"));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!s.contains("a"));
        s.insert("b");
        assert_eq!(s.len(), 1, "the expired id was swept");
    }

    #[test]
    fn an_envelope_belongs_to_its_task_by_trace_id() {
        let task = uuid::Uuid::new_v4();
        let mut env = Envelope::new(
            "child-1".to_owned(),
            crate::envelope::Route::default(),
            serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        );
        env.headers
            .insert_str(crate::envelope::HEADER_TRACE_ID, &task.simple().to_string());
        let s = Canceled::new();
        assert!(!s.holds_task_of(&env));
        s.insert("other");
        assert!(!s.holds_task_of(&env));
        s.insert(&task.to_string());
        assert!(s.holds_task_of(&env));
    }
}
