//! Test-only: when the frame's payload has `"mode": "sleep"`, blocks in a sleep of
//! `"sleep_ms"` milliseconds (default 60,000) before keeping the frame. A blocked guest
//! uses no CPU, so the epoch deadline does not stop it: the host's wall-clock bound must.

use std::time::Duration;

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct Sleep;

impl RoutePolicy for Sleep {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(Sleep)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("sleep") {
            let ms = frame
                .payload_str("sleep_ms")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(60_000);
            // wasi:clocks monotonic-clock subscribe + wasi:io/poll: a blocking host call.
            std::thread::sleep(Duration::from_millis(ms));
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(Sleep);
