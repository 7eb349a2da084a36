//! Deploying: `asya-host render k8s` (golden files, the Kubernetes API schemas offline, the
//! KEDA and Prometheus-operator objects structurally), the alert rules through `promtool`,
//! every dashboard query and alert signal against a real Prometheus scraping a local mesh,
//! and the `asya_actor_queue_depth` gauge against a real nats-server.
//!
//! Regenerate the golden files (host/tests/golden/render-k8s/, deploy/prometheus/) with
//! `ASYA_UPDATE_GOLDEN=1 cargo test -p asya-host --test deploy`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use asya_host::mesh::deploy::Scaling;
use asya_host::mesh::flowfile::FlowFile;
use asya_host::metrics::{Metrics, QueueLabel};
use asya_host::queue::{EndActors, QueueName};
use asya_host::render::{self, K8sOptions, Scaler};
use asya_host::transport::nats::{provision, NatsConfig, NatsTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::{free_port, http_get, plugin, poll_value, repo_root, NatsServer, Proc};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_asya-host");

fn reviews_flow() -> PathBuf {
    repo_root().join("examples/reviews/flow.toml")
}

fn update_golden() -> bool {
    std::env::var_os("ASYA_UPDATE_GOLDEN").is_some()
}

/// Compare `actual` with the golden file `path` (or rewrite it).
fn golden(path: &Path, actual: &str) {
    if update_golden() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (ASYA_UPDATE_GOLDEN=1 writes it)", path.display()));
    if want != actual {
        let line = want
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| want.lines().count().min(actual.lines().count()) + 1);
        panic!(
            "{} differs from the rendered output at line {line} (ASYA_UPDATE_GOLDEN=1 rewrites it after a deliberate change)",
            path.display()
        );
    }
}

fn run_render(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .current_dir(repo_root())
        .args(["render", "k8s"])
        .args(args)
        .output()
        .expect("run asya-host");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn render_k8s_matches_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let listed = run_render(&[
        "examples/reviews/flow.toml",
        "-o",
        dir.path().to_str().unwrap(),
    ]);
    let golden_dir = repo_root().join("host/tests/golden/render-k8s");
    // In the order printed (apply order).
    let mut files: Vec<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut stream = String::new();
    for f in &files {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        if f == render::monitoring::RULES_FILE {
            golden(&repo_root().join("deploy/prometheus").join(f), &text);
        } else {
            golden(&golden_dir.join(f), &text);
            stream.push_str(&text);
        }
    }
    files.sort();
    if !update_golden() {
        let mut want: Vec<String> = std::fs::read_dir(&golden_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        want.push(render::monitoring::RULES_FILE.into());
        want.sort();
        assert_eq!(files, want, "rendered files vs golden files");
    }
    // Without -o: the same objects as one stream, in the files' order.
    assert_eq!(run_render(&["examples/reviews/flow.toml"]), stream);
}

/// Parse a YAML stream with PyYAML and validate every core object against the Kubernetes
/// API schemas (kubernetes-validate, strict: unknown fields are errors).
fn python_validate(yaml: &str) -> (Vec<Value>, Vec<String>) {
    const SCRIPT: &str = r#"
import json, sys, yaml, kubernetes_validate
docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
errors = []
for d in docs:
    if d["apiVersion"] in ("keda.sh/v1alpha1", "monitoring.coreos.com/v1"):
        continue
    for version in ("1.28.0", "1.37.0"):
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except Exception as e:
            errors.append("%s %s (k8s %s): %s" % (d["kind"], d["metadata"]["name"], version, str(e).splitlines()[0]))
print(json.dumps({"docs": docs, "errors": errors}))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (kubernetes-validate is installed by .ci/setup)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "validation script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    (v["docs"].as_array().unwrap().clone(), errors)
}

fn objects(flow: &FlowFile, opts: &K8sOptions) -> Vec<Value> {
    render::k8s(flow, opts)
        .unwrap()
        .into_iter()
        .flat_map(|m| m.objects)
        .collect()
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_schemas() {
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    for scaler in [
        Scaler::NatsJetStream {
            monitoring_endpoint: "nats:8222".into(),
        },
        Scaler::Prometheus {
            server_address: "http://prometheus:9090".into(),
        },
    ] {
        let opts = K8sOptions {
            scaler,
            ..K8sOptions::new()
        };
        let manifests = render::k8s(&flow, &opts).unwrap();
        let yaml = render::to_stream(&manifests);
        let (docs, errors) = python_validate(&yaml);
        assert!(errors.is_empty(), "schema errors:\n{}", errors.join("\n"));
        // The YAML reads back (PyYAML) as exactly the objects that were built.
        assert_eq!(docs, objects(&flow, &opts));
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for k in [
            "Namespace",
            "Job",
            "ConfigMap",
            "Service",
            "Deployment",
            "ScaledObject",
            "PodMonitor",
            "ServiceMonitor",
            "PrometheusRule",
        ] {
            assert!(kinds.contains(&k), "no {k} in {kinds:?}");
        }
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e.get("value").cloned().unwrap_or(e["valueFrom"].clone()),
            )
        })
        .collect()
}

/// Do `selector`'s matchLabels / matchExpressions (In) select `labels`?
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .map(|m| m.iter().all(|(k, v)| &labels[k] == v))
        .unwrap_or(true);
    let by_exprs = selector["matchExpressions"]
        .as_array()
        .map(|es| {
            es.iter().all(|e| {
                assert_eq!(e["operator"], "In");
                e["values"]
                    .as_array()
                    .unwrap()
                    .contains(&labels[e["key"].as_str().unwrap()])
            })
        })
        .unwrap_or(true);
    by_labels && by_exprs
}

/// A sidecar sends the reports' token (the Secret's `report-token` key) and never holds
/// the clients' token: a leaked sidecar credential cannot submit or read tasks.
fn assert_report_token_only(env: &BTreeMap<String, Value>, who: &str) {
    assert_eq!(
        env["ASYA_GATEWAY_REPORT_TOKEN"]["secretKeyRef"],
        json!({"name": "asya-gateway", "key": "report-token"}),
        "{who}"
    );
    assert!(
        !env.contains_key("ASYA_GATEWAY_TOKEN"),
        "{who}: a sidecar must not hold the clients' token"
    );
}

#[test]
fn actor_pods_scaling_and_monitoring_objects_fit_together() {
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    let docs = objects(&flow, &K8sOptions::new());
    let pod_monitor = docs.iter().find(|d| d["kind"] == "PodMonitor").unwrap();
    assert_eq!(pod_monitor["apiVersion"], "monitoring.coreos.com/v1");
    for a in &flow.actors {
        let dep = find(&docs, "Deployment", &a.name);
        let pod = &dep["spec"]["template"];
        assert!(selects(
            &dep["spec"]["selector"],
            &pod["metadata"]["labels"]
        ));
        assert!(selects(
            &pod_monitor["spec"]["selector"],
            &pod["metadata"]["labels"]
        ));
        let spec = &pod["spec"];
        let containers = spec["containers"].as_array().unwrap();
        let runtime = &containers[0];
        let sidecar = &containers[1];
        assert_eq!(runtime["name"], "asya-runtime");
        assert_eq!(sidecar["name"], "asya-sidecar");
        // Seed 003's readiness probe on the runtime; the sidecar's own probes.
        assert_eq!(
            runtime["readinessProbe"]["exec"]["command"][2],
            "test -S /var/run/asya/asya-runtime.sock && test -f /var/run/asya/runtime-ready"
        );
        assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
        // Both mount the shared socket directory; the runtime file comes from the init
        // container, which copies it from our image.
        for c in [runtime, sidecar] {
            assert!(c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "asya-socket" && m["mountPath"] == "/var/run/asya"));
            assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        }
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
        assert_eq!(spec["initContainers"][0]["image"], sidecar["image"]);
        assert_eq!(
            runtime["command"][1],
            spec["initContainers"][0]["command"][2]
        );
        // The sidecar's variables parse as the sidecar would read them.
        let env = env_of(sidecar);
        assert_report_token_only(&env, &a.name);
        assert_eq!(env["ASYA_ACTOR_NAME"], a.name.as_str());
        assert_eq!(env["ASYA_NAMESPACE"], "reviews");
        assert_eq!(env["ASYA_CONCURRENCY"], a.concurrency.to_string().as_str());
        let grace = asya_host::config::parse_duration(env["ASYA_SHUTDOWN_GRACE"].as_str().unwrap())
            .unwrap();
        assert!(spec["terminationGracePeriodSeconds"].as_u64().unwrap() > grace.as_secs());
        if let Some(t) = a.timeout {
            let parsed = asya_host::config::parse_duration(
                env["ASYA_RESILIENCY_ACTOR_TIMEOUT"].as_str().unwrap(),
            )
            .unwrap();
            assert_eq!(parsed, t);
            assert!(grace > t, "the shutdown grace covers one call");
        }
        if !a.policies.is_empty() {
            let specs =
                asya_host::plugin::PolicySpec::parse(env["ASYA_ROUTE_POLICIES"].as_str().unwrap())
                    .unwrap();
            assert_eq!(specs.len(), a.policies.len());
            assert!(specs[0].path.starts_with("/opt/asya/plugins"));
            assert_eq!(specs[0].config, a.policies[0].config);
        }
        let renv = env_of(runtime);
        assert_eq!(renv["ASYA_HANDLER"], a.handler.as_str());
        for (k, v) in &a.env {
            assert_eq!(renv[k], v.as_str());
        }
        // KEDA: the Deployment, the stream and consumer `provision` creates.
        let scaled = docs
            .iter()
            .find(|d| d["kind"] == "ScaledObject" && d["metadata"]["name"] == a.name.as_str());
        match a.deploy.scaling {
            Scaling::Fixed(n) => {
                assert_eq!(dep["spec"]["replicas"], n);
                assert!(
                    scaled.is_none(),
                    "{}: fixed replicas, no ScaledObject",
                    a.name
                );
            }
            Scaling::Auto { min, max } => {
                let so = scaled.unwrap_or_else(|| panic!("no ScaledObject {}", a.name));
                assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
                assert_eq!(
                    so["spec"]["scaleTargetRef"]["name"],
                    dep["metadata"]["name"]
                );
                assert_eq!(so["spec"]["minReplicaCount"], min);
                assert_eq!(so["spec"]["maxReplicaCount"], max);
                assert!(dep["spec"].get("replicas").is_none(), "KEDA owns replicas");
                let t = &so["spec"]["triggers"][0];
                assert_eq!(t["type"], "nats-jetstream");
                assert_eq!(t["metadata"]["stream"], "asya-reviews");
                assert_eq!(t["metadata"]["consumer"], a.name.as_str());
                assert_eq!(t["metadata"]["natsServerMonitoringEndpoint"], "nats:8222");
                // KEDA reads trigger metadata as strings only.
                assert!(t["metadata"]
                    .as_object()
                    .unwrap()
                    .values()
                    .all(Value::is_string));
            }
        }
    }
    // The example scales to zero by default, caps aspects at 4 and pins tally to 1.
    assert_eq!(
        find(&docs, "ScaledObject", "parse")["spec"]["minReplicaCount"],
        0
    );
    assert_eq!(
        find(&docs, "ScaledObject", "aspects")["spec"]["maxReplicaCount"],
        4
    );
    assert_eq!(find(&docs, "Deployment", "tally")["spec"]["replicas"], 1);
    for end in ["x-sink", "x-sump"] {
        let dep = find(&docs, "Deployment", end);
        let containers = dep["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1, "end actors need no runtime");
        let env = env_of(&containers[0]);
        assert_eq!(env["ASYA_IS_END_ACTOR"], "true");
        assert_report_token_only(&env, end);
        assert!(selects(
            &pod_monitor["spec"]["selector"],
            &dep["spec"]["template"]["metadata"]["labels"]
        ));
    }
    // Gateway: flows from the ConfigMap, token from the Secret, Service and ServiceMonitor
    // pointing at its ports.
    let gw = find(&docs, "Deployment", "asya-gateway");
    let c = &gw["spec"]["template"]["spec"]["containers"][0];
    let env = env_of(c);
    // Both credentials, from separate keys of the Secret.
    assert_eq!(
        env["ASYA_GATEWAY_TOKEN"]["secretKeyRef"],
        json!({"name": "asya-gateway", "key": "token"})
    );
    assert_eq!(
        env["ASYA_GATEWAY_REPORT_TOKEN"]["secretKeyRef"],
        json!({"name": "asya-gateway", "key": "report-token"})
    );
    let cm = find(&docs, "ConfigMap", "asya-flows");
    let flows =
        asya_host::gateway::parse_flows(cm["data"]["flows.toml"].as_str().unwrap()).unwrap();
    assert_eq!(flows, flow.flows);
    // The gateway's /mcp shows the flows' descriptions and input schemas there too.
    let docs_of_flows =
        asya_host::gateway::mcp::parse_flow_docs(cm["data"]["flows.toml"].as_str().unwrap())
            .unwrap();
    assert_eq!(docs_of_flows, flow.flow_docs);
    assert_eq!(docs_of_flows.len(), 2);
    let svc = find(&docs, "Service", "asya-gateway");
    let pod_labels = &gw["spec"]["template"]["metadata"]["labels"];
    assert!(svc["spec"]["selector"]
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &pod_labels[k] == v));
    let sm = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    assert!(selects(&sm["spec"]["selector"], &svc["metadata"]["labels"]));
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == port));
    // The provisioning Job runs `asya-host provision` for every actor.
    let job = docs.iter().find(|d| d["kind"] == "Job").unwrap();
    let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "provision");
    assert_eq!(args[4], "parse,sentiment,escalate,aspects,tally");
    // The PrometheusRule carries the same groups as the plain rules file.
    let rule = docs.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    assert_eq!(rule["spec"], render::monitoring::rules_file(&flow));
}

#[test]
fn prometheus_scaler_reads_our_gauge() {
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    let opts = K8sOptions {
        scaler: Scaler::Prometheus {
            server_address: "http://prometheus:9090".into(),
        },
        ..K8sOptions::new()
    };
    let docs = objects(&flow, &opts);
    let so = find(&docs, "ScaledObject", "parse");
    let t = &so["spec"]["triggers"][0];
    assert_eq!(t["type"], "prometheus");
    assert_eq!(
        t["metadata"]["query"],
        "max(asya_actor_queue_depth{queue=\"asya-reviews-parse\"})"
    );
    assert_eq!(t["metadata"]["serverAddress"], "http://prometheus:9090");
}

#[test]
fn deploy_keys_shape_the_manifests_and_a_missing_image_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flow.toml");
    std::fs::write(
        &path,
        r#"namespace = "shop"
[actors.a]
handler = "m.f"
image = "reg.example/a:1"
replicas = 3
resources = { requests = { cpu = "250m" }, limits = { memory = "1Gi", "nvidia.com/gpu" = "1" } }
[actors.b]
handler = "m.g"
min = 2
max = 7
non_retryable_errors = ["ValueError", "KeyError"]
backoff_initial = "2s"
backoff_multiplier = 3
[flows]
f = ["a", "b"]
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["render", "k8s"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("actor b has no runtime image"), "{err}");
    let flow = FlowFile::load(&path).unwrap();
    let opts = K8sOptions {
        namespace: Some("prod".into()),
        runtime_image: Some("reg.example/default:2".into()),
        ..K8sOptions::new()
    };
    let docs = objects(&flow, &opts);
    assert!(docs
        .iter()
        .all(|d| d["kind"] == "Namespace" || d["metadata"]["namespace"] == "prod"));
    let a = find(&docs, "Deployment", "a");
    assert_eq!(a["spec"]["replicas"], 3);
    let rt = &a["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(rt["image"], "reg.example/a:1");
    assert_eq!(rt["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(rt["resources"]["requests"]["cpu"], "250m");
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "ScaledObject" && d["metadata"]["name"] == "a"));
    let b = find(&docs, "Deployment", "b");
    assert_eq!(
        b["spec"]["template"]["spec"]["containers"][0]["image"],
        "reg.example/default:2"
    );
    // The flow file's resiliency keys reach the sidecar as the variables it reads.
    let benv = env_of(&b["spec"]["template"]["spec"]["containers"][1]);
    assert_eq!(
        benv["ASYA_RESILIENCY_NON_RETRYABLE_ERRORS"],
        "ValueError,KeyError"
    );
    assert_eq!(
        asya_host::config::parse_duration(
            benv["ASYA_RESILIENCY_BACKOFF_INITIAL"].as_str().unwrap()
        )
        .unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(benv["ASYA_RESILIENCY_BACKOFF_MULTIPLIER"], "3");
    // Both containers run as uid 10001: the socket is not world-writable.
    assert_eq!(
        env_of(&b["spec"]["template"]["spec"]["containers"][0])["ASYA_SOCKET_CHMOD"],
        "0o660"
    );
    let so = find(&docs, "ScaledObject", "b");
    assert_eq!(so["spec"]["minReplicaCount"], 2);
    assert_eq!(so["spec"]["maxReplicaCount"], 7);
    let (_, errors) = python_validate(&render::to_stream(&render::k8s(&flow, &opts).unwrap()));
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn promtool_accepts_the_rules() {
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yml");
    std::fs::write(
        &file,
        render::yaml::to_yaml(&render::monitoring::rules_file(&flow)),
    )
    .unwrap();
    for f in [
        file,
        repo_root().join("deploy/prometheus/asya-alerts.rules.yml"),
    ] {
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&f)
            .output()
            .expect("promtool (installed by .ci/setup)");
        assert!(
            out.status.success(),
            "promtool check rules {}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Each alert expression fires on the series it is about and stays quiet otherwise
/// (`promtool test rules`, synthetic series at one-minute steps).
#[test]
fn alert_expressions_fire_on_their_conditions() {
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    let alerts = render::monitoring::alerts(&flow);
    let expr = |name: &str, actor: Option<&str>| -> String {
        alerts
            .iter()
            .find(|a| {
                a.name == name
                    && actor.is_none_or(|x| a.expr.contains(&format!("asya-reviews-{x}\"")))
            })
            .unwrap_or_else(|| panic!("no alert {name}"))
            .expr
            .clone()
    };
    let series = |s: &str, v: &str| serde_json::json!({"series": s, "values": v});
    // (what, input series, expression that must yield exactly one sample)
    let fires = |input: Vec<Value>, e: String| {
        serde_json::json!({"interval": "1m", "input_series": input, "promql_expr_test": [
            {"expr": format!("count({e})"), "eval_time": "30m", "exp_samples": [{"labels": "{}", "value": 1}]}
        ]})
    };
    let quiet = |input: Vec<Value>, e: String| {
        serde_json::json!({"interval": "1m", "input_series": input, "promql_expr_test": [
            {"expr": format!("absent({e})"), "eval_time": "30m", "exp_samples": [{"labels": "{}", "value": 1}]}
        ]})
    };
    let sump = r#"asya_actor_messages_sent_total{message_type="sump", destination_queue="asya-reviews-x-sump"}"#;
    let failed =
        r#"asya_actor_messages_failed_total{queue="asya-reviews-parse", reason="runtime_error"}"#;
    let received =
        r#"asya_actor_messages_received_total{queue="asya-reviews-parse", transport="nats"}"#;
    let bucket = |le: &str| {
        format!(
            r#"asya_actor_processing_duration_seconds_bucket{{queue="asya-reviews-parse", le="{le}"}}"#
        )
    };
    let depth = r#"asya_actor_queue_depth{queue="asya-reviews-aspects"}"#;
    let active = |pod: &str| {
        format!(r#"asya_actor_active_messages{{queue="asya-reviews-aspects", pod="{pod}"}}"#)
    };
    let tests = vec![
        fires(vec![series(sump, "0+1x40")], expr("AsyaSumpGrowing", None)),
        quiet(vec![series(sump, "3x40")], expr("AsyaSumpGrowing", None)),
        fires(
            vec![series(failed, "0+1x40"), series(received, "0+10x40")],
            expr("AsyaErrorRatioHigh", None),
        ),
        quiet(
            vec![series(failed, "0+1x40"), series(received, "0+100x40")],
            expr("AsyaErrorRatioHigh", None),
        ),
        fires(
            vec![
                series(&bucket("1"), "0x40"),
                series(&bucket("30"), "0+1x40"),
                series(&bucket("+Inf"), "0+1x40"),
            ],
            expr("AsyaProcessingSlow", None),
        ),
        quiet(
            vec![
                series(&bucket("1"), "0+1x40"),
                series(&bucket("30"), "0+1x40"),
                series(&bucket("+Inf"), "0+1x40"),
            ],
            expr("AsyaProcessingSlow", None),
        ),
        fires(
            vec![series(r#"asya_actor_ready{check="transport"}"#, "0x40")],
            expr("AsyaSidecarNotReady", None),
        ),
        quiet(
            vec![series(r#"asya_actor_ready{check="transport"}"#, "1x40")],
            expr("AsyaSidecarNotReady", None),
        ),
        // aspects: max 4 replicas, concurrency 1 -> backlog above 40 with 4 replicas running.
        fires(
            vec![
                series(depth, "100x40"),
                series(&active("a"), "1x40"),
                series(&active("b"), "1x40"),
                series(&active("c"), "1x40"),
                series(&active("d"), "1x40"),
            ],
            expr("AsyaQueueAtMaxReplicas", Some("aspects")),
        ),
        quiet(
            vec![
                series(depth, "100x40"),
                series(&active("a"), "1x40"),
                series(&active("b"), "1x40"),
                series(&active("c"), "1x40"),
            ],
            expr("AsyaQueueAtMaxReplicas", Some("aspects")),
        ),
        quiet(
            vec![
                series(depth, "30x40"),
                series(&active("a"), "1x40"),
                series(&active("b"), "1x40"),
                series(&active("c"), "1x40"),
                series(&active("d"), "1x40"),
            ],
            expr("AsyaQueueAtMaxReplicas", Some("aspects")),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alerts.test.yml");
    std::fs::write(
        &file,
        render::yaml::to_yaml(&serde_json::json!({"evaluation_interval": "1m", "tests": tests})),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (installed by .ci/setup)");
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `/api/v1/query` of a Prometheus on `port` → the result vector.
fn prom_query(port: u16, q: &str) -> Result<Vec<Value>, String> {
    let mut enc = String::new();
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    let (status, body) =
        http_get(port, &format!("/api/v1/query?query={enc}")).ok_or("no answer")?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{q}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn send_task(gateway: u16, payload: &str) {
    let out = Command::new(BIN)
        .args(["send", "reviews", payload, "--wait", "--timeout", "60s"])
        .arg("--gateway")
        .arg(format!("http://127.0.0.1:{gateway}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"succeeded\"") || text.contains("\"failed\""),
        "task not final: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every dashboard query and every alert's signals return series from a real Prometheus
/// scraping `asya-host up` (after traffic, including one failing review); every rule
/// evaluates without error.
#[test]
fn dashboard_queries_and_alerts_return_series_from_a_real_prometheus() {
    plugin("priority_router");
    let flow = FlowFile::load(&reviews_flow()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (metrics, gateway, prom) = (free_port(), free_port(), free_port());
    let up = Proc(
        Command::new(BIN)
            .current_dir(repo_root())
            .args(["up", "examples/reviews/flow.toml"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--gateway-addr")
            .arg(format!("127.0.0.1:{gateway}"))
            .env_remove("ASYA_GATEWAY_TOKEN")
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
    let rules = dir.path().join("rules.yml");
    std::fs::write(
        &rules,
        render::yaml::to_yaml(&render::monitoring::rules_file(&flow)),
    )
    .unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: asya\n    static_configs:\n      - targets: [\"127.0.0.1:{metrics}\"]\n",
            rules.display()
        ),
    )
    .unwrap();
    let _prom = Proc(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (installed by .ci/setup)"),
    );
    poll_value(
        "prometheus is ready",
        Duration::from_secs(60),
        || match http_get(prom, "/-/ready") {
            Some((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Traffic: a few reviews (one angry: escalate), one invalid rating (x-sump).
    for p in [
        r#"{"id": "p1", "product": "X", "rating": 5, "text": "Great sound, love it."}"#,
        r#"{"id": "p2", "product": "X", "rating": 1, "text": "Terrible, it broke. I want a refund."}"#,
        r#"{"id": "p3", "product": "X", "rating": 9, "text": "out of range"}"#,
    ] {
        send_task(gateway, p);
    }
    let mut queries: Vec<(String, String)> = render::monitoring::dashboard_queries()
        .into_iter()
        .map(|(title, q)| (format!("dashboard panel {title:?}"), q))
        .collect();
    assert!(queries.len() >= 6);
    for a in render::monitoring::alerts(&flow) {
        // The whole rule must be a valid query (empty while not firing)...
        prom_query(prom, &a.expr).unwrap_or_else(|e| panic!("alert {}: {e}", a.name));
        // ...and every metric it reads must have series.
        for s in a.signals {
            queries.push((format!("alert {}", a.name), s));
        }
    }
    poll_value(
        "every dashboard query and alert signal has series",
        Duration::from_secs(90),
        || {
            let missing: Vec<String> = queries
                .iter()
                .filter(|(_, q)| prom_query(prom, q).map(|r| r.is_empty()).unwrap_or(true))
                .map(|(who, q)| format!("{who}: {q}"))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing.join("; "))
            }
        },
    );
    // Every rule was evaluated by Prometheus without an error.
    poll_value("every rule evaluated", Duration::from_secs(30), || {
        let (_, body) = http_get(prom, "/api/v1/rules").ok_or("no answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        let bad: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if rules.len() == render::monitoring::alerts(&flow).len() && bad.is_empty() {
            Ok(())
        } else {
            Err(format!("{} rules, not ok: {bad:?}", rules.len()))
        }
    });
    drop(up);
}

fn depth_line(body: &str, queue: &str) -> Option<u64> {
    let prefix = format!("asya_actor_queue_depth{{queue=\"{queue}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn nats_cfg(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        ack_wait: Duration::from_secs(30),
        duplicate_window: Duration::from_secs(60),
        ..NatsConfig::new(&server.url())
    }
}

async fn publish(t: &NatsTransport, queue: &QueueName, n: usize) {
    let msgs = (0..n)
        .map(|i| OutMessage {
            queue: queue.clone(),
            id: format!("m{i}"),
            body: bytes::Bytes::from(format!("{{\"i\": {i}}}")),
        })
        .collect();
    t.send_all(msgs).await.unwrap();
}

/// The gauge is the consumer's pending + ack-pending: N published and not consumed → N;
/// some delivered and unacked → still N (split between the two counts); all acked → 0.
#[tokio::test]
async fn queue_depth_is_pending_plus_ack_pending() {
    let server = NatsServer::start();
    let t = NatsTransport::connect(nats_cfg(&server)).await.unwrap();
    let queue = QueueName::new("qd", "work").unwrap();
    assert_eq!(
        t.queue_depth(&queue).await.unwrap(),
        None,
        "no consumer yet"
    );
    provision(
        nats_cfg(&server),
        "qd",
        &["work".into()],
        &EndActors::default(),
    )
    .await
    .unwrap();
    assert_eq!(t.queue_depth(&queue).await.unwrap(), Some(0));
    publish(&t, &queue, 7).await;
    let metrics = Metrics::new("asya_actor");
    let gauge = || {
        metrics
            .queue_depth
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .get()
    };
    asya_host::queue_depth::refresh(&t, &metrics, std::slice::from_ref(&queue)).await;
    assert_eq!(gauge(), 7);
    assert!(metrics
        .encode()
        .contains("asya_actor_queue_depth{queue=\"asya-qd-work\"} 7"));
    // Three delivered, not acked: 4 pending + 3 ack-pending.
    let mut rx = t.subscribe(&queue, 3).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(rx.recv().await.unwrap());
    }
    let js = async_nats::jetstream::new(t.client().clone());
    let info = js
        .get_stream("asya-qd")
        .await
        .unwrap()
        .consumer_info("work")
        .await
        .unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (4, 3));
    asya_host::queue_depth::refresh(&t, &metrics, std::slice::from_ref(&queue)).await;
    assert_eq!(gauge(), 7);
    for d in held {
        d.acker.ack().await.unwrap();
    }
    for _ in 0..4 {
        rx.recv().await.unwrap().acker.ack().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        asya_host::queue_depth::refresh(&t, &metrics, std::slice::from_ref(&queue)).await;
        if gauge() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "depth stuck at {}", gauge());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real binaries: a sidecar whose runtime never comes (so nothing consumes) and the
/// gateway both export the depth of the actor's queue: N, then 0 once drained.
#[tokio::test]
async fn sidecar_and_gateway_export_the_queue_depth() {
    let server = NatsServer::start();
    let ns = "qe";
    let qn = QueueName::new(ns, "slow").unwrap();
    let queue: &'static str = "asya-qe-slow";
    assert_eq!(qn.as_str(), queue);
    provision(
        nats_cfg(&server),
        ns,
        &["slow".into()],
        &EndActors::default(),
    )
    .await
    .unwrap();
    let t = NatsTransport::connect(nats_cfg(&server)).await.unwrap();
    publish(&t, &qn, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows.toml");
    std::fs::write(&flows, "[flows]\nf = [\"slow\"]\n").unwrap();
    let (sidecar_admin, gw_admin, gw_port) = (free_port(), free_port(), free_port());
    let _sidecar = Proc(
        Command::new(BIN)
            .arg("sidecar")
            .env("ASYA_ACTOR_NAME", "slow")
            .env("ASYA_NAMESPACE", ns)
            .env("ASYA_NATS_URL", server.url())
            .env("ASYA_SOCKET_DIR", dir.path())
            .env("ASYA_METRICS_ADDR", format!("127.0.0.1:{sidecar_admin}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _gateway = Proc(
        Command::new(BIN)
            .arg("gateway")
            .env("ASYA_NAMESPACE", ns)
            .env("ASYA_NATS_URL", server.url())
            .env("ASYA_GATEWAY_ADDR", format!("127.0.0.1:{gw_port}"))
            .env("ASYA_GATEWAY_FLOWS", &flows)
            .env("ASYA_METRICS_ADDR", format!("127.0.0.1:{gw_admin}"))
            .env_remove("ASYA_GATEWAY_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wait_depth = |port: u16, q: &str, want: u64| {
        poll_value(
            &format!("depth of {q} on :{port} = {want}"),
            Duration::from_secs(30),
            || {
                let (_, body) = http_get(port, "/metrics").ok_or("no answer")?;
                match depth_line(&body, q) {
                    Some(n) if n == want => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
    };
    tokio::task::spawn_blocking(move || {
        wait_depth(sidecar_admin, queue, 5);
        wait_depth(gw_admin, queue, 5);
        wait_depth(gw_admin, "asya-qe-x-sump", 0);
    })
    .await
    .unwrap();
    // Drain it (the sidecar never consumes: its runtime never became ready).
    let mut rx = t.subscribe(&qn, 5).await.unwrap();
    for _ in 0..5 {
        rx.recv().await.unwrap().acker.ack().await.unwrap();
    }
    tokio::task::spawn_blocking(move || {
        wait_depth(sidecar_admin, queue, 0);
        wait_depth(gw_admin, queue, 0);
    })
    .await
    .unwrap();
}

/// Scale from zero: with no sidecar running at all, the gateway alone exports the depth of
/// every actor of its flows (and of the end actors), and nothing for a queue outside them.
#[tokio::test]
async fn gateway_exports_every_flow_actors_depth_with_no_sidecar_running() {
    let server = NatsServer::start();
    let ns = "qz";
    let actors = ["first", "second", "outside"];
    provision(
        nats_cfg(&server),
        ns,
        &actors.map(String::from),
        &EndActors::default(),
    )
    .await
    .unwrap();
    let t = NatsTransport::connect(nats_cfg(&server)).await.unwrap();
    // One stream per namespace deduplicates by message id: ids distinct across queues.
    for (actor, n) in [("first", 3), ("second", 2), ("outside", 4)] {
        let queue = QueueName::new(ns, actor).unwrap();
        let msgs = (0..n)
            .map(|i| OutMessage {
                queue: queue.clone(),
                id: format!("{actor}-{i}"),
                body: bytes::Bytes::from(format!("{{\"i\": {i}}}")),
            })
            .collect();
        t.send_all(msgs).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows.toml");
    std::fs::write(
        &flows,
        "[flows]\none = [\"first\", \"second\"]\ntwo = [\"second\"]\n",
    )
    .unwrap();
    let (gw_admin, gw_port) = (free_port(), free_port());
    let _gateway = Proc(
        Command::new(BIN)
            .arg("gateway")
            .env("ASYA_NAMESPACE", ns)
            .env("ASYA_NATS_URL", server.url())
            .env("ASYA_GATEWAY_ADDR", format!("127.0.0.1:{gw_port}"))
            .env("ASYA_GATEWAY_FLOWS", &flows)
            .env("ASYA_METRICS_ADDR", format!("127.0.0.1:{gw_admin}"))
            .env_remove("ASYA_GATEWAY_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let body = tokio::task::spawn_blocking(move || {
        poll_value(
            "the gateway's depth of every flow actor",
            Duration::from_secs(30),
            || {
                let (_, body) = http_get(gw_admin, "/metrics").ok_or("no answer")?;
                let got: Vec<Option<u64>> = [
                    "asya-qz-first",
                    "asya-qz-second",
                    "asya-qz-x-sink",
                    "asya-qz-x-sump",
                ]
                .iter()
                .map(|q| depth_line(&body, q))
                .collect();
                if got == [Some(3), Some(2), Some(0), Some(0)] {
                    Ok(body)
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
    })
    .await
    .unwrap();
    assert_eq!(
        depth_line(&body, "asya-qz-outside"),
        None,
        "a queue outside the gateway's flows has no series"
    );
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("asya_actor_queue_depth{"))
            .count(),
        4,
        "{body}"
    );
}
