//! Inputs found by the fuzz targets in `fuzz/` (`.ci/fuzz`), kept as tests: each one
//! panicked before its fix.

use std::sync::Arc;

use asya_host::gateway::store::MemoryStore;
use asya_host::gateway::{Flows, Gateway, SubmitRequest};
use asya_host::transport::memory::MemoryTransport;

/// `POST /tasks` with `"timeout": 1e300` panicked in `Duration::from_secs_f64`.
#[test]
fn submit_timeout_too_large_is_an_error() {
    for body in [r#"{"flow":"f","timeout":1e300}"#, r#"{"timeout":"1e300"}"#] {
        let r = serde_json::from_str::<SubmitRequest>(body);
        assert!(r.is_err(), "{body} parsed: {r:?}");
    }
}

/// `"timeout": 1e15` (31 million years) parsed, then overflowed the deadline date in
/// `Gateway::submit`.
#[tokio::test]
async fn submit_timeout_beyond_the_calendar_is_capped() {
    let flows: Flows = [("f".to_owned(), vec!["a".to_owned()])]
        .into_iter()
        .collect();
    let gw = Gateway::new(
        Arc::new(MemoryStore::new()),
        Arc::new(MemoryTransport::new()),
        "fz".into(),
        flows,
        "x-sink".into(),
        "x-sump".into(),
    );
    let sub: SubmitRequest =
        serde_json::from_str(r#"{"flow":"f","payload":1,"timeout":1e15}"#).unwrap();
    let view = gw.submit(sub).await.unwrap();
    let deadline = view.deadline_at.expect("a deadline");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&deadline).is_ok(),
        "{deadline}"
    );
}
