//! Runtime processes of the local mesh: one stock Python runtime per actor, in its own
//! process group (killed on drop, so nothing survives a panic of the host), its output
//! forwarded to the host's log, restarted with backoff when it dies. Each runtime also gets
//! SIGKILL from the kernel when the host dies, even by SIGKILL (`PR_SET_PDEATHSIG`).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Socket file name inside an actor's socket directory.
pub const SOCKET_NAME: &str = "asya-runtime.sock";
/// Ready file name inside an actor's socket directory.
pub const READY_FILE: &str = "runtime-ready";
/// SIGTERM → SIGKILL grace of a runtime at shutdown.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// First restart delay; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A runtime that ran this long before dying restarts after [`INITIAL_BACKOFF`] again.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Output lines kept to explain a failed start.
const TAIL_LINES: usize = 20;
/// Longest output line forwarded to the log.
const MAX_LINE: usize = 8 * 1024;

/// How to start one actor's runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub actor: String,
    /// The interpreter (`python3` or `ASYA_PYTHONEXECUTABLE`).
    pub python: OsString,
    /// `asya_runtime.py`.
    pub script: PathBuf,
    /// Holds the socket and the ready file.
    pub socket_dir: PathBuf,
    /// Environment on top of the host's (`ASYA_HANDLER`, `PYTHONPATH`, the actor's `env`).
    pub env: Vec<(String, String)>,
    /// How long a start may take before it counts as failed.
    pub ready_timeout: Duration,
}

impl RuntimeConfig {
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(SOCKET_NAME)
    }

    pub fn ready_file(&self) -> PathBuf {
        self.socket_dir.join(READY_FILE)
    }
}

/// A runtime that did not come up. One line each.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeStartError {
    #[error("actor {actor}: cannot start the Python runtime with {python:?}: {source} (install python3 or set ASYA_PYTHONEXECUTABLE to a Python 3 interpreter)")]
    Spawn {
        actor: String,
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error("actor {actor}: the runtime exited during start-up ({status}): {message}")]
    Exited {
        actor: String,
        status: String,
        message: String,
    },
    #[error("actor {actor}: the runtime was not ready after {waited:?} (no {} yet)", missing.display())]
    NotReady {
        actor: String,
        waited: Duration,
        missing: PathBuf,
    },
}

/// What a runtime printed, for start-up errors.
#[derive(Default)]
struct Output {
    /// The runtime's own one-line reason (`fatal: ...`).
    fatal: Option<String>,
    tail: VecDeque<String>,
}

/// One running runtime process (and its process group).
pub struct RuntimeProcess {
    actor: String,
    child: Child,
    pgid: Option<Pid>,
    started: Instant,
    exited: bool,
    output: Arc<Mutex<Output>>,
    /// Until set, output is logged at DEBUG only (a failed start is reported as one line).
    ready: Arc<AtomicBool>,
    readers: Vec<JoinHandle<()>>,
}

impl RuntimeProcess {
    /// Start the runtime (stale socket and ready file removed first).
    pub fn spawn(cfg: &RuntimeConfig) -> Result<RuntimeProcess, RuntimeStartError> {
        let _ = std::fs::create_dir_all(&cfg.socket_dir);
        let _ = std::fs::remove_file(cfg.socket_path());
        let _ = std::fs::remove_file(cfg.ready_file());
        let mut cmd = Command::new(&cfg.python);
        cmd.arg(&cfg.script)
            .env("ASYA_SOCKET_DIR", &cfg.socket_dir)
            .env("ASYA_SOCKET_NAME", SOCKET_NAME)
            .env("PYTHONUNBUFFERED", "1")
            .envs(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| RuntimeStartError::Spawn {
            actor: cfg.actor.clone(),
            python: cfg.python.to_string_lossy().into_owned(),
            source,
        })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        let output = Arc::new(Mutex::new(Output::default()));
        let ready = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(forward(
                cfg.actor.clone(),
                out,
                output.clone(),
                ready.clone(),
                false,
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(forward(
                cfg.actor.clone(),
                err,
                output.clone(),
                ready.clone(),
                true,
            )));
        }
        debug!(actor = %cfg.actor, pid = ?child.id(), "runtime started");
        Ok(RuntimeProcess {
            actor: cfg.actor.clone(),
            child,
            pgid,
            started: Instant::now(),
            exited: false,
            output,
            ready,
            readers,
        })
    }

    /// Operating-system id of the runtime process.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Wait until the runtime wrote its ready file and bound its socket, or fail with the
    /// runtime's own reason when it exits first.
    pub async fn wait_ready(&mut self, cfg: &RuntimeConfig) -> Result<(), RuntimeStartError> {
        let start = Instant::now();
        let deadline = start + cfg.ready_timeout;
        let (socket, ready) = (cfg.socket_path(), cfg.ready_file());
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                return Err(self.exit_error(status).await);
            }
            if ready.exists() && socket.exists() {
                self.ready.store(true, Ordering::Relaxed);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RuntimeStartError::NotReady {
                    actor: self.actor.clone(),
                    waited: start.elapsed(),
                    missing: if socket.exists() { ready } else { socket },
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn exit_error(&mut self, status: ExitStatus) -> RuntimeStartError {
        // Let the readers drain the pipes so the runtime's last words are seen.
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        let out = self.output.lock().expect("output lock");
        let message = out
            .fatal
            .clone()
            .or_else(|| out.tail.back().cloned())
            .unwrap_or_else(|| "it printed nothing".into());
        RuntimeStartError::Exited {
            actor: self.actor.clone(),
            status: describe(status),
            message,
        }
    }

    /// Wait for the process to exit (cancel-safe).
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.exited = true;
        status
    }

    /// SIGTERM to the group, SIGKILL after `grace`, then reap. Anything left in the group
    /// (processes the handler started) is killed too.
    pub async fn terminate(&mut self, grace: Duration) {
        if !self.exited {
            self.signal(Signal::TERM);
            match tokio::time::timeout(grace, self.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    warn!(actor = %self.actor, ?grace, "runtime did not stop after SIGTERM; killing it");
                    self.signal(Signal::KILL);
                    let _ = self.child.wait().await;
                }
            }
            self.exited = true;
        }
        self.signal(Signal::KILL);
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is gone) is the expected outcome after an exit.
            let _ = kill_process_group(pgid, sig);
        }
    }
}

impl Drop for RuntimeProcess {
    fn drop(&mut self) {
        // A panic or an early return must not leave a runtime behind.
        self.signal(Signal::KILL);
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Have the kernel SIGKILL the child when the host dies, however it dies: a SIGKILL of
/// `asya-host up` cannot run `Drop`, and its runtimes were left running.
///
/// The signal fires when the *thread* that forked the child exits. Runtimes are spawned from
/// the thread running `up` (the main thread) or from tokio worker threads, which live as long
/// as the process; nothing in the mesh moves a worker to the blocking pool.
///
/// The one `unsafe` block of the workspace (the lint is `deny`, allowed here only):
/// `pre_exec` is the only way std offers to run code in the child between fork and exec, and
/// the parent-death signal must be set there (it is cleared by fork, kept by exec).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use rustix::process::{getpid, getppid, set_parent_process_death_signal};
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2) and
    // getppid(2) through rustix (raw syscalls: async-signal-safe, no allocation, no locks)
    // and builds an io::Error from a raw errno or a static message, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The host may have died between fork and prctl: then no signal will come.
            if getppid() != Some(parent) {
                return Err(std::io::Error::from(std::io::ErrorKind::Other));
            }
            Ok(())
        });
    }
}

/// Elsewhere only the process group and kill-on-drop apply (no parent-death signal).
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(2), _) => "exit code 2: bad configuration".into(),
        (Some(3), _) => "exit code 3: the handler cannot be loaded".into(),
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Forward a runtime's output lines to the log (warnings and errors at WARN, the rest at
/// DEBUG; stdout at INFO) and keep the last ones.
async fn forward(
    actor: String,
    pipe: impl AsyncRead + Unpin,
    output: Arc<Mutex<Output>>,
    ready: Arc<AtomicBool>,
    is_stderr: bool,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(mut line)) = lines.next_line().await {
        if line.len() > MAX_LINE {
            line = crate::plugin::truncate(&line, MAX_LINE).into_owned();
        }
        // The runtime's format: `DATE TIME LEVEL logger envelope_id=.. trace_id=.. message`.
        let level = line.split_whitespace().nth(2).unwrap_or("");
        if !ready.load(Ordering::Relaxed) {
            debug!(target: "asya_host::mesh::runtime", %actor, "{line}");
        } else if !is_stderr {
            info!(target: "asya_host::mesh::runtime", %actor, "{line}");
        } else if matches!(level, "WARNING" | "ERROR" | "CRITICAL") || level.is_empty() {
            warn!(target: "asya_host::mesh::runtime", %actor, "{line}");
        } else {
            debug!(target: "asya_host::mesh::runtime", %actor, "{line}");
        }
        let mut out = output.lock().expect("output lock");
        if let Some(i) = line.find("fatal: ") {
            out.fatal = Some(line[i + "fatal: ".len()..].trim().to_owned());
        }
        if out.tail.len() == TAIL_LINES {
            out.tail.pop_front();
        }
        out.tail.push_back(line);
    }
}

/// A request to restart the runtime (after a runtime timeout); answered once it is ready.
pub type RestartRequest = oneshot::Sender<()>;

/// Keep one actor's runtime alive until `stop`: restart it with backoff when it dies, and
/// on request. Terminates it (SIGTERM, then SIGKILL after [`TERM_GRACE`]) on `stop`.
pub async fn supervise(
    cfg: RuntimeConfig,
    mut proc: RuntimeProcess,
    mut restart_rx: mpsc::Receiver<RestartRequest>,
    stop: CancellationToken,
    restarts: Arc<AtomicU64>,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                proc.terminate(TERM_GRACE).await;
                return;
            }
            req = restart_rx.recv() => {
                let Some(ack) = req else { continue };
                warn!(actor = %cfg.actor, "restarting the runtime after a runtime timeout");
                proc.terminate(Duration::from_secs(2)).await;
                restarts.fetch_add(1, Ordering::Relaxed);
                match respawn(&cfg, &stop, &mut backoff).await {
                    Some(p) => proc = p,
                    None => return,
                }
                let _ = ack.send(());
            }
            status = proc.wait() => {
                let status = status.map(describe).unwrap_or_else(|e| e.to_string());
                if proc.started.elapsed() >= STABLE_AFTER {
                    backoff = INITIAL_BACKOFF;
                }
                warn!(actor = %cfg.actor, %status, ?backoff, "runtime exited; restarting it");
                proc.terminate(Duration::ZERO).await;
                restarts.fetch_add(1, Ordering::Relaxed);
                if !pause(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match respawn(&cfg, &stop, &mut backoff).await {
                    Some(p) => proc = p,
                    None => return,
                }
            }
        }
    }
}

/// Start the runtime again until it is ready (or `stop`).
async fn respawn(
    cfg: &RuntimeConfig,
    stop: &CancellationToken,
    backoff: &mut Duration,
) -> Option<RuntimeProcess> {
    loop {
        match RuntimeProcess::spawn(cfg) {
            Ok(mut p) => {
                let ready = tokio::select! {
                    r = p.wait_ready(cfg) => r,
                    _ = stop.cancelled() => {
                        p.terminate(TERM_GRACE).await;
                        return None;
                    }
                };
                match ready {
                    Ok(()) => {
                        info!(actor = %cfg.actor, pid = ?p.pid(), "runtime restarted");
                        return Some(p);
                    }
                    Err(e) => {
                        error!("{e}");
                        p.terminate(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(e) => error!("{e}"),
        }
        if !pause(stop, *backoff).await {
            return None;
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }
}

/// Wait `d` unless `stop` comes first (→ false).
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
