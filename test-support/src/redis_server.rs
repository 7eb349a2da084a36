//! A throwaway `redis-server` for tests and benchmarks: free port, no persistence
//! (`--save "" --appendonly no`), temp dir, killed on drop. Readiness is polled with a
//! deadline (`PING`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // A free port can be taken by another test's process between `free_port` and the
        // server's bind: then the server exits at once, and it starts again on a new port.
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(dir.path(), port);
            if wait_ready(&mut child, port) {
                return RedisServer {
                    child: Some(child),
                    port,
                    _dir: dir,
                };
            }
            let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
            assert!(log.contains("in use"), "redis-server exited early: {log}");
        }
        panic!("redis-server found its port taken five times");
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn spawn(dir: &std::path::Path, port: u16) -> Child {
    let log = std::fs::File::create(dir.join("redis.log")).expect("log file");
    Command::new(std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into()))
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (run .ci/setup)")
}

/// Poll `PING` until `+PONG` (true) or the server's exit (false), within a deadline.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return true;
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
