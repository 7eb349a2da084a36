//! `priority-router`: when the frame's payload field (default `priority`) equals a value
//! (default `"high"`), the configured actor (default `priority-handler`) processes the
//! frame next; the actor that was next moves to the front of `next`.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

/// Configuration: `{"actor": "priority-handler", "field": "priority", "value": "high"}`.
pub struct PriorityRouter {
    actor: String,
    field: String,
    value: String,
}

impl RoutePolicy for PriorityRouter {
    fn configure(config: &Config) -> Result<Self, Error> {
        let actor = config.str_or("actor", "priority-handler")?;
        if actor.is_empty() {
            return Err(Error::new("config \"actor\" must not be empty"));
        }
        Ok(PriorityRouter {
            actor,
            field: config.str_or("field", "priority")?,
            value: config.str_or("value", "high")?,
        })
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str(&self.field).as_deref() != Some(self.value.as_str()) {
            return Ok(Decision::Keep);
        }
        // Read only what the decision needs: `curr`, then `next` (never `prev`).
        let curr = frame.route_curr();
        if curr == self.actor {
            return Ok(Decision::Keep);
        }
        let (curr, next) = prioritize(curr, frame.route_next(), &self.actor);
        Ok(Decision::ReplaceRoute { curr, next })
    }
}

/// `actor` as the new `curr`; the old `curr` (unless it was the end of the route) pushed to
/// the front of `next`.
pub fn prioritize(curr: String, next: Vec<String>, actor: &str) -> (String, Vec<String>) {
    let mut ahead = Vec::with_capacity(next.len() + 1);
    if !curr.is_empty() {
        ahead.push(curr);
    }
    ahead.extend(next);
    (actor.to_owned(), ahead)
}

asya_sdk::export_route_policy!(PriorityRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use asya_sdk::serde_json::json;
    use asya_sdk::{LocalEnvelope, Route};

    fn route(prev: &[&str], curr: &str, next: &[&str]) -> Route {
        Route {
            prev: prev.iter().map(|s| s.to_string()).collect(),
            curr: curr.into(),
            next: next.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn high_priority_goes_to_the_handler_first() {
        let p = PriorityRouter::configure(&Config::parse("null").unwrap()).unwrap();
        let input = LocalEnvelope::new("e", route(&[], "a", &["b", "c"]), json!({}));
        let frame =
            LocalEnvelope::new("e", route(&["a"], "b", &["c"]), json!({"priority": "high"}));
        assert_eq!(
            p.decide(&input.view(), &frame.view()).unwrap(),
            Decision::ReplaceRoute {
                curr: "priority-handler".into(),
                next: vec!["b".into(), "c".into()]
            }
        );
        let low = LocalEnvelope::new("e", route(&["a"], "b", &[]), json!({"priority": "low"}));
        assert_eq!(
            p.decide(&input.view(), &low.view()).unwrap(),
            Decision::Keep
        );
    }
}
