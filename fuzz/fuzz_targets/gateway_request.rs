//! The gateway's request bodies: `POST /tasks` (`SubmitRequest`, then the submit itself on
//! a memory store and transport) and `POST /reports` (one report or an array, applied to a
//! task; the trace id `T` stands for the task's real one). The first byte picks the
//! endpoint. Property: no panic; a bad body is an error.
#![no_main]

use std::sync::{Arc, OnceLock};

use asya_host::gateway::store::MemoryStore;
use asya_host::gateway::{Flows, Gateway, SubmitRequest, WireReport};
use asya_host::transport::memory::MemoryTransport;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn with_trace_id(v: &mut Value, trace_id: &str) {
    if let Some(t) = v.get_mut("trace_id") {
        if t == "T" {
            *t = Value::String(trace_id.to_owned());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&endpoint, body)) = data.split_first() else {
        return;
    };
    rt().block_on(async {
        let flows: Flows = [("f".to_owned(), vec!["a".to_owned(), "b".to_owned()])]
            .into_iter()
            .collect();
        let gw = Gateway::new(
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryTransport::new()),
            "fuzz".into(),
            flows,
            "x-sink".into(),
            "x-sump".into(),
        );
        gw.set_max_payload_bytes(4096);
        exercise(&gw, endpoint, body).await;
        // The gateway's report task ends once the gateway is dropped; on this
        // current-thread runtime it runs only while the future waits, and nothing here ever
        // waits (memory store and transport): yield so it ends instead of piling up
        // (116 k leftover tasks and their channels were a 2 GB "leak" of the harness).
        drop(gw);
        for _ in 0..2 {
            tokio::task::yield_now().await;
        }
    });
});

async fn exercise(gw: &Gateway, endpoint: u8, body: &[u8]) {
    if endpoint & 1 == 0 {
        if let Ok(sub) = serde_json::from_slice::<SubmitRequest>(body) {
            let _ = gw.submit(sub).await;
        }
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let task = gw
        .submit(SubmitRequest {
            flow: Some("f".into()),
            payload: Value::from(1),
            ..Default::default()
        })
        .await
        .expect("a valid submit");
    let items = match v {
        Value::Array(items) => items,
        other => vec![other],
    };
    for mut item in items {
        with_trace_id(&mut item, &task.trace_id);
        if let Ok(r) = serde_json::from_value::<WireReport>(item) {
            gw.apply(r).await;
        }
    }
    let _ = gw.get(&task.id).await;
}
