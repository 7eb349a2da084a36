//! The wasmtime engine shared by every plugin of a process: component compilation with an
//! on-disk cache, the epoch ticker that bounds CPU per call, stores with memory limits and
//! a WASI context that grants nothing.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{EnvelopeView, RoutePolicyPlugin};
use super::PluginError;

/// How often the epoch advances: the resolution of per-call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bumped whenever the engine configuration below changes (part of the cache key).
const ENGINE_FINGERPRINT: &str = "asya-plugin-engine/1:epoch-interruption";

/// wasmtime's version, part of the cache key.
const WASMTIME_VERSION: &str = "48";

/// The process-wide plugin engine. Dropping the last handle stops the epoch ticker.
#[derive(Clone)]
pub struct PluginEngine {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    stop: Arc<AtomicBool>,
    cache_dir: Option<PathBuf>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// An engine whose compiled code is cached in `cache_dir` (`None` = no cache).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<PluginEngine, PluginError> {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        let engine = Engine::new(&cfg).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("asya-plugin-epoch".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        Ok(PluginEngine {
            inner: Arc::new(Inner {
                engine,
                stop,
                cache_dir,
            }),
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Read and compile a component, through the cache when there is one.
    pub fn load(&self, path: &Path) -> Result<Component, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !is_component(&bytes) {
            return Err(PluginError::NotComponent {
                path: path.to_owned(),
                message: if bytes.starts_with(b"\0asm") {
                    "it is a core WebAssembly module (build for wasm32-wasip2)".into()
                } else {
                    "no WebAssembly header".into()
                },
            });
        }
        let cached = self.inner.cache_dir.as_ref().map(|dir| {
            let key = self.cache_key(&bytes);
            dir.join(format!("wasmtime-{WASMTIME_VERSION}"))
                .join(format!("{key}.cwasm"))
        });
        if let Some(file) = &cached {
            if let Some(c) = self.read_cached(file) {
                return Ok(c);
            }
        }
        let component =
            Component::new(self.engine(), &bytes).map_err(|e| PluginError::Compile {
                path: path.to_owned(),
                message: format!("{e:#}"),
            })?;
        if let Some(file) = &cached {
            write_cached(file, &component);
        }
        Ok(component)
    }

    fn cache_key(&self, wasm: &[u8]) -> String {
        struct ShaHasher<'a>(&'a mut Sha256);
        impl Hasher for ShaHasher<'_> {
            fn finish(&self) -> u64 {
                0
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
        }
        let mut sha = Sha256::new();
        sha.update(WASMTIME_VERSION.as_bytes());
        sha.update([0]);
        sha.update(ENGINE_FINGERPRINT.as_bytes());
        sha.update([0]);
        self.engine()
            .precompile_compatibility_hash()
            .hash(&mut ShaHasher(&mut sha));
        sha.update([0]);
        sha.update(wasm);
        sha.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn read_cached(&self, file: &Path) -> Option<Component> {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "plugin cache unreadable; compiling");
                return None;
            }
        };
        // SAFETY: the file was written by `Component::serialize` of this same engine
        // configuration (its name is a hash of the wasm bytes, the wasmtime version and the
        // engine's compatibility hash), into a cache directory the operator controls;
        // wasmtime re-checks the header, version and configuration before loading it.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize(self.engine(), &bytes) };
        match loaded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "plugin cache entry unusable; compiling");
                None
            }
        }
    }
}

fn write_cached(file: &Path, component: &Component) {
    let result = (|| -> Result<(), String> {
        let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
        let dir = file.parent().ok_or("cache file has no directory")?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            file.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id()
        ));
        std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, file).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            e.to_string()
        })
    })();
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), error = %e, "cannot write the plugin cache; continuing without it");
    }
}

/// A component (not a core module): `\0asm` followed by a component-layer version.
pub(crate) fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[6..8] == [1, 0]
}

/// The cache directory: `ASYA_PLUGIN_CACHE_DIR`, else `$XDG_CACHE_HOME/asya`, else
/// `~/.cache/asya`; `None` when none can be determined.
pub fn cache_dir(src: &dyn crate::config::Source) -> Option<PathBuf> {
    let r = crate::config::Reader(src);
    if let Some(d) = r.raw(super::vars::PLUGIN_CACHE_DIR) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = src.get("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("asya"));
    }
    src.get("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("asya"))
}

/// Memory limiter that remembers whether it refused to grow (to label the outcome).
pub(crate) struct Limits {
    inner: StoreLimits,
    pub(crate) hit: bool,
}

impl Limits {
    fn new(memory_bytes: usize) -> Self {
        Limits {
            inner: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .instances(16)
                .tables(64)
                .memories(16)
                .table_elements(100_000)
                .trap_on_grow_failure(true)
                .build(),
            hit: false,
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.hit = true;
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.inner.table_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.hit = true;
        }
        r
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// What the host refused a transport's guest on the network (names it may not look up,
/// addresses it may not connect to), so a failed call can say why.
#[derive(Default)]
pub(crate) struct NetGuard {
    /// Host names the guest may resolve (lower case, no trailing dot).
    hosts: Vec<String>,
    /// The last refusal, taken by the error that follows it.
    denied: std::sync::Mutex<Option<String>>,
}

impl NetGuard {
    pub(crate) fn new(hosts: impl IntoIterator<Item = String>) -> NetGuard {
        NetGuard {
            hosts: hosts.into_iter().map(|h| normalize_host(&h)).collect(),
            denied: std::sync::Mutex::new(None),
        }
    }

    /// Whether the guest may resolve `name`: an address literal (no lookup happens) or a
    /// host name of the allow-list.
    fn may_resolve(&self, name: &str) -> bool {
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok() || self.hosts.contains(&normalize_host(name))
    }

    /// Remember a refusal (`what` = "a connection to 1.2.3.4:5", "a lookup of \"x\"").
    pub(crate) fn deny(&self, what: String) {
        tracing::debug!(refused = %what, "transport sandbox refused a network use");
        *self.denied.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    /// The refusal since the last call, as a clause to append to the guest's error.
    pub(crate) fn take_denial(&self) -> Option<String> {
        self.denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|what| {
                format!(
                    "the host refused {what}: not in ASYA_TRANSPORT_ALLOW (--allow for `asya-host plugin test`)"
                )
            })
    }
}

fn normalize_host(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Data of one plugin store.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// A transport's network allow-list (`None` for policies: they get no network).
    pub(crate) net: Option<Arc<NetGuard>>,
    pub(crate) limits: Limits,
    pub(crate) plugin: Arc<str>,
    pub(crate) input: EnvelopeView,
    pub(crate) frame: EnvelopeView,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A WASI context that grants nothing: no preopened directories, no environment or
/// arguments, stdio discarded, no sockets and no name lookup. Clocks and randomness stay:
/// the time is a legitimate routing input and every Rust `std` component imports
/// `wasi:io/poll`; a policy blocking on them is cut by the wall-clock bound of every call
/// (`policy.rs`), so blocking gains it nothing.
fn sandbox() -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    b.build()
}

impl PluginEngine {
    /// A fresh store for `plugin` with a memory limit; its epoch deadline is `deadline`
    /// from now (set again before every call).
    pub(crate) fn store(
        &self,
        plugin: Arc<str>,
        memory_bytes: usize,
        deadline: Duration,
    ) -> Store<StoreState> {
        self.store_with_wasi(plugin, memory_bytes, deadline, sandbox())
    }

    /// Like [`PluginEngine::store`] with a caller-built WASI context (a transport's
    /// context grants the sockets of its allow-list).
    pub(crate) fn store_with_wasi(
        &self,
        plugin: Arc<str>,
        memory_bytes: usize,
        deadline: Duration,
        wasi: WasiCtx,
    ) -> Store<StoreState> {
        let mut store = Store::new(
            self.engine(),
            StoreState {
                wasi,
                table: ResourceTable::new(),
                net: None,
                limits: Limits::new(memory_bytes),
                plugin,
                input: EnvelopeView::default(),
                frame: EnvelopeView::default(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks(deadline));
        store
    }

    /// The linker for route policies: WASI (granting nothing) and the host imports.
    pub(crate) fn policy_linker(&self) -> Result<Linker<StoreState>, PluginError> {
        let mut linker = Linker::new(self.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        RoutePolicyPlugin::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        Ok(linker)
    }
}

/// `wasi:sockets/ip-name-lookup` for transports: the guest may resolve only the host
/// names of its allow-list (wasmtime-wasi's own switch is all or nothing, and a lookup of
/// any name is a channel out even when every connection is refused).
struct NameLookup<'a> {
    sockets: wasmtime_wasi::sockets::WasiSocketsCtxView<'a>,
    net: Option<Arc<NetGuard>>,
}

struct NameLookupData;

impl wasmtime::component::HasData for NameLookupData {
    type Data<'a> = NameLookup<'a>;
}

use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup as ip_lookup;
use wasmtime_wasi::p2::bindings::sockets::network as wasi_net;

impl ip_lookup::Host for NameLookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: wasmtime::component::Resource<wasi_net::Network>,
        name: String,
    ) -> Result<
        wasmtime::component::Resource<ip_lookup::ResolveAddressStream>,
        wasmtime_wasi::p2::SocketError,
    > {
        let allowed = self.net.as_ref().is_some_and(|n| n.may_resolve(&name));
        if !allowed {
            if let Some(n) = &self.net {
                n.deny(format!("a lookup of {name:?}"));
            }
            return Err(wasi_net::ErrorCode::AccessDenied.into());
        }
        ip_lookup::Host::resolve_addresses(&mut self.sockets, network, name)
    }
}

// The lookup interface's error conversions come from `wasi:sockets/network`: delegated.
impl wasi_net::Host for NameLookup<'_> {
    fn convert_error_code(
        &mut self,
        error: wasmtime_wasi::p2::SocketError,
    ) -> wasmtime::Result<wasi_net::ErrorCode> {
        wasi_net::Host::convert_error_code(&mut self.sockets, error)
    }

    fn network_error_code(
        &mut self,
        err: wasmtime::component::Resource<wasi_net::Error>,
    ) -> wasmtime::Result<Option<wasi_net::ErrorCode>> {
        wasi_net::Host::network_error_code(&mut self.sockets, err)
    }
}

impl wasi_net::HostNetwork for NameLookup<'_> {
    fn drop(
        &mut self,
        this: wasmtime::component::Resource<wasi_net::Network>,
    ) -> wasmtime::Result<()> {
        wasi_net::HostNetwork::drop(&mut self.sockets, this)
    }
}

impl ip_lookup::HostResolveAddressStream for NameLookup<'_> {
    fn resolve_next_address(
        &mut self,
        stream: wasmtime::component::Resource<ip_lookup::ResolveAddressStream>,
    ) -> Result<Option<wasi_net::IpAddress>, wasmtime_wasi::p2::SocketError> {
        ip_lookup::HostResolveAddressStream::resolve_next_address(&mut self.sockets, stream)
    }

    fn subscribe(
        &mut self,
        stream: wasmtime::component::Resource<ip_lookup::ResolveAddressStream>,
    ) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
        ip_lookup::HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(
        &mut self,
        stream: wasmtime::component::Resource<ip_lookup::ResolveAddressStream>,
    ) -> wasmtime::Result<()> {
        ip_lookup::HostResolveAddressStream::drop(&mut self.sockets, stream)
    }
}

fn name_lookup(s: &mut StoreState) -> NameLookup<'_> {
    let net = s.net.clone();
    NameLookup {
        sockets: wasmtime_wasi::sockets::WasiSocketsView::sockets(s),
        net,
    }
}

impl PluginEngine {
    /// The linker for transports: async WASI p2 (what a store's context grants) with name
    /// lookup restricted to the allow-list's host names, and the host imports of the
    /// `transport-plugin` world.
    pub(crate) fn transport_linker(&self) -> Result<Linker<StoreState>, PluginError> {
        let mut linker = Linker::new(self.engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        linker.allow_shadowing(true);
        ip_lookup::add_to_linker::<StoreState, NameLookupData>(&mut linker, name_lookup)
            .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        linker.allow_shadowing(false);
        super::bindings::transport::TransportPlugin::add_to_linker::<
            _,
            wasmtime::component::HasSelf<_>,
        >(&mut linker, |s| s)
        .map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        Ok(linker)
    }
}

/// Epoch ticks covering `d` (at least one).
pub(crate) fn ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
}
