use flotilla_docker::DockerError;
use flotilla_store::StoreError;

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Docker(#[from] DockerError),

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("node id file {path}: {source}")]
    NodeIdFile {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid node id: {0}")]
    NodeId(#[from] flotilla_types::ids::InvalidNodeId),

    #[error("no free host port in {start}-{end}")]
    NoFreePort { start: u16, end: u16 },

    #[error("the Docker Engine did not answer {what} within {after:?}")]
    EngineSlow { what: &'static str, after: std::time::Duration },

    #[error("the agent's HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),

    #[error("replica {replica} has no container on node {node}")]
    NoContainer { replica: String, node: String },
}
