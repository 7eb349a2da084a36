//! The binary's configuration errors: one line naming the variable, non-zero exit.

use std::process::Command;

use asya_test_support::wait_output;

fn sidecar(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_asya-host"));
    cmd.arg("sidecar")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_actor_name_is_one_line_naming_the_variable() {
    let (code, err) = sidecar(&[]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("ASYA_ACTOR_NAME"), "{err}");
}

#[test]
fn invalid_values_are_one_line_naming_the_variable() {
    for (var, val) in [
        ("ASYA_CONCURRENCY", "many"),
        ("ASYA_RESILIENCY_ACTOR_TIMEOUT", "soon"),
        ("ASYA_TRANSPORT", "carrier-pigeon"),
        ("ASYA_METRICS_ADDR", "nowhere"),
    ] {
        let (code, err) = sidecar(&[("ASYA_ACTOR_NAME", "a"), (var, val)]);
        assert_eq!(code, 1, "{var}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(var), "{err}");
    }
}

#[test]
fn memory_transport_is_refused_outside_one_process() {
    let (code, err) = sidecar(&[
        ("ASYA_ACTOR_NAME", "a"),
        ("ASYA_TRANSPORT", "memory"),
        ("ASYA_METRICS_ADDR", "127.0.0.1:0"),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("memory"), "{err}");
}

#[test]
fn a_missing_policy_file_stops_start_up_before_the_broker_is_contacted() {
    let (code, err) = sidecar(&[
        ("ASYA_ACTOR_NAME", "a"),
        ("ASYA_ROUTE_POLICIES", "/nonexistent/policy.wasm"),
        // Nothing listens here: reaching the broker first would fail with a connect error.
        ("ASYA_NATS_URL", "nats://127.0.0.1:1"),
        ("ASYA_METRICS_ADDR", "127.0.0.1:0"),
    ]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/policy.wasm"), "{err}");
}

#[test]
fn an_admin_port_in_use_is_one_line_saying_it_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = sidecar(&[
        ("ASYA_ACTOR_NAME", "a"),
        ("ASYA_METRICS_ADDR", &addr),
        // Nothing listens here: the port is checked before the broker is contacted.
        ("ASYA_NATS_URL", "nats://127.0.0.1:1"),
    ]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&addr), "{err}");
    assert_eq!(
        err.matches("in use").count(),
        1,
        "the cause is said once: {err}"
    );
}

/// `asya-host up` names its end actors after `ASYA_ACTOR_SINK` / `ASYA_ACTOR_SUMP`: the
/// finished task reaches the renamed sink, and the summary lists the renamed end actors.
#[test]
fn up_uses_the_end_actors_named_by_the_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("flow.toml"),
        "[actors.a]\nhandler = \"h.work\"\n[flows]\nf = [\"a\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("h.py"), "def work(p):\n    return p\n").unwrap();
    std::fs::write(dir.join("in.jsonl"), "{\"n\": 1}\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_asya-host"))
        .arg("up")
        .arg(dir.join("flow.toml"))
        .arg("--input")
        .arg(dir.join("in.jsonl"))
        .args(["--flow", "f"])
        .env("TMPDIR", tmp.path())
        .env("ASYA_ACTOR_SINK", "done")
        .env("ASYA_ACTOR_SUMP", "dead")
        .env_remove("ASYA_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .env_remove("ASYA_PYTHONEXECUTABLE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("asya-host starts");
    let out = wait_output(child, std::time::Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1 tasks: 1 succeeded"), "{stderr}");
    for end in ["done", "dead"] {
        assert!(
            stderr.lines().any(|l| l.starts_with(end)),
            "{end}: {stderr}"
        );
    }
    assert!(
        !stderr.lines().any(|l| l.starts_with("x-s")),
        "no default end actor: {stderr}"
    );
}

/// `--help` of `sidecar`, `gateway`, `up` and `provision` lists the variables each reads, with their
/// defaults, from the definitions the parsers use.
#[test]
fn help_lists_the_variables_with_their_defaults() {
    for (cmd, var, default) in [
        ("sidecar", "ASYA_CONCURRENCY", "[default 1]"),
        ("sidecar", "ASYA_RUNTIME_READY_TIMEOUT", "[default 300s]"),
        ("sidecar", "ASYA_NATS_ACK_WAIT", "[default 30s]"),
        ("sidecar", "ASYA_ACTOR_NAME", "[required]"),
        ("gateway", "ASYA_GATEWAY_ADDR", "[default :8090]"),
        (
            "gateway",
            "ASYA_GATEWAY_KV_BUCKET",
            "[default asya-<namespace>-tasks]",
        ),
        ("up", "ASYA_ACTOR_SINK", "[default x-sink]"),
        ("up", "ASYA_NATS_URL", "[default nats://127.0.0.1:4222]"),
        ("up", "ASYA_TRANSPORT_CONFIG", "[default {}]"),
        ("gateway", "ASYA_TRANSPORT", "[default nats]"),
        ("gateway", "ASYA_TRANSPORT_PLUGIN", "ASYA_TRANSPORT=wasm"),
        ("provision", "ASYA_TRANSPORT", "[default nats]"),
        (
            "provision",
            "ASYA_NATS_URL",
            "[default nats://127.0.0.1:4222]",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_asya-host"))
            .args([cmd, "--help"])
            .output()
            .expect("binary runs");
        assert!(out.status.success(), "{cmd} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let line = help
            .lines()
            .find(|l| l.split_whitespace().next() == Some(var))
            .unwrap_or_else(|| panic!("{cmd} --help does not list {var}:\n{help}"));
        assert!(line.contains(default), "{cmd} --help: {line}");
    }
}
