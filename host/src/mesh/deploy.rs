//! The deploy keys of the flow file: what `asya-host render k8s` needs to run an actor on
//! Kubernetes. `up` parses and validates them like every other key, then ignores them.
//!
//! ```toml
//! image = "registry.example/reviews:1.4"   # top level: default runtime image of every actor
//!
//! [actors.sentiment]
//! handler = "handlers.Sentiment.score"
//! image = "registry.example/sentiment:2.0" # this actor's runtime image
//! min = 0                                  # autoscaled (KEDA) between min and max replicas;
//! max = 8                                  #   min = 0 scales to zero when the queue is empty
//! # replicas = 2                           # or: a fixed number of replicas, no autoscaling
//! resources = { requests = { cpu = "500m", memory = "256Mi" }, limits = { memory = "1Gi" } }
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

/// Most replicas an actor may ask for.
pub const MAX_REPLICAS: i64 = 1000;
/// Upper bound of autoscaling when only `min` is given.
pub const DEFAULT_MAX_REPLICAS: u32 = 10;

/// How many replicas of an actor run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaling {
    /// Autoscaled on the actor's queue depth between `min` and `max` (`min = 0`: scale to
    /// zero when idle).
    Auto { min: u32, max: u32 },
    /// Exactly this many replicas.
    Fixed(u32),
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling::Auto {
            min: 0,
            max: DEFAULT_MAX_REPLICAS,
        }
    }
}

/// Container resources: quantity per resource name (`cpu`, `memory`, `nvidia.com/gpu`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    pub requests: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.limits.is_empty()
    }
}

/// The deploy keys of one actor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeploySpec {
    /// The runtime image (the handler's code and its Python); `None`: the file's `image`.
    pub image: Option<String>,
    pub scaling: Scaling,
    /// Resources of the runtime container.
    pub resources: Resources,
}

/// The deploy keys of an actor as written (part of the actor's table).
#[derive(Default)]
pub(crate) struct RawDeploy {
    pub image: Option<Spanned<String>>,
    pub replicas: Option<Spanned<i64>>,
    pub min: Option<Spanned<i64>>,
    pub max: Option<Spanned<i64>>,
    pub resources: Option<Spanned<RawResources>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResources {
    #[serde(default)]
    requests: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    limits: BTreeMap<Spanned<String>, Spanned<String>>,
}

/// A deploy key that is invalid: where (byte span) and why.
pub(crate) type Invalid = (Range<usize>, String);

/// Check an image reference (the top-level `image` or an actor's).
pub(crate) fn check_image(who: &str, image: Spanned<String>) -> Result<String, Invalid> {
    let span = image.span();
    let image = image.into_inner();
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err((
            span,
            format!("{who}: invalid image {image:?} (expected e.g. \"registry.example/app:1.0\")"),
        ));
    }
    Ok(image)
}

impl RawDeploy {
    pub(crate) fn validate(self, actor: &str) -> Result<DeploySpec, Invalid> {
        let who = format!("actor {actor}");
        let image = self.image.map(|i| check_image(&who, i)).transpose()?;
        let count = |key: &str, v: Spanned<i64>, lowest: i64| -> Result<u32, Invalid> {
            let n = *v.get_ref();
            if !(lowest..=MAX_REPLICAS).contains(&n) {
                return Err((
                    v.span(),
                    format!("{who}: {key} must be between {lowest} and {MAX_REPLICAS}, got {n}"),
                ));
            }
            Ok(n as u32)
        };
        let scaling = match (self.replicas, self.min, self.max) {
            (Some(r), None, None) => Scaling::Fixed(count("replicas", r, 0)?),
            (Some(r), _, _) => {
                return Err((
                    r.span(),
                    format!("{who}: set either replicas (fixed) or min/max (autoscaled), not both"),
                ))
            }
            (None, min, max) => {
                let min_span = min.as_ref().map(|m| m.span());
                let min = min.map(|m| count("min", m, 0)).transpose()?.unwrap_or(0);
                let max = match max {
                    Some(m) => count("max", m, 1)?,
                    None => DEFAULT_MAX_REPLICAS.max(min),
                };
                if min > max {
                    return Err((
                        min_span.unwrap_or(0..0),
                        format!("{who}: min ({min}) is larger than max ({max})"),
                    ));
                }
                Scaling::Auto { min, max }
            }
        };
        let mut resources = Resources::default();
        if let Some(r) = self.resources {
            let r = r.into_inner();
            for (kind, raw, out) in [
                ("requests", r.requests, &mut resources.requests),
                ("limits", r.limits, &mut resources.limits),
            ] {
                for (name, qty) in raw {
                    if !resource_name_ok(name.get_ref()) {
                        return Err((
                            name.span(),
                            format!(
                                "{who}: invalid resource name {:?} in resources.{kind} (e.g. cpu, memory, nvidia.com/gpu)",
                                name.get_ref()
                            ),
                        ));
                    }
                    if !quantity_ok(qty.get_ref()) {
                        return Err((
                            qty.span(),
                            format!(
                                "{who}: resources.{kind}.{}: invalid quantity {:?} (e.g. \"500m\", \"2\", \"256Mi\")",
                                name.get_ref(),
                                qty.get_ref()
                            ),
                        ));
                    }
                    out.insert(name.into_inner(), qty.into_inner());
                }
            }
        }
        Ok(DeploySpec {
            image,
            scaling,
            resources,
        })
    }
}

/// `cpu`, `memory`, `ephemeral-storage`, `example.com/foo`: a qualified name.
fn resource_name_ok(name: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && p.as_bytes()[p.len() - 1].is_ascii_alphanumeric()
    };
    match name.split_once('/') {
        Some((prefix, rest)) => part_ok(prefix) && part_ok(rest),
        None => part_ok(name),
    }
}

/// A Kubernetes quantity: `[+]digits[.digits][suffix]`, suffix one of the binary (`Ki`..`Ei`)
/// or decimal (`n u m k M G T P E`) ones, or a decimal exponent (`e3`).
pub fn quantity_ok(q: &str) -> bool {
    let q = q.strip_prefix('+').unwrap_or(q);
    let num_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(num_end);
    let num_ok = match num.split_once('.') {
        Some((a, b)) => (!a.is_empty() || !b.is_empty()) && !b.contains('.'),
        None => !num.is_empty(),
    };
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
        })
        .unwrap_or(false);
    num_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in [
            "1", "500m", "0.5", "256Mi", "1Gi", "2e3", "+1", ".5", "1.", "100k",
        ] {
            assert!(quantity_ok(ok), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "1 Gi", "1gb", "-1", "1Mb", "e3", "1e"] {
            assert!(!quantity_ok(bad), "{bad}");
        }
    }

    #[test]
    fn resource_names() {
        for ok in ["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"] {
            assert!(resource_name_ok(ok), "{ok}");
        }
        for bad in ["", "-cpu", "a/b/c", "gpu ", "/gpu"] {
            assert!(!resource_name_ok(bad), "{bad}");
        }
    }
}
