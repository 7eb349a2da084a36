//! Each command's settings, parsed once from a [`Source`] (the process environment in
//! `main`, a map in tests) before anything starts, and the variable lists `--help` shows.
//! Nothing here does I/O: resolving host names and loading files happen when the parts are
//! built ([`crate::serve_sidecar`], [`crate::gateway::cli::run_gateway`], [`crate::mesh::up`]).

use std::path::PathBuf;

use crate::config::{self, help_table, vars, ConfigError, LogSettings, Source, Var};
use crate::gateway::cli::{gvars, GatewayConfig, ReporterSettings, StoreKind};
use crate::plugin::PolicySettings;
use crate::queue::EndActors;
use crate::transport::nats::{self, NatsConfig};
use crate::transport::{wasm, TransportKind, TransportSettings};

/// `PYTHONPATH` of `up`'s runtimes: after the flow file's folder.
pub const PYTHONPATH: Var = Var::optional(
    "PYTHONPATH",
    "appended to the runtimes' import path after the flow file's folder",
);

/// `asya-host sidecar`.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub sidecar: config::SidecarConfig,
    pub transport: TransportSettings,
    pub policies: PolicySettings,
    pub reporter: ReporterSettings,
}

impl SidecarSettings {
    pub fn from_source(src: &dyn Source) -> Result<SidecarSettings, ConfigError> {
        let sidecar = config::SidecarConfig::from_source(src)?;
        Ok(SidecarSettings {
            transport: TransportSettings::from_source(sidecar.transport, src)?,
            policies: PolicySettings::from_source(src)?,
            reporter: ReporterSettings::from_source(src),
            sidecar,
        })
    }
}

/// `asya-host gateway`.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub gateway: GatewayConfig,
    /// Where the first envelopes go: `ASYA_TRANSPORT` (`nats` or `wasm`) and its variables,
    /// as a sidecar reads them.
    pub transport: TransportSettings,
    /// `ASYA_NATS_*` for the NATS key-value store beside a non-NATS transport (with
    /// `ASYA_TRANSPORT=nats` the store uses the transport's connection).
    pub kv_nats: Option<NatsConfig>,
}

impl GatewaySettings {
    pub fn from_source(src: &dyn Source) -> Result<GatewaySettings, ConfigError> {
        let gateway = GatewayConfig::from_source(src)?;
        let transport = TransportSettings::from_source(TransportKind::from_source(src)?, src)?;
        let kv_nats = match (&transport, gateway.store) {
            (TransportSettings::Nats(_), _) | (_, StoreKind::Memory) => None,
            (_, StoreKind::Nats) => Some(NatsConfig::from_source(src)?),
        };
        Ok(GatewaySettings {
            gateway,
            transport,
            kv_nats,
        })
    }
}

/// Flags that stand for variables (`up --transport-plugin` for `ASYA_TRANSPORT_PLUGIN`),
/// over another source: a flag given wins over its variable, and both are parsed by the
/// variable's code.
pub struct Flags<'a> {
    pub set: Vec<(&'static str, String)>,
    pub under: &'a dyn Source,
}

impl Source for Flags<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.set
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| self.under.get(key))
    }
}

/// What `asya-host up` reads from variables (its flags are parsed by `main`; those that
/// stand for variables come in through [`Flags`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UpSettings {
    pub ends: EndActors,
    /// `PYTHONPATH` as set.
    pub pythonpath: Option<String>,
    /// Compiled-code cache of the route policies (and of the transport component).
    pub plugin_cache_dir: Option<PathBuf>,
    /// The transport of `--transport`: `ASYA_NATS_*` for nats, `ASYA_TRANSPORT_PLUGIN`,
    /// `_CONFIG` and `_ALLOW` for wasm, nothing for memory.
    pub transport: TransportSettings,
}

impl UpSettings {
    pub fn from_source(src: &dyn Source, kind: TransportKind) -> Result<UpSettings, ConfigError> {
        Ok(UpSettings {
            ends: config::end_actors(src)?,
            pythonpath: src.get(PYTHONPATH.name).filter(|p| !p.is_empty()),
            plugin_cache_dir: crate::plugin::engine::cache_dir(src),
            transport: TransportSettings::from_source(kind, src)?,
        })
    }
}

/// `provision`: the transport (`ASYA_TRANSPORT`, default nats, and its variables) and the
/// end actors.
pub fn provision_settings(src: &dyn Source) -> Result<(TransportSettings, EndActors), ConfigError> {
    Ok((
        TransportSettings::from_source(TransportKind::from_source(src)?, src)?,
        config::end_actors(src)?,
    ))
}

/// The bearer token `trace` and `send` present (`ASYA_GATEWAY_TOKEN`).
pub fn client_token(src: &dyn Source) -> Option<String> {
    config::Reader(src).raw(gvars::TOKEN)
}

/// Logging, for every command.
pub fn logging(src: &dyn Source) -> LogSettings {
    LogSettings::from_source(src)
}

const NAMES: &[Var] = &[vars::NAMESPACE, vars::ACTOR_SINK, vars::ACTOR_SUMP];

/// The variables of `asya-host sidecar`, grouped for `--help`.
pub fn sidecar_vars() -> Vec<(&'static str, &'static [Var])> {
    vec![
        ("Sidecar variables", vars::SIDECAR),
        ("NATS transport (ASYA_TRANSPORT=nats)", nats::vars::ALL),
        (
            "WebAssembly transport (ASYA_TRANSPORT=wasm)",
            wasm::vars::ALL,
        ),
        ("Route policies", crate::plugin::vars::ALL),
        ("Reporting", gvars::REPORTING),
        ("Logging", vars::LOGGING),
    ]
}

/// The variables of `asya-host gateway`, grouped for `--help`.
pub fn gateway_vars() -> Vec<(&'static str, &'static [Var])> {
    vec![
        ("Gateway variables", gvars::GATEWAY),
        ("Names", NAMES),
        ("Transport of the first envelopes", TRANSPORT),
        (
            "NATS (ASYA_TRANSPORT=nats, or ASYA_GATEWAY_STORE=nats)",
            nats::vars::ALL,
        ),
        (
            "WebAssembly transport (ASYA_TRANSPORT=wasm)",
            wasm::vars::ALL,
        ),
        ("Logging", vars::LOGGING),
    ]
}

const TRANSPORT: &[Var] = &[vars::TRANSPORT];

/// The variables of `asya-host provision`, grouped for `--help`.
pub fn provision_vars() -> Vec<(&'static str, &'static [Var])> {
    vec![
        ("Transport", TRANSPORT),
        ("NATS transport (ASYA_TRANSPORT=nats)", nats::vars::ALL),
        (
            "WebAssembly transport (ASYA_TRANSPORT=wasm)",
            wasm::vars::ALL,
        ),
        ("End actors", vars::END_ACTORS),
        ("Logging", vars::LOGGING),
    ]
}

/// The variables of `asya-host up`, grouped for `--help`.
pub fn up_vars() -> Vec<(&'static str, &'static [Var])> {
    const RUNTIMES: &[Var] = &[PYTHONPATH, crate::plugin::vars::PLUGIN_CACHE_DIR];
    vec![
        ("End actors", vars::END_ACTORS),
        ("Runtimes and plugins", RUNTIMES),
        ("NATS (--transport nats)", nats::vars::ALL),
        (
            "WebAssembly transport (--transport wasm; the --transport-* flags override these)",
            wasm::vars::ALL,
        ),
        ("Logging", vars::LOGGING),
    ]
}

/// `--help` text listing `groups` (see [`config::help_table`]).
pub fn help(groups: &[(&'static str, &'static [Var])]) -> String {
    help_table(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fixed default parses with the code that parses a set value.
    #[test]
    fn every_default_is_valid() {
        let unset: [(&str, &str); 0] = [];
        SidecarSettings::from_source(&[("ASYA_ACTOR_NAME", "a")]).unwrap();
        // The default address is every interface, which needs a token (or the explicit
        // opt-out); with the opt-out every other default must parse.
        let e = GatewaySettings::from_source(&unset).unwrap_err();
        assert_eq!(e.var, "ASYA_GATEWAY_TOKEN", "{e}");
        GatewaySettings::from_source(&[("ASYA_GATEWAY_AUTH", "none")]).unwrap();
        UpSettings::from_source(&unset, TransportKind::Nats).unwrap();
        let wasm = SidecarSettings::from_source(&[
            ("ASYA_ACTOR_NAME", "a"),
            ("ASYA_TRANSPORT", "wasm"),
            ("ASYA_TRANSPORT_PLUGIN", "/t.wasm"),
        ])
        .unwrap();
        assert!(matches!(wasm.transport, TransportSettings::Wasm(_)));
    }

    /// The gateway reads its transport as a sidecar does, and NATS only where it needs it:
    /// for the NATS transport, or for the NATS key-value store beside another transport.
    #[test]
    fn gateway_transport_and_store() {
        let open = ("ASYA_GATEWAY_AUTH", "none");
        let s = GatewaySettings::from_source(&[open]).unwrap();
        assert!(matches!(s.transport, TransportSettings::Nats(_)));
        assert!(s.kv_nats.is_none());
        let wasm = [
            open,
            ("ASYA_TRANSPORT", "wasm"),
            ("ASYA_TRANSPORT_PLUGIN", "/t.wasm"),
            ("ASYA_TRANSPORT_CONFIG", "{\"address\": \"127.0.0.1:6379\"}"),
            ("ASYA_NATS_URL", "nats://10.0.0.1:4222"),
        ];
        let s = GatewaySettings::from_source(&wasm).unwrap();
        let TransportSettings::Wasm(w) = &s.transport else {
            panic!("{:?}", s.transport)
        };
        assert_eq!(w.plugin, PathBuf::from("/t.wasm"));
        assert!(s.kv_nats.is_none(), "memory store: no NATS");
        let mut with_kv: Vec<(&str, &str)> = wasm.to_vec();
        with_kv.push(("ASYA_GATEWAY_STORE", "nats"));
        let src: std::collections::HashMap<String, String> = with_kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let s = GatewaySettings::from_source(&src).unwrap();
        assert_eq!(s.kv_nats.unwrap().url, "nats://10.0.0.1:4222");
        let e = GatewaySettings::from_source(&[open, ("ASYA_TRANSPORT", "wasm")]).unwrap_err();
        assert_eq!(e.var, "ASYA_TRANSPORT_PLUGIN", "{e}");
    }

    /// `up --transport-plugin/--transport-config/--transport-allow` stand for the
    /// variables and win over them; a bad flag value is named by its variable.
    #[test]
    fn up_flags_override_the_transport_variables() {
        let env = [
            ("ASYA_TRANSPORT_PLUGIN", "/env.wasm"),
            ("ASYA_TRANSPORT_ALLOW", "127.0.0.1:1"),
        ];
        let flags = Flags {
            set: vec![(wasm::vars::PLUGIN.name, "/flag.wasm".into())],
            under: &env,
        };
        let s = UpSettings::from_source(&flags, TransportKind::Wasm).unwrap();
        let TransportSettings::Wasm(w) = s.transport else {
            panic!("{:?}", s.transport)
        };
        assert_eq!(w.plugin, PathBuf::from("/flag.wasm"));
        assert_eq!(w.allow.as_deref(), Some("127.0.0.1:1"));
        let flags = Flags {
            set: vec![(wasm::vars::CONFIG.name, "{nope".into())],
            under: &env,
        };
        let e = UpSettings::from_source(&flags, TransportKind::Wasm).unwrap_err();
        assert_eq!(e.var, "ASYA_TRANSPORT_CONFIG", "{e}");
        let unset: [(&str, &str); 0] = [];
        let s = UpSettings::from_source(&unset, TransportKind::Memory).unwrap();
        assert_eq!(s.transport, TransportSettings::Memory);
    }

    /// No variable is listed twice under one command, and every one has a doc line.
    #[test]
    fn variable_lists_are_sound() {
        for list in [sidecar_vars(), gateway_vars(), up_vars(), provision_vars()] {
            let mut names: Vec<&str> = list
                .iter()
                .flat_map(|(_, vs)| vs.iter().map(|v| v.name))
                .collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "{names:?}");
            for (_, vs) in &list {
                for v in *vs {
                    assert!(!v.doc.is_empty() && !v.doc.contains('\n'), "{}", v.name);
                }
            }
        }
    }

    /// The README lists every variable of the sidecar and the gateway with its default.
    #[test]
    fn readme_lists_every_variable_with_its_default() {
        let readme = include_str!("../../README.md");
        let nats_md = include_str!("transport/NATS.md");
        for (_, vs) in sidecar_vars().into_iter().chain(gateway_vars()) {
            for v in vs {
                let doc = if v.name.starts_with("ASYA_NATS_") {
                    nats_md
                } else {
                    readme
                };
                assert!(doc.contains(v.name), "{} is not documented", v.name);
                let Some(d) = v.default_value() else { continue };
                let cell = format!("`{}`", v.name);
                // The row whose first cell names the variable.
                if let Some(row) = doc.lines().find(|l| {
                    l.starts_with('|') && l.split('|').nth(1).is_some_and(|c| c.contains(&cell))
                }) {
                    assert!(
                        row.contains(&format!("`{d}`")),
                        "{}: the docs say {row}",
                        v.name
                    );
                }
            }
        }
    }
}
