//! Graceful shutdown in phases, watched by every stream.
//!
//! SIGINT or SIGTERM moves `Running` → `Draining`: the listener stops
//! accepting, telemetry streams end, new generation requests get a 503, and
//! generations in flight go on. After `--shutdown-timeout`, `Draining` →
//! `Cancelled`: what is still in flight ends with an error event (its engine
//! requests aborted), and the server returns.

use std::time::Duration;

use tokio::sync::watch;

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Not accepting; in-flight generations finish.
    Draining,
    /// In-flight generations are cancelled.
    Cancelled,
}

/// The sender side of the phase.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<Phase>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            tx: watch::Sender::new(Phase::Running),
        }
    }
}

impl Shutdown {
    /// A receiver of the phase.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// Moves to `phase` (never back).
    pub fn set(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            let later = matches!(
                (*p, phase),
                (Phase::Running, Phase::Draining | Phase::Cancelled)
                    | (Phase::Draining, Phase::Cancelled)
            );
            if later {
                *p = phase;
            }
            later
        });
    }

    /// Drains for `timeout`, then cancels.
    pub async fn drain_then_cancel(&self, timeout: Duration) {
        self.set(Phase::Draining);
        tokio::time::sleep(timeout).await;
        self.set(Phase::Cancelled);
    }
}

/// Resolves when `phase` reaches `at_least` (or its sender is gone).
pub async fn reached(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    let rank = |p: Phase| p as u8;
    let _ = phase.wait_for(|p| rank(*p) >= rank(at_least)).await;
}

/// Resolves at the first SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            // No signal handling: wait for Ctrl-C the portable way.
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
