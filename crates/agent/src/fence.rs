//! Self-fencing: what makes `fence` deployments run at most once.
//!
//! When a node is lost the orchestrator places its replicas elsewhere. A
//! node that is only cut off (a partition looks like a power cut from
//! outside) still runs them: two copies at once. For `fence` deployments the
//! agent prevents that itself: once it has been out of contact with the
//! control database for `fence_after` and cannot reach more than half of the
//! cluster's nodes (itself included), it stops those replicas. The
//! orchestrator places them elsewhere only after the node has been silent
//! for `fence_after` plus a margin, so the copy is gone first.
//!
//! The majority rule tells a cut-off node from a database outage: with the
//! database away every agent is out of contact, but they still reach each
//! other, and nothing is stopped (nothing is placed elsewhere either: the
//! orchestrator cannot write).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_telemetry::liveness::{AgentProber, Liveness};

/// An agent's contact with the control database and its peers.
#[derive(Debug)]
pub(crate) struct Fence {
    after: Option<Duration>,
    prober: AgentProber,
    /// When the last heartbeat that succeeded was sent (taken before the
    /// write, so it is never later than the time the database recorded).
    last_contact: Mutex<Instant>,
    /// The other nodes' agents, as of the last refresh.
    peers: Mutex<Vec<String>>,
    fenced: AtomicBool,
}

/// What the fence check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FenceCheck {
    /// In contact, not long enough out of it, or fencing disabled.
    Keep,
    /// Out of contact but a majority answers: a database outage, not a cut.
    Majority { reachable: usize, cluster: usize },
    /// Cut off: stop the `fence` replicas.
    Fence { reachable: usize, cluster: usize, silent_for: Duration },
}

impl Fence {
    pub(crate) fn new(after: Option<Duration>, prober: AgentProber) -> Self {
        Self {
            after,
            prober,
            last_contact: Mutex::new(Instant::now()),
            peers: Mutex::new(Vec::new()),
            fenced: AtomicBool::new(false),
        }
    }

    pub(crate) fn after(&self) -> Option<Duration> {
        self.after
    }

    /// A heartbeat sent at `sent` succeeded. Returns whether the agent had
    /// fenced itself (it may run its replicas again).
    pub(crate) fn contact(&self, sent: Instant) -> bool {
        let mut last = self.last_contact.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(sent);
        self.fenced.swap(false, Ordering::Relaxed)
    }

    pub(crate) fn set_peers(&self, peers: Vec<String>) {
        *self.peers.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_fenced(&self) {
        self.fenced.store(true, Ordering::Relaxed);
    }

    pub(crate) fn silent_for(&self) -> Duration {
        self.last_contact.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }

    /// Decides whether to fence now; asks the peers only once out of
    /// contact for `fence_after`.
    pub(crate) async fn check(&self) -> FenceCheck {
        let Some(after) = self.after else { return FenceCheck::Keep };
        let silent_for = self.silent_for();
        if silent_for < after {
            return FenceCheck::Keep;
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let answers = futures::future::join_all(peers.iter().map(|url| self.prober.probe(url))).await;
        // Any answer counts, a peer's engine away or fenced too: what matters
        // is which side of a cut this node is on.
        let answered = answers.iter().filter(|a| !matches!(a, Liveness::NoAnswer(_))).count();
        decide(answered, peers.len(), silent_for)
    }
}

/// The majority rule: this node and the peers that answered against the
/// cluster (this node and all its peers).
pub(crate) fn decide(answered: usize, peers: usize, silent_for: Duration) -> FenceCheck {
    let (reachable, cluster) = (answered + 1, peers + 1);
    if reachable * 2 > cluster {
        FenceCheck::Majority { reachable, cluster }
    } else {
        FenceCheck::Fence { reachable, cluster, silent_for }
    }
}

impl crate::Agent {
    /// Checks whether this node is cut off and, if so, stops its `fence`
    /// replicas (with a second of grace: the orchestrator's margin counts
    /// on it). Runs every [`crate::FENCE_TICK`], also while the database is
    /// away.
    pub(crate) async fn fence_pass(&self) {
        if self.fence.is_fenced() {
            return;
        }
        let (reachable, cluster, silent_for) = match self.fence.check().await {
            FenceCheck::Keep => return,
            FenceCheck::Majority { reachable, cluster } => {
                tracing::debug!(reachable, cluster, "out of contact with the control database, but not cut off");
                return;
            }
            FenceCheck::Fence { reachable, cluster, silent_for } => (reachable, cluster, silent_for),
        };
        let containers = match self.docker.list_managed(&self.node_id).await {
            Ok(containers) => containers,
            Err(error) => {
                // The engine is away too: nothing runs that could run twice.
                tracing::warn!(%error, "cut off, and the engine does not answer");
                self.fence.mark_fenced();
                return;
            }
        };
        let replaceable = self.replaceable.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fenced: Vec<_> = containers
            .iter()
            .filter(|c| c.state.is_running())
            .filter(|c| c.replica_slot().is_none_or(|(deployment, _)| !replaceable.contains(&deployment)))
            .collect();
        tracing::warn!(
            reachable, cluster, silent_for = ?silent_for, replicas = fenced.len(),
            "cut off from the control database and most nodes: stopping the replicas that must run at most once"
        );
        let stops = fenced.iter().map(|container| async move {
            self.stopping(&container.id);
            (container, self.docker.stop_container(&container.id, FENCE_STOP_GRACE).await)
        });
        for (container, result) in futures::future::join_all(stops).await {
            match result {
                Ok(()) => {
                    self.stats.replicas_fenced.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(container.id = %container.id, "replica stopped: node fenced");
                }
                Err(error) => tracing::warn!(container.id = %container.id, %error, "could not stop a fenced replica"),
            }
        }
        self.fence.mark_fenced();
    }
}

/// SIGTERM-to-SIGKILL grace of a fenced replica.
const FENCE_STOP_GRACE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(5);

    #[test]
    fn a_node_alone_never_fences() {
        assert_eq!(decide(0, 0, S), FenceCheck::Majority { reachable: 1, cluster: 1 });
    }

    #[test]
    fn cut_off_from_every_peer_fences() {
        assert_eq!(decide(0, 2, S), FenceCheck::Fence { reachable: 1, cluster: 3, silent_for: S });
        assert_eq!(decide(0, 1, S), FenceCheck::Fence { reachable: 1, cluster: 2, silent_for: S });
    }

    #[test]
    fn reaching_a_majority_keeps_running() {
        assert_eq!(decide(1, 2, S), FenceCheck::Majority { reachable: 2, cluster: 3 });
        assert_eq!(decide(2, 4, S), FenceCheck::Majority { reachable: 3, cluster: 5 });
    }

    #[test]
    fn half_is_not_a_majority() {
        assert_eq!(decide(1, 3, S), FenceCheck::Fence { reachable: 2, cluster: 4, silent_for: S });
    }

    #[tokio::test]
    async fn in_contact_or_disabled_keeps() {
        let prober = || AgentProber::new("t".into(), Duration::from_millis(100)).unwrap();
        let fence = Fence::new(None, prober());
        fence.set_peers(vec!["http://127.0.0.1:9".into()]);
        assert_eq!(fence.check().await, FenceCheck::Keep, "fencing disabled");
        let fence = Fence::new(Some(Duration::from_secs(60)), prober());
        fence.set_peers(vec!["http://127.0.0.1:9".into()]);
        assert_eq!(fence.check().await, FenceCheck::Keep, "in contact");
    }
}
