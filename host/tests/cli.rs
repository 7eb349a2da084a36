//! The binary's configuration errors: one line naming the variable, non-zero exit.

use std::process::Command;

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
