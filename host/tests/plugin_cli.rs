//! `asya-host plugin test` through the real binary with misbehaving components: what the
//! transport sandbox refuses (an address outside the allow-list, a name lookup the list
//! does not grant) is said in one line naming `ASYA_TRANSPORT_ALLOW` / `--allow`, and a
//! route policy is recognised as one.

use std::net::TcpListener;
use std::process::Command;

use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_test_support::plugin;

/// `asya-host plugin test FILE --config CONFIG [--allow ALLOW]`: (success, stdout, stderr).
fn plugin_test(file: &str, config: &str, allow: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_asya-host"));
    cmd.args(["plugin", "test"])
        .arg(plugin(file))
        .args(["--config", config]);
    if let Some(a) = allow {
        cmd.args(["--allow", a]);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_transport_dial_outside_the_allow_list_names_the_variable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = serde_json::json!({ "addr": addr }).to_string();
    // Nothing allowed, or another port: refused, and the error says by whom and where.
    for allow in [None, Some("127.0.0.1:1")] {
        let (ok, _, err) = plugin_test("test_transport_dial", &config, allow);
        assert!(!ok, "{allow:?}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("the host refused a connection to {addr}")),
            "{err}"
        );
        assert!(err.contains("ASYA_TRANSPORT_ALLOW"), "{err}");
        assert!(err.contains("--allow"), "{err}");
    }
}

#[test]
fn test_transport_resolve_may_look_up_only_allowed_names() {
    // `vm`, `runsc` and `localhost` resolve from /etc/hosts on the test machines; any name
    // outside the list must be refused before a query is made.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let other = ["vm", "runsc", "ip6-localhost", "ip6-loopback"]
        .into_iter()
        .find(|n| hosts.split_whitespace().any(|w| w == *n))
        .unwrap_or("example.com");
    let allow = Some("localhost:6379");
    // The listed name (in any case) and an address literal resolve.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let list = AllowList::parse("localhost:6379").await.unwrap();
        let cfg = WasmConfig::new(
            plugin("test_transport_resolve"),
            r#"{"names": ["localhost", "LocalHost", "127.0.0.1"]}"#,
            list,
        );
        if let Err(e) = WasmTransport::connect(cfg).await {
            panic!("listed names resolve: {e}");
        }
    });
    // Another name is refused, and the error says so.
    let config = serde_json::json!({ "names": ["localhost", other] }).to_string();
    let (ok, _, err) = plugin_test("test_transport_resolve", &config, allow);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("lookup of {other} failed")), "{err}");
    assert!(
        err.contains(&format!("the host refused a lookup of \"{other}\"")),
        "{err}"
    );
    assert!(err.contains("ASYA_TRANSPORT_ALLOW"), "{err}");
}

#[test]
fn plugin_test_on_a_route_policy_says_it_is_a_policy() {
    let (ok, _, err) = plugin_test("priority_router", "{}", None);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("priority_router.wasm"), "{err}");
    assert!(err.contains("is a route policy"), "{err}");
    assert!(err.contains("plugin check"), "{err}");
}
