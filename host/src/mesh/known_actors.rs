//! `up` knows every actor of the mesh: a frame routed (by a handler or a policy) to an actor
//! that no one in the mesh consumes goes to x-sump at once, with a reason naming it, instead
//! of waiting in a queue nobody reads until its task times out.
//!
//! A native [`RoutePolicy`] that runs after the actor's configured policy chain and looks at
//! the frame's next actor (`route.curr`) as the chain left it.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::plugin::{Decision, PolicyError, RoutePolicy};

/// The configured chain of one actor (if any), then the known-actor check.
pub struct KnownActors {
    inner: Option<Arc<dyn RoutePolicy>>,
    known: Arc<BTreeSet<String>>,
}

impl KnownActors {
    /// `known`: every actor with a consumer in the mesh (the flow's actors and the end
    /// actors).
    pub fn new(inner: Option<Arc<dyn RoutePolicy>>, known: Arc<BTreeSet<String>>) -> Self {
        KnownActors { inner, known }
    }

    /// Why a frame bound for `curr` cannot be delivered, if it cannot.
    fn unknown(&self, curr: &str) -> Option<String> {
        if curr.is_empty() || self.known.contains(curr) {
            return None;
        }
        let known: Vec<&str> = self.known.iter().map(String::as_str).collect();
        Some(format!(
            "actor {curr:?} is not part of this mesh (known: {})",
            known.join(", ")
        ))
    }
}

#[async_trait]
impl RoutePolicy for KnownActors {
    async fn decide(&self, input: &Envelope, frame: &Envelope) -> Result<Decision, PolicyError> {
        let decision = match &self.inner {
            Some(chain) => chain.decide(input, frame).await?,
            None => Decision::Keep,
        };
        let curr = match &decision {
            Decision::Keep => frame.route.curr.as_str(),
            Decision::ReplaceRoute(route) => route.curr.as_str(),
            Decision::Reject(_) | Decision::SendToSink | Decision::SendToSump(_) => {
                return Ok(decision)
            }
        };
        Ok(match self.unknown(curr) {
            Some(why) => Decision::SendToSump(why),
            None => decision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Route;

    fn frame(curr: &str) -> Envelope {
        let json = serde_json::json!({
            "id": "e1",
            "route": {"prev": ["a"], "curr": curr, "next": []},
            "payload": null,
        });
        Envelope::parse(json.to_string().as_bytes()).unwrap()
    }

    struct Replace(&'static str);

    #[async_trait]
    impl RoutePolicy for Replace {
        async fn decide(&self, _: &Envelope, f: &Envelope) -> Result<Decision, PolicyError> {
            Ok(Decision::ReplaceRoute(Route {
                prev: f.route.prev.clone(),
                curr: self.0.to_owned(),
                next: vec![],
            }))
        }
    }

    #[tokio::test]
    async fn unknown_next_actor_goes_to_sump_with_its_name() {
        let known: Arc<BTreeSet<String>> = Arc::new(
            ["a", "b", "x-sink", "x-sump"]
                .into_iter()
                .map(String::from)
                .collect(),
        );
        let p = KnownActors::new(None, known.clone());
        let input = frame("a");
        for ok in ["b", "", "x-sump"] {
            assert_eq!(p.decide(&input, &frame(ok)).await.unwrap(), Decision::Keep);
        }
        let Decision::SendToSump(why) = p.decide(&input, &frame("ghost")).await.unwrap() else {
            panic!("not sent to x-sump");
        };
        assert_eq!(
            why,
            "actor \"ghost\" is not part of this mesh (known: a, b, x-sink, x-sump)"
        );
        // The chain's replacement route is what is checked.
        let p = KnownActors::new(Some(Arc::new(Replace("ghost"))), known.clone());
        assert!(matches!(
            p.decide(&input, &frame("b")).await.unwrap(),
            Decision::SendToSump(_)
        ));
        let p = KnownActors::new(Some(Arc::new(Replace("b"))), known);
        assert!(matches!(
            p.decide(&input, &frame("ghost")).await.unwrap(),
            Decision::ReplaceRoute(_)
        ));
    }
}
