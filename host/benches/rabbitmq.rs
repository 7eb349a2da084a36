//! The WebAssembly RabbitMQ transport (`plugins/rabbitmq` through `ASYA_TRANSPORT=wasm`)
//! against the same AMQP operations issued by a native Rust client (`lapin`, tokio) inside
//! the host, both on one broker (`$ASYA_TEST_RABBITMQ`, default 127.0.0.1:5672, in a vhost
//! of its own, deleted afterwards).
//!
//! Operations per message, both sides: a persistent `basic.publish` (default exchange,
//! mandatory, message id) on a channel in confirm mode, waiting for the confirms of each
//! batch; delivery to a consumer with `basic.qos` prefetch; `basic.ack`. Two shapes:
//! - `batched`: publish in batches of 100, consume with prefetch 64, ack each message;
//! - `one-by-one`: send one (confirmed), receive it, ack it.
//!
//! `cargo bench -p asya-host --bench rabbitmq` (`ASYA_BENCH_N` messages, default 20000;
//! `ASYA_BENCH_ROUNDS` rounds, default 3: medians reported).

use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::{plugin, rabbitmq, Vhost};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

const BATCH: usize = 100;
const PREFETCH: usize = 64;
const ONE_BY_ONE: usize = 2_000;

fn body(i: usize) -> Vec<u8> {
    let mut b = format!(
        r#"{{"id":"e-{i}","route":{{"prev":[],"curr":"a","next":["b"]}},"headers":{{}},"payload":{{"i":{i},"text":""#
    )
    .into_bytes();
    b.resize(240, b'x');
    b.extend_from_slice(br#""}}"#);
    b
}

// --- wasm -------------------------------------------------------------------------------

async fn wasm_batched(t: &Arc<WasmTransport>, queue: &str, n: usize) -> Duration {
    let queue = &asya_host::queue::QueueName::new(
        "bench",
        queue.strip_prefix("asya-bench-").unwrap_or(queue),
    )
    .expect("a valid bench queue");
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let msgs = chunk
            .iter()
            .map(|&i| OutMessage {
                queue: queue.clone(),
                id: format!("{queue}-{i}"),
                body: body(i).into(),
            })
            .collect();
        t.send_all(msgs).await.unwrap();
    }
    let published = start.elapsed();
    let mut rx = t.subscribe(queue, PREFETCH).await.unwrap();
    for _ in 0..n {
        let d = rx.recv().await.unwrap();
        d.acker.ack().await.unwrap();
    }
    if std::env::var_os("ASYA_BENCH_PHASES").is_some() {
        println!(
            "  wasm batched: publish {published:?}, consume {:?}",
            start.elapsed() - published
        );
    }
    start.elapsed()
}

async fn wasm_one_by_one(t: &Arc<WasmTransport>, queue: &str, n: usize) -> Duration {
    let queue = &asya_host::queue::QueueName::new(
        "bench",
        queue.strip_prefix("asya-bench-").unwrap_or(queue),
    )
    .expect("a valid bench queue");
    let mut rx = t.subscribe(queue, 1).await.unwrap();
    let start = Instant::now();
    for i in 0..n {
        t.send(OutMessage {
            queue: queue.clone(),
            id: format!("{queue}-{i}"),
            body: body(i).into(),
        })
        .await
        .unwrap();
        let d = rx.recv().await.unwrap();
        d.acker.ack().await.unwrap();
    }
    start.elapsed()
}

// --- native -----------------------------------------------------------------------------

struct Native {
    publisher: Channel,
    consumer_conn: Connection,
}

impl Native {
    async fn connect(uri: &str) -> (Native, Connection) {
        let conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap();
        let publisher = conn.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let consumer_conn = Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap();
        (
            Native {
                publisher,
                consumer_conn,
            },
            conn,
        )
    }

    /// The same layout the component declares: topic exchange, durable queue, binding.
    async fn declare(&self, queue: &str) {
        let ch = &self.publisher;
        ch.exchange_declare(
            "asya".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            queue.into(),
            "asya".into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }

    async fn send(&self, queue: &str, ids: &[usize]) {
        let mut confirms = Vec::with_capacity(ids.len());
        for &i in ids {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(format!("{queue}-{i}").into());
            confirms.push(
                self.publisher
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body(i),
                        props,
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
    }

    async fn consumer(&self, queue: &str, prefetch: u16) -> (Channel, lapin::Consumer) {
        let ch = self.consumer_conn.create_channel().await.unwrap();
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let c = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        (ch, c)
    }

    async fn batched(&self, queue: &str, n: usize) -> Duration {
        self.declare(queue).await;
        let start = Instant::now();
        let ids: Vec<usize> = (0..n).collect();
        for chunk in ids.chunks(BATCH) {
            self.send(queue, chunk).await;
        }
        let published = start.elapsed();
        let (_ch, mut consumer) = self.consumer(queue, PREFETCH as u16).await;
        for _ in 0..n {
            let d = consumer.next().await.unwrap().unwrap();
            assert!(!d.data.is_empty());
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        if std::env::var_os("ASYA_BENCH_PHASES").is_some() {
            println!(
                "  native batched: publish {published:?}, consume {:?}",
                start.elapsed() - published
            );
        }
        start.elapsed()
    }

    async fn one_by_one(&self, queue: &str, n: usize) -> Duration {
        self.declare(queue).await;
        let (_ch, mut consumer) = self.consumer(queue, 1).await;
        let start = Instant::now();
        for i in 0..n {
            self.send(queue, &[i]).await;
            let d = consumer.next().await.unwrap().unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        start.elapsed()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env_usize("ASYA_BENCH_N", 20_000);
    let rounds = env_usize("ASYA_BENCH_ROUNDS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let vhost = Vhost::create("asya-bench");
    let wasm = plugin("rabbitmq");
    rt.block_on(async {
        let cfg = WasmConfig::new(
            &wasm,
            &vhost.config().to_string(),
            AllowList::parse(&rabbitmq::addr()).await.unwrap(),
        );
        let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());
        let uri = format!("amqp://guest:guest@{}/{}", rabbitmq::addr(), vhost.name);
        let (native, _conn) = Native::connect(&uri).await;
        // Warm-up: both paths, small.
        wasm_batched(&t, "asya-bench-warmw", 500).await;
        native.batched("asya-bench-warmn", 500).await;

        let (mut wb, mut nb, mut w1, mut n1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let d = wasm_batched(&t, &format!("asya-bench-wb{r}"), n).await;
            wb.push(n as f64 / d.as_secs_f64());
            let d = native.batched(&format!("asya-bench-nb{r}"), n).await;
            nb.push(n as f64 / d.as_secs_f64());
            let d = wasm_one_by_one(&t, &format!("asya-bench-w1{r}"), ONE_BY_ONE).await;
            w1.push(ONE_BY_ONE as f64 / d.as_secs_f64());
            let d = native.one_by_one(&format!("asya-bench-n1{r}"), ONE_BY_ONE).await;
            n1.push(ONE_BY_ONE as f64 / d.as_secs_f64());
            println!(
                "round {r}: batched wasm {:.0}/s native {:.0}/s; one-by-one wasm {:.0}/s native {:.0}/s",
                wb[r], nb[r], w1[r], n1[r]
            );
        }
        let (wb, nb, w1, n1) = (median(wb), median(nb), median(w1), median(n1));
        println!("rabbitmq (rabbitmq component vs native lapin client, {rounds} rounds, medians)");
        println!(
            "  batched    ({n} msgs, send batches of {BATCH}, prefetch {PREFETCH}, ack each): wasm {wb:>8.0} msg/s  native {nb:>8.0} msg/s  ratio {:.2}",
            wb / nb
        );
        println!(
            "  one-by-one ({ONE_BY_ONE} msgs, send + receive + ack):                         wasm {w1:>8.0} msg/s  native {n1:>8.0} msg/s  ratio {:.2}",
            w1 / n1
        );
        println!("  restarts of the wasm instance: {}", t.restarts());
    });
}
