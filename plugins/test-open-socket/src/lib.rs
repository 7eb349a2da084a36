//! Test-only: when the frame's payload has `"mode": "open-socket"`, tries to connect to the
//! TCP address in payload field `addr` (default `127.0.0.1:80`). A sandboxed host makes that
//! fail: the policy returns an error (`connect failed: ...`). Should it connect, the policy
//! sends the frame to x-sink, which a test detects as a sandbox breach.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct OpenSocket;

impl RoutePolicy for OpenSocket {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(OpenSocket)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("open-socket") {
            let addr = frame
                .payload_str("addr")
                .unwrap_or_else(|| "127.0.0.1:80".into());
            return match std::net::TcpStream::connect(addr.as_str()) {
                Ok(_) => Ok(Decision::SendToSink),
                Err(e) => Err(Error::new(format!("connect failed: {e}"))),
            };
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(OpenSocket);
