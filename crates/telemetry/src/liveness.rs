//! Whether another node's agent is alive: the orchestrator asks the agents of
//! silent nodes, and an agent cut off from the control database asks its
//! peers (see the agent's fence). The agent answers at
//! [`AGENT_LIVENESS_PATH`] with the internal token.

use std::sync::Arc;
use std::time::Duration;

/// Where an agent answers whether it and its Docker Engine are alive:
/// 200, or 503 with the reason (its engine does not answer, or it fenced
/// itself). Internal token required.
pub const AGENT_LIVENESS_PATH: &str = "/internal/v1/liveness";

/// What a node's agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The agent answered that it cannot run anything: its engine does not
    /// answer, or it fenced itself; why.
    Unavailable(String),
    /// No answer at all (no route, nothing listening, too slow); why.
    NoAnswer(String),
}

/// Asks agents, at the URL they announced, whether they are alive; the
/// request carries the cluster's internal token.
#[derive(Clone)]
pub struct AgentProber {
    client: reqwest::Client,
    token: Arc<str>,
    timeout: Duration,
}

impl std::fmt::Debug for AgentProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentProber").finish_non_exhaustive()
    }
}

impl AgentProber {
    pub fn new(token: Arc<str>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Self { client, token, timeout })
    }

    pub async fn probe(&self, agent_url: &str) -> Liveness {
        let url = format!("{}{AGENT_LIVENESS_PATH}", agent_url.trim_end_matches('/'));
        match self.client.get(&url).bearer_auth(&*self.token).send().await {
            Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let body = response.text().await.unwrap_or_default();
                Liveness::Unavailable(body.chars().take(200).collect())
            }
            // Any other answer (an agent from before the probe, or one with
            // another token) still shows the agent alive.
            Ok(_) => Liveness::Alive,
            Err(error) => Liveness::NoAnswer(error.to_string()),
        }
    }

    /// Whether the node at `address` accepts a connection on `port` (in a
    /// swarm, its engine's gossip port): the question left while its agent
    /// restarts. A refusal counts as no answer: the engine is not there.
    pub async fn probe_node(&self, address: &str, port: u16) -> Liveness {
        let connect = tokio::net::TcpStream::connect((address, port));
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_)) => Liveness::Alive,
            Ok(Err(error)) => Liveness::NoAnswer(format!("{address}:{port}: {error}")),
            Err(_) => Liveness::NoAnswer(format!("{address}:{port}: no answer within {:?}", self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_answers_when_its_port_accepts_and_not_when_it_refuses() {
        let prober = AgentProber::new("t".into(), Duration::from_secs(1)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(prober.probe_node("127.0.0.1", port).await, Liveness::Alive);
        drop(listener);
        match prober.probe_node("127.0.0.1", port).await {
            Liveness::NoAnswer(why) => assert!(why.contains(&format!("127.0.0.1:{port}")), "{why}"),
            other => panic!("a closed port answered {other:?}"),
        }
    }
}
