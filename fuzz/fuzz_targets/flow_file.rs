//! The flow file of `asya-host up` and the gateway's flows file. Property: no panic; an
//! error is one line.
#![no_main]

use std::path::Path;

use asya_host::mesh::flowfile::FlowFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match FlowFile::parse(Path::new("/fuzz/flows.toml"), text) {
        Ok(f) => {
            for name in f.flows.keys() {
                let _ = f.actor(name);
            }
        }
        Err(e) => assert!(!e.to_string().contains('\n'), "multi-line error: {e}"),
    }
    if let Err(e) = asya_host::gateway::parse_flows(text) {
        assert!(!e.contains('\n'), "multi-line error: {e}");
    }
});
