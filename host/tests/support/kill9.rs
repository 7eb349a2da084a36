//! Building blocks of the kill -9 end-to-end tests (NATS and Wasm transports): real
//! `asya-host` sidecar processes paired with Python runtime processes, a tally of what
//! reaches the end queues, the test envelopes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use asya_host::transport::Transport;

/// Envelopes per run.
pub const ENVELOPES: usize = 5_000;

/// A child process killed (SIGKILL) on drop.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The stock runtime (`sdk/python/asya_runtime.py` with a one-line handler) when
/// `ASYA_E2E_RUNTIME=stock`, else the echo fixture.
fn start_runtime(dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join("runtime.log")).unwrap();
    let mut cmd = Command::new("python3");
    if std::env::var("ASYA_E2E_RUNTIME").as_deref() == Ok("stock") {
        std::fs::write(
            dir.join("echo_handler.py"),
            "def echo(payload):\n    return payload\n",
        )
        .unwrap();
        cmd.arg(repo_path("sdk/python/asya_runtime.py"))
            .env("ASYA_HANDLER", "echo_handler.echo")
            .env("PYTHONPATH", dir);
    } else {
        cmd.arg(repo_path("tests/fixtures/echo_runtime_nats.py"));
    }
    let child = cmd
        .env("ASYA_SOCKET_DIR", dir.join("sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("python3");
    Proc(child)
}

/// A sidecar process with the shared test settings plus `transport_env` (namespace,
/// transport and its variables).
fn start_sidecar(
    dir: &Path,
    actor: &str,
    transport_env: &[(String, String)],
    generation: usize,
) -> Proc {
    let log = std::fs::File::create(dir.join(format!("sidecar-{generation}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .arg("sidecar")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("ASYA_ACTOR_NAME", actor)
        .envs(transport_env.iter().map(|(k, v)| (k, v)))
        .env("ASYA_SOCKET_DIR", dir.join("sock"))
        .env("ASYA_METRICS_ADDR", "off")
        .env("ASYA_CONCURRENCY", "16")
        // Kills must not use up the retry budget: nothing may reach x-sump.
        .env("ASYA_RESILIENCY_MAX_ATTEMPTS", "1000")
        .env("ASYA_RESILIENCY_BACKOFF_INITIAL", "100ms")
        .env("ASYA_RESILIENCY_BACKOFF_MAX", "1s")
        .env("ASYA_RUNTIME_READY_TIMEOUT", "30s")
        .env("ASYA_SHUTDOWN_GRACE", "2s")
        .env(
            "ASYA_LOG_LEVEL",
            std::env::var("ASYA_E2E_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("asya-host binary");
    Proc(child)
}

/// One actor: a runtime process and its sidecar process, in a temp dir of their own.
pub struct Actor {
    pub name: &'static str,
    dir: tempfile::TempDir,
    transport_env: Arc<Vec<(String, String)>>,
    _runtime: Proc,
    sidecar: Option<Proc>,
    pub generation: usize,
}

impl Actor {
    pub fn start(name: &'static str, transport_env: Arc<Vec<(String, String)>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sock")).unwrap();
        let runtime = start_runtime(dir.path());
        let sidecar = Some(start_sidecar(dir.path(), name, &transport_env, 0));
        Actor {
            name,
            dir,
            transport_env,
            _runtime: runtime,
            sidecar,
            generation: 0,
        }
    }

    /// SIGKILL the sidecar, wait for it, start a new one.
    pub fn kill9_and_restart(&mut self) {
        drop(self.sidecar.take());
        self.generation += 1;
        self.sidecar = Some(start_sidecar(
            self.dir.path(),
            self.name,
            &self.transport_env,
            self.generation,
        ));
    }

    /// Every sidecar generation's whole log.
    pub fn sidecar_logs(&self) -> String {
        (0..=self.generation)
            .map(|g| {
                std::fs::read_to_string(self.dir.path().join(format!("sidecar-{g}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The current sidecar's exit status if it has exited (it should not).
    pub fn sidecar_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.sidecar
            .as_mut()
            .and_then(|p| p.0.try_wait().ok().flatten())
    }

    /// The tails of every sidecar generation's log and of the runtime's log.
    pub fn logs(&self) -> String {
        fn tail(text: &str, n: usize) -> String {
            let lines: Vec<&str> = text.lines().rev().take(n).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        let mut out = String::new();
        for g in 0..=self.generation {
            let p = self.dir.path().join(format!("sidecar-{g}.log"));
            let text = std::fs::read_to_string(p).unwrap_or_default();
            out += &format!("--- {} sidecar {g}\n{}\n", self.name, tail(&text, 12));
        }
        let rt = std::fs::read_to_string(self.dir.path().join("runtime.log")).unwrap_or_default();
        out += &format!("--- {} runtime\n{}\n", self.name, tail(&rt, 6));
        out
    }
}

/// Ids seen on an end queue: envelope id → first deliveries (attempt 1) and
/// redeliveries. A duplicate publish is a second message with the same id, so it shows as a
/// second first delivery; a redelivery to this test's own consumer does not.
#[derive(Default)]
pub struct Seen {
    pub by_id: HashMap<String, (usize, usize)>,
}

impl Seen {
    pub fn unique(&self) -> usize {
        self.by_id.len()
    }

    pub fn duplicates(&self) -> Vec<(&String, &(usize, usize))> {
        self.by_id
            .iter()
            .filter(|(_, (first, _))| *first > 1)
            .collect()
    }
}

/// Consume `queue` with `t` into `seen`, acking each message.
pub fn collect(
    t: Arc<dyn Transport>,
    queue: asya_host::queue::QueueName,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = t.subscribe(&queue, 256).await.expect("subscribe end queue");
        while let Ok(d) = rx.recv().await {
            let id = serde_json::from_slice::<serde_json::Value>(&d.body)
                .ok()
                .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "unparseable".into());
            {
                let mut s = seen.lock().unwrap();
                let e = s.by_id.entry(id).or_default();
                if d.attempt == 1 {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
            let _ = d.acker.ack().await;
        }
    })
}

/// Envelope `e-<i>` routed a → b → c.
pub fn envelope(i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": format!("e-{i}"),
        "route": {"prev": [], "curr": "a", "next": ["b", "c"]},
        "headers": {"trace_id": format!("t-{i}")},
        "payload": {"i": i, "text": "hello"},
    }))
    .unwrap()
}

/// Publish the run's envelopes to `asya-<ns>-a`, 500 per batch.
pub async fn publish(t: &dyn Transport, ns: &str) {
    let queue = asya_host::queue::QueueName::new(ns, "a").unwrap();
    for chunk in (0..ENVELOPES).collect::<Vec<_>>().chunks(500) {
        let msgs = chunk
            .iter()
            .map(|&i| asya_host::transport::OutMessage {
                queue: queue.clone(),
                id: format!("in-{i}"),
                body: envelope(i).into(),
            })
            .collect();
        t.send_all(msgs).await.unwrap();
    }
}

/// Every envelope at x-sink exactly once, none in x-sump.
pub fn assert_exactly_once(ns: &str, elapsed: std::time::Duration, sink: &Seen, sump: &Seen) {
    let dups = sink.duplicates();
    println!(
        "[{ns}] done in {elapsed:?}: x-sink {} unique, {} duplicated; x-sump {}",
        sink.unique(),
        dups.len(),
        sump.unique()
    );
    assert!(
        dups.is_empty(),
        "duplicates at x-sink: {:?}",
        dups.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(sink.unique(), ENVELOPES, "envelopes missing at x-sink");
    for i in 0..ENVELOPES {
        assert!(
            sink.by_id.contains_key(&format!("e-{i}")),
            "e-{i} missing at x-sink"
        );
    }
    assert_eq!(
        sump.unique(),
        0,
        "envelopes in x-sump: {:?}",
        sump.by_id.keys().take(5).collect::<Vec<_>>()
    );
}
