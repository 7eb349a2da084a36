//! `asya-host render k8s`: Kubernetes manifests from the flow file `up` runs.
//!
//! The objects are built as serde values ([`k8s`], [`monitoring`]) and written as YAML by
//! [`yaml`] — one multi-document stream for `kubectl apply -f -`, or one file per part
//! into a directory. Nothing here talks to a cluster.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::mesh::flowfile::FlowFile;

pub mod k8s;
pub mod monitoring;
pub mod yaml;

/// Which KEDA trigger scales the actors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scaler {
    /// KEDA's `nats-jetstream` scaler, reading the NATS monitoring endpoint (`host:8222`).
    NatsJetStream { monitoring_endpoint: String },
    /// KEDA's `prometheus` scaler on our own `asya_actor_queue_depth` gauge.
    Prometheus { server_address: String },
}

/// Options of `render k8s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sOptions {
    /// Kubernetes namespace of every object (default: the flow's namespace).
    pub namespace: Option<String>,
    /// Our image: sidecars, gateway, provisioning job, and the source of the runtime file.
    pub image: String,
    /// NATS server URL(s) as seen from inside the cluster.
    pub nats_url: String,
    pub scaler: Scaler,
    /// Runtime image of actors that name none (and the flow file names none).
    pub runtime_image: Option<String>,
}

/// The default image: `asya-host:<version>` (what `docker build -t asya-host:<version> .`
/// builds).
pub fn default_image() -> String {
    format!("asya-host:{}", env!("CARGO_PKG_VERSION"))
}

impl K8sOptions {
    /// Defaults: image `asya-host:<version>`, NATS at `nats://nats:4222`, the NATS
    /// JetStream scaler on `nats:8222`.
    pub fn new() -> Self {
        K8sOptions {
            namespace: None,
            image: default_image(),
            nats_url: "nats://nats:4222".into(),
            scaler: Scaler::NatsJetStream {
                monitoring_endpoint: "nats:8222".into(),
            },
            runtime_image: None,
        }
    }
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The monitoring endpoint (`host:8222`) of the first server of a NATS URL list.
pub fn monitoring_endpoint(nats_url: &str) -> String {
    let first = nats_url.split(',').next().unwrap_or("").trim();
    let no_scheme = first.split_once("://").map_or(first, |(_, r)| r);
    let host_port = no_scheme.rsplit_once('@').map_or(no_scheme, |(_, r)| r);
    let host = match host_port.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host_port,
    };
    format!("{host}:8222")
}

/// Why nothing was rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{file}: actor {actor} has no runtime image: add image = \"registry/app:tag\" to [actors.{actor}] (or a top-level image = ...), or pass --runtime-image")]
    NoImage { file: String, actor: String },
    #[error("{flag}: {message}")]
    Option { flag: &'static str, message: String },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One output file: its name and its objects, in apply order.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub file: String,
    pub objects: Vec<Value>,
}

/// Every object for `flow`, grouped into files (in apply order).
pub fn k8s(flow: &FlowFile, opts: &K8sOptions) -> Result<Vec<Manifest>, RenderError> {
    k8s::render(flow, opts)
}

/// All objects as one YAML stream (`kubectl apply -f -`).
pub fn to_stream(manifests: &[Manifest]) -> String {
    yaml::to_yaml_stream(manifests.iter().flat_map(|m| m.objects.iter()))
}

/// Write each manifest to `dir/<file>` (created if missing), plus the plain Prometheus
/// rules file; returns the paths written.
pub fn write_dir(
    manifests: &[Manifest],
    rules: &Value,
    dir: &Path,
) -> Result<Vec<PathBuf>, RenderError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| RenderError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    let mut out = Vec::new();
    for m in manifests {
        let path = dir.join(&m.file);
        std::fs::write(&path, yaml::to_yaml_stream(&m.objects)).map_err(err(&path))?;
        out.push(path);
    }
    let path = dir.join(monitoring::RULES_FILE);
    std::fs::write(&path, yaml::to_yaml(rules)).map_err(err(&path))?;
    out.push(path);
    Ok(out)
}

/// The queue of `actor` in `namespace` as text, for manifests. Names come from a validated
/// flow file; one that cannot be a queue is printed as it would be formed, and the
/// sidecar's own start-up check names it.
fn queue_name(namespace: &str, actor: &str) -> String {
    match crate::queue::QueueName::new(namespace, actor) {
        Ok(q) => q.to_string(),
        Err(_) => format!("asya-{namespace}-{actor}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitoring_endpoints() {
        assert_eq!(monitoring_endpoint("nats://nats:4222"), "nats:8222");
        assert_eq!(
            monitoring_endpoint("nats://u:p@nats.nats.svc:4222,nats://b:4222"),
            "nats.nats.svc:8222"
        );
        assert_eq!(monitoring_endpoint("tls://10.0.0.1"), "10.0.0.1:8222");
    }
}
