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
}

impl std::fmt::Debug for AgentProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentProber").finish_non_exhaustive()
    }
}

impl AgentProber {
    pub fn new(token: Arc<str>, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Self { client, token })
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
}
