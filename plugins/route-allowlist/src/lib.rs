//! `route-allowlist`: rejects a frame whose route names an actor outside a configured
//! set. The end of the route (`""`) and x-sink are always allowed.

use std::collections::HashSet;

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

/// Configuration: `{"allow": ["a", "b"], "sink": "x-sink"}` (`sink` optional).
pub struct RouteAllowlist {
    allow: HashSet<String>,
}

impl RoutePolicy for RouteAllowlist {
    fn configure(config: &Config) -> Result<Self, Error> {
        let Some(list) = config.str_list("allow")? else {
            return Err(Error::new(
                "config \"allow\" (a list of actor names) is required",
            ));
        };
        let mut allow: HashSet<String> = list.into_iter().collect();
        allow.insert(config.str_or("sink", "x-sink")?);
        Ok(RouteAllowlist { allow })
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        let route = frame.route();
        let outsider = route.actors().find(|a| !self.allow.contains(*a));
        Ok(match outsider {
            None => Decision::Keep,
            Some(actor) => Decision::Reject(format!(
                "route names actor {actor:?}, which is not in the allow-list"
            )),
        })
    }
}

asya_sdk::export_route_policy!(RouteAllowlist);
