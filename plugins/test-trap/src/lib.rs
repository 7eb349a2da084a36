//! Test-only: panics (a trap) when the frame's payload has `"mode": "trap"`; keeps the
//! frame otherwise.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct Trap;

impl RoutePolicy for Trap {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(Trap)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("trap") {
            panic!("test-trap was asked to trap");
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(Trap);
