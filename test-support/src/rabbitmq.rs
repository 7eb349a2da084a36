//! A RabbitMQ vhost of its own for a test or benchmark, on the broker at
//! `$ASYA_TEST_RABBITMQ` (default `127.0.0.1:5672`, user guest/guest; `.ci/setup` installs
//! and starts one). Created with `rabbitmqctl add_vhost`, deleted (with its queues) on drop.

use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The broker's address.
pub fn addr() -> String {
    std::env::var("ASYA_TEST_RABBITMQ").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl (run .ci/setup: it installs and starts rabbitmq-server)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed (is rabbitmq-server running? run .ci/setup): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Vhost {
    pub name: String,
}

impl Vhost {
    /// A fresh vhost `<prefix>-<pid>-<n>` where guest may do everything.
    pub fn create(prefix: &str) -> Vhost {
        TcpStream::connect_timeout(
            &addr().parse().expect("ASYA_TEST_RABBITMQ"),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("no RabbitMQ at {} ({e}): run .ci/setup", addr()));
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        rabbitmqctl(&["add_vhost", &name]);
        let v = Vhost { name };
        rabbitmqctl(&["set_permissions", "-p", &v.name, "guest", ".*", ".*", ".*"]);
        v
    }

    /// The component's configuration for this vhost.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({ "address": addr(), "vhost": self.name })
    }

    /// The broker closes every client connection of the vhost (what clients see when the
    /// broker restarts: `connection.close` 320 CONNECTION_FORCED).
    pub fn close_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "test: connections closed by the broker",
        ]);
    }

    /// `(messages ready, messages unacked)` per queue.
    pub fn queues(&self) -> Vec<(String, u64, u64)> {
        rabbitmqctl(&[
            "list_queues",
            "-p",
            &self.name,
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.to_owned(),
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}
