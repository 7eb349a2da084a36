//! The runtime response parser: whatever a runtime writes back on the Unix socket (status
//! line, headers, content-length, chunked or close-delimited bodies, JSON frames, error
//! objects, SSE events) goes through the real `RuntimeClient`. Property: no panic and no
//! hang; a broken response is an error.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use asya_host::runtime::{Reply, RuntimeClient};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::time::Instant;

const ENVELOPE: &[u8] =
    br#"{"id":"e-1","route":{"prev":[],"curr":"a","next":["b"]},"payload":{"n":1}}"#;
/// Body cap of the client (a small one, so the too-large path is reachable).
const MAX_BODY: usize = 64 * 1024;

struct Harness {
    rt: tokio::runtime::Runtime,
    listener: UnixListener,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("rt.sock");
        let listener = rt.block_on(async { UnixListener::bind(&socket).expect("bind") });
        Harness {
            rt,
            listener,
            socket,
            _dir: dir,
        }
    })
}

/// Read one request (head and the envelope body), answer `response`, close.
async fn serve_once(listener: &UnixListener, response: &[u8]) {
    let Ok((mut s, _)) = listener.accept().await else {
        return;
    };
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|h| buf.len() >= h + 4 + ENVELOPE.len()) {
            break;
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let _ = s.write_all(response).await;
    let _ = s.shutdown().await;
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        let client = RuntimeClient::new(&h.socket, MAX_BODY);
        let call = async {
            let deadline = Instant::now() + Duration::from_millis(500);
            if let Ok(Reply::Stream(mut events)) =
                client.invoke(Bytes::from_static(ENVELOPE), deadline).await
            {
                // Each event is bounded by the body cap, the stream by the deadline.
                while let Ok(Some(_)) = events.next().await {}
            }
        };
        let served = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::join!(serve_once(&h.listener, data), call)
        })
        .await;
        assert!(served.is_ok(), "runtime call did not end within 2s");
    });
});
