//! `asya-host plugin check FILE.wasm`: which world a component implements and whether it
//! fits this host's contract.

use std::fmt;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

use super::bindings::{RoutePolicyPluginPre, TransportPluginPre};
use super::engine::PluginEngine;
use super::PluginError;

/// The interface a route policy exports.
pub const ROUTE_POLICY_EXPORT: &str = "asya:plugin/route-policy@0.1.0";
/// The interface a transport exports.
pub const TRANSPORT_EXPORT: &str = "asya:plugin/transport@0.1.0";

/// The contracts a component can implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `asya:plugin/route-policy-plugin`
    RoutePolicy,
    /// `asya:plugin/transport-plugin`
    Transport,
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            World::RoutePolicy => "route-policy (asya:plugin/route-policy-plugin@0.1.0)",
            World::Transport => "transport (asya:plugin/transport-plugin@0.1.0)",
        })
    }
}

/// A component that fits this host.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub path: PathBuf,
    pub world: World,
    /// Names of the component's imports (all satisfiable by this host).
    pub imports: Vec<String>,
    /// Names of the component's exports.
    pub exports: Vec<String>,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: ok, implements {}; imports: {}",
            self.path.display(),
            self.world,
            if self.imports.is_empty() {
                "none".to_owned()
            } else {
                self.imports.join(", ")
            }
        )
    }
}

/// The world a compiled component implements, by its exports (`None`: neither).
pub(crate) fn world_of(engine: &PluginEngine, component: &Component) -> Option<World> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(engine.engine()).map(|(n, _)| n).collect();
    if names.contains(&ROUTE_POLICY_EXPORT) {
        Some(World::RoutePolicy)
    } else if names.contains(&TRANSPORT_EXPORT) {
        Some(World::Transport)
    } else {
        None
    }
}

/// The error for a component loaded as `wanted` that implements the other world.
pub(crate) fn other_world(path: &Path, wanted: World, found: World) -> PluginError {
    let message = match (wanted, found) {
        (World::Transport, World::RoutePolicy) => format!(
            "it is a route policy (exports {ROUTE_POLICY_EXPORT}), not a transport: load it \
             with ASYA_ROUTE_POLICIES and check it with `asya-host plugin check`; \
             `asya-host plugin test` and ASYA_TRANSPORT_PLUGIN take a transport"
        ),
        _ => format!(
            "it is a transport (exports {TRANSPORT_EXPORT}), not a route policy: load it with \
             ASYA_TRANSPORT=wasm and ASYA_TRANSPORT_PLUGIN, test it with `asya-host plugin test`"
        ),
    };
    PluginError::WrongWorld {
        path: path.to_owned(),
        message,
    }
}

/// Compile `path` and check it against this host's contract: its world (by its exports),
/// that every import can be satisfied, and that its exports have the right types.
pub fn check(path: &Path) -> Result<CheckReport, PluginError> {
    let engine = PluginEngine::new(None)?;
    let component = engine.load(path)?;
    let ty = component.component_type();
    let imports: Vec<String> = ty
        .imports(engine.engine())
        .map(|(n, _)| n.to_owned())
        .collect();
    let exports: Vec<String> = ty
        .exports(engine.engine())
        .map(|(n, _)| n.to_owned())
        .collect();
    let world = if exports.iter().any(|e| e == ROUTE_POLICY_EXPORT) {
        World::RoutePolicy
    } else if exports.iter().any(|e| e == TRANSPORT_EXPORT) {
        World::Transport
    } else {
        let ours: Vec<&String> = exports
            .iter()
            .filter(|e| e.starts_with("asya:plugin/"))
            .collect();
        return Err(PluginError::WrongWorld {
            path: path.to_owned(),
            message: if ours.is_empty() {
                format!(
                    "exports neither {ROUTE_POLICY_EXPORT} nor {TRANSPORT_EXPORT} (exports: {})",
                    if exports.is_empty() {
                        "nothing".to_owned()
                    } else {
                        exports.join(", ")
                    }
                )
            } else {
                format!(
                    "exports {} but this host implements asya:plugin@0.1.0",
                    ours.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        });
    };
    let imports_err = |e: wasmtime::Error| PluginError::Imports {
        path: path.to_owned(),
        message: format!("{e:#}"),
    };
    let exports_err = |e: wasmtime::Error| PluginError::Exports {
        path: path.to_owned(),
        message: format!("{e:#}"),
    };
    match world {
        World::RoutePolicy => {
            let pre = engine
                .policy_linker()?
                .instantiate_pre(&component)
                .map_err(imports_err)?;
            RoutePolicyPluginPre::new(pre).map_err(exports_err)?;
        }
        World::Transport => {
            let pre = engine
                .transport_linker()?
                .instantiate_pre(&component)
                .map_err(imports_err)?;
            TransportPluginPre::new(pre).map_err(exports_err)?;
        }
    }
    Ok(CheckReport {
        path: path.to_owned(),
        world,
        imports,
        exports,
    })
}
