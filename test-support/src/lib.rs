//! Test support for `asya-host`'s tests and benchmarks (`host/tests`, `host/benches`) and the
//! end-to-end tests (`tests/`), used as a dev-dependency: throwaway `nats-server` /
//! `redis-server` processes and RabbitMQ vhosts, the plugin components, the Python fixture
//! and stock runtimes, the kill -9 building blocks, and small helpers (free ports, process
//! guards, polling with a deadline, metric scraping).
//!
//! It does not depend on `asya-host` (the host's own tests use it, and a dev-dependency cycle
//! would build the host twice): helpers that need the host's types stay in the tests that use
//! them, or in `asya-tests`' library for the in-process harnesses.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

pub mod kill9;
pub mod nats_server;
pub mod plugins;
pub mod rabbitmq;
pub mod redis_server;
pub mod runtime;

pub use nats_server::NatsServer;
pub use plugins::plugin;
pub use rabbitmq::Vhost;
pub use redis_server::RedisServer;
pub use runtime::{FixtureRuntime, StockRuntime};

/// The repository root (the parent of this crate's folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support/ has a parent")
        .to_path_buf()
}

/// A TCP port on 127.0.0.1 that is free now (the OS picks it; it may be taken again before
/// the caller binds it, which tests accept).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub Child);

impl Proc {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `cond` every 20 ms until it holds or `limit` passes; one last try at the deadline.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Poll `f` every 200 ms until it returns `Ok`; past `limit`, panic naming `what` and the
/// last error.
pub fn poll_value<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not reached within {limit:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Poll `cond` every 10 ms (tokio time) until it holds or `wait` passes.
pub async fn eventually(wait: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`eventually`] for an asynchronous condition.
pub async fn eventually_async<F, Fut>(wait: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait for `child` with a deadline; past it the child is killed and the test fails with its
/// stderr.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "process did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// `GET http://127.0.0.1:port/path` → (status, body). HTTP/1.0: the body ends at EOF.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The text exposition at `http://127.0.0.1:port/metrics` if it answers 200.
pub fn scrape(port: u16) -> Option<String> {
    match http_get(port, "/metrics")? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// The value of one sample line of the text exposition, e.g.
/// `metric_value(&text, "asya_actor_messages_failed_total", &[("reason", "parse_error")])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `ASYA_TEST_LOG=debug cargo test ...` shows the host's logs (in-process tests).
pub fn init_logging() {
    if let Ok(level) = std::env::var("ASYA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_test_writer()
            .try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_name_and_labels_exactly() {
        let text = "# HELP x\nasya_a_total{reason=\"p\"} 3\nasya_a_total_more 9\nasya_a_total 5\n";
        assert_eq!(
            metric_value(text, "asya_a_total", &[("reason", "p")]),
            Some(3.0)
        );
        assert_eq!(metric_value(text, "asya_a_total", &[]), Some(3.0));
        assert_eq!(metric_value(text, "asya_a_total", &[("reason", "q")]), None);
        assert_eq!(metric_value(text, "asya_a", &[]), None);
    }

    #[test]
    fn poll_until_gives_up_at_the_deadline() {
        let start = Instant::now();
        assert!(!poll_until(Duration::from_millis(100), || false));
        assert!(start.elapsed() >= Duration::from_millis(100));
        let mut n = 0;
        assert!(poll_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
    }
}
