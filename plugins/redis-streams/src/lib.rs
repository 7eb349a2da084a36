//! Asya transport over Redis Streams, speaking RESP from inside the component (see
//! README.md for the configuration and the data layout).
//!
//! - a queue is a stream (`<prefix><queue>`) read through one consumer group; every
//!   connection is its own consumer;
//! - `ack` = `XACK` + `XDEL`; deliveries whose consumer died are taken over with
//!   `XAUTOCLAIM` once idle for `ack_wait_ms`; `in-progress` resets that idle time;
//! - `nack(delay)` moves the entry to a sorted set `<stream>:delayed` (score = due time,
//!   server clock), from where a receiver moves it back when due (a script, atomic);
//! - `send` is `SET NX PX` on `<prefix>dedup:<queue>:<message-id>` + `XADD` in one script:
//!   a second message with the same id within `dedup_ttl_ms` is dropped.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::time::{Duration, Instant};

use asya_sdk::transport::{Delivery, Outgoing, Transport};
use asya_sdk::{Config, Error};

mod resp;

use resp::Value;

/// `SET NX` the dedup key, then `XADD`. KEYS: stream, dedup key. ARGV: ttl ms, id, body.
const SEND_LUA: &str = r#"
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 0 end
end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'body', ARGV[3])
return 1
"#;

/// Park a pending entry in the delayed set and settle it. KEYS: stream, delayed set.
/// ARGV: group, entry id, delay ms, consumer. Returns 1, 0 (not pending) or -1 (owned by
/// another consumer).
const NACK_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then return 0 end
if p[1][2] ~= ARGV[4] then return -1 end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #e == 0 then return 0 end
local f = e[1][2]
local prior, id, body = 0, '', ''
for i = 1, #f, 2 do
  if f[i] == 'n' then prior = tonumber(f[i + 1])
  elseif f[i] == 'id' then id = f[i + 1]
  elseif f[i] == 'body' then body = f[i + 1] end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[2] .. '|' .. (prior + tonumber(p[1][4])) .. '|' .. #id .. '|' .. id .. body
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), member)
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"#;

/// Move due entries of the delayed set back into the stream. KEYS: stream, delayed set.
/// ARGV: max.
const MOVE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local a = string.find(m, '|', 1, true)
  local b = string.find(m, '|', a + 1, true)
  local c = string.find(m, '|', b + 1, true)
  local n = string.sub(m, a + 1, b - 1)
  local len = tonumber(string.sub(m, b + 1, c - 1))
  redis.call('XADD', KEYS[1], '*', 'id', string.sub(m, c + 1, c + len), 'body', string.sub(m, c + len + 1), 'n', n)
  redis.call('ZREM', KEYS[2], m)
end
return #due
"#;

/// Parsed configuration (README.md).
#[derive(Debug, Clone)]
struct Settings {
    addr: String,
    username: Option<String>,
    password: Option<String>,
    db: Option<i64>,
    group: String,
    prefix: String,
    ack_wait_ms: u64,
    dedup_ttl_ms: u64,
}

impl Settings {
    fn parse(c: &Config) -> Result<Settings, Error> {
        let v = c.value();
        if !(v.is_object() || v.is_null()) {
            return Err(Error::new("config must be a JSON object"));
        }
        let opt = |k: &str| c.str_or(k, "").map(|s| Some(s).filter(|s| !s.is_empty()));
        let num = |k: &str, d: u64| match v.get(k) {
            None | Some(asya_sdk::serde_json::Value::Null) => Ok(d),
            Some(n) => n
                .as_u64()
                .ok_or_else(|| Error::new(format!("config {k:?} must be a non-negative integer"))),
        };
        let s = Settings {
            addr: c.str_or("addr", "127.0.0.1:6379")?,
            username: opt("username")?,
            password: opt("password")?,
            db: match v.get("db") {
                None | Some(asya_sdk::serde_json::Value::Null) => None,
                Some(n) => Some(
                    n.as_i64()
                        .ok_or_else(|| Error::new("config \"db\" must be an integer"))?,
                ),
            },
            group: c.str_or("group", "asya")?,
            prefix: c.str_or("prefix", "")?,
            ack_wait_ms: num("ack_wait_ms", 30_000)?,
            dedup_ttl_ms: num("dedup_ttl_ms", 120_000)?,
        };
        if s.ack_wait_ms == 0 {
            return Err(Error::new(
                "config \"ack_wait_ms\" must be greater than zero",
            ));
        }
        if s.group.is_empty() {
            return Err(Error::new("config \"group\" must not be empty"));
        }
        Ok(s)
    }
}

pub struct RedisStreams {
    cfg: Settings,
    conn: Option<resp::Conn>,
    consumer: String,
    shas: [String; 3],
    groups: HashSet<String>,
    next_claim: Option<Instant>,
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::retryable(format!("redis {what}: {e}"))
}

fn reply_err(what: &str, v: &Value) -> Option<Error> {
    match v {
        Value::Error(e) => Some(Error::retryable(format!("redis {what}: {e}"))),
        _ => None,
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

/// Tags are `<stream>\n<entry id>`.
fn split_tag(tag: &str) -> Result<(&str, &str), Error> {
    tag.rsplit_once('\n')
        .ok_or_else(|| Error::new(format!("malformed delivery tag {tag:?}")))
}

impl RedisStreams {
    fn open(cfg: &Settings) -> Result<(resp::Conn, [String; 3]), Error> {
        let mut c = resp::Conn::connect(&cfg.addr)
            .map_err(|e| io_err(&format!("connect to {}", cfg.addr), e))?;
        if let Some(pw) = &cfg.password {
            let v = match &cfg.username {
                Some(u) => c.call(&[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => c.call(&[b"AUTH", pw.as_bytes()]),
            }
            .map_err(|e| io_err("AUTH", e))?;
            if let Some(e) = reply_err("AUTH", &v) {
                return Err(Error::new(e.message));
            }
        }
        if let Some(db) = cfg.db {
            let v = c
                .call(&[b"SELECT", db.to_string().as_bytes()])
                .map_err(|e| io_err("SELECT", e))?;
            if let Some(e) = reply_err("SELECT", &v) {
                return Err(Error::new(e.message));
            }
        }
        for s in [SEND_LUA, NACK_LUA, MOVE_LUA] {
            c.push(&[b"SCRIPT", b"LOAD", s.as_bytes()]);
        }
        let shas = c.run(3).map_err(|e| io_err("SCRIPT LOAD", e))?;
        let mut out: [String; 3] = Default::default();
        for (i, v) in shas.into_iter().enumerate() {
            if let Some(e) = reply_err("SCRIPT LOAD", &v) {
                return Err(e);
            }
            out[i] = String::from_utf8(v.into_bytes().unwrap_or_default()).unwrap_or_default();
        }
        Ok((c, out))
    }

    /// Run `f` on the connection; on an I/O error reconnect once and run it again (every
    /// operation here is safe to repeat: sends are deduplicated by message id).
    fn with_conn<R>(
        &mut self,
        mut f: impl FnMut(
            &mut resp::Conn,
            &Settings,
            &[String; 3],
            &mut HashSet<String>,
            &str,
        ) -> Result<R, Op>,
    ) -> Result<R, Error> {
        for attempt in 0..2 {
            if self.conn.is_none() {
                let (c, shas) = Self::open(&self.cfg)?;
                self.conn = Some(c);
                self.shas = shas;
                self.groups.clear();
            }
            let conn = self.conn.as_mut().expect("connected above");
            match f(
                conn,
                &self.cfg,
                &self.shas,
                &mut self.groups,
                &self.consumer,
            ) {
                Ok(r) => return Ok(r),
                Err(Op::Io(what, e)) => {
                    self.conn = None;
                    if attempt == 1 {
                        return Err(io_err(what, e));
                    }
                }
                Err(Op::Fail(e)) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    fn stream_key(&self, queue: &str) -> String {
        format!("{}{queue}", self.cfg.prefix)
    }
}

/// Why an operation stopped: the connection broke (retry once) or a definite failure.
enum Op {
    Io(&'static str, io::Error),
    Fail(Error),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> Op {
    move |e| Op::Io(what, e)
}

fn check(what: &str, v: &Value) -> Result<(), Op> {
    match reply_err(what, v) {
        Some(e) => Err(Op::Fail(e)),
        None => Ok(()),
    }
}

/// Create the consumer group of `key` once per connection (from the start of the stream,
/// so messages sent before the first receive are delivered).
fn ensure_group(
    c: &mut resp::Conn,
    cfg: &Settings,
    groups: &mut HashSet<String>,
    key: &str,
) -> Result<(), Op> {
    if groups.contains(key) {
        return Ok(());
    }
    let v = c
        .call(&[
            b"XGROUP",
            b"CREATE",
            key.as_bytes(),
            cfg.group.as_bytes(),
            b"0",
            b"MKSTREAM",
        ])
        .map_err(io("XGROUP CREATE"))?;
    match &v {
        Value::Error(e) if e.starts_with("BUSYGROUP") => {}
        v => check("XGROUP CREATE", v)?,
    }
    groups.insert(key.to_owned());
    Ok(())
}

/// Entries `[id, [field, value, ...]]` to deliveries, with `counts` deliveries so far in
/// this stream entry.
fn entries(key: &str, items: Vec<Value>, counts: &[u32]) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Some(mut pair) = item.into_array() else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop().and_then(Value::into_array);
        let Some(id) = pair.pop().and_then(Value::into_bytes) else {
            continue;
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        let (mut body, mut msg_id, mut prior) = (Vec::new(), None, 0u32);
        let mut it = fields.unwrap_or_default().into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match k.into_bytes().as_deref() {
                Some(b"body") => body = v.into_bytes().unwrap_or_default(),
                Some(b"id") => {
                    msg_id = v
                        .into_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                }
                Some(b"n") => prior = v.as_int().unwrap_or(0).max(0) as u32,
                _ => {}
            }
        }
        out.push(Delivery {
            tag: format!("{key}\n{id}"),
            body,
            delivery_count: prior + counts.get(i).copied().unwrap_or(1).max(1),
            message_id: msg_id,
        });
    }
    out
}

impl Transport for RedisStreams {
    fn connect(config: &Config) -> Result<Self, Error> {
        let cfg = Settings::parse(config)?;
        let (conn, shas) = Self::open(&cfg)?;
        Ok(RedisStreams {
            consumer: format!("c-{:016x}", random_u64()),
            cfg,
            conn: Some(conn),
            shas,
            groups: HashSet::new(),
            next_claim: None,
        })
    }

    fn receive(&mut self, queue: &str, max: u32, wait: Duration) -> Result<Vec<Delivery>, Error> {
        let key = self.stream_key(queue);
        if max == 0 {
            // Only make sure the stream and its group exist (`asya-host provision`).
            return self.with_conn(|c, cfg, _, groups, _| {
                ensure_group(c, cfg, groups, &key).map(|()| Vec::new())
            });
        }
        let max_s = max.to_string();
        // Take over deliveries of dead consumers, at most every ack_wait / 4.
        let now = Instant::now();
        let claim = self.next_claim.is_none_or(|t| now >= t);
        if claim {
            self.next_claim = Some(now + Duration::from_millis(self.cfg.ack_wait_ms / 4 + 1));
        }
        self.with_conn(|c, cfg, shas, groups, consumer| {
            ensure_group(c, cfg, groups, &key)?;
            if claim {
                let idle = cfg.ack_wait_ms.to_string();
                let v = c
                    .call(&[
                        b"XAUTOCLAIM",
                        key.as_bytes(),
                        cfg.group.as_bytes(),
                        consumer.as_bytes(),
                        idle.as_bytes(),
                        b"0-0",
                        b"COUNT",
                        max_s.as_bytes(),
                    ])
                    .map_err(io("XAUTOCLAIM"))?;
                check("XAUTOCLAIM", &v)?;
                let claimed = v
                    .into_array()
                    .and_then(|mut a| (a.len() >= 2).then(|| a.swap_remove(1)))
                    .and_then(Value::into_array)
                    .unwrap_or_default();
                let full = claimed.len() >= max as usize;
                if !claimed.is_empty() {
                    // Delivery counts of the claimed entries.
                    let ids: Vec<Vec<u8>> = claimed
                        .iter()
                        .map(|e| match e {
                            Value::Array(Some(p)) => p
                                .first()
                                .cloned()
                                .and_then(Value::into_bytes)
                                .unwrap_or_default(),
                            _ => Vec::new(),
                        })
                        .collect();
                    for id in &ids {
                        c.push(&[
                            b"XPENDING",
                            key.as_bytes(),
                            cfg.group.as_bytes(),
                            id,
                            id,
                            b"1",
                        ]);
                    }
                    let counts: Vec<u32> = c
                        .run(ids.len())
                        .map_err(io("XPENDING"))?
                        .into_iter()
                        .map(|v| {
                            v.into_array()
                                .and_then(|mut a| a.pop())
                                .and_then(Value::into_array)
                                .and_then(|e| e.get(3).and_then(Value::as_int))
                                .unwrap_or(2) as u32
                        })
                        .collect();
                    return Ok((entries(&key, claimed, &counts), full));
                }
            }
            // Due delayed messages back into the stream, then read new ones.
            let delayed = format!("{key}:delayed");
            c.push(&[
                b"EVALSHA",
                shas[2].as_bytes(),
                b"2",
                key.as_bytes(),
                delayed.as_bytes(),
                max_s.as_bytes(),
            ]);
            let block = wait.as_millis().to_string();
            let mut args: Vec<&[u8]> = vec![
                b"XREADGROUP",
                b"GROUP",
                cfg.group.as_bytes(),
                consumer.as_bytes(),
                b"COUNT",
                max_s.as_bytes(),
            ];
            if !wait.is_zero() {
                args.extend([b"BLOCK".as_slice(), block.as_bytes()]);
            }
            args.extend([b"STREAMS".as_slice(), key.as_bytes(), b">"]);
            c.push(&args);
            let mut r = c.run(2).map_err(io("XREADGROUP"))?;
            let read = r.pop().unwrap_or(Value::Array(None));
            check("delayed move", &r[0])?;
            if let Value::Error(e) = &read {
                if e.starts_with("NOGROUP") {
                    groups.remove(&key);
                    return Ok((Vec::new(), false));
                }
            }
            check("XREADGROUP", &read)?;
            let items = read
                .into_array()
                .and_then(|mut streams| streams.pop())
                .and_then(Value::into_array)
                .and_then(|mut kv| kv.pop())
                .and_then(Value::into_array)
                .unwrap_or_default();
            Ok((entries(&key, items, &[]), false))
        })
        .map(|(got, more)| {
            if more {
                // A full batch of dead consumers' deliveries: look for more right away.
                self.next_claim = None;
            }
            got
        })
    }

    fn send(&mut self, messages: Vec<Outgoing>) -> Result<(), Error> {
        if messages.is_empty() {
            return Ok(());
        }
        self.with_conn(|c, cfg, shas, _, _| {
            let ttl = cfg.dedup_ttl_ms.to_string();
            for m in &messages {
                let key = format!("{}{}", cfg.prefix, m.queue);
                let dedup = format!("{}dedup:{}:{}", cfg.prefix, m.queue, m.message_id);
                c.push(&[
                    b"EVALSHA",
                    shas[0].as_bytes(),
                    b"2",
                    key.as_bytes(),
                    dedup.as_bytes(),
                    ttl.as_bytes(),
                    m.message_id.as_bytes(),
                    &m.body,
                ]);
            }
            for v in c.run(messages.len()).map_err(io("send"))? {
                check("send", &v)?;
            }
            Ok(())
        })
    }

    fn ack(&mut self, tag: &str) -> Result<(), Error> {
        let (key, id) = split_tag(tag)?;
        self.with_conn(|c, cfg, _, _, _| {
            c.push(&[b"XACK", key.as_bytes(), cfg.group.as_bytes(), id.as_bytes()]);
            c.push(&[b"XDEL", key.as_bytes(), id.as_bytes()]);
            let r = c.run(2).map_err(io("XACK"))?;
            check("XACK", &r[0])?;
            match r[0].as_int() {
                Some(1) => Ok(()),
                _ => Err(Op::Fail(Error::new(format!(
                    "delivery {id} of {key} is not pending (already settled)"
                )))),
            }
        })
    }

    fn nack(&mut self, tag: &str, delay: Duration) -> Result<(), Error> {
        let (key, id) = split_tag(tag)?;
        let delayed = format!("{key}:delayed");
        let ms = delay.as_millis().to_string();
        self.with_conn(|c, cfg, shas, _, consumer| {
            let v = c
                .call(&[
                    b"EVALSHA",
                    shas[1].as_bytes(),
                    b"2",
                    key.as_bytes(),
                    delayed.as_bytes(),
                    cfg.group.as_bytes(),
                    id.as_bytes(),
                    ms.as_bytes(),
                    consumer.as_bytes(),
                ])
                .map_err(io("nack"))?;
            check("nack", &v)?;
            match v.as_int() {
                Some(1) => Ok(()),
                Some(-1) => Err(Op::Fail(Error::new(format!(
                    "delivery {id} of {key} was taken over by another consumer"
                )))),
                _ => Err(Op::Fail(Error::new(format!(
                    "delivery {id} of {key} is not pending (already settled)"
                )))),
            }
        })
    }

    fn in_progress(&mut self, tag: &str) -> Result<(), Error> {
        let (key, id) = split_tag(tag)?;
        self.with_conn(|c, cfg, _, _, consumer| {
            let v = c
                .call(&[
                    b"XCLAIM",
                    key.as_bytes(),
                    cfg.group.as_bytes(),
                    consumer.as_bytes(),
                    b"0",
                    id.as_bytes(),
                    b"JUSTID",
                ])
                .map_err(io("XCLAIM"))?;
            check("XCLAIM", &v)
        })
    }

    fn close(&mut self) {
        // Unsettled deliveries stay pending under this consumer and are taken over by
        // another one after ack_wait_ms.
        self.conn = None;
    }
}

asya_sdk::export_transport!(RedisStreams);
