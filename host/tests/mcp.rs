//! MCP at the gateway's `/mcp`, driven by the official Python `mcp` client package
//! (`tests/fixtures/mcp_client.py`) against `asya-host up examples/reviews/flow.toml`: the
//! flows are the tools (descriptions and input schemas from the flow file), a call returns
//! its result with progress on the way, a bad argument is a tool error, a slow flow goes
//! through the task form (task id, `tasks/get`) to completion, `tasks/cancel` ends in
//! `cancelled`, a call the client gives up on cancels its task, and `/mcp` takes the task
//! API's bearer token.

use std::process::{Command, Stdio};
use std::time::Duration;

use asya_test_support::{free_port, http_get, plugin, poll_value, repo_root, wait_output, Proc};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");
const TOKEN: &str = "mcp-test-token";

#[test]
fn mcp_client_lists_calls_waits_for_and_cancels_flows() {
    plugin("priority_router");
    let (gateway, metrics) = (free_port(), free_port());
    let mut up = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("ASYA_") || k == "PYTHONPATH" {
            up.env_remove(k);
        }
    }
    let _up = Proc(
        up.current_dir(repo_root())
            .args(["up", "examples/reviews/flow.toml"])
            .arg("--gateway-addr")
            .arg(format!("127.0.0.1:{gateway}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .env("ASYA_GATEWAY_TOKEN", TOKEN)
            // Short, so that the 6 s ticket call goes through the task form.
            .env("ASYA_GATEWAY_MCP_WAIT", "3s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    poll_value(
        "the mesh is ready",
        Duration::from_secs(60),
        || match http_get(metrics, "/readyz") {
            Some((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    let client = Command::new("python3")
        .arg(repo_root().join("tests/fixtures/mcp_client.py"))
        .arg(format!("http://127.0.0.1:{gateway}/mcp"))
        .arg(TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(client, Duration::from_secs(50));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mcp_client.py failed (the `mcp` package is installed by .ci/setup):\n{stderr}"
    );
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    // The same bearer token as the task API.
    assert_eq!(seen["status_without_token"], 401, "{seen}");
    assert_eq!(seen["status_wrong_token"], 401, "{seen}");

    // Tools = flows, with the flow file's descriptions and input schemas.
    let tools = seen["tools"].as_object().unwrap();
    let mut names: Vec<&str> = tools.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["reviews", "ticket"]);
    assert!(
        tools["reviews"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Analyses one product review"),
        "{seen}"
    );
    assert_eq!(
        tools["reviews"]["input_schema"]["required"],
        json!(["text"])
    );
    assert_eq!(
        tools["reviews"]["input_schema"]["properties"]["rating"]["type"],
        "integer"
    );
    assert_eq!(tools["ticket"]["input_schema"]["required"], json!(["id"]));

    // A call within the bound: the flow's result (one record per aspect), with progress
    // from the hop reports on the way.
    let reviews = &seen["reviews"];
    assert_eq!(reviews["is_error"], false, "{seen}");
    let records = reviews["structured"]["result"].as_array().expect("a list");
    let mut aspects: Vec<&str> = records
        .iter()
        .map(|r| r["aspect"].as_str().unwrap())
        .collect();
    aspects.sort();
    assert_eq!(aspects, ["battery", "sound"], "{seen}");
    assert!(records.iter().all(|r| r["review"] == "m1"), "{seen}");
    let text: Value = serde_json::from_str(reviews["text"].as_str().unwrap()).unwrap();
    assert_eq!(&text, &reviews["structured"]["result"]);
    let progress = seen["reviews_progress"].as_array().unwrap();
    assert!(progress.len() >= 2, "{seen}");
    let values: Vec<f64> = progress
        .iter()
        .map(|p| p["progress"].as_f64().unwrap())
        .collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    assert!(
        progress
            .iter()
            .any(|p| p["message"].as_str().unwrap().contains("at sentiment")),
        "{seen}"
    );

    // A bad argument: a tool error naming it.
    assert_eq!(seen["bad_argument"]["is_error"], true, "{seen}");
    assert!(
        seen["bad_argument"]["text"]
            .as_str()
            .unwrap()
            .contains("\"text\" is a required property"),
        "{seen}"
    );

    // The slow flow: the task form after the 3 s bound, then completed with its result.
    let answered = seen["slow_answered_after_s"].as_f64().unwrap();
    assert!((2.5..5.0).contains(&answered), "{answered}");
    assert_eq!(seen["slow_created"]["status"], "working", "{seen}");
    let fin = &seen["slow_final"];
    assert_eq!(fin["status"], "completed", "{seen}");
    assert!(fin["seen"].as_array().unwrap().contains(&json!("working")));
    assert_eq!(fin["result"]["isError"], false, "{seen}");
    assert_eq!(fin["result"]["structuredContent"]["id"], "m3");
    assert!(fin["result"]["structuredContent"]["ticket"]
        .as_str()
        .unwrap()
        .starts_with("T-"));
    assert_eq!(seen["slow_created"]["gateway_status"], "succeeded");

    // Cancel: the MCP task and the gateway task.
    assert_eq!(seen["cancelled"]["status"], "cancelled", "{seen}");
    assert_eq!(seen["cancelled"]["gateway_status"], "canceled", "{seen}");
    // A call the client gave up on (its read timeout) cancelled its task too.
    assert_eq!(seen["abandoned"], "MCPError", "{seen}");
    assert_eq!(seen["canceled_ticket_tasks"], 2, "{seen}");
}
