//! The README's "separate processes" NATS recipe (`examples/nats/`): the README shows the
//! lines of `examples/nats/run.sh` verbatim, and the script runs them against a nats-server
//! of this test (real `asya-host` processes, real stock Python runtimes) to a succeeded
//! task. Also what the recipe's users saw go wrong: a sidecar without its runtime says what
//! it waits for, and `send --wait` that gives up says why.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use asya_test_support::{free_port, NatsServer};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A port such that it and the next `n - 1` are free now.
fn free_ports(n: u16) -> u16 {
    for _ in 0..50 {
        let p = free_port();
        if p.checked_add(n).is_some()
            && (1..n).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok())
        {
            return p;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// `PATH` with the `asya-host` under test first (the recipe calls it by name).
fn path_with_host() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_asya-host"));
    format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A command with no `ASYA_*` variable of the caller's environment.
fn clean(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("ASYA_") || k == "RUST_LOG" || k == "PYTHONPATH" {
            cmd.env_remove(k);
        }
    }
    cmd.env("PATH", path_with_host())
}

/// Wait for `child` with a deadline (killed when it passes).
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("did not finish within {limit:?}");
        }
    }
}

fn readme_block(readme: &str, script: &str) -> String {
    let block = script
        .split("# --- README begin ---\n")
        .nth(1)
        .and_then(|s| s.split("# --- README end ---\n").next())
        .expect("run.sh has the README markers");
    assert!(
        readme.contains(&format!("```sh\n{block}```\n")),
        "README.md does not show examples/nats/run.sh's lines verbatim:\n{block}"
    );
    block.to_owned()
}

#[test]
fn separate_processes_recipe_runs_as_documented() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let script = std::fs::read_to_string(repo().join("examples/nats/run.sh")).unwrap();
    let block = readme_block(&readme, &script);
    assert!(
        !block.contains("PYTHONPATH"),
        "the recipe works without PYTHONPATH"
    );

    let server = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("bash");
    clean(&mut cmd)
        .arg(repo().join("examples/nats/run.sh"))
        .current_dir(tmp.path())
        .env("ASYA_NATS_URL", server.url())
        .env("GATEWAY_PORT", free_port().to_string())
        .env("ADMIN_PORT", free_ports(4).to_string())
        .env("TMPDIR", tmp.path());
    let out = output_within(cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains(r#""status": "succeeded""#), "{stdout}");
    assert!(stdout.contains(r#""text": "HELLO MESH""#), "{stdout}");
    assert!(stdout.contains(r#""length": 10"#), "{stdout}");
    // The trace names both actors' hops.
    let trace_at = stdout.rfind('}').unwrap_or(0);
    let trace = &stdout[trace_at..];
    assert!(
        trace.contains("upper") && trace.contains("count"),
        "{stdout}"
    );
}

#[test]
fn sidecar_without_runtime_says_what_it_waits_for() {
    let server = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_asya-host"));
    clean(&mut cmd)
        .arg("sidecar")
        .env("ASYA_NATS_URL", server.url())
        .env("ASYA_NAMESPACE", "demo")
        .env("ASYA_ACTOR_NAME", "upper")
        .env("ASYA_SOCKET_DIR", tmp.path())
        .env("ASYA_METRICS_ADDR", "127.0.0.1:0")
        .env("ASYA_RUNTIME_READY_TIMEOUT", "3s");
    let started = Instant::now();
    let out = output_within(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let waiting: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("still waiting for the runtime"))
        .collect();
    assert!(!waiting.is_empty(), "{stderr}");
    assert!(
        waiting[0].contains("asya-runtime.sock does not exist")
            && waiting[0].contains("ASYA_RUNTIME_READY_TIMEOUT"),
        "{}",
        waiting[0]
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[test]
fn send_wait_says_why_it_stopped_waiting() {
    let server = NatsServer::start();
    let host = env!("CARGO_BIN_EXE_asya-host");
    // The namespace's stream exists, but no sidecar consumes it.
    let mut provision = Command::new(host);
    clean(&mut provision)
        .args([
            "provision",
            "--namespace",
            "idle",
            "--actors",
            "upper,count",
        ])
        .env("ASYA_NATS_URL", server.url());
    let out = output_within(provision, Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");

    let port = free_port();
    let mut gateway = Command::new(host);
    clean(&mut gateway)
        .arg("gateway")
        .env("ASYA_NATS_URL", server.url())
        .env("ASYA_NAMESPACE", "idle")
        .env(
            "ASYA_GATEWAY_FLOWS",
            repo().join("examples/nats/flows.toml"),
        )
        .env("ASYA_GATEWAY_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut gateway = gateway.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut send = Command::new(host);
    clean(&mut send)
        .args([
            "send",
            "shout",
            r#"{"text": "hi"}"#,
            "--wait",
            "--timeout",
            "2s",
        ])
        .env("ASYA_GATEWAY_URL", format!("http://127.0.0.1:{port}"));
    let out = output_within(send, Duration::from_secs(30));
    let _ = gateway.kill();
    let _ = gateway.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("asya-host send: stopped waiting after 2s (the --timeout): task "),
        "{stderr}"
    );
    assert!(
        stderr.contains("at actor \"upper\"") || stderr.contains("no actor has reported it"),
        "{stderr}"
    );
}
