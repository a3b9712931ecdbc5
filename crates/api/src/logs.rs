//! StreamDeploymentLogs: each replica's lines come from the agent of the
//! replica's node (its internal endpoint, announced in `node_endpoints`,
//! called with the cluster's internal token), merged into one stream.

use std::sync::Arc;

use axum::extract::State;
use connectrpc_axum::{BoxedStream, ConnectError, ConnectRequest, ConnectResponse, StreamBody};
use flotilla_proto::v1 as pb;
use flotilla_store::ReplicaRecord;
use flotilla_types::{DeploymentId, FieldError};
use futures::StreamExt as _;

use crate::auth::Caller;
use crate::convert::{parse_id, timestamp};
use crate::{ApiError, ApiState};

type Reply<T> = Result<ConnectResponse<T>, ConnectError>;

const DEFAULT_TAIL: u32 = 100;
const MAX_TAIL: u32 = 10_000;

/// How the API calls agents.
#[derive(Debug, Clone)]
pub struct InternalClient {
    token: Option<Arc<str>>,
    http: reqwest::Client,
}

impl InternalClient {
    pub fn new(token: Option<Arc<str>>) -> Self {
        Self { token, http: reqwest::Client::new() }
    }
}

pub async fn stream_deployment_logs(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::StreamDeploymentLogsRequest>,
) -> Reply<StreamBody<BoxedStream<pb::LogLine>>> {
    let shutdown = api.shutdown.clone();
    api.observe("StreamDeploymentLogs", async {
        let id: DeploymentId = parse_id("deployment_id", &request.deployment_id)?;
        let tail = match request.tail {
            0 => DEFAULT_TAIL,
            n if n <= MAX_TAIL => n,
            n => return Err(FieldError::new("tail", format!("{n} is more than {MAX_TAIL}")).into()),
        };
        let view = api.store.tenant(caller.organization_id).get_deployment(id).await?;
        let replicas: Vec<&ReplicaRecord> =
            view.replicas.iter().filter(|r| request.replica_index.is_none_or(|i| r.replica_index == i)).collect();
        if let (Some(index), true) = (request.replica_index, replicas.is_empty()) {
            return Err(ApiError::NotFound { what: "replica", id: index.to_string() });
        }
        let token = api.internal.token.clone().ok_or_else(|| {
            ApiError::Unavailable("this API process has no internal token to reach agents".to_owned())
        })?;
        let mut streams = Vec::new();
        for replica in replicas {
            streams.push(replica_lines(&api, replica, &token, request.follow, tail).await?);
        }
        let merged = futures::stream::select_all(streams).take_until(shutdown.cancelled_owned());
        let boxed: BoxedStream<pb::LogLine> = Box::pin(merged);
        Ok(StreamBody::new(boxed))
    })
    .await
}

/// One replica's lines, from its node's agent.
async fn replica_lines(
    api: &ApiState,
    replica: &ReplicaRecord,
    token: &str,
    follow: bool,
    tail: u32,
) -> Result<BoxedStream<pb::LogLine>, ApiError> {
    let unreachable =
        |why: String| ApiError::Unavailable(format!("the logs of replica {}: {why}", replica.replica_index));
    let base = api
        .store
        .agent_url(&replica.node_id)
        .await?
        .ok_or_else(|| unreachable(format!("node {} announced no agent endpoint", replica.node_id)))?;
    let response = api
        .internal
        .http
        .get(format!("{base}/internal/v1/replicas/{}/logs", replica.id))
        .query(&[("follow", follow.to_string()), ("tail", tail.to_string())])
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| unreachable(format!("node {} cannot be reached: {e}", replica.node_id)))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(unreachable(format!("node {} answered {status}: {text}", replica.node_id)));
    }
    let template = pb::LogLine {
        replica_index: replica.replica_index,
        replica_id: replica.id.to_string(),
        node_id: replica.node_id.to_string(),
        ..Default::default()
    };
    // Whole lines out of the byte stream, each one JSON object.
    let lines = futures::stream::unfold(
        (response.bytes_stream(), Vec::<u8>::new(), false),
        move |(mut bytes, mut buffer, mut done)| {
            let template = template.clone();
            async move {
                loop {
                    if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        return Some((parse_line(&template, &line[..end]), (bytes, buffer, done)));
                    }
                    if done {
                        return None;
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                        Some(Err(error)) => {
                            tracing::info!(%error, "a replica's log stream broke off");
                            done = true;
                        }
                        None => done = true,
                    }
                }
            }
        },
    );
    Ok(Box::pin(lines))
}

#[allow(clippy::result_large_err, reason = "the stream's item type is connectrpc-axum's, not ours to shrink")]
fn parse_line(template: &pb::LogLine, line: &[u8]) -> Result<pb::LogLine, ConnectError> {
    #[derive(serde::Deserialize)]
    struct Line {
        stream: Option<String>,
        time: Option<String>,
        text: Option<String>,
        error: Option<String>,
    }
    let parsed: Line = serde_json::from_slice(line)
        .map_err(|e| ConnectError::from(ApiError::Internal(format!("an agent sent an unreadable log line: {e}"))))?;
    if let Some(error) = parsed.error {
        return Err(ApiError::Unavailable(format!("reading replica {}'s logs: {error}", template.replica_index)).into());
    }
    let time = parsed
        .time
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| timestamp(t.with_timezone(&chrono::Utc)));
    Ok(pb::LogLine {
        stream: parsed.stream.unwrap_or_default(),
        text: parsed.text.unwrap_or_default(),
        time,
        ..template.clone()
    })
}
