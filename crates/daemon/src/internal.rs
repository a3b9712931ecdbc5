//! Endpoints one Flotilla process serves another: a replica's log lines,
//! from the agent of the replica's node, for the API's StreamDeploymentLogs;
//! whether the agent and its engine are alive, for the orchestrator's node
//! watch when the node's heartbeats stop.
//! Every request carries the internal token all processes of a cluster
//! share (`--internal-token`); nothing here is for users.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_agent::Agent;
use flotilla_docker::{LogOptions, LogSource};
use flotilla_telemetry::internal_token::bearer_matches;
use flotilla_types::ReplicaId;
use futures::StreamExt as _;
use serde::Deserialize;

#[derive(Clone)]
struct Internal {
    agent: Arc<Agent>,
    token: Arc<str>,
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<usize>,
}

pub fn router(agent: Arc<Agent>, token: Arc<str>) -> axum::Router {
    axum::Router::new()
        .route("/internal/v1/replicas/{replica}/logs", axum::routing::get(replica_logs))
        .route(flotilla_telemetry::liveness::AGENT_LIVENESS_PATH, axum::routing::get(liveness))
        .with_state(Internal { agent, token })
}

/// 200 when this node can run its replicas, 503 with the reason when its
/// engine does not answer or it fenced itself.
async fn liveness(State(internal): State<Internal>, headers: HeaderMap) -> Response {
    if !bearer_matches(&headers, &internal.token) {
        return (StatusCode::UNAUTHORIZED, "internal token required").into_response();
    }
    match internal.agent.liveness(std::time::Duration::from_millis(800)).await {
        Ok(()) => (StatusCode::OK, "alive").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn replica_logs(
    State(internal): State<Internal>,
    Path(replica): Path<String>,
    Query(query): Query<LogQuery>,
    headers: HeaderMap,
) -> Response {
    if !bearer_matches(&headers, &internal.token) {
        return (StatusCode::UNAUTHORIZED, "internal token required").into_response();
    }
    let Ok(replica) = replica.parse::<ReplicaId>() else {
        return (StatusCode::BAD_REQUEST, "not a replica id").into_response();
    };
    let options = LogOptions { tail: query.tail, follow: query.follow, timestamps: true, since: None };
    let lines = match internal.agent.replica_logs(replica, &options).await {
        Ok(lines) => lines,
        Err(error) => return (StatusCode::NOT_FOUND, error.to_string()).into_response(),
    };
    // One JSON object per line; an error ends the stream with a last object
    // that says so.
    let body = lines.map(|line| {
        let value = match line {
            Ok(line) => serde_json::json!({
                "stream": match line.source { LogSource::Stdout => "stdout", LogSource::Stderr => "stderr" },
                "time": line.timestamp,
                "text": line.text,
            }),
            Err(error) => serde_json::json!({ "error": error.to_string() }),
        };
        let mut bytes = serde_json::to_vec(&value).unwrap_or_default();
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(body)).into_response()
}
