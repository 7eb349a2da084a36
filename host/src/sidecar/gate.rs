//! Whether the runtime can take calls (SPEC §5 step 4): an unreachable runtime is a fault
//! of the pair, not a handler failure. While it is down the sidecar is not ready, takes no
//! new deliveries, and holds the ones whose call found it gone (uncounted) until it is back
//! — bounded by `ASYA_RUNTIME_READY_TIMEOUT`, after which the sidecar hands them back and
//! exits ([`super::Exit::RuntimeLost`]).
//!
//! Two ways to find out: a call that cannot connect (or loses its connection before any
//! answer) marks the gate down at once, and [`watch`] probes the runtime every
//! [`PROBE_INTERVAL`] while it is up, so an idle actor notices too.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Readiness, Shared};

/// How often an up runtime is probed.
pub(super) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    /// A call or the probe found the runtime unreachable; [`watch`] checks and waits.
    Down,
    /// It did not come back in time.
    Lost,
}

pub(super) struct Gate {
    state: watch::Sender<State>,
    readiness: Arc<Readiness>,
    outages: Counter,
}

impl Gate {
    pub fn new(readiness: Arc<Readiness>, outages: Counter) -> Gate {
        Gate {
            state: watch::Sender::new(State::Up),
            readiness,
            outages,
        }
    }

    pub fn is_up(&self) -> bool {
        *self.state.borrow() == State::Up
    }

    /// A call found the runtime unreachable.
    pub fn down(&self) {
        self.state.send_if_modified(|s| {
            let was_up = *s == State::Up;
            if was_up {
                *s = State::Down;
            }
            was_up
        });
    }

    /// Wait until the runtime is up (`true`) or lost for good (`false`).
    pub async fn wait_up(&self) -> bool {
        let mut rx = self.state.subscribe();
        let state = *rx
            .wait_for(|s| *s != State::Down)
            .await
            .expect("the gate outlives its waiters");
        state == State::Up
    }

    /// Completes once the runtime is lost for good.
    pub async fn lost(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == State::Lost).await;
    }

    fn set(&self, state: State) {
        self.readiness
            .runtime_ready
            .store(state == State::Up, std::sync::atomic::Ordering::Relaxed);
        self.state.send_replace(state);
    }
}

/// Probe the runtime while it is up; while it is down, wait for it (socket, ready file and a
/// connection, as at start-up) and open the gate again, or declare it lost.
pub(super) async fn watch(shared: Arc<Shared>) {
    let gate = &shared.gate;
    let ready_file = &shared.cfg.ready_file;
    let mut rx = gate.state.subscribe();
    loop {
        let state = *rx.borrow_and_update();
        match state {
            State::Lost => return,
            State::Up => {
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {
                        if shared.runtime.reachable(ready_file).await.is_err() {
                            gate.down();
                        }
                    }
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            State::Down => {
                // A lost connection can be a pooled connection the runtime closed while it
                // is still there: check before calling it an outage.
                let why = match shared.runtime.reachable(ready_file).await {
                    Ok(()) => {
                        debug!(actor = %shared.actor, "a runtime call lost its connection; the runtime is reachable: resuming");
                        gate.set(State::Up);
                        continue;
                    }
                    Err(why) => why,
                };
                // Pooled connections lead to the runtime that went away: a call after its
                // restart must not meet one of them (it would count as a lost call).
                shared.runtime.reset();
                gate.outages.inc();
                gate.set(State::Down);
                let timeout = shared.cfg.ready_timeout;
                warn!(actor = %shared.actor, reason = %why, ?timeout, "runtime unreachable: not ready, consumption paused, in-flight deliveries held until it is back (bounded by ASYA_RUNTIME_READY_TIMEOUT)");
                let since = Instant::now();
                match shared.runtime.wait_ready(ready_file, timeout).await {
                    Ok(()) => {
                        shared.runtime.reset();
                        info!(actor = %shared.actor, after = ?since.elapsed(), "runtime is back; consuming again");
                        gate.set(State::Up);
                    }
                    Err(e) => {
                        warn!(actor = %shared.actor, error = %e, "runtime did not come back");
                        gate.set(State::Lost);
                        return;
                    }
                }
            }
        }
    }
}
