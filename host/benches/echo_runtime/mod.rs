//! The in-process Rust echo runtime the benchmarks call: HTTP/1.1 over a Unix socket,
//! `POST /invoke` answers one frame with the payload and the route shifted (N frames when
//! the payload holds `"fanout": N`).

use std::convert::Infallible;

use asya_host::envelope::Envelope;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixListener;

#[derive(Serialize)]
struct FramesOut<'a> {
    frames: Vec<FrameOut<'a>>,
}

#[derive(Serialize)]
struct FrameOut<'a> {
    payload: &'a serde_json::value::RawValue,
    route: asya_host::envelope::Route,
}

/// The echo runtime: one frame with the payload, route shifted.
async fn echo(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let rid = req.headers().get("x-request-id").cloned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut resp = if body.is_empty() {
        Response::new(Full::new(Bytes::from_static(b"{\"status\":\"ready\"}")))
    } else {
        let env = Envelope::parse(&body).expect("bench sends envelopes");
        let n = fanout(env.payload.get());
        let out = FramesOut {
            frames: (0..n)
                .map(|_| FrameOut {
                    payload: &env.payload,
                    route: env.route.shifted(),
                })
                .collect(),
        };
        Response::new(Full::new(Bytes::from(serde_json::to_vec(&out).unwrap())))
    };
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(r) = rid {
        resp.headers_mut().insert("x-request-id", r);
    }
    Ok(resp)
}

/// `N` of a payload with `"fanout": N`, else 1.
fn fanout(payload: &str) -> usize {
    if !payload.contains("\"fanout\"") {
        return 1;
    }
    serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["fanout"].as_u64())
        .map_or(1, |n| n as usize)
}

async fn serve_echo(listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

/// Serve the echo runtime on `path` as a task of the current (tokio) runtime: with the bench
/// on a current-thread runtime, everything runs on one thread and a hop costs its work alone,
/// without wake-ups (a diagnostic, not the deployed shape; `HOP_ONE_THREAD=1` in the hop
/// bench — the other benches that include this module do not use it).
#[allow(dead_code)]
pub fn spawn_echo_task(path: &std::path::Path) {
    let listener = UnixListener::bind(path).expect("bind the echo socket");
    tokio::spawn(serve_echo(listener));
}

/// Serve the echo runtime on `path` from a thread of its own, with a runtime of its own (a
/// handler runtime is a process of its own next to the sidecar: its scheduling is not the
/// sidecar's). Returns once the socket accepts connections.
pub fn spawn_echo_thread(path: &std::path::Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind the echo socket");
    listener.set_nonblocking(true).expect("non-blocking socket");
    std::thread::Builder::new()
        .name("echo-runtime".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("echo runtime")
                .block_on(async move {
                    serve_echo(UnixListener::from_std(listener).expect("a tokio listener")).await
                });
        })
        .expect("spawn the echo thread");
}
