//! Building blocks of the kill -9 end-to-end tests (NATS, Redis and RabbitMQ transports):
//! real `asya-host` sidecar processes paired with Python runtime processes, a tally of what
//! reaches the end queues, the test envelopes. Subscribing and publishing need the host's
//! `Transport`, so they stay in the tests: feed each delivery to [`Seen::record`] and publish
//! [`batches`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::runtime::{scripted_command, stock_command};
use crate::Proc;

/// Envelopes per run.
pub const ENVELOPES: usize = 5_000;

/// The stock runtime (`sdk/python/asya_runtime.py` with a one-line handler) when
/// `ASYA_E2E_RUNTIME=stock`, else the scripted fixture runtime (it echoes these payloads).
fn start_runtime(dir: &Path) -> Proc {
    let log = std::fs::File::create(dir.join("runtime.log")).unwrap();
    let sock = dir.join("sock");
    let mut cmd = if std::env::var("ASYA_E2E_RUNTIME").as_deref() == Ok("stock") {
        std::fs::write(
            dir.join("echo_handler.py"),
            "def echo(payload):\n    return payload\n",
        )
        .unwrap();
        stock_command(&sock, "echo_handler.echo", dir)
    } else {
        scripted_command(&sock)
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("python3");
    Proc(child)
}

/// A sidecar process with the shared test settings plus `transport_env` (namespace,
/// transport and its variables).
fn start_sidecar(
    bin: &Path,
    dir: &Path,
    actor: &str,
    transport_env: &[(String, String)],
    generation: usize,
) -> Proc {
    let log = std::fs::File::create(dir.join(format!("sidecar-{generation}.log"))).unwrap();
    let child = Command::new(bin)
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
    bin: PathBuf,
    dir: tempfile::TempDir,
    transport_env: Arc<Vec<(String, String)>>,
    _runtime: Proc,
    sidecar: Option<Proc>,
    pub generation: usize,
}

impl Actor {
    /// `bin` is the `asya-host` binary under test (`env!("CARGO_BIN_EXE_asya-host")`).
    pub fn start(
        bin: impl Into<PathBuf>,
        name: &'static str,
        transport_env: Arc<Vec<(String, String)>>,
    ) -> Self {
        let bin = bin.into();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sock")).unwrap();
        let runtime = start_runtime(dir.path());
        let sidecar = Some(start_sidecar(&bin, dir.path(), name, &transport_env, 0));
        Actor {
            name,
            bin,
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
            &self.bin,
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

    /// Tally one message of an end queue: its envelope id, first delivery or redelivery.
    pub fn record(&mut self, body: &[u8], attempt: u32) {
        let id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
            .unwrap_or_else(|| "unparseable".into());
        let e = self.by_id.entry(id).or_default();
        if attempt == 1 {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    pub fn duplicates(&self) -> Vec<(&String, &(usize, usize))> {
        self.by_id
            .iter()
            .filter(|(_, (first, _))| *first > 1)
            .collect()
    }
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

/// The run's envelopes as `(message id, body)` (`in-<i>`, envelope `e-<i>`), 500 per batch:
/// publish each batch with one `send_all` to `asya-<ns>-a`.
pub fn batches() -> impl Iterator<Item = Vec<(String, Vec<u8>)>> {
    (0..ENVELOPES).step_by(500).map(|start| {
        (start..(start + 500).min(ENVELOPES))
            .map(|i| (format!("in-{i}"), envelope(i)))
            .collect()
    })
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

/// Defines `collect` (consume an end queue into a [`Seen`], acking each message) and
/// `publish` (the run's envelopes to `asya-<ns>-a` in [`batches`]) in the calling test, on
/// `asya_host`'s `Transport`. A macro because this crate must not depend on `asya-host` (it
/// is a dev-dependency of it): the code expands where `asya_host` is in scope.
#[macro_export]
macro_rules! kill9_transport_helpers {
    () => {
        /// Consume `queue` with `t` into `seen`, acking each message.
        #[allow(dead_code)]
        fn collect(
            t: ::std::sync::Arc<dyn ::asya_host::transport::Transport>,
            queue: ::asya_host::queue::QueueName,
            seen: ::std::sync::Arc<::std::sync::Mutex<$crate::kill9::Seen>>,
        ) -> ::tokio::task::JoinHandle<()> {
            ::tokio::spawn(async move {
                let mut rx = t.subscribe(&queue, 256).await.expect("subscribe end queue");
                while let Ok(d) = rx.recv().await {
                    seen.lock().unwrap().record(&d.body, d.attempt);
                    let _ = d.acker.ack().await;
                }
            })
        }

        /// Publish the run's envelopes to `asya-<ns>-a`.
        #[allow(dead_code)]
        async fn publish(t: &dyn ::asya_host::transport::Transport, ns: &str) {
            let queue = ::asya_host::queue::QueueName::new(ns, "a").unwrap();
            for batch in $crate::kill9::batches() {
                let msgs = batch
                    .into_iter()
                    .map(|(id, body)| ::asya_host::transport::OutMessage {
                        queue: queue.clone(),
                        id,
                        body: body.into(),
                    })
                    .collect();
                t.send_all(msgs).await.unwrap();
            }
        }
    };
}
