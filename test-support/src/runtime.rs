//! Python runtime processes on real Unix sockets: the scripted fixture runtime
//! (`tests/fixtures/scripted_runtime.py`, behaviour chosen by each envelope's payload) and
//! the stock runtime (`sdk/python/asya_runtime.py` serving a handler).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{repo_root, Proc};

/// `python3 tests/fixtures/scripted_runtime.py` serving `socket_dir/asya-runtime.sock`.
/// Every payload without an `op` is echoed (one frame, route shifted); see the script's
/// docstring for the ops. Stdin is null; the caller picks stdout/stderr.
pub fn scripted_command(socket_dir: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/fixtures/scripted_runtime.py"))
        .env("ASYA_SOCKET_DIR", socket_dir)
        .stdin(Stdio::null());
    cmd
}

/// `python3 sdk/python/asya_runtime.py` serving `handler` (`module.function`, found on
/// `pythonpath`) on `socket_dir/asya-runtime.sock`. Stdin is null.
pub fn stock_command(socket_dir: &Path, handler: &str, pythonpath: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("sdk/python/asya_runtime.py"))
        .env("ASYA_HANDLER", handler)
        .env("ASYA_SOCKET_DIR", socket_dir)
        .env("PYTHONPATH", pythonpath)
        .stdin(Stdio::null());
    cmd
}

/// The scripted fixture runtime in a temp dir of its own (`dir/asya-runtime.sock`); killed
/// on drop. Records the id of every envelope it is invoked with (`invocations`).
pub struct FixtureRuntime {
    _proc: Proc,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl FixtureRuntime {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("invocations.log");
        let child = scripted_command(dir.path())
            .env("SCRIPTED_LOG", &log)
            .spawn()
            .expect("python3 starts");
        FixtureRuntime {
            _proc: Proc(child),
            dir,
            log,
        }
    }

    /// Ids of the envelopes the runtime was invoked with, in order.
    pub fn invocations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The stock runtime serving `handler` from `tests/fixtures/handlers/` in a temp dir of its
/// own; killed on drop.
pub struct StockRuntime {
    _proc: Proc,
    pub dir: tempfile::TempDir,
}

impl StockRuntime {
    pub fn start(handler: &str) -> StockRuntime {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = stock_command(
            dir.path(),
            handler,
            &repo_root().join("tests/fixtures/handlers"),
        )
        .env("ASYA_LOG_LEVEL", "WARNING")
        .spawn()
        .expect("python3 starts");
        StockRuntime {
            _proc: Proc(child),
            dir,
        }
    }
}
