//! Envelope parse -> validate -> serialise round trip. Properties: no panic; an envelope
//! that parses re-serialises to bytes that parse again, validate again, and serialise to
//! the same bytes (nothing is lost or changed by a hop that does not touch it).
#![no_main]

use asya_host::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    env.validate().expect("a parsed envelope validates");
    let once = env.to_vec();
    let again = Envelope::parse(&once).unwrap_or_else(|e| {
        panic!(
            "re-serialised envelope does not parse: {e}\n{}",
            String::from_utf8_lossy(&once)
        )
    });
    let twice = again.to_vec();
    assert_eq!(
        String::from_utf8_lossy(&once),
        String::from_utf8_lossy(&twice),
        "serialisation is not stable"
    );
    // The accessors the sidecar uses on every envelope.
    let _ = env.trace_id();
    let _ = env.deadline();
    let _ = env.route.is_finished();
    let _ = env.route.shifted();
});
