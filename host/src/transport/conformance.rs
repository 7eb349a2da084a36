//! The transport conformance suite: the semantics of [`super`] checked against any
//! [`Transport`] (memory, NATS, a WebAssembly transport component). `asya-host plugin test`
//! runs it against a component; the tests run it against `memory` and `nats`.
//!
//! Every case gets a fresh namespace from the caller (so cases never see each other's
//! messages), is bounded by [`Options::case_timeout`], and reports pass or fail with a
//! message; the suite never panics on a misbehaving transport.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{queue_name, Delivery, OutMessage, Receiver, Transport};

/// Produces a namespace no other case used (letters, digits and `_` only).
pub type NamespaceFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Knobs for transports with different limits.
#[derive(Debug, Clone)]
pub struct Options {
    /// Upper bound of one case.
    pub case_timeout: Duration,
    /// How long "nothing arrives" is watched.
    pub quiet_period: Duration,
    /// Size of the large-body case.
    pub large_body: usize,
    /// Messages in the ordering case.
    pub ordering_count: usize,
    /// Whether the transport deduplicates by message id (checks the dedup case).
    pub deduplicates: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            case_timeout: Duration::from_secs(30),
            quiet_period: Duration::from_millis(300),
            large_body: 512 * 1024,
            ordering_count: 200,
            deduplicates: true,
        }
    }
}

/// The delay of the `nack_with_delay` case; a redelivery earlier than 80 % of it fails.
pub const NACK_DELAY: Duration = Duration::from_millis(700);
/// How long the `nack_with_delay` case waits for the redelivery after a `nack(0)`.
pub const NACK_ZERO_WITHIN: Duration = Duration::from_secs(5);

impl Options {
    /// How long a case waits for a delivery or a redelivery.
    pub fn delivery_wait(&self) -> Duration {
        wait(self)
    }

    /// Every wait of the suite, in words (what `asya-host plugin test` prints first).
    pub fn describe(&self) -> String {
        format!(
            "{} cases, each bounded by {:?}. A case waits up to {:?} for each delivery or \
             redelivery (after a nack: {:?} plus the nack delay of {:?}, and a redelivery \
             before {:?} fails; after nack(0): {:?}); \"nothing more arrives\" is watched \
             for {:?}. Large body {} bytes, ordering {} messages, dedup_by_id {}.",
            CASES.len(),
            self.case_timeout,
            self.delivery_wait(),
            self.delivery_wait(),
            NACK_DELAY,
            NACK_DELAY.mul_f64(0.8),
            NACK_ZERO_WITHIN,
            self.quiet_period,
            self.large_body,
            self.ordering_count,
            if self.deduplicates {
                "checked"
            } else {
                "skipped"
            },
        )
    }
}

/// Outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: &'static str,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub message: String,
    pub took: Duration,
}

/// Outcome of the suite.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub transport: String,
    pub cases: Vec<CaseResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> Vec<&CaseResult> {
        self.cases.iter().filter(|c| !c.passed).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ok = self.cases.iter().filter(|c| c.passed).count();
        writeln!(
            f,
            "transport conformance ({}): {ok}/{} passed",
            self.transport,
            self.cases.len()
        )?;
        for c in &self.cases {
            let mark = if c.passed { "ok  " } else { "FAIL" };
            write!(f, "  {mark} {:<28} {:>8.1?}", c.name, c.took)?;
            if !c.passed {
                write!(f, "  {}", c.message)?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

type CaseResultInner = Result<(), String>;

/// The names of every case, in the order [`run`] runs them.
pub const CASES: &[&str] = &[
    "send_receive_ack",
    "ack_is_final",
    "nack_with_delay",
    "redelivery_after_drop",
    "ordering_per_queue",
    "large_body",
    "send_all",
    "dedup_by_id",
    "prefetch_bound",
    "competing_consumers",
    "in_progress",
    "shutdown_cancel_safe",
];

/// Run every case against `transport`.
pub async fn run(transport: Arc<dyn Transport>, fresh_ns: NamespaceFn, opts: &Options) -> Report {
    run_only(transport, fresh_ns, opts, CASES).await
}

/// Run the named cases (unknown names fail).
pub async fn run_only(
    transport: Arc<dyn Transport>,
    fresh_ns: NamespaceFn,
    opts: &Options,
    names: &[&str],
) -> Report {
    let mut report = Report {
        transport: transport.kind().as_str().to_owned(),
        cases: Vec::new(),
    };
    for &name in names {
        let Some(&name) = CASES.iter().find(|c| **c == name) else {
            report.cases.push(CaseResult {
                name: "unknown",
                passed: false,
                message: format!("no case named {name:?}"),
                took: Duration::ZERO,
            });
            continue;
        };
        let t = transport.clone();
        let ns = fresh_ns();
        let o = opts.clone();
        let start = Instant::now();
        let fut = async move {
            match name {
                "send_receive_ack" => send_receive_ack(t, ns, o).await,
                "ack_is_final" => ack_is_final(t, ns, o).await,
                "nack_with_delay" => nack_with_delay(t, ns, o).await,
                "redelivery_after_drop" => redelivery_after_drop(t, ns, o).await,
                "ordering_per_queue" => ordering_per_queue(t, ns, o).await,
                "large_body" => large_body(t, ns, o).await,
                "send_all" => send_all(t, ns, o).await,
                "dedup_by_id" => dedup_by_id(t, ns, o).await,
                "prefetch_bound" => prefetch_bound(t, ns, o).await,
                "competing_consumers" => competing_consumers(t, ns, o).await,
                "in_progress" => in_progress(t, ns, o).await,
                "shutdown_cancel_safe" => shutdown_cancel_safe(t, ns, o).await,
                _ => Err("case not wired".to_owned()),
            }
        };
        // A panicking case is a failed case, not a crashed suite.
        let outcome = tokio::time::timeout(opts.case_timeout, tokio::spawn(fut)).await;
        let (passed, message) = match outcome {
            Ok(Ok(Ok(()))) => (true, String::new()),
            Ok(Ok(Err(m))) => (false, m),
            Ok(Err(join)) => (false, format!("case panicked: {join}")),
            Err(_) => (false, format!("timed out after {:?}", opts.case_timeout)),
        };
        report.cases.push(CaseResult {
            name,
            passed,
            message,
            took: start.elapsed(),
        });
    }
    report
}

fn msg(queue: &str, id: impl Into<String>, body: impl Into<Bytes>) -> OutMessage {
    OutMessage {
        queue: queue.to_owned(),
        id: id.into(),
        body: body.into(),
    }
}

async fn setup(t: &Arc<dyn Transport>, ns: &str, actor: &str) -> Result<String, String> {
    let q = queue_name(ns, actor);
    t.ensure_queues(std::slice::from_ref(&q))
        .await
        .map_err(|e| format!("ensure_queues({q}): {e}"))?;
    Ok(q)
}

async fn send(t: &Arc<dyn Transport>, m: OutMessage) -> CaseResultInner {
    let q = m.queue.clone();
    t.send(m).await.map_err(|e| format!("send to {q}: {e}"))
}

async fn subscribe(
    t: &Arc<dyn Transport>,
    q: &str,
    prefetch: usize,
) -> Result<Box<dyn Receiver>, String> {
    t.subscribe(q, prefetch)
        .await
        .map_err(|e| format!("subscribe({q}): {e}"))
}

/// Receive within `within`.
async fn recv(
    rx: &mut Box<dyn Receiver>,
    within: Duration,
    what: &str,
) -> Result<Delivery, String> {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(format!("{what}: receive failed: {e}")),
        Err(_) => Err(format!("{what}: nothing received within {within:?}")),
    }
}

/// Nothing arrives within `quiet`.
async fn quiet(rx: &mut Box<dyn Receiver>, quiet: Duration, what: &str) -> CaseResultInner {
    match tokio::time::timeout(quiet, rx.recv()).await {
        Err(_) => Ok(()),
        Ok(Ok(d)) => Err(format!(
            "{what}: unexpected delivery (attempt {}, {:?})",
            d.attempt,
            preview(&d.body)
        )),
        Ok(Err(e)) => Err(format!("{what}: receive failed: {e}")),
    }
}

fn preview(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(60)]);
    s.into_owned()
}

fn expect<T: PartialEq + fmt::Debug>(what: &str, got: T, want: T) -> CaseResultInner {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

async fn ack(d: Delivery, what: &str) -> CaseResultInner {
    d.acker
        .ack()
        .await
        .map_err(|e| format!("{what}: ack failed: {e}"))
}

fn wait(o: &Options) -> Duration {
    o.case_timeout / 2
}

async fn send_receive_ack(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    send(&t, msg(&q, "m1", "hello")).await?;
    let mut rx = subscribe(&t, &q, 1).await?;
    let d = recv(&mut rx, wait(&o), "first delivery").await?;
    expect("body", d.body.as_ref(), b"hello".as_ref())?;
    expect("attempt", d.attempt, 1)?;
    ack(d, "first delivery").await
}

async fn ack_is_final(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let mut rx = subscribe(&t, &q, 4).await?;
    send(&t, msg(&q, "m1", "once")).await?;
    let d = recv(&mut rx, wait(&o), "delivery").await?;
    ack(d, "delivery").await?;
    quiet(&mut rx, o.quiet_period, "after ack").await?;
    // A new subscriber does not see it either.
    drop(rx);
    let mut rx = subscribe(&t, &q, 4).await?;
    quiet(&mut rx, o.quiet_period, "new subscriber after ack").await
}

async fn nack_with_delay(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let mut rx = subscribe(&t, &q, 1).await?;
    send(&t, msg(&q, "m1", "retry me")).await?;
    let d = recv(&mut rx, wait(&o), "first delivery").await?;
    expect("first attempt", d.attempt, 1)?;
    let delay = NACK_DELAY;
    let nacked = Instant::now();
    d.acker
        .nack(delay)
        .await
        .map_err(|e| format!("nack failed: {e}"))?;
    let d = recv(&mut rx, wait(&o) + delay, "redelivery after nack").await?;
    let after = nacked.elapsed();
    if after < delay.mul_f64(0.8) {
        return Err(format!(
            "redelivered after {after:?}, before the {delay:?} delay"
        ));
    }
    expect("body", d.body.as_ref(), b"retry me".as_ref())?;
    expect("attempt after nack", d.attempt, 2)?;
    ack(d, "redelivery").await?;
    // A zero-delay nack redelivers promptly.
    send(&t, msg(&q, "m2", "again")).await?;
    let d = recv(&mut rx, wait(&o), "second message").await?;
    d.acker
        .nack(Duration::ZERO)
        .await
        .map_err(|e| format!("nack(0) failed: {e}"))?;
    let d = recv(&mut rx, NACK_ZERO_WITHIN, "redelivery after nack(0)").await?;
    expect("attempt after nack(0)", d.attempt, 2)?;
    ack(d, "second redelivery").await
}

async fn redelivery_after_drop(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    send(&t, msg(&q, "m1", "crash")).await?;
    {
        let mut rx = subscribe(&t, &q, 1).await?;
        let d = recv(&mut rx, wait(&o), "first delivery").await?;
        expect("first attempt", d.attempt, 1)?;
        // The consumer dies without settling.
        drop(d);
        drop(rx);
    }
    let mut rx = subscribe(&t, &q, 1).await?;
    let d = recv(&mut rx, wait(&o), "redelivery to a new subscriber").await?;
    expect("body", d.body.as_ref(), b"crash".as_ref())?;
    if d.attempt < 2 {
        return Err(format!("redelivery has attempt {}, want >= 2", d.attempt));
    }
    ack(d, "redelivery").await
}

async fn ordering_per_queue(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let n = o.ordering_count;
    for i in 0..n {
        send(&t, msg(&q, format!("m{i}"), format!("{i}"))).await?;
    }
    let mut rx = subscribe(&t, &q, 1).await?;
    for i in 0..n {
        let d = recv(&mut rx, wait(&o), &format!("message {i}")).await?;
        expect(&format!("message {i}"), preview(&d.body), i.to_string())?;
        ack(d, "ordered").await?;
    }
    Ok(())
}

async fn large_body(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let body: Vec<u8> = (0..o.large_body).map(|i| (i * 31 % 251) as u8).collect();
    send(&t, msg(&q, "big", body.clone())).await?;
    let mut rx = subscribe(&t, &q, 1).await?;
    let d = recv(&mut rx, wait(&o), "large body").await?;
    expect("large body length", d.body.len(), body.len())?;
    if d.body.as_ref() != body.as_slice() {
        return Err("large body content differs".into());
    }
    ack(d, "large body").await
}

async fn send_all(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let qa = setup(&t, &ns, "a").await?;
    let qb = setup(&t, &ns, "b").await?;
    let msgs: Vec<OutMessage> = (0..50)
        .map(|i| {
            msg(
                if i % 2 == 0 { &qa } else { &qb },
                format!("s{i}"),
                format!("{i}"),
            )
        })
        .collect();
    t.send_all(msgs)
        .await
        .map_err(|e| format!("send_all: {e}"))?;
    for (q, parity) in [(&qa, 0), (&qb, 1)] {
        let mut rx = subscribe(&t, q, 8).await?;
        let mut got = BTreeSet::new();
        for _ in 0..25 {
            let d = recv(&mut rx, wait(&o), q).await?;
            got.insert(preview(&d.body).parse::<usize>().unwrap_or(usize::MAX));
            ack(d, q).await?;
        }
        let want: BTreeSet<usize> = (0..50).filter(|i| i % 2 == parity).collect();
        expect(&format!("messages on {q}"), got, want)?;
        quiet(&mut rx, o.quiet_period, q).await?;
    }
    Ok(())
}

async fn dedup_by_id(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    if !o.deduplicates {
        return Ok(());
    }
    let q = setup(&t, &ns, "a").await?;
    send(&t, msg(&q, "same-id", "first")).await?;
    send(&t, msg(&q, "same-id", "second")).await?;
    send(&t, msg(&q, "other-id", "third")).await?;
    let mut rx = subscribe(&t, &q, 4).await?;
    let d = recv(&mut rx, wait(&o), "first").await?;
    expect("first body", preview(&d.body), "first".into())?;
    ack(d, "first").await?;
    let d = recv(&mut rx, wait(&o), "third").await?;
    expect("after a duplicate", preview(&d.body), "third".into())?;
    ack(d, "third").await?;
    quiet(&mut rx, o.quiet_period, "duplicate").await
}

async fn prefetch_bound(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    for i in 0..5 {
        send(&t, msg(&q, format!("p{i}"), format!("{i}"))).await?;
    }
    let mut rx = subscribe(&t, &q, 2).await?;
    let d1 = recv(&mut rx, wait(&o), "first").await?;
    let d2 = recv(&mut rx, wait(&o), "second").await?;
    quiet(
        &mut rx,
        o.quiet_period,
        "third while two are unacked (prefetch 2)",
    )
    .await?;
    ack(d1, "first").await?;
    let d3 = recv(&mut rx, wait(&o), "third after an ack").await?;
    ack(d2, "second").await?;
    ack(d3, "third").await?;
    for i in 3..5 {
        let d = recv(&mut rx, wait(&o), &format!("message {i}")).await?;
        ack(d, "rest").await?;
    }
    Ok(())
}

async fn competing_consumers(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let n = 40;
    let msgs = (0..n)
        .map(|i| msg(&q, format!("c{i}"), format!("{i}")))
        .collect();
    t.send_all(msgs)
        .await
        .map_err(|e| format!("send_all: {e}"))?;
    let rx1 = subscribe(&t, &q, 2).await?;
    let rx2 = subscribe(&t, &q, 2).await?;
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for mut rx in [rx1, rx2] {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(d) = rx.recv().await {
                let body = preview(&d.body);
                if d.acker.ack().await.is_err() || tx.send(body).is_err() {
                    return;
                }
            }
        }));
    }
    drop(tx);
    let mut got = HashSet::new();
    let deadline = Instant::now() + wait(&o);
    let result = async {
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, seen.recv()).await {
                Ok(Some(b)) => {
                    if !got.insert(b.clone()) {
                        return Err(format!("message {b} delivered to both consumers"));
                    }
                }
                _ => return Err(format!("only {} of {n} messages consumed", got.len())),
            }
        }
        Ok(())
    }
    .await;
    for t in tasks {
        t.abort();
    }
    result
}

async fn in_progress(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    send(&t, msg(&q, "m1", "slow")).await?;
    let mut rx = subscribe(&t, &q, 1).await?;
    let d = recv(&mut rx, wait(&o), "delivery").await?;
    for _ in 0..3 {
        d.acker
            .in_progress()
            .await
            .map_err(|e| format!("in_progress failed: {e}"))?;
    }
    if let Some(every) = d.acker.progress_interval() {
        if every.is_zero() {
            return Err("progress_interval is zero".into());
        }
    }
    ack(d, "after in_progress").await?;
    quiet(&mut rx, o.quiet_period, "after in_progress and ack").await
}

/// A `recv` future dropped mid-wait loses nothing; deliveries left unacked when a
/// subscriber shuts down come back; acked ones do not.
async fn shutdown_cancel_safe(t: Arc<dyn Transport>, ns: String, o: Options) -> CaseResultInner {
    let q = setup(&t, &ns, "a").await?;
    let mut rx = subscribe(&t, &q, 4).await?;
    // Cancel waiting receives repeatedly while messages arrive around the cancellations;
    // a receive that completes keeps its delivery.
    let mut got = Vec::new();
    for i in 0..3 {
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(30), rx.recv()).await {
            got.push(r.map_err(|e| format!("receive failed: {e}"))?);
        }
        send(&t, msg(&q, format!("x{i}"), format!("{i}"))).await?;
    }
    while got.len() < 3 {
        got.push(recv(&mut rx, wait(&o), "message after cancelled receives").await?);
    }
    let ids: BTreeSet<String> = got.iter().map(|d| preview(&d.body)).collect();
    expect(
        "bodies after cancelled receives",
        ids,
        ["0", "1", "2"].iter().map(|s| s.to_string()).collect(),
    )?;
    if let Some(d) = got.iter().find(|d| d.attempt != 1) {
        return Err(format!(
            "a cancelled receive lost a delivery: attempt {}",
            d.attempt
        ));
    }
    let first = got.remove(0);
    let acked = preview(&first.body);
    ack(first, "first").await?;
    let unacked = got;
    let want: BTreeSet<String> = ["0", "1", "2"]
        .iter()
        .map(|s| s.to_string())
        .filter(|s| *s != acked)
        .collect();
    // Shutdown: the receiver goes away with two deliveries unsettled.
    drop(rx);
    drop(unacked);
    let mut rx = subscribe(&t, &q, 4).await?;
    let mut back = BTreeSet::new();
    for _ in 0..2 {
        let d = recv(&mut rx, wait(&o), "unacked delivery after shutdown").await?;
        back.insert(preview(&d.body));
        ack(d, "after shutdown").await?;
    }
    expect("redelivered after shutdown", back, want)?;
    quiet(&mut rx, o.quiet_period, "acked message after shutdown").await
}
