//! The node watch: noticing a lost node within seconds without taking a slow
//! one for lost.
//!
//! Heartbeats alone force a choice between slow detection (a long timeout)
//! and false alarms (a short one marks a node busy with a long pass, or cut
//! off only from the database, down, and its replicas run twice). So a node
//! silent for `suspect_after` (about two missed heartbeats) is asked directly:
//! its agent answers whether it and its Docker Engine are alive. No answer,
//! or an engine that does not answer, and the node is down at once; an
//! answer, and it keeps its replicas until the full heartbeat timeout, as
//! before. Like the indirect probe of SWIM (Consul's memberlist), a missed
//! heartbeat only raises a suspicion that a second channel settles.

use std::time::Duration;

/// How the node watch runs.
#[derive(Debug, Clone)]
pub struct NodeWatchConfig {
    /// How often the leader looks for silent nodes.
    pub every: Duration,
    /// A node silent this long is asked whether it is alive.
    pub suspect_after: Duration,
    /// How long its agent has to answer.
    pub probe_timeout: Duration,
    /// A `fence` replica of a lost node is placed elsewhere once the node
    /// is silent for its agent's fence time plus this (the agent asks its
    /// peers, up to a second, then stops its containers with a second of
    /// grace).
    pub fence_margin: Duration,
    /// An agent that said it stops (an update) is not asked for this long:
    /// a failed update is rolled back by Swarm in about 30 s, its node's
    /// apps running all along. Its node still goes down at the heartbeat
    /// timeout, but its replicas are still sent requests.
    pub restart_grace: Duration,
    /// Meanwhile the node itself is asked, when this is set: a connection
    /// to this port of its address (Swarm's gossip port, 7946, is served by
    /// every swarm node's engine). Refused or unanswered, the node is lost,
    /// not restarting its agent: down at once; but only when a node that
    /// beats serves the port (a single engine may not). Unset (one engine,
    /// no swarm), a restarting node is left to the heartbeat timeout.
    pub engine_port: Option<u16>,
}

impl Default for NodeWatchConfig {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            suspect_after: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(1),
            fence_margin: Duration::from_secs(4),
            restart_grace: Duration::from_secs(60),
            engine_port: None,
        }
    }
}
