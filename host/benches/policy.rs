//! Per-call cost of a route policy: the shipped `priority-router` component through the
//! host's policy chain vs the same rule as native Rust behind the same `RoutePolicy`
//! trait, measured in the same run with a 1 KB payload.
//! Run: `cargo bench -p asya-host --bench policy` (env: POLICY_N, default 20000).
//!
//! Needs `plugins/target/wasm32-wasip2/release/priority_router.wasm`; builds the plugins
//! workspace when it is missing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use asya_host::envelope::{Envelope, Route};
use asya_test_support::plugin;

use asya_host::plugin::{
    Decision, PluginEngine, PolicyChain, PolicyError, PolicyOptions, PolicySpec, RoutePolicy,
};

/// The priority-router rule, natively.
struct NativePriorityRouter {
    actor: String,
    value: String,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    priority: Option<std::borrow::Cow<'a, str>>,
}

#[async_trait]
impl RoutePolicy for NativePriorityRouter {
    async fn decide(&self, _input: &Envelope, frame: &Envelope) -> Result<Decision, PolicyError> {
        let f: Fields = match serde_json::from_str(frame.payload.get()) {
            Ok(f) => f,
            Err(_) => return Ok(Decision::Keep),
        };
        if f.priority.as_deref() != Some(self.value.as_str()) || frame.route.curr == self.actor {
            return Ok(Decision::Keep);
        }
        let r = &frame.route;
        let mut next = Vec::with_capacity(r.next.len() + 1);
        if !r.curr.is_empty() {
            next.push(r.curr.clone());
        }
        next.extend(r.next.iter().cloned());
        Ok(Decision::ReplaceRoute(Route {
            prev: r.prev.clone(),
            curr: self.actor.clone(),
            next,
        }))
    }
}

fn envelopes(priority: &str) -> (Envelope, Envelope) {
    let blob = "x".repeat(1000);
    let input = format!(
        r#"{{"id":"e1","route":{{"prev":[],"curr":"a","next":["b","c"]}},"headers":{{"trace_id":"t1"}},"payload":{{"priority":"{priority}","blob":"{blob}"}}}}"#
    );
    let frame = format!(
        r#"{{"id":"e1","route":{{"prev":["a"],"curr":"b","next":["c"]}},"headers":{{"trace_id":"t1"}},"payload":{{"blob":"{blob}","priority":"{priority}"}}}}"#
    );
    (
        Envelope::parse(input.as_bytes()).expect("input"),
        Envelope::parse(frame.as_bytes()).expect("frame"),
    )
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

async fn measure(policy: &dyn RoutePolicy, input: &Envelope, frame: &Envelope, n: usize) -> Stats {
    for _ in 0..n / 10 {
        policy.decide(input, frame).await.expect("decide");
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let d = policy.decide(input, frame).await.expect("decide");
        samples.push(t.elapsed());
        std::hint::black_box(d);
    }
    samples.sort();
    Stats {
        p50: samples[n / 2],
        p99: samples[n * 99 / 100],
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let n: usize = std::env::var("POLICY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cache = tempfile_dir();
        let engine = PluginEngine::new(Some(cache.clone())).expect("engine");
        let spec = PolicySpec {
            path: plugin("priority-router"),
            config: serde_json::Value::Null,
        };
        let wasm = PolicyChain::load(&engine, &[spec], PolicyOptions::default(), None)
            .await
            .expect("priority-router loads");
        let native = NativePriorityRouter {
            actor: "priority-handler".into(),
            value: "high".into(),
        };
        println!("policy call, 1 KB payload, n = {n} (per call; ratio = wasm / native p50)");
        for case in ["high", "low"] {
            let (input, frame) = envelopes(case);
            let expect = native.decide(&input, &frame).await.expect("native");
            assert_eq!(wasm.decide(&input, &frame).await.expect("wasm"), expect);
            let nat = measure(&native, &input, &frame, n).await;
            let was = measure(&wasm, &input, &frame, n).await;
            let what = if case == "high" { "replace route" } else { "keep" };
            println!(
                "priority={case:<4} ({what:<13}) native p50 {:6.2} µs p99 {:6.2} µs | wasm p50 {:6.2} µs p99 {:6.2} µs | ratio {:5.1}x",
                us(nat.p50),
                us(nat.p99),
                us(was.p50),
                us(was.p99),
                us(was.p50) / us(nat.p50).max(1e-3),
            );
        }
        let _ = std::fs::remove_dir_all(&cache);
    });
}

fn tempfile_dir() -> PathBuf {
    std::env::temp_dir().join(format!("asya-policy-bench-{}", std::process::id()))
}
