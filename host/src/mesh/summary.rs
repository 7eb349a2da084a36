//! Per-actor numbers of a local mesh run (envelopes, errors, retries, runtime time), taken
//! from the sidecars' hop reports on their way to the gateway, and the table `up` prints.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sidecar::{Report, Reporter};

/// Runtime-time samples kept per actor (enough for a stable p99 of any local run).
const MAX_SAMPLES: usize = 1 << 20;

#[derive(Default)]
struct ActorCounts {
    envelopes: u64,
    errors: u64,
    retries: u64,
    runtime: Vec<Duration>,
}

/// Counts every report, then hands it to the gateway's reporter.
pub struct StatsReporter {
    inner: Option<Arc<dyn Reporter>>,
    counts: Mutex<BTreeMap<String, ActorCounts>>,
}

impl StatsReporter {
    pub fn new(inner: Option<Arc<dyn Reporter>>) -> Arc<Self> {
        Arc::new(StatsReporter {
            inner,
            counts: Mutex::new(BTreeMap::new()),
        })
    }

    /// Numbers of `actors` (in that order; actors without reports get zero rows).
    pub fn snapshot(&self, actors: &[String]) -> Vec<ActorStats> {
        let counts = self.counts.lock().expect("stats lock");
        actors
            .iter()
            .map(|name| match counts.get(name) {
                None => ActorStats {
                    actor: name.clone(),
                    ..ActorStats::default()
                },
                Some(c) => {
                    let mut samples = c.runtime.clone();
                    samples.sort_unstable();
                    ActorStats {
                        actor: name.clone(),
                        envelopes: c.envelopes,
                        errors: c.errors,
                        retries: c.retries,
                        runtime_p50: percentile(&samples, 0.50),
                        runtime_p99: percentile(&samples, 0.99),
                    }
                }
            })
            .collect()
    }
}

impl Reporter for StatsReporter {
    fn report(&self, report: Report) {
        {
            let mut counts = self.counts.lock().expect("stats lock");
            match &report {
                Report::Hop(h) => {
                    let c = counts.entry(h.actor.clone()).or_default();
                    c.envelopes += 1;
                    if h.error.is_some() {
                        c.errors += 1;
                    }
                    if h.retried {
                        c.retries += 1;
                    }
                    if let Some(d) = h.runtime {
                        if c.runtime.len() < MAX_SAMPLES {
                            c.runtime.push(d);
                        }
                    }
                }
                Report::Final { actor, .. } => {
                    counts.entry(actor.clone()).or_default().envelopes += 1;
                }
                Report::Upstream { .. } => {}
            }
        }
        if let Some(inner) = &self.inner {
            inner.report(report);
        }
    }
}

/// `q`-quantile of sorted `samples` (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// One row of the summary table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActorStats {
    pub actor: String,
    /// Deliveries handled (retries included).
    pub envelopes: u64,
    /// Deliveries that ended in an error (retried or sent to x-sump).
    pub errors: u64,
    pub retries: u64,
    pub runtime_p50: Option<Duration>,
    pub runtime_p99: Option<Duration>,
}

/// The summary table.
pub struct Table<'a>(pub &'a [ActorStats]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .0
            .iter()
            .map(|r| r.actor.len())
            .max()
            .unwrap_or(0)
            .max("actor".len());
        writeln!(
            f,
            "{:<width$}  {:>9}  {:>6}  {:>7}  {:>11}  {:>11}",
            "actor", "envelopes", "errors", "retries", "runtime p50", "runtime p99"
        )?;
        for r in self.0 {
            writeln!(
                f,
                "{:<width$}  {:>9}  {:>6}  {:>7}  {:>11}  {:>11}",
                r.actor,
                r.envelopes,
                r.errors,
                r.retries,
                ms(r.runtime_p50),
                ms(r.runtime_p99)
            )?;
        }
        Ok(())
    }
}

fn ms(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => {
            let ms = d.as_secs_f64() * 1000.0;
            if ms < 10.0 {
                format!("{ms:.2}ms")
            } else if ms < 10_000.0 {
                format!("{ms:.0}ms")
            } else {
                format!("{:.1}s", ms / 1000.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&s, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&s[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn table_renders_every_row() {
        let rows = vec![
            ActorStats {
                actor: "tokenize".into(),
                envelopes: 20,
                errors: 1,
                retries: 1,
                runtime_p50: Some(Duration::from_micros(1500)),
                runtime_p99: Some(Duration::from_millis(42)),
            },
            ActorStats {
                actor: "x-sink".into(),
                envelopes: 19,
                ..ActorStats::default()
            },
        ];
        let t = Table(&rows).to_string();
        assert!(t.contains("tokenize"), "{t}");
        assert!(t.contains("1.50ms") && t.contains("42ms"), "{t}");
        assert_eq!(t.lines().count(), 3);
    }
}
