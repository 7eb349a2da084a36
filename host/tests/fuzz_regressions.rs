//! Inputs found by the fuzz targets in `fuzz/` (`.ci/fuzz`), kept as tests: each one
//! panicked before its fix.

use asya_host::gateway::SubmitRequest;

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
#[test]
fn submit_timeout_beyond_the_calendar_is_rejected() {
    // A timeout far beyond the calendar (the deadline date would overflow) is refused with
    // an error naming the field, never a panic; the gateway answers it with 400.
    let e = serde_json::from_str::<SubmitRequest>(r#"{"flow":"f","payload":1,"timeout":1e15}"#)
        .unwrap_err();
    assert!(e.to_string().contains("timeout"), "{e}");
}

/// Found by the `envelope` target on its first run: a header integer beyond 64 bits became
/// a float (`1.2345678901234567e+23`) and was not even stable through a second hop. Headers
/// are kept as JSON text now (`envelope::Headers`).
#[test]
fn header_integer_beyond_64_bits_round_trips() {
    let input = br#"{"id":"e","route":{"prev":[],"curr":"a","next":[]},"headers":{"big":123456789012345678901234},"payload":1}"#;
    let once = asya_host::envelope::Envelope::parse(input)
        .unwrap()
        .to_vec();
    assert!(
        String::from_utf8_lossy(&once).contains("123456789012345678901234"),
        "{}",
        String::from_utf8_lossy(&once)
    );
    let twice = asya_host::envelope::Envelope::parse(&once)
        .unwrap()
        .to_vec();
    assert_eq!(once, twice);
}
