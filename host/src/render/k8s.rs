//! The Kubernetes objects of a flow (see README "Deploying on Kubernetes").
//!
//! Per actor, a Deployment of one pod with two containers sharing an `emptyDir` at
//! `/var/run/asya`: `asya-runtime` (the actor's image running the stock runtime) and
//! `asya-sidecar` (our image). The runtime file is copied from our image by an init
//! container, not shipped in a ConfigMap: the runtime then always comes from the same
//! image as the sidecar that speaks to it (one version to upgrade, no manifest to
//! re-render when it changes), and the manifests stay small.

use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest;

use super::monitoring;
use super::queue_name;
use super::{K8sOptions, Manifest, RenderError, Scaler};
use crate::mesh::deploy::Scaling;
use crate::mesh::flowfile::{ActorSpec, FlowFile};

/// Where runtime and sidecar meet (socket and ready file), as in seed 003.
pub const SOCKET_DIR: &str = "/var/run/asya";
/// Where the init container puts the runtime file in the runtime container.
pub const RUNTIME_DIR: &str = "/opt/asya-runtime";
/// The runtime file inside our image.
pub const RUNTIME_IN_IMAGE: &str = "/opt/asya/asya_runtime.py";
/// Stock plugins inside our image.
pub const PLUGINS_IN_IMAGE: &str = "/opt/asya/plugins";
/// Admin port of sidecars and the gateway (`/metrics`, `/healthz`, `/readyz`).
pub const ADMIN_PORT: u16 = 8080;
/// Task API port of the gateway.
pub const GATEWAY_PORT: u16 = 8090;
/// The gateway's Deployment and Service.
pub const GATEWAY: &str = "asya-gateway";
/// The Secret (created by the operator) holding the gateway's two credentials: the
/// clients' token under key [`TOKEN_KEY`] (the gateway only) and the sidecars' report
/// token under key [`REPORT_TOKEN_KEY`] (the gateway and every sidecar). Sidecars never hold
/// the clients' token.
pub const GATEWAY_SECRET: &str = "asya-gateway";
/// Key of `ASYA_GATEWAY_TOKEN` in [`GATEWAY_SECRET`].
pub const TOKEN_KEY: &str = "token";
/// Key of `ASYA_GATEWAY_REPORT_TOKEN` in [`GATEWAY_SECRET`].
pub const REPORT_TOKEN_KEY: &str = "report-token";
/// An optional Secret whose keys become environment variables of everything that connects
/// to NATS (`ASYA_NATS_USER`, `ASYA_NATS_PASSWORD`, `ASYA_NATS_TOKEN`, ...).
pub const NATS_SECRET: &str = "asya-nats";
/// ConfigMap of the gateway's flows.
pub const FLOWS_CONFIGMAP: &str = "asya-flows";
/// The uid/gid of the image's `asya` user.
pub const UID: u64 = 10001;
/// Default `ASYA_SHUTDOWN_GRACE` of the sidecar.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Time on top of the shutdown grace before the kubelet kills the pod: the runtime's
/// pre-stop wait and exit.
const KILL_MARGIN_SECS: u64 = 15;
/// Messages per replica the autoscaler aims at, per unit of concurrency.
pub const LAG_PER_SLOT: u64 = 10;

fn labels(ns: &str, component: &str, instance: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "asya",
        "app.kubernetes.io/part-of": format!("asya-{ns}"),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/managed-by": "asya-host",
    })
}

fn metadata(name: &str, k8s_ns: &str, labels: &Value) -> Value {
    json!({"name": name, "namespace": k8s_ns, "labels": labels})
}

fn env(name: &str, value: impl Into<String>) -> Value {
    json!({"name": name, "value": value.into()})
}

fn secret_env(name: &str, key: &str) -> Value {
    json!({
        "name": name,
        "valueFrom": {"secretKeyRef": {"name": GATEWAY_SECRET, "key": key}},
    })
}

/// The clients' token: the gateway only.
fn token_env() -> Value {
    secret_env("ASYA_GATEWAY_TOKEN", TOKEN_KEY)
}

/// The reports' token: the gateway checks it, sidecars send it.
fn report_token_env() -> Value {
    secret_env("ASYA_GATEWAY_REPORT_TOKEN", REPORT_TOKEN_KEY)
}

fn nats_env_from() -> Value {
    json!([{"secretRef": {"name": NATS_SECRET, "optional": true}}])
}

fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn scrape_annotations() -> Value {
    json!({
        "prometheus.io/scrape": "true",
        "prometheus.io/port": ADMIN_PORT.to_string(),
        "prometheus.io/path": "/metrics",
    })
}

/// `10000ms`: exact, and what `parse_duration` reads back.
fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn sidecar_resources() -> Value {
    // Measured: 12.6 MB RSS idle, 13.8 MB after 10,000 envelopes (no policies); route
    // policies add their instance pools.
    json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}})
}

/// The sidecar container of an actor or an end actor.
fn sidecar_container(
    flow: &FlowFile,
    opts: &K8sOptions,
    actor: &str,
    extra_env: Vec<Value>,
    grace: Duration,
) -> Value {
    let mut e = vec![
        env("ASYA_ACTOR_NAME", actor),
        env("ASYA_NAMESPACE", &flow.namespace),
        env("ASYA_TRANSPORT", "nats"),
        env("ASYA_NATS_URL", &opts.nats_url),
        env("ASYA_SOCKET_DIR", SOCKET_DIR),
        env("ASYA_METRICS_ADDR", format!(":{ADMIN_PORT}")),
        env("ASYA_SHUTDOWN_GRACE", millis(grace)),
        env(
            "ASYA_GATEWAY_URL",
            format!("http://{GATEWAY}:{GATEWAY_PORT}"),
        ),
        report_token_env(),
        env("ASYA_LOG_FORMAT", "json"),
    ];
    e.extend(extra_env);
    json!({
        "name": "asya-sidecar",
        "image": opts.image,
        "args": ["sidecar"],
        "env": e,
        "envFrom": nats_env_from(),
        "ports": [{"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "admin"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "admin"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "resources": sidecar_resources(),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "asya-socket", "mountPath": SOCKET_DIR},
            // Compiled plugins are cached here (ASYA_PLUGIN_CACHE_DIR of the image).
            {"name": "plugin-cache", "mountPath": "/home/asya/.cache"},
        ],
    })
}

/// `ASYA_ROUTE_POLICIES` for the image: each policy by its file name in the image's
/// plugin directory.
fn policies_env(a: &ActorSpec) -> Option<Value> {
    if a.policies.is_empty() {
        return None;
    }
    let items: Vec<Value> = a
        .policies
        .iter()
        .map(|p| {
            let file = p
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            json!({"path": format!("{PLUGINS_IN_IMAGE}/{file}"), "config": p.config})
        })
        .collect();
    Some(env("ASYA_ROUTE_POLICIES", Value::Array(items).to_string()))
}

/// Waits (bounded) until the sidecar's admin port is closed, i.e. the sidecar finished its
/// in-flight envelopes and exited, so the runtime is stopped last. Python is the one tool
/// every runtime image has.
fn pre_stop(grace: Duration) -> Value {
    let script = format!(
        "import socket, time\n\
         end = time.time() + {secs}\n\
         while time.time() < end:\n    \
         try:\n        \
         socket.create_connection(('127.0.0.1', {ADMIN_PORT}), 1).close()\n    \
         except OSError:\n        \
         break\n    \
         time.sleep(1)\n",
        secs = grace.as_secs() + 5
    );
    json!({"exec": {"command": ["python3", "-c", script]}})
}

fn actor_deployment(
    flow: &FlowFile,
    opts: &K8sOptions,
    k8s_ns: &str,
    a: &ActorSpec,
    image: &str,
) -> Value {
    let lbl = labels(&flow.namespace, "actor", &a.name);
    let mut pod_labels = lbl.clone();
    pod_labels["asya.sh/actor"] = json!(a.name);
    let timeout = a.timeout;
    let grace = match timeout {
        Some(t) if t + Duration::from_secs(5) > SHUTDOWN_GRACE => t + Duration::from_secs(5),
        _ => SHUTDOWN_GRACE,
    };
    let mut extra = vec![env("ASYA_CONCURRENCY", a.concurrency.to_string())];
    if let Some(t) = timeout {
        extra.push(env("ASYA_RESILIENCY_ACTOR_TIMEOUT", millis(t)));
    }
    if let Some(m) = a.max_attempts {
        extra.push(env("ASYA_RESILIENCY_MAX_ATTEMPTS", m.to_string()));
    }
    if let Some(d) = a.backoff_initial {
        extra.push(env("ASYA_RESILIENCY_BACKOFF_INITIAL", millis(d)));
    }
    if let Some(d) = a.backoff_max {
        extra.push(env("ASYA_RESILIENCY_BACKOFF_MAX", millis(d)));
    }
    if let Some(m) = a.backoff_multiplier {
        extra.push(env("ASYA_RESILIENCY_BACKOFF_MULTIPLIER", m.to_string()));
    }
    if !a.non_retryable_errors.is_empty() {
        extra.push(env(
            "ASYA_RESILIENCY_NON_RETRYABLE_ERRORS",
            a.non_retryable_errors.join(","),
        ));
    }
    extra.extend(policies_env(a));
    let sidecar = sidecar_container(flow, opts, &a.name, extra, grace);
    let mut runtime_env = vec![
        env("ASYA_HANDLER", &a.handler),
        env("ASYA_HANDLER_MODE", a.mode.as_str()),
        env("ASYA_SOCKET_DIR", SOCKET_DIR),
        // Both containers run as uid/gid 10001: nobody else needs the socket.
        env("ASYA_SOCKET_CHMOD", "0o660"),
        env("PYTHONDONTWRITEBYTECODE", "1"),
        env("PYTHONUNBUFFERED", "1"),
    ];
    runtime_env.extend(a.env.iter().map(|(k, v)| env(k, v)));
    let mut runtime = json!({
        "name": "asya-runtime",
        "image": image,
        "command": ["python3", format!("{RUNTIME_DIR}/asya_runtime.py")],
        "env": runtime_env,
        // Seed 003: ready once the socket exists and the handler is loaded.
        "readinessProbe": {
            "exec": {"command": [
                "sh", "-c",
                format!("test -S {SOCKET_DIR}/asya-runtime.sock && test -f {SOCKET_DIR}/runtime-ready"),
            ]},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "lifecycle": {"preStop": pre_stop(grace)},
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "asya-socket", "mountPath": SOCKET_DIR},
            {"name": "asya-runtime-file", "mountPath": RUNTIME_DIR, "readOnly": true},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    });
    if !a.deploy.resources.is_empty() {
        let mut r = serde_json::Map::new();
        if !a.deploy.resources.requests.is_empty() {
            r.insert("requests".into(), json!(a.deploy.resources.requests));
        }
        if !a.deploy.resources.limits.is_empty() {
            r.insert("limits".into(), json!(a.deploy.resources.limits));
        }
        runtime["resources"] = Value::Object(r);
    }
    let init = json!({
        "name": "asya-runtime-file",
        "image": opts.image,
        "command": ["cp", RUNTIME_IN_IMAGE, format!("{RUNTIME_DIR}/asya_runtime.py")],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "asya-runtime-file", "mountPath": RUNTIME_DIR}],
    });
    let mut spec = json!({
        "selector": {"matchLabels": {"app.kubernetes.io/part-of": format!("asya-{}", flow.namespace), "asya.sh/actor": a.name}},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": scrape_annotations()},
            "spec": {
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": grace.as_secs() + KILL_MARGIN_SECS,
                "securityContext": pod_security(),
                "initContainers": [init],
                "containers": [runtime, sidecar],
                "volumes": [
                    {"name": "asya-socket", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                    {"name": "asya-runtime-file", "emptyDir": {"sizeLimit": "16Mi"}},
                    {"name": "tmp", "emptyDir": {}},
                    {"name": "plugin-cache", "emptyDir": {"sizeLimit": "256Mi"}},
                ],
            },
        },
    });
    // Autoscaled actors leave `replicas` to KEDA (a re-apply must not reset it).
    if let Scaling::Fixed(n) = a.deploy.scaling {
        spec["replicas"] = json!(n);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(&a.name, k8s_ns, &lbl),
        "spec": spec,
    })
}

fn end_deployment(flow: &FlowFile, opts: &K8sOptions, k8s_ns: &str, end: &str) -> Value {
    let lbl = labels(&flow.namespace, "end-actor", end);
    let mut pod_labels = lbl.clone();
    pod_labels["asya.sh/actor"] = json!(end);
    let sidecar = sidecar_container(
        flow,
        opts,
        end,
        vec![
            env("ASYA_IS_END_ACTOR", "true"),
            env("ASYA_CONCURRENCY", "16"),
        ],
        SHUTDOWN_GRACE,
    );
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(end, k8s_ns, &lbl),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/part-of": format!("asya-{}", flow.namespace), "asya.sh/actor": end}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": scrape_annotations()},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": SHUTDOWN_GRACE.as_secs() + KILL_MARGIN_SECS,
                    "securityContext": pod_security(),
                    "containers": [sidecar],
                    "volumes": [
                        {"name": "asya-socket", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                        {"name": "plugin-cache", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                },
            },
        },
    })
}

/// KEDA `ScaledObject` of an autoscaled actor.
fn scaled_object(flow: &FlowFile, opts: &K8sOptions, k8s_ns: &str, a: &ActorSpec) -> Option<Value> {
    let Scaling::Auto { min, max } = a.deploy.scaling else {
        return None;
    };
    let lag = (LAG_PER_SLOT * a.concurrency as u64).to_string();
    let queue = queue_name(&flow.namespace, &a.name);
    let trigger = match &opts.scaler {
        Scaler::NatsJetStream {
            monitoring_endpoint,
        } => json!({
            "type": "nats-jetstream",
            "metadata": {
                "natsServerMonitoringEndpoint": monitoring_endpoint,
                "account": "$G",
                "stream": format!("asya-{}", flow.namespace),
                "consumer": a.name,
                "lagThreshold": lag,
                "activationLagThreshold": "0",
            },
        }),
        Scaler::Prometheus { server_address } => json!({
            "type": "prometheus",
            "metadata": {
                "serverAddress": server_address,
                // The gateway exports every queue's depth too, so this has a value while
                // the actor is scaled to zero.
                "query": format!("max(asya_actor_queue_depth{{queue=\"{queue}\"}})"),
                "threshold": lag,
                "activationThreshold": "0",
            },
        }),
    };
    Some(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(&a.name, k8s_ns, &labels(&flow.namespace, "actor", &a.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": a.name},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "pollingInterval": 10,
            "cooldownPeriod": 300,
            "triggers": [trigger],
        },
    }))
}

/// The gateway's flows file: the namespace and the `[flows]` table (the table form, with
/// `description` and `input_schema`, for the flows that have them: `/mcp` shows them).
pub fn flows_toml(flow: &FlowFile) -> String {
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Entry<'a> {
        List(&'a [String]),
        Table {
            actors: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            description: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            input_schema: Option<&'a serde_json::Map<String, Value>>,
        },
    }
    #[derive(serde::Serialize)]
    struct File<'a> {
        namespace: &'a str,
        flows: std::collections::BTreeMap<&'a str, Entry<'a>>,
    }
    let flows = flow
        .flows
        .iter()
        .map(|(name, actors)| {
            let entry = match flow.flow_docs.get(name) {
                None => Entry::List(actors),
                Some(doc) => Entry::Table {
                    actors,
                    description: doc.description.as_deref(),
                    input_schema: doc.input_schema.as_ref(),
                },
            };
            (name.as_str(), entry)
        })
        .collect();
    toml::to_string(&File {
        namespace: &flow.namespace,
        flows,
    })
    .expect("strings, lists and the schemas read from TOML serialise to TOML")
}

fn gateway_objects(flow: &FlowFile, opts: &K8sOptions, k8s_ns: &str) -> Vec<Value> {
    let lbl = labels(&flow.namespace, "gateway", GATEWAY);
    let selector = json!({"app.kubernetes.io/part-of": format!("asya-{}", flow.namespace), "app.kubernetes.io/component": "gateway"});
    let config = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(FLOWS_CONFIGMAP, k8s_ns, &lbl),
        "data": {"flows.toml": flows_toml(flow)},
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(GATEWAY, k8s_ns, &lbl),
        "spec": {
            // Tasks live in NATS key-value (ASYA_GATEWAY_STORE=nats); one replica keeps
            // each task's SSE stream on the pod that serves it.
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": lbl, "annotations": scrape_annotations()},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": "asya-gateway",
                        "image": opts.image,
                        "args": ["gateway"],
                        "env": [
                            env("ASYA_NAMESPACE", &flow.namespace),
                            env("ASYA_GATEWAY_ADDR", format!(":{GATEWAY_PORT}")),
                            env("ASYA_GATEWAY_FLOWS", "/etc/asya/flows.toml"),
                            env("ASYA_GATEWAY_STORE", "nats"),
                            env("ASYA_NATS_URL", &opts.nats_url),
                            token_env(),
                            report_token_env(),
                            // The queue depth of every actor (scale from zero).
                            env("ASYA_METRICS_ADDR", format!(":{ADMIN_PORT}")),
                            env("ASYA_LOG_FORMAT", "json"),
                        ],
                        "envFrom": nats_env_from(),
                        "ports": [
                            {"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
                            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                        ],
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "admin"}, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                        "securityContext": container_security(),
                        "volumeMounts": [{"name": "flows", "mountPath": "/etc/asya", "readOnly": true}],
                    }],
                    "volumes": [{"name": "flows", "configMap": {"name": FLOWS_CONFIGMAP}}],
                },
            },
        },
    });
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(GATEWAY, k8s_ns, &lbl),
        "spec": {
            "selector": selector,
            "ports": [
                {"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin", "protocol": "TCP"},
            ],
        },
    });
    vec![config, deployment, service]
}

/// The provisioning Job. Its name carries a hash of what it creates: a changed flow gets a
/// new Job (a Job's spec cannot be changed in place), an unchanged one re-applies cleanly.
fn provision_job(flow: &FlowFile, opts: &K8sOptions, k8s_ns: &str) -> Value {
    let actors: Vec<&str> = flow.actors.iter().map(|a| a.name.as_str()).collect();
    let args = vec![
        "provision".to_owned(),
        "--namespace".to_owned(),
        flow.namespace.clone(),
        "--actors".to_owned(),
        actors.join(","),
    ];
    let mut h = sha2::Sha256::new();
    h.update(args.join("\n"));
    h.update(&opts.nats_url);
    let hash: String = h.finalize()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let lbl = labels(&flow.namespace, "provision", "asya-provision");
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(&format!("asya-provision-{hash}"), k8s_ns, &lbl),
        "spec": {
            "backoffLimit": 10,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": lbl},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": false,
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": "provision",
                        "image": opts.image,
                        "args": args,
                        "env": [env("ASYA_NATS_URL", &opts.nats_url)],
                        "envFrom": nats_env_from(),
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": container_security(),
                    }],
                },
            },
        },
    })
}

fn monitoring_objects(flow: &FlowFile, k8s_ns: &str) -> Vec<Value> {
    let lbl = labels(&flow.namespace, "monitoring", "asya");
    let part_of = format!("asya-{}", flow.namespace);
    let pod_monitor = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata(&format!("asya-{}-actors", flow.namespace), k8s_ns, &lbl),
        "spec": {
            // Pods, not Services: sidecars have no Service, and a not-ready sidecar must
            // still be scraped (its asya_actor_ready is what the alert reads).
            "selector": {"matchExpressions": [
                {"key": "app.kubernetes.io/part-of", "operator": "In", "values": [part_of]},
                {"key": "app.kubernetes.io/component", "operator": "In", "values": ["actor", "end-actor"]},
            ]},
            "podMetricsEndpoints": [{"port": "admin", "path": "/metrics", "interval": "15s"}],
            "podTargetLabels": ["asya.sh/actor"],
        },
    });
    let service_monitor = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(&format!("asya-{}-gateway", flow.namespace), k8s_ns, &lbl),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/part-of": part_of, "app.kubernetes.io/component": "gateway"}},
            "endpoints": [{"port": "admin", "path": "/metrics", "interval": "15s"}],
        },
    });
    let rule = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(&format!("asya-{}", flow.namespace), k8s_ns, &lbl),
        "spec": monitoring::rules_file(flow),
    });
    let mut dash_lbl = lbl.clone();
    // The Grafana chart's dashboard sidecar loads ConfigMaps with this label.
    dash_lbl["grafana_dashboard"] = json!("1");
    let dashboard = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(&format!("asya-{}-dashboard", flow.namespace), k8s_ns, &dash_lbl),
        "data": {"asya-dashboard.json": monitoring::DASHBOARD},
    });
    vec![pod_monitor, service_monitor, rule, dashboard]
}

/// Every object of `flow`, by file, in apply order.
pub fn render(flow: &FlowFile, opts: &K8sOptions) -> Result<Vec<Manifest>, RenderError> {
    let k8s_ns = opts
        .namespace
        .clone()
        .unwrap_or_else(|| flow.namespace.clone());
    crate::config::validate_actor_name("--namespace", &k8s_ns).map_err(|e| {
        RenderError::Option {
            flag: "--namespace",
            message: e.message,
        }
    })?;
    let mut out = vec![Manifest {
        file: "00-namespace.yaml".into(),
        objects: vec![json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": k8s_ns, "labels": {"app.kubernetes.io/managed-by": "asya-host"}},
        })],
    }];
    out.push(Manifest {
        file: "10-provision.yaml".into(),
        objects: vec![provision_job(flow, opts, &k8s_ns)],
    });
    out.push(Manifest {
        file: "20-gateway.yaml".into(),
        objects: gateway_objects(flow, opts, &k8s_ns),
    });
    for a in &flow.actors {
        let image = a
            .deploy
            .image
            .as_ref()
            .or(flow.image.as_ref())
            .or(opts.runtime_image.as_ref())
            .ok_or_else(|| RenderError::NoImage {
                file: flow.path.display().to_string(),
                actor: a.name.clone(),
            })?;
        let mut objects = vec![actor_deployment(flow, opts, &k8s_ns, a, image)];
        objects.extend(scaled_object(flow, opts, &k8s_ns, a));
        out.push(Manifest {
            file: format!("30-actor-{}.yaml", a.name),
            objects,
        });
    }
    for end in ["x-sink", "x-sump"] {
        out.push(Manifest {
            file: format!("40-{end}.yaml"),
            objects: vec![end_deployment(flow, opts, &k8s_ns, end)],
        });
    }
    out.push(Manifest {
        file: "50-monitoring.yaml".into(),
        objects: monitoring_objects(flow, &k8s_ns),
    });
    Ok(out)
}
