//! Test-only: allocates (and touches) memory until the host's memory limit stops it when
//! the frame's payload has `"mode": "bomb"`; keeps the frame otherwise.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct MemoryBomb;

impl RoutePolicy for MemoryBomb {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(MemoryBomb)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("bomb") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            // 64 GiB in 1 MiB chunks: far beyond any limit, so the limit must stop it.
            for i in 0..65_536usize {
                hoard.push(vec![(i % 251) as u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
            return Ok(Decision::SendToSink);
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(MemoryBomb);
