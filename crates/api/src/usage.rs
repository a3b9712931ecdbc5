//! Metrics RPCs: a deployment's history (GetDeploymentMetrics), its live
//! samples (StreamDeploymentMetrics) and hourly usage (GetUsage, GetDeploymentUsage). Each
//! checks the deployment belongs to the caller's organization, and the
//! metrics store's queries filter on it again.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use chrono::{DateTime, Utc};
use connectrpc_axum::{BoxedStream, ConnectError, ConnectRequest, ConnectResponse, StreamBody};
use flotilla_metrics::Filter;
use flotilla_proto::v1 as pb;
use flotilla_store::metrics::{MetricsStore, Resolution};
use flotilla_types::metrics::Sample;
use flotilla_types::{DeploymentId, FieldError};
use futures::StreamExt;

use crate::auth::Caller;
use crate::convert::{parse_id, parse_optional_id, timestamp};
use crate::{ApiError, ApiState};

/// The longest range one request may read.
const MAX_RANGE: Duration = Duration::from_secs(400 * 86_400);
/// How long a live stream lasts unless the client asks otherwise, and at most.
const DEFAULT_STREAM: Duration = Duration::from_secs(3600);
const MAX_STREAM: Duration = Duration::from_secs(86_400);

type Reply<T> = Result<ConnectResponse<T>, ConnectError>;

fn metrics_store(api: &ApiState) -> Result<&MetricsStore, ApiError> {
    api.metrics.store.as_ref().ok_or_else(|| ApiError::Unavailable("the metrics store is not configured".to_owned()))
}

fn time(field: &str, value: Option<&pbjson_types::Timestamp>) -> Result<Option<DateTime<Utc>>, FieldError> {
    value
        .map(|t| {
            u32::try_from(t.nanos)
                .ok()
                .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
                .ok_or_else(|| FieldError::new(field, "is not a valid time"))
        })
        .transpose()
}

/// `[start, end)` from the request, with defaults, checked.
fn range(
    start: Option<&pbjson_types::Timestamp>,
    end: Option<&pbjson_types::Timestamp>,
    default_length: Duration,
) -> Result<(DateTime<Utc>, DateTime<Utc>), FieldError> {
    let end = time("end", end)?.unwrap_or_else(Utc::now);
    let start =
        time("start", start)?.unwrap_or_else(|| end - chrono::Duration::from_std(default_length).unwrap_or_default());
    if start >= end {
        return Err(FieldError::new("start", "must be before end"));
    }
    if (end - start).to_std().unwrap_or_default() > MAX_RANGE {
        return Err(FieldError::new(
            "start",
            format!("the range may span at most {} days", MAX_RANGE.as_secs() / 86_400),
        ));
    }
    Ok((start, end))
}

pub async fn get_deployment_metrics(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetDeploymentMetricsRequest>,
) -> Reply<pb::GetDeploymentMetricsResponse> {
    api.observe("GetDeploymentMetrics", async {
        let id: DeploymentId = parse_id("deployment_id", &request.deployment_id)?;
        let (start, end) = range(request.start.as_ref(), request.end.as_ref(), Duration::from_secs(3600))?;
        let step = match request.step_seconds {
            0 => None,
            s if u64::from(s) <= MAX_RANGE.as_secs() => Some(Duration::from_secs(u64::from(s))),
            s => return Err(FieldError::new("step_seconds", format!("{s} is too large")).into()),
        };
        let store = metrics_store(&api)?;
        // NotFound for another organization's deployment, as everywhere.
        api.store.tenant(caller.organization_id).get_deployment(id).await?;
        let series = store.tenant(caller.organization_id).series(id, start, end, step).await.map_err(metrics_error)?;
        let (resolution, step, points) = (series.resolution, series.step, series.points);
        Ok(pb::GetDeploymentMetricsResponse {
            resolution: match resolution {
                Resolution::Raw => pb::MetricsResolution::Raw,
                Resolution::Minute => pb::MetricsResolution::Minute,
                Resolution::Hour => pb::MetricsResolution::Hour,
            } as i32,
            step_seconds: u32::try_from(step.as_secs()).unwrap_or(u32::MAX),
            points: points
                .into_iter()
                .map(|p| pb::MetricPoint {
                    time: Some(timestamp(p.time)),
                    container_id: p.container_id.unwrap_or_default(),
                    replica_index: p.replica_index.unwrap_or(0),
                    cpu_cores: p.cpu_cores,
                    cpu_max_cores: p.cpu_max_cores,
                    memory_bytes: p.memory_bytes,
                    memory_max_bytes: p.memory_max_bytes,
                    net_rx_bytes: p.net_rx_bytes,
                    net_tx_bytes: p.net_tx_bytes,
                    blk_read_bytes: p.blk_read_bytes,
                    blk_write_bytes: p.blk_write_bytes,
                })
                .collect(),
        })
    })
    .await
}

pub async fn get_usage(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetUsageRequest>,
) -> Reply<pb::GetUsageResponse> {
    api.observe("GetUsage", async {
        let deployment: Option<DeploymentId> = parse_optional_id("deployment_id", &request.deployment_id)?;
        usage_hours(&api, &caller, deployment, request.start.as_ref(), request.end.as_ref()).await
    })
    .await
}

/// GetUsage of exactly one deployment: its id is required.
pub async fn get_deployment_usage(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::GetDeploymentUsageRequest>,
) -> Reply<pb::GetUsageResponse> {
    api.observe("GetDeploymentUsage", async {
        let deployment: DeploymentId = parse_id("deployment_id", &request.deployment_id)?;
        usage_hours(&api, &caller, Some(deployment), request.start.as_ref(), request.end.as_ref()).await
    })
    .await
}

/// Hourly usage of one deployment of the caller's organization, or of all.
async fn usage_hours(
    api: &ApiState,
    caller: &Caller,
    deployment: Option<DeploymentId>,
    start: Option<&pbjson_types::Timestamp>,
    end: Option<&pbjson_types::Timestamp>,
) -> Result<pb::GetUsageResponse, ApiError> {
    let (start, end) = range(start, end, Duration::from_secs(86_400))?;
    let tenant = metrics_store(api)?.tenant(caller.organization_id);
    if let Some(id) = deployment {
        // NotFound for another organization's deployment, as everywhere
        // (not an empty answer that looks like no usage).
        api.store.tenant(caller.organization_id).get_deployment(id).await?;
    }
    let rows = match deployment {
        Some(id) => tenant.usage(Some(id), start, end).await,
        None => tenant.organization_usage(start, end).await,
    }
    .map_err(metrics_error)?;
    Ok(pb::GetUsageResponse {
        hours: rows
            .into_iter()
            .map(|u| pb::UsageHour {
                hour: Some(timestamp(u.hour)),
                deployment_id: u.deployment_id.map(|d| d.to_string()).unwrap_or_default(),
                cpu_core_seconds: u.cpu_core_seconds,
                memory_byte_seconds: u.memory_byte_seconds,
                net_rx_bytes: u.net_rx_bytes,
                net_tx_bytes: u.net_tx_bytes,
                blk_read_bytes: u.blk_read_bytes,
                blk_write_bytes: u.blk_write_bytes,
            })
            .collect(),
    })
}

/// How long a stream runs: `max_duration_seconds`, 0 for the default.
pub(crate) fn stream_duration(seconds: u32) -> Result<Duration, ApiError> {
    match seconds {
        0 => Ok(DEFAULT_STREAM),
        s if u64::from(s) <= MAX_STREAM.as_secs() => Ok(Duration::from_secs(u64::from(s))),
        s => Err(FieldError::new("max_duration_seconds", format!("{s} is more than {}", MAX_STREAM.as_secs())).into()),
    }
}

pub async fn stream_deployment_metrics(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::StreamDeploymentMetricsRequest>,
) -> Reply<StreamBody<BoxedStream<pb::MetricSample>>> {
    let shutdown = api.shutdown.clone();
    api.observe("StreamDeploymentMetrics", async {
        let id: DeploymentId = parse_id("deployment_id", &request.deployment_id)?;
        let duration = stream_duration(request.max_duration_seconds)?;
        let live = api.metrics.live.clone().ok_or_else(|| {
            ApiError::Unavailable("live metrics need Redis or a node agent in this process".to_owned())
        })?;
        api.store.tenant(caller.organization_id).get_deployment(id).await?;
        // Subscribe before reading the cache so nothing falls in between
        // (a sample in both is sent once: the cache part stops where the
        // live part starts).
        let mut subscription = live.subscribe(Filter::Deployment(id));
        let cached = if request.backfill { live.cache.recent(id) } else { Vec::new() };
        let newest_backfilled = cached.last().map_or(i64::MIN, |s| s.time_ms);
        let backfill: Vec<pb::MetricSample> = cached.iter().map(|s| sample(s)).collect();
        let pending: VecDeque<Arc<Sample>> = subscription.drain().into();
        let deadline = tokio::time::Instant::now() + duration;
        let live_samples = futures::stream::unfold((subscription, pending), move |(mut subscription, mut pending)| {
            let shutdown = shutdown.clone();
            async move {
                loop {
                    if let Some(s) = pending.pop_front() {
                        // Already sent from the cache.
                        if s.time_ms <= newest_backfilled {
                            continue;
                        }
                        return Some((Ok(sample(&s)), (subscription, pending)));
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep_until(deadline) => return None,
                        s = subscription.recv() => pending.push_back(s),
                    }
                }
            }
        });
        let stream = futures::stream::iter(backfill.into_iter().map(Ok)).chain(live_samples);
        let boxed: Pin<Box<dyn futures::Stream<Item = Result<pb::MetricSample, ConnectError>> + Send>> =
            Box::pin(stream);
        Ok(StreamBody::new(boxed))
    })
    .await
}

fn sample(s: &Sample) -> pb::MetricSample {
    pb::MetricSample {
        deployment_id: s.key.deployment_id.to_string(),
        container_id: s.key.container_id.clone(),
        replica_index: s.key.replica_index,
        time: DateTime::from_timestamp_millis(s.time_ms).map(timestamp),
        interval_ms: s.interval_ms,
        cpu_cores: s.cpu_cores,
        cpu_percent: s.cpu_percent_of_limit,
        memory_bytes: s.memory_bytes,
        memory_limit_bytes: s.memory_limit_bytes,
        net_rx_bytes: s.net_rx_bytes,
        net_tx_bytes: s.net_tx_bytes,
        blk_read_bytes: s.blk_read_bytes,
        blk_write_bytes: s.blk_write_bytes,
        pids: s.pids,
    }
}

fn metrics_error(error: flotilla_store::StoreError) -> ApiError {
    if error.is_unavailable() {
        ApiError::Unavailable("the metrics store cannot be reached".to_owned())
    } else {
        ApiError::Internal(error.to_string())
    }
}
