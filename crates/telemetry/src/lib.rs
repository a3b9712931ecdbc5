//! What every Flotilla process exposes about itself:
//! - `GET /health`: JSON, 200 while every component is `ok` or `degraded`,
//!   503 once one has `failed`;
//! - `GET /metrics`: Prometheus text format, `flotilla_*` names with help;
//! - `GET /metrics/observability`: a JSON snapshot of every component's
//!   detail (reconciler passes, wake-ups, ...);
//! - `GET /admin/reconcilers`: each reconciler's last pass (what it
//!   corrected, how long it took, its error).
//!
//! Components report into a [`HealthBoard`]; counters live where the work is
//! done (atomics) and are read at scrape time by [`FnCollector`].

mod collector;
pub mod internal_token;
pub mod liveness;
pub mod logging;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use collector::{FnCollector, MetricKind, MetricSpec};
pub use prometheus::Registry;

/// How a component is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Ok,
    /// Working with reduced function; the process should not be restarted.
    Degraded,
    /// Not working; `/health` answers 503.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentStatus {
    pub health: Health,
    /// Set by reconcilers' pass reports.
    pub reconciler: bool,
    pub message: Option<String>,
    pub detail: serde_json::Value,
    pub updated_at: DateTime<Utc>,
}

/// The latest status of each component of a process.
#[derive(Debug, Default)]
pub struct HealthBoard {
    components: RwLock<BTreeMap<String, ComponentStatus>>,
}

impl HealthBoard {
    pub fn set(&self, component: &str, health: Health, message: Option<String>, detail: serde_json::Value) {
        self.put(component, ComponentStatus { health, reconciler: false, message, detail, updated_at: Utc::now() });
    }

    fn put(&self, component: &str, status: ComponentStatus) {
        self.components.write().unwrap_or_else(|e| e.into_inner()).insert(component.to_owned(), status);
    }

    /// Records a reconciler's last pass: `ok` without an error, `degraded`
    /// with one (it keeps retrying; the process need not be restarted).
    pub fn report_pass(&self, component: &str, error: Option<&str>, detail: serde_json::Value) {
        let health = if error.is_some() { Health::Degraded } else { Health::Ok };
        let status = ComponentStatus {
            health,
            reconciler: true,
            message: error.map(str::to_owned),
            detail,
            updated_at: Utc::now(),
        };
        self.put(component, status);
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentStatus> {
        self.components.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The worst health of all components (`ok` when there are none).
    pub fn overall(&self) -> Health {
        self.snapshot()
            .values()
            .map(|c| c.health)
            .max_by_key(|h| match h {
                Health::Ok => 0,
                Health::Degraded => 1,
                Health::Failed => 2,
            })
            .unwrap_or(Health::Ok)
    }
}

/// A process's telemetry: its metrics registry and health board.
#[derive(Debug, Clone)]
pub struct Telemetry {
    pub registry: Registry,
    pub health: Arc<HealthBoard>,
    pub process: &'static str,
    pub version: &'static str,
}

impl Telemetry {
    pub fn new(process: &'static str, version: &'static str) -> Self {
        Self { registry: Registry::new(), health: Arc::new(HealthBoard::default()), process, version }
    }

    /// Registers a collector; a duplicate name is a programming error and
    /// is logged rather than taking the process down.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(error) = self.registry.register(collector) {
            tracing::error!(%error, "metrics collector not registered");
        }
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render_metrics(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// `/health`, `/metrics` and `/metrics/observability`.
    pub fn router<S>(&self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .route("/metrics/observability", get(observability))
            .route("/admin/reconcilers", get(reconcilers))
            .with_state(self.clone())
    }
}

async fn health(State(t): State<Telemetry>) -> Response {
    let overall = t.health.overall();
    let body = serde_json::json!({
        "status": overall,
        "process": t.process,
        "version": t.version,
        "components": t.health.snapshot(),
    });
    let code = if overall == Health::Failed { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(t): State<Telemetry>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], t.render_metrics()).into_response()
}

async fn reconcilers(State(t): State<Telemetry>) -> Response {
    let reconcilers: BTreeMap<String, ComponentStatus> =
        t.health.snapshot().into_iter().filter(|(_, status)| status.reconciler).collect();
    axum::Json(serde_json::json!({ "process": t.process, "reconcilers": reconcilers })).into_response()
}

async fn observability(State(t): State<Telemetry>) -> Response {
    let components: BTreeMap<String, serde_json::Value> =
        t.health.snapshot().into_iter().map(|(name, status)| (name, status.detail)).collect();
    axum::Json(serde_json::json!({
        "process": t.process,
        "generated_at": Utc::now(),
        "components": components,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_path(t: &Telemetry, path: &str) -> (StatusCode, String) {
        let response =
            t.router::<()>().oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn health_is_503_only_when_a_component_failed() {
        let t = Telemetry::new("test", "0");
        assert_eq!(get_path(&t, "/health").await.0, StatusCode::OK);
        t.health.set("docker", Health::Degraded, Some("unreachable".into()), serde_json::json!({}));
        let (code, body) = get_path(&t, "/health").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("\"degraded\""), "{body}");
        t.health.set("database", Health::Failed, None, serde_json::json!({"errors": 3}));
        assert_eq!(get_path(&t, "/health").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let (_, detail) = get_path(&t, "/metrics/observability").await;
        assert!(detail.contains("\"errors\":3"), "{detail}");
        t.health.report_pass("agent", Some("engine unreachable"), serde_json::json!({"removed": 2}));
        let (code, admin) = get_path(&t, "/admin/reconcilers").await;
        assert_eq!(code, StatusCode::OK);
        let admin: serde_json::Value = serde_json::from_str(&admin).unwrap();
        assert_eq!(admin["reconcilers"]["agent"]["detail"]["removed"], 2);
        assert_eq!(admin["reconcilers"]["agent"]["health"], "degraded");
        assert!(admin["reconcilers"].get("database").is_none(), "only reconcilers: {admin}");
    }

    #[tokio::test]
    async fn metrics_render_collectors() {
        let t = Telemetry::new("test", "0");
        let value = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let v = value.clone();
        t.register(Box::new(FnCollector::new(vec![MetricSpec::counter(
            "flotilla_test_things_total",
            "Things seen.",
            move || v.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )])));
        let (code, body) = get_path(&t, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("# HELP flotilla_test_things_total Things seen."), "{body}");
        assert!(body.contains("flotilla_test_things_total 7"), "{body}");
    }
}
