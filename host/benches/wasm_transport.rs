//! The WebAssembly Redis Streams transport (`plugins/redis-streams` through
//! `ASYA_TRANSPORT=wasm`) against the same Redis operations issued by a native Rust client
//! (the `redis` crate, tokio) inside the host, both on one `redis-server` started here.
//!
//! Operations per message, both sides: the dedup+XADD script (pipelined per batch on send),
//! XREADGROUP (COUNT = prefetch, with the delayed-set move script pipelined before it),
//! XACK + XDEL. Two shapes:
//! - `batched`: publish in batches of 100, consume with prefetch 64, ack each message;
//! - `one-by-one`: send one, receive it, ack it (a round trip each, no batching).
//!
//! `cargo bench -p asya-host --bench wasm_transport` (`ASYA_BENCH_N` messages, default
//! 20000; `ASYA_BENCH_ROUNDS` rounds, default 3: medians reported).

use std::sync::Arc;
use std::time::{Duration, Instant};

use asya_host::queue::QueueName;
use asya_host::transport::wasm::{AllowList, WasmConfig, WasmTransport};
use asya_host::transport::{OutMessage, Transport};
use asya_test_support::{plugin, RedisServer};
use redis::aio::MultiplexedConnection;

const BATCH: usize = 100;
const PREFETCH: usize = 64;
const ONE_BY_ONE: usize = 2_000;

const SEND_LUA: &str = r#"
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 0 end
end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'body', ARGV[3])
return 1
"#;

const MOVE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[2], m)
end
return #due
"#;

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

fn bench_queue(actor: &str) -> QueueName {
    QueueName::new("bench", actor).unwrap()
}

async fn wasm_batched(t: &Arc<WasmTransport>, queue: &QueueName, n: usize) -> Duration {
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

async fn wasm_one_by_one(t: &Arc<WasmTransport>, queue: &QueueName, n: usize) -> Duration {
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
    send: redis::Script,
    mv: redis::Script,
}

impl Native {
    fn new() -> Native {
        Native {
            send: redis::Script::new(SEND_LUA),
            mv: redis::Script::new(MOVE_LUA),
        }
    }

    /// `SCRIPT LOAD` both scripts (pipelines invoke them by hash).
    async fn load(c: &mut MultiplexedConnection) {
        for lua in [SEND_LUA, MOVE_LUA] {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(lua)
                .query_async(c)
                .await
                .unwrap();
        }
    }

    async fn ensure_group(c: &mut MultiplexedConnection, queue: &str) {
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(queue)
            .arg("asya")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(c)
            .await;
        if let Err(e) = r {
            assert!(e.to_string().contains("BUSYGROUP"), "{e}");
        }
    }

    async fn send(&self, c: &mut MultiplexedConnection, queue: &str, ids: &[usize]) {
        let mut p = redis::pipe();
        for &i in ids {
            p.invoke_script(
                self.send
                    .key(queue)
                    .key(format!("dedup:{queue}:{queue}-{i}"))
                    .arg(120_000)
                    .arg(format!("{queue}-{i}"))
                    .arg(body(i)),
            );
        }
        let _: Vec<i64> = p.query_async(c).await.unwrap();
    }

    /// Move script + XREADGROUP; returns entry ids with their bodies.
    async fn receive(
        &self,
        c: &mut MultiplexedConnection,
        queue: &str,
        max: usize,
    ) -> Vec<(String, Vec<u8>)> {
        let mut p = redis::pipe();
        p.invoke_script(self.mv.key(queue).key(format!("{queue}:delayed")).arg(max));
        p.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("asya")
            .arg("native")
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(queue)
            .arg(">");
        let (_, read): (i64, Option<redis::streams::StreamReadReply>) =
            p.query_async(c).await.unwrap();
        let mut out = Vec::new();
        for k in read.map(|r| r.keys).unwrap_or_default() {
            for e in k.ids {
                let b = match e.map.get("body") {
                    Some(redis::Value::BulkString(b)) => b.clone(),
                    _ => Vec::new(),
                };
                out.push((e.id, b));
            }
        }
        out
    }

    async fn ack(c: &mut MultiplexedConnection, queue: &str, id: &str) {
        let (acked, _): (i64, i64) = redis::pipe()
            .cmd("XACK")
            .arg(queue)
            .arg("asya")
            .arg(id)
            .cmd("XDEL")
            .arg(queue)
            .arg(id)
            .query_async(c)
            .await
            .unwrap();
        assert_eq!(acked, 1);
    }

    async fn batched(&self, c: &mut MultiplexedConnection, queue: &str, n: usize) -> Duration {
        let start = Instant::now();
        let ids: Vec<usize> = (0..n).collect();
        for chunk in ids.chunks(BATCH) {
            self.send(c, queue, chunk).await;
        }
        let published = start.elapsed();
        Self::ensure_group(c, queue).await;
        let mut got = 0;
        while got < n {
            for (id, b) in self.receive(c, queue, PREFETCH).await {
                assert!(!b.is_empty());
                Self::ack(c, queue, &id).await;
                got += 1;
            }
        }
        if std::env::var_os("ASYA_BENCH_PHASES").is_some() {
            println!(
                "  native batched: publish {published:?}, consume {:?}",
                start.elapsed() - published
            );
        }
        start.elapsed()
    }

    async fn one_by_one(&self, c: &mut MultiplexedConnection, queue: &str, n: usize) -> Duration {
        Self::ensure_group(c, queue).await;
        let start = Instant::now();
        for i in 0..n {
            self.send(c, queue, &[i]).await;
            let got = self.receive(c, queue, 1).await;
            assert_eq!(got.len(), 1);
            Self::ack(c, queue, &got[0].0).await;
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
    let server = RedisServer::start();
    let wasm = plugin("redis_streams");
    rt.block_on(async {
        let cfg = WasmConfig::new(
            &wasm,
            &serde_json::json!({ "addr": server.addr(), "ack_wait_ms": 30_000 }).to_string(),
            AllowList::parse(&server.addr()).await.unwrap(),
        );
        let t = Arc::new(WasmTransport::connect(cfg).await.unwrap());
        let client = redis::Client::open(format!("redis://{}/", server.addr())).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let native = Native::new();
        Native::load(&mut c).await;
        // Warm-up: both paths, small.
        wasm_batched(&t, &bench_queue("warm-w"), 500).await;
        native.batched(&mut c, "warm-n", 500).await;

        let (mut wb, mut nb, mut w1, mut n1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let d = wasm_batched(&t, &bench_queue(&format!("wb{r}")), n).await;
            wb.push(n as f64 / d.as_secs_f64());
            let d = native.batched(&mut c, &format!("nb{r}"), n).await;
            nb.push(n as f64 / d.as_secs_f64());
            let d = wasm_one_by_one(&t, &bench_queue(&format!("w1{r}")), ONE_BY_ONE).await;
            w1.push(ONE_BY_ONE as f64 / d.as_secs_f64());
            let d = native.one_by_one(&mut c, &format!("n1{r}"), ONE_BY_ONE).await;
            n1.push(ONE_BY_ONE as f64 / d.as_secs_f64());
            println!(
                "round {r}: batched wasm {:.0}/s native {:.0}/s; one-by-one wasm {:.0}/s native {:.0}/s",
                wb[r], nb[r], w1[r], n1[r]
            );
        }
        let (wb, nb, w1, n1) = (median(wb), median(nb), median(w1), median(n1));
        println!("wasm_transport (redis-streams component vs native redis crate, {rounds} rounds, medians)");
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
