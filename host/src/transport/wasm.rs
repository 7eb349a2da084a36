//! `ASYA_TRANSPORT=wasm`: a [`Transport`] that drives a transport component (the
//! `transport-plugin` world of `wit/`).
//!
//! - One component instance per broker connection, in its own store with an async WASI p2
//!   context that grants clocks, randomness and TCP to the addresses of
//!   `ASYA_TRANSPORT_ALLOW` — nothing else (no files, environment, UDP, listening).
//! - Calls into one instance are serialized behind a tokio mutex and bounded twice: an
//!   epoch deadline (a runaway guest traps) and a wall-clock timeout (a guest blocked in
//!   host I/O); both are `wait + margin` for `receive`, `margin` for the other calls.
//! - A trap, a deadline or a cancelled call discards the instance; the next call
//!   instantiates a new one and connects again. Deliveries of the old connection are not
//!   acked by us: the broker redelivers them (their acks fail with a clear error).
//! - Each subscriber has its own connection and a background task that calls
//!   `receive(queue, max, wait)` in a loop and buffers deliveries in a channel, so
//!   [`Receiver::recv`] is cancel-safe; the number of unsettled deliveries (buffered or
//!   handed out) never exceeds `prefetch`.
//! - Publishing uses a small pool of connections of its own.
//!
//! `ASYA_TRANSPORT_ALLOW` is a comma-separated list of `host:port`, `ip:port` or
//! `cidr:port` (`port` may be `*`; IPv6 in brackets: `[::1]:6379`, `[fd00::/8]:*`).
//! Host names are resolved once, at startup, by the host; the guest may look up only the
//! host names of the list (any other name is refused without a query, address literals need
//! none), and every connection is still checked against the resolved addresses. A refused
//! connection or lookup is named in the error of the call that made it (with
//! `ASYA_TRANSPORT_ALLOW` / `--allow`), not only the guest's "permission denied".

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, Mutex, Notify, OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceAny;
use wasmtime::Store;
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::{
    Acker, Delivery, OutMessage, QueueName, Receiver, Sent, Transport, TransportError,
    TransportKind,
};
use crate::config::{ConfigError, Reader, Source};
use crate::metrics::Metrics;
use crate::plugin::bindings::{
    GuestDelivery, GuestError, TransportCalls, TransportPlugin, TransportPluginPre,
};
use crate::plugin::engine::{self, NetGuard, PluginEngine, StoreState};
use crate::plugin::PluginError;

/// Variables of `ASYA_TRANSPORT=wasm`.
pub mod vars {
    use crate::config::Var;

    pub const PLUGIN: Var = Var::optional(
        "ASYA_TRANSPORT_PLUGIN",
        "the transport component (.wasm); required with ASYA_TRANSPORT=wasm",
    );
    pub const CONFIG: Var = Var::new(
        "ASYA_TRANSPORT_CONFIG",
        "{}",
        "JSON configuration passed to the component's connect",
    );
    pub const ALLOW: Var = Var::optional(
        "ASYA_TRANSPORT_ALLOW",
        "host:port list the component may connect to (nothing when unset)",
    );

    /// Every variable of the WebAssembly transport, in `--help` order.
    pub const ALL: &[Var] = &[PLUGIN, CONFIG, ALLOW];
}

/// How long `receive` waits for a first message while nothing is unsettled.
pub const DEFAULT_WAIT: Duration = Duration::from_millis(200);
/// While deliveries are unsettled, `receive` does not wait in the broker (their acks share
/// the connection); after an empty answer the next poll waits for a settlement or this.
const IDLE_POLL: Duration = Duration::from_millis(5);
/// Extra time every call gets on top of its wait.
pub const DEFAULT_CALL_MARGIN: Duration = Duration::from_secs(5);
/// Deadline of instantiation plus `connect`.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Linear memory limit per instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;
/// `kind` label of plugin metrics for transports.
pub const KIND: &str = "transport";
/// Publishing connections.
const PUBLISHERS: usize = 2;
/// Messages per `send` call.
const SEND_CHUNK: usize = 256;
/// Backoff bounds of a failing receive loop.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// Allow-list

/// One allowed network: `addr/prefix`, on `port` (`None` = any port).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    net: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

impl Rule {
    fn matches(&self, a: &SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != a.port()) {
            return false;
        }
        let ip = match (self.net, a.ip()) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4),
            (_, ip) => Some(ip),
        };
        match (self.net, ip) {
            (IpAddr::V4(n), Some(IpAddr::V4(i))) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), Some(IpAddr::V6(i))) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// The addresses a transport component may connect to (`ASYA_TRANSPORT_ALLOW`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    rules: Vec<Rule>,
    /// The list named a host: the guest may use name lookup.
    names: bool,
    /// The host names of the list: the only names the guest may look up.
    hosts: Vec<String>,
}

impl AllowList {
    /// Nothing allowed.
    pub fn none() -> AllowList {
        AllowList::default()
    }

    /// Parse and resolve a list (host names are looked up now, once).
    pub async fn parse(text: &str) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (host, port) = item
                .rsplit_once(':')
                .ok_or_else(|| format!("{item:?}: expected host:port, ip:port or cidr:port"))?;
            let port = match port {
                "*" => None,
                p => Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{item:?}: invalid port {p:?}"))?,
                ),
            };
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(format!("{item:?}: empty host"));
            }
            if let Some((ip, prefix)) = host.split_once('/') {
                let net: IpAddr = ip
                    .parse()
                    .map_err(|_| format!("{item:?}: invalid network address {ip:?}"))?;
                let max = if net.is_ipv4() { 32 } else { 128 };
                let prefix = prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("{item:?}: invalid prefix length {prefix:?}"))?;
                list.rules.push(Rule { net, prefix, port });
            } else if let Ok(ip) = host.parse::<IpAddr>() {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                list.rules.push(Rule {
                    net: ip,
                    prefix,
                    port,
                });
            } else {
                let addrs = tokio::net::lookup_host((host, port.unwrap_or(0)))
                    .await
                    .map_err(|e| format!("{item:?}: cannot resolve {host:?}: {e}"))?;
                let mut any = false;
                for a in addrs {
                    any = true;
                    let prefix = if a.is_ipv4() { 32 } else { 128 };
                    list.rules.push(Rule {
                        net: a.ip(),
                        prefix,
                        port,
                    });
                }
                if !any {
                    return Err(format!("{item:?}: {host:?} resolves to no address"));
                }
                list.names = true;
                list.hosts.push(host.to_owned());
            }
        }
        Ok(list)
    }

    /// Whether a connection to `addr` is allowed.
    pub fn allows(&self, addr: &SocketAddr) -> bool {
        self.rules.iter().any(|r| r.matches(addr))
    }

    /// Whether the guest may look names up.
    pub fn name_lookup(&self) -> bool {
        self.names
    }

    /// The WASI context of one instance: clocks, randomness, TCP connections to the
    /// allowed addresses (plus the implicit wildcard bind a connect performs), lookups of
    /// the list's host names only (see `PluginEngine::transport_linker`); no files,
    /// environment, arguments, UDP, listening or accepting. Refusals are noted in `guard`.
    fn wasi(self: &Arc<Self>, guard: Arc<NetGuard>) -> WasiCtx {
        let allow = self.clone();
        let mut b = WasiCtxBuilder::new();
        b.allow_tcp(true)
            .allow_udp(false)
            .allow_ip_name_lookup(self.names)
            .socket_addr_check(move |addr, usage| {
                let ok = match usage {
                    SocketAddrUse::TcpConnect => allow.allows(&addr),
                    SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                    _ => false,
                };
                if !ok {
                    guard.deny(match usage {
                        SocketAddrUse::TcpConnect => format!("a connection to {addr}"),
                        other => format!("{other:?} on {addr}"),
                    });
                }
                Box::pin(async move { ok })
            });
        b.build()
    }

    /// A fresh record of refusals for one instance, knowing the list's host names.
    fn guard(&self) -> Arc<NetGuard> {
        Arc::new(NetGuard::new(self.hosts.iter().cloned()))
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

/// Everything `ASYA_TRANSPORT=wasm` needs.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// The component file.
    pub plugin: PathBuf,
    /// JSON text for `connect`.
    pub config: String,
    pub allow: AllowList,
    /// `receive`'s wait for a first message.
    pub wait: Duration,
    /// Per-call deadline on top of the wait.
    pub call_margin: Duration,
    pub memory_limit: usize,
    /// How often the sidecar extends an unsettled delivery (`in-progress`): half the
    /// config's `ack_wait_ms` when it has one.
    pub progress_interval: Option<Duration>,
    /// Compiled-code cache (`None` = compile every time).
    pub cache_dir: Option<PathBuf>,
}

impl WasmConfig {
    /// A configuration with defaults for `plugin`, `config` (JSON text) and `allow`.
    pub fn new(plugin: impl Into<PathBuf>, config: &str, allow: AllowList) -> WasmConfig {
        WasmConfig {
            plugin: plugin.into(),
            config: config.to_owned(),
            allow,
            wait: DEFAULT_WAIT,
            call_margin: DEFAULT_CALL_MARGIN,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            progress_interval: progress_interval(config),
            cache_dir: None,
        }
    }
}

/// `ASYA_TRANSPORT=wasm` as parsed from the variables; [`WasmSettings::resolve`] then
/// resolves the allow-list's host names (parsing does no I/O).
#[derive(Debug, Clone, PartialEq)]
pub struct WasmSettings {
    pub plugin: PathBuf,
    /// JSON text for `connect` (checked to be JSON).
    pub config: String,
    /// `ASYA_TRANSPORT_ALLOW` as written.
    pub allow: Option<String>,
    /// Compiled-code cache.
    pub cache_dir: Option<PathBuf>,
}

impl WasmSettings {
    /// From `ASYA_TRANSPORT_PLUGIN`, `ASYA_TRANSPORT_CONFIG`, `ASYA_TRANSPORT_ALLOW` and the
    /// plugin cache directory.
    pub fn from_source(src: &dyn Source) -> Result<WasmSettings, ConfigError> {
        let r = Reader(src);
        let plugin = PathBuf::from(r.required(vars::PLUGIN)?);
        let config = r.string(vars::CONFIG);
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&config) {
            return Err(vars::CONFIG.error(format!("not JSON: {e}")));
        }
        Ok(WasmSettings {
            plugin,
            config,
            allow: r.raw(vars::ALLOW),
            cache_dir: engine::cache_dir(src),
        })
    }

    /// The transport's configuration, with the allow-list's names resolved.
    pub async fn resolve(&self) -> Result<WasmConfig, ConfigError> {
        let allow = match &self.allow {
            None => AllowList::none(),
            Some(text) => AllowList::parse(text)
                .await
                .map_err(|message| vars::ALLOW.error(message))?,
        };
        let mut cfg = WasmConfig::new(&self.plugin, &self.config, allow);
        cfg.cache_dir = self.cache_dir.clone();
        Ok(cfg)
    }
}

/// Half of `ack_wait_ms` in the component's configuration, if it has that key.
fn progress_interval(config: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(config).ok()?;
    let ms = v.get("ack_wait_ms")?.as_u64().filter(|ms| *ms >= 2)?;
    Some(Duration::from_millis(ms / 2))
}

// ---------------------------------------------------------------------------------------
// One loaded component

struct Plugin {
    name: Arc<str>,
    path: PathBuf,
    engine: PluginEngine,
    pre: TransportPluginPre<StoreState>,
    cfg: WasmConfig,
    allow: Arc<AllowList>,
    /// Instances discarded after a trap, deadline or cancelled call.
    restarts: AtomicU64,
    /// Where failed calls are counted (`asya_plugin_calls_total{kind="transport"}`).
    metrics: OnceLock<Arc<Metrics>>,
}

impl Plugin {
    fn load(engine: &PluginEngine, cfg: WasmConfig) -> Result<Plugin, PluginError> {
        let path = cfg.plugin.clone();
        let component = engine.load(&path)?;
        if let Some(w @ crate::plugin::World::RoutePolicy) =
            crate::plugin::check::world_of(engine, &component)
        {
            return Err(crate::plugin::check::other_world(
                &path,
                crate::plugin::World::Transport,
                w,
            ));
        }
        let pre = engine
            .transport_linker()?
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Imports {
                path: path.clone(),
                message: format!("{e:#}"),
            })?;
        let pre = TransportPluginPre::new(pre).map_err(|e| PluginError::Exports {
            path: path.clone(),
            message: format!("{e:#}"),
        })?;
        Ok(Plugin {
            name: plugin_name(&path).into(),
            path,
            engine: engine.clone(),
            pre,
            allow: Arc::new(cfg.allow.clone()),
            cfg,
            restarts: AtomicU64::new(0),
            metrics: OnceLock::new(),
        })
    }
}

fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("transport")
        .to_owned()
}

struct Live {
    store: Store<StoreState>,
    bindings: TransportPlugin,
    conn: ResourceAny,
    generation: u64,
}

/// What a call asks of an instance.
enum Req<'a> {
    Receive {
        queue: &'a str,
        max: u32,
        wait: Duration,
    },
    Send(&'a [OutMessage]),
    Ack(&'a str),
    Nack(&'a str, u32),
    InProgress(&'a str),
}

impl Req<'_> {
    fn op(&self) -> &'static str {
        match self {
            Req::Receive { .. } => "receive",
            Req::Send(_) => "send",
            Req::Ack(_) => "ack",
            Req::Nack(..) => "nack",
            Req::InProgress(_) => "in-progress",
        }
    }
}

fn guest_failed(op: &'static str, e: GuestError) -> TransportError {
    TransportError::Plugin {
        op,
        message: e.message,
        retryable: e.retryable,
    }
}

/// One broker connection: a component instance (re-created after a failure).
struct Conn {
    plugin: Arc<Plugin>,
    live: Mutex<Option<Live>>,
    generations: AtomicU64,
    healthy: AtomicBool,
}

impl Conn {
    fn new(plugin: Arc<Plugin>) -> Conn {
        Conn {
            plugin,
            live: Mutex::new(None),
            generations: AtomicU64::new(0),
            healthy: AtomicBool::new(false),
        }
    }

    /// A new instance, connected.
    async fn open(&self) -> Result<Live, TransportError> {
        let p = &self.plugin;
        let fail = |m: String| {
            TransportError::broker(
                "wasm transport: connect failed",
                format!("{}: {m}", p.path.display()),
            )
        };
        let guard = p.allow.guard();
        let mut store = p.engine.store_with_wasi(
            p.name.clone(),
            p.cfg.memory_limit,
            CONNECT_DEADLINE,
            p.allow.wasi(guard.clone()),
        );
        store.data_mut().net = Some(guard.clone());
        let with_denial = |m: String| match guard.take_denial() {
            Some(d) => format!("{m} ({d})"),
            None => m,
        };
        let fut = async {
            let bindings = p
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| fail(format!("cannot instantiate: {e:#}")))?;
            store.set_epoch_deadline(engine::ticks(CONNECT_DEADLINE));
            let conn = TransportCalls {
                bindings: &bindings,
                store: &mut store,
            }
            .connect(&p.cfg.config)
            .await
            .map_err(|e| fail(format!("trapped: {e:#}")))?
            .map_err(|e| fail(with_denial(e.message)))?;
            Ok::<_, TransportError>((bindings, conn))
        };
        let (bindings, conn) = tokio::time::timeout(CONNECT_DEADLINE, fut)
            .await
            .map_err(|_| fail(format!("no answer within {CONNECT_DEADLINE:?}")))??;
        Ok(Live {
            store,
            bindings,
            conn,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// Run one call. `generation`: the connection a delivery tag belongs to (acks of a
    /// connection that was replaced fail). Returns the generation the call ran on.
    async fn call(
        &self,
        req: Req<'_>,
        generation: Option<u64>,
    ) -> Result<(u64, Vec<GuestDelivery>), TransportError> {
        let mut guard = self.live.lock().await;
        if let Some(g) = generation {
            if guard.as_ref().map(|l| l.generation) != Some(g) {
                return Err(TransportError::broker(
                    "wasm transport",
                    format!(
                        "{} of a delivery from a connection that was re-established; the broker redelivers it",
                        req.op()
                    ),
                ));
            }
        }
        // Taken out for the call: a call whose future is dropped leaves `None` behind,
        // so a possibly half-entered instance is never used again.
        let mut live = match guard.take() {
            Some(l) => l,
            None => match self.open().await {
                Ok(l) => l,
                Err(e) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    self.count("connect-failed", Instant::now());
                    return Err(e);
                }
            },
        };
        let limit = match &req {
            Req::Receive { wait, .. } => *wait + self.plugin.cfg.call_margin,
            _ => self.plugin.cfg.call_margin,
        };
        live.store.set_epoch_deadline(engine::ticks(limit));
        let op = req.op();
        let conn = live.conn;
        let mut calls = TransportCalls {
            bindings: &live.bindings,
            store: &mut live.store,
        };
        let fut = async {
            match req {
                Req::Receive { queue, max, wait } => {
                    let ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
                    calls.receive(conn, queue, max, ms).await
                }
                Req::Send(msgs) => {
                    let m: Vec<(&str, &str, &[u8])> = msgs
                        .iter()
                        .map(|m| (m.queue.as_str(), m.id.as_str(), m.body.as_ref()))
                        .collect();
                    calls.send(conn, &m).await.map(|r| r.map(|()| Vec::new()))
                }
                Req::Ack(tag) => calls.ack(conn, tag).await.map(|r| r.map(|()| Vec::new())),
                Req::Nack(tag, ms) => calls
                    .nack(conn, tag, ms)
                    .await
                    .map(|r| r.map(|()| Vec::new())),
                Req::InProgress(tag) => calls
                    .in_progress(conn, tag)
                    .await
                    .map(|r| r.map(|()| Vec::new())),
            }
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit + Duration::from_millis(100), fut).await;
        let generation = live.generation;
        match outcome {
            Ok(Ok(Ok(v))) => {
                *guard = Some(live);
                self.healthy.store(true, Ordering::Relaxed);
                Ok((generation, v))
            }
            Ok(Ok(Err(mut e))) => {
                if let Some(d) = live.store.data().net.as_ref().and_then(|n| n.take_denial()) {
                    e.message = format!("{} ({d})", e.message);
                }
                *guard = Some(live);
                self.count("error", started);
                Err(guest_failed(op, e))
            }
            Ok(Err(trap)) => {
                let what = if live.store.data().limits.hit {
                    self.count("memory-limit", started);
                    format!(
                        "exceeded its memory limit of {} bytes",
                        self.plugin.cfg.memory_limit
                    )
                } else if trap.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt)
                {
                    self.count("timeout", started);
                    format!("exceeded its {limit:?} deadline")
                } else {
                    self.count("trap", started);
                    format!(
                        "trapped: {}",
                        crate::plugin::truncate(&format!("{trap:#}"), 1024)
                    )
                };
                Err(self.discard(op, what))
            }
            Err(_) => {
                self.count("timeout", started);
                Err(self.discard(op, format!("did not return within {limit:?}")))
            }
        }
    }

    /// Count a failed call (successful calls are not recorded: one per message).
    fn count(&self, outcome: &'static str, started: Instant) {
        if let Some(m) = self.plugin.metrics.get() {
            m.plugin_call(&self.plugin.name, KIND, outcome, started.elapsed());
        }
    }

    fn discard(&self, op: &'static str, what: String) -> TransportError {
        self.plugin.restarts.fetch_add(1, Ordering::Relaxed);
        self.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(plugin = %self.plugin.name, op, error = %what, "transport plugin failed; instance discarded, reconnecting on the next call");
        TransportError::broker(
            "wasm transport",
            format!("{} {op} {what}; instance discarded", self.plugin.name),
        )
    }
}

impl Drop for Conn {
    /// Close the guest's connection (unsettled deliveries come back from the broker).
    fn drop(&mut self) {
        let Some(mut live) = self.live.get_mut().take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let margin = self.plugin.cfg.call_margin;
        rt.spawn(async move {
            live.store.set_epoch_deadline(engine::ticks(margin));
            let conn = live.conn;
            let mut calls = TransportCalls {
                bindings: &live.bindings,
                store: &mut live.store,
            };
            let _ = tokio::time::timeout(margin, calls.close(conn)).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// The transport

/// A transport driven by a WebAssembly component.
pub struct WasmTransport {
    plugin: Arc<Plugin>,
    publishers: Vec<Arc<Conn>>,
    next: AtomicUsize,
}

impl WasmTransport {
    /// Load the component and open the publishing connections (a component that cannot
    /// be loaded or connect fails here).
    pub async fn connect(cfg: WasmConfig) -> Result<WasmTransport, TransportError> {
        let engine = PluginEngine::new(cfg.cache_dir.clone())
            .map_err(|e| TransportError::Unavailable(e.to_string()))?;
        WasmTransport::with_engine(&engine, cfg).await
    }

    /// Like [`WasmTransport::connect`] on a shared engine.
    pub async fn with_engine(
        engine: &PluginEngine,
        cfg: WasmConfig,
    ) -> Result<WasmTransport, TransportError> {
        let plugin = Arc::new(
            Plugin::load(engine, cfg).map_err(|e| TransportError::Unavailable(e.to_string()))?,
        );
        let publishers: Vec<Arc<Conn>> = (0..PUBLISHERS)
            .map(|_| Arc::new(Conn::new(plugin.clone())))
            .collect();
        // Connect one now: configuration errors surface at startup.
        let first = publishers[0].open().await?;
        *publishers[0].live.lock().await = Some(first);
        publishers[0].healthy.store(true, Ordering::Relaxed);
        Ok(WasmTransport {
            plugin,
            publishers,
            next: AtomicUsize::new(0),
        })
    }

    /// Instances discarded so far (traps, deadlines, cancelled calls).
    pub fn restarts(&self) -> u64 {
        self.plugin.restarts.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Transport for WasmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Wasm
    }

    async fn subscribe(
        &self,
        queue: &QueueName,
        prefetch: usize,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        let prefetch = prefetch.clamp(1, 4096);
        let conn = Arc::new(Conn::new(self.plugin.clone()));
        let first = conn.open().await?;
        *conn.live.lock().await = Some(first);
        let (tx, rx) = mpsc::channel(prefetch);
        let sem = Arc::new(Semaphore::new(prefetch));
        let drained = Arc::new(Notify::new());
        tokio::spawn(receive_loop(
            conn,
            queue.to_string(),
            prefetch,
            sem,
            tx,
            drained.clone(),
            self.plugin.cfg.wait,
        ));
        Ok(Box::new(WasmReceiver { rx, drained }))
    }

    async fn send(&self, msg: OutMessage) -> Result<(), TransportError> {
        self.send_all(vec![msg]).await.map(|_| ())
    }

    /// The WIT `send` cannot report duplicates: a component that deduplicates drops them
    /// silently.
    async fn send_all(&self, msgs: Vec<OutMessage>) -> Result<Sent, TransportError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.publishers.len();
        let conn = &self.publishers[i];
        for chunk in msgs.chunks(SEND_CHUNK) {
            conn.call(Req::Send(chunk), None).await?;
        }
        Ok(Sent::default())
    }

    fn is_connected(&self) -> bool {
        self.publishers
            .iter()
            .any(|c| c.healthy.load(Ordering::Relaxed))
    }

    fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.plugin.metrics.set(metrics);
    }
}

/// Fetch deliveries into `tx` while the receiver lives; never more than `prefetch`
/// unsettled.
async fn receive_loop(
    conn: Arc<Conn>,
    queue: String,
    prefetch: usize,
    sem: Arc<Semaphore>,
    tx: mpsc::Sender<Result<Delivery, TransportError>>,
    drained: Arc<Notify>,
    wait: Duration,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_empty = false;
    loop {
        let first = tokio::select! {
            _ = tx.closed() => return,
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        // Fetch in batches: wait for half the prefetch window to be free, unless the
        // consumer has nothing buffered (then fetch whatever is free now).
        let target = prefetch.div_ceil(2);
        loop {
            while permits.len() < prefetch {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            if permits.len() >= target || tx.capacity() == tx.max_capacity() {
                break;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = drained.notified() => {}
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => permits.push(p),
                    Err(_) => return,
                },
            }
        }
        if last_empty && permits.len() < prefetch {
            // The queue was empty a moment ago and deliveries are unsettled: poll again
            // when one settles, or after a short pause.
            tokio::select! {
                _ = tx.closed() => return,
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => permits.push(p),
                    Err(_) => return,
                },
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            while permits.len() < prefetch {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
        }
        // Block in the broker only while nothing is unsettled: an ack waits for the
        // connection, and so for a blocked receive.
        let wait = if permits.len() == prefetch {
            wait
        } else {
            Duration::ZERO
        };
        let req = Req::Receive {
            queue: &queue,
            max: permits.len() as u32,
            wait,
        };
        match conn.call(req, None).await {
            Ok((generation, got)) => {
                backoff = BACKOFF_MIN;
                last_empty = got.is_empty();
                for d in got {
                    let delivery = Delivery {
                        body: Bytes::from(d.body),
                        attempt: d.delivery_count.max(1),
                        acker: Box::new(WasmAcker {
                            conn: conn.clone(),
                            tag: d.tag,
                            generation,
                            _permit: permits.pop(),
                        }),
                    };
                    if tx.send(Ok(delivery)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(queue = %queue, error = %e, "wasm transport: receive failed; retrying");
                drop(permits);
                last_empty = false;
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

struct WasmReceiver {
    rx: mpsc::Receiver<Result<Delivery, TransportError>>,
    /// Signalled when the buffer runs empty (the fetch loop stops batching then).
    drained: Arc<Notify>,
}

#[async_trait]
impl Receiver for WasmReceiver {
    async fn recv(&mut self) -> Result<Delivery, TransportError> {
        let got = self.rx.recv().await.unwrap_or(Err(TransportError::Closed));
        if self.rx.is_empty() {
            self.drained.notify_one();
        }
        got
    }
}

struct WasmAcker {
    conn: Arc<Conn>,
    tag: String,
    generation: u64,
    /// One unit of the subscriber's prefetch, released when settled or dropped.
    _permit: Option<OwnedSemaphorePermit>,
}

#[async_trait]
impl Acker for WasmAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.conn
            .call(Req::Ack(&self.tag), Some(self.generation))
            .await
            .map(drop)
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        let ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        self.conn
            .call(Req::Nack(&self.tag, ms), Some(self.generation))
            .await
            .map(drop)
    }

    async fn in_progress(&self) -> Result<(), TransportError> {
        self.conn
            .call(Req::InProgress(&self.tag), Some(self.generation))
            .await
            .map(drop)
    }

    fn progress_interval(&self) -> Option<Duration> {
        self.conn.plugin.cfg.progress_interval
    }
}

/// The suite's options for `asya-host plugin test` (printed before it runs).
pub fn plugin_test_options(deduplicates: bool) -> super::conformance::Options {
    super::conformance::Options {
        deduplicates,
        ..super::conformance::Options::default()
    }
}

/// `asya-host plugin test FILE.wasm`: run the transport conformance suite
/// ([`super::conformance`]) against a transport component. `config` is its JSON
/// configuration, `allow` its allow-list (`ASYA_TRANSPORT_ALLOW` syntax). Every case uses
/// fresh queues (`asya-ct<pid>n<k>-a`).
pub async fn conformance_test(
    plugin: &Path,
    config: &str,
    allow: &str,
    deduplicates: bool,
) -> Result<super::conformance::Report, TransportError> {
    use super::conformance;
    if let Err(e) = serde_json::from_str::<serde_json::Value>(config) {
        return Err(TransportError::Unavailable(format!(
            "--config is not JSON: {e}"
        )));
    }
    let allow = AllowList::parse(allow)
        .await
        .map_err(|e| TransportError::Unavailable(format!("--allow: {e}")))?;
    let t: Arc<dyn Transport> =
        Arc::new(WasmTransport::connect(WasmConfig::new(plugin, config, allow)).await?);
    let n = Arc::new(AtomicU64::new(0));
    let pid = std::process::id();
    let fresh: conformance::NamespaceFn =
        Arc::new(move || format!("ct{pid}n{}", n.fetch_add(1, Ordering::Relaxed)));
    let opts = plugin_test_options(deduplicates);
    let mut report = conformance::run(t, fresh, &opts).await;
    report.transport = format!("wasm: {}", plugin.display());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn allow_list_parses_and_matches() {
        let a = AllowList::parse("127.0.0.1:6379, 10.0.0.0/8:*, [::1]:7000, [fd00::/8]:80")
            .await
            .unwrap();
        let ok = |s: &str| a.allows(&s.parse().unwrap());
        assert!(ok("127.0.0.1:6379"));
        assert!(!ok("127.0.0.1:6380"));
        assert!(!ok("127.0.0.2:6379"));
        assert!(ok("10.2.3.4:1"));
        assert!(!ok("11.0.0.1:1"));
        assert!(ok("[::1]:7000"));
        assert!(ok("[fd12::1]:80"));
        assert!(!ok("[fe00::1]:80"));
        assert!(ok("[::ffff:127.0.0.1]:6379"));
        assert!(!a.name_lookup());
        let l = AllowList::parse("localhost:6379").await.unwrap();
        assert!(l.name_lookup());
        assert!(l.allows(&"127.0.0.1:6379".parse().unwrap()));
        for bad in ["nope", "1.2.3.4:x", "1.2.3.0/33:1", ":80"] {
            assert!(AllowList::parse(bad).await.is_err(), "{bad}");
        }
        assert!(!AllowList::none().allows(&"127.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn progress_interval_is_half_ack_wait() {
        assert_eq!(
            progress_interval(r#"{"ack_wait_ms": 4000}"#),
            Some(Duration::from_secs(2))
        );
        assert_eq!(progress_interval("{}"), None);
    }
}
