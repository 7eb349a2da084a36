//! Test-only: loops forever when the frame's payload has `"mode": "loop"`, keeps the
//! frame otherwise. The host's per-call deadline must cut it off.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct InfiniteLoop;

impl RoutePolicy for InfiniteLoop {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(InfiniteLoop)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(InfiniteLoop);
