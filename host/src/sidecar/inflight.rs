//! What every worker is doing right now (`/debug/inflight`): finds wedged actors without a
//! debugger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Where an envelope is in the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Received,
    Invoking,
    /// The runtime is unreachable; the delivery is held until it is back.
    WaitingForRuntime,
    Routing,
    Acking,
}

struct Entry {
    actor: Arc<str>,
    envelope_id: String,
    trace_id: String,
    stage: Stage,
    since: Instant,
}

/// One row of `/debug/inflight`.
#[derive(Debug, Serialize)]
pub struct InflightRow {
    pub actor: String,
    pub envelope_id: String,
    pub trace_id: String,
    pub stage: Stage,
    pub age_ms: u64,
}

/// Registry of in-flight envelopes, shared by every sidecar of a process.
#[derive(Default)]
pub struct Inflight {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

impl Inflight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The table. A panic in a worker must not poison it for every other worker (nor panic
    /// again while a guard is dropped during the unwind): the rows stay usable.
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register an envelope; the returned guard removes it when dropped.
    pub fn enter(self: &Arc<Self>, actor: &Arc<str>) -> InflightGuard {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(
            key,
            Entry {
                actor: actor.clone(),
                envelope_id: String::new(),
                trace_id: String::new(),
                stage: Stage::Received,
                since: Instant::now(),
            },
        );
        InflightGuard {
            registry: self.clone(),
            key,
        }
    }

    pub fn snapshot(&self) -> Vec<InflightRow> {
        let now = Instant::now();
        let mut rows: Vec<InflightRow> = self
            .entries()
            .values()
            .map(|e| InflightRow {
                actor: e.actor.to_string(),
                envelope_id: e.envelope_id.clone(),
                trace_id: e.trace_id.clone(),
                stage: e.stage,
                age_ms: now.duration_since(e.since).as_millis() as u64,
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.age_ms));
        rows
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps one envelope registered.
pub struct InflightGuard {
    registry: Arc<Inflight>,
    key: u64,
}

impl InflightGuard {
    pub fn identify(&self, envelope_id: &str, trace_id: &str) {
        if let Some(e) = self.registry.entries().get_mut(&self.key) {
            e.envelope_id = envelope_id.to_owned();
            e.trace_id = trace_id.to_owned();
        }
    }

    pub fn stage(&self, stage: Stage) {
        if let Some(e) = self.registry.entries().get_mut(&self.key) {
            e.stage = stage;
        }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.registry.entries().remove(&self.key);
    }
}
