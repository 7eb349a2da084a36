//! Test-only: when the frame's payload has `"mode": "open-file"`, tries to read the file
//! named by payload field `path` (default `/etc/hostname`). A sandboxed host makes that
//! fail: the policy returns an error (`open failed: ...`). Should the read succeed, the
//! policy sends the frame to x-sink, which a test detects as a sandbox breach.

use asya_sdk::{Config, Decision, Envelope, Error, RoutePolicy};

pub struct OpenFile;

impl RoutePolicy for OpenFile {
    fn configure(_: &Config) -> Result<Self, Error> {
        Ok(OpenFile)
    }

    fn decide(&self, _input: &Envelope<'_>, frame: &Envelope<'_>) -> Result<Decision, Error> {
        if frame.payload_str("mode").as_deref() == Some("open-file") {
            let path = frame
                .payload_str("path")
                .unwrap_or_else(|| "/etc/hostname".into());
            return match std::fs::read(&path) {
                Ok(_) => Ok(Decision::SendToSink),
                Err(e) => Err(Error::new(format!("open failed: {e}"))),
            };
        }
        Ok(Decision::Keep)
    }
}

asya_sdk::export_route_policy!(OpenFile);
