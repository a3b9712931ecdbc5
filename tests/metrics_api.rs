//! Metrics through the public API of a whole `flotillad all`: live samples
//! streamed (Connect streaming JSON and gRPC, fed through Redis), history
//! at raw and minute resolution, hourly usage; bad requests refused with the
//! right code; `/metrics` accepted by `promtool check metrics`.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_e2e::{TestFlotilla, replica_container};
use flotilla_proto::v1 as pb;
use serde_json::{Value, json};

fn fast_metrics(settings: &mut flotilla_daemon::DaemonSettings) {
    if let Some(pipeline) = settings.metrics.pipeline.as_mut() {
        pipeline.interval = Duration::from_secs(2);
    }
    settings.metrics.maintenance_interval = Duration::from_secs(2);
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_samples_history_and_usage_through_the_api() {
    let flotilla = TestFlotilla::start_with(fast_metrics).await;
    let id = flotilla.deploy_demo("measured", 2).await;
    let deployment = flotilla.get(&id).await;
    let containers: BTreeSet<String> =
        (0..2).map(|i| replica_container(&deployment, i).expect("a container")).collect();

    // Live, over Connect streaming JSON: samples of both replicas.
    let (samples, end) = flotilla
        .connect_stream(
            "StreamDeploymentMetrics",
            json!({ "deploymentId": id, "maxDurationSeconds": 30 }),
            4,
            Duration::from_secs(30),
        )
        .await;
    assert!(end.is_none(), "the stream did not end early: {end:?}");
    assert_eq!(samples.len(), 4, "{samples:?}");
    for sample in &samples {
        assert_eq!(sample["deploymentId"], id.as_str());
        assert!(containers.contains(sample["containerId"].as_str().unwrap()), "{sample}");
        assert!(sample["memoryBytes"].as_str().and_then(|m| m.parse::<u64>().ok()) > Some(0), "{sample}");
        let interval: i64 = sample["intervalMs"].as_str().unwrap().parse().unwrap();
        assert!((1900..=2100).contains(&interval), "the configured 2 s: {sample}");
    }
    let seen: BTreeSet<&str> = samples.iter().filter_map(|s| s["containerId"].as_str()).collect();
    assert_eq!(seen.len(), 2, "both replicas: {samples:?}");

    // With backfill, the last minutes come first, at once.
    let (backfilled, _) = flotilla
        .connect_stream(
            "StreamDeploymentMetrics",
            json!({ "deploymentId": id, "backfill": true, "maxDurationSeconds": 5 }),
            4,
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(backfilled.len(), 4, "cached samples are sent without waiting");

    // The same over gRPC.
    let mut grpc =
        pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone()).await.unwrap();
    let mut stream = grpc
        .stream_deployment_metrics(pb::StreamDeploymentMetricsRequest {
            deployment_id: id.clone(),
            backfill: false,
            max_duration_seconds: 20,
        })
        .await
        .unwrap()
        .into_inner();
    let sample = tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(sample.deployment_id, id);
    drop(stream);

    // History: raw samples of the last minutes, per replica.
    let now = chrono::Utc::now();
    let (status, raw) = flotilla
        .connect_json(
            "GetDeploymentMetrics",
            json!({ "deploymentId": id, "start": rfc3339(now - chrono::Duration::minutes(10)), "end": rfc3339(now + chrono::Duration::seconds(5)) }),
        )
        .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["resolution"], "METRICS_RESOLUTION_RAW");
    let points = raw["points"].as_array().expect("points");
    assert!(points.len() >= 2, "{raw}");
    assert!(points.iter().all(|p| containers.contains(p["containerId"].as_str().unwrap())));

    // Minutes and hourly usage once a minute has closed and been rolled up.
    let started = std::time::Instant::now();
    let usage = loop {
        let (status, usage) = flotilla.connect_json("GetUsage", json!({ "deploymentId": id })).await;
        assert_eq!(status, 200, "{usage}");
        if usage["hours"].as_array().is_some_and(|h| !h.is_empty()) {
            break usage;
        }
        assert!(started.elapsed() < Duration::from_secs(100), "no hourly usage after 100 s: {usage}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let hour = &usage["hours"][0];
    assert_eq!(hour["deploymentId"], id.as_str());
    assert!(hour["cpuCoreSeconds"].as_f64() > Some(0.0), "{usage}");
    assert!(hour["memoryByteSeconds"].as_f64() > Some(0.0), "{usage}");
    // GetDeploymentUsage is the same answer, with the id required.
    let (status, by_deployment) = flotilla.connect_json("GetDeploymentUsage", json!({ "deploymentId": id })).await;
    assert_eq!(status, 200, "{by_deployment}");
    assert_eq!(by_deployment["hours"][0]["deploymentId"], id.as_str());
    assert!(by_deployment["hours"][0]["cpuCoreSeconds"].as_f64() > Some(0.0), "{by_deployment}");
    let (status, organization) = flotilla.connect_json("GetUsage", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(organization["hours"][0]["deploymentId"].as_str().unwrap_or(""), "", "an organization total");
    let (status, minutes) = flotilla
        .connect_json(
            "GetDeploymentMetrics",
            json!({ "deploymentId": id, "start": rfc3339(now - chrono::Duration::hours(3)), "end": rfc3339(now + chrono::Duration::minutes(5)) }),
        )
        .await;
    assert_eq!(status, 200, "{minutes}");
    assert_eq!(minutes["resolution"], "METRICS_RESOLUTION_MINUTE");
    assert_eq!(minutes["stepSeconds"], 60);
    assert!(!minutes["points"].as_array().unwrap().is_empty(), "{minutes}");

    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metrics_requests_are_refused_with_the_right_code() {
    let flotilla = TestFlotilla::start().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("GetDeploymentMetrics", json!({ "deploymentId": "nope" }), "invalid_argument"),
        ("GetDeploymentMetrics", json!({}), "invalid_argument"),
        ("GetDeploymentMetrics", json!({ "deploymentId": unknown }), "not_found"),
        (
            "GetDeploymentMetrics",
            json!({ "deploymentId": unknown, "start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z" }),
            "invalid_argument",
        ),
        (
            "GetDeploymentMetrics",
            json!({ "deploymentId": unknown, "start": "2020-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z" }),
            "invalid_argument",
        ),
        ("GetUsage", json!({ "deploymentId": "x" }), "invalid_argument"),
        ("GetDeploymentUsage", json!({}), "invalid_argument"),
        ("GetDeploymentUsage", json!({ "deploymentId": "x" }), "invalid_argument"),
        ("GetDeploymentUsage", json!({ "deploymentId": unknown }), "not_found"),
    ];
    for (method, body, code) in cases {
        let (status, answer) = flotilla.connect_json(method, body.clone()).await;
        assert_ne!(status, 200, "{method} {body}: {answer}");
        assert_eq!(answer["code"], code, "{method} {body}: {answer}");
    }
    // Streams report errors in their end-of-stream message.
    for (body, code) in [
        (json!({ "deploymentId": unknown }), "not_found"),
        (json!({ "deploymentId": unknown, "maxDurationSeconds": 999_999 }), "invalid_argument"),
        (json!({ "deploymentId": "" }), "invalid_argument"),
    ] {
        let (messages, end) =
            flotilla.connect_stream("StreamDeploymentMetrics", body.clone(), 1, Duration::from_secs(10)).await;
        assert!(messages.is_empty());
        assert_eq!(end.as_ref().map(|e| e["error"]["code"].clone()), Some(json!(code)), "{body}: {end:?}");
    }
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_observability_names_every_figure() {
    let flotilla = TestFlotilla::start_with(fast_metrics).await;
    flotilla.deploy_demo("scraped", 1).await;
    let started = std::time::Instant::now();
    let observability = loop {
        let o: Value =
            reqwest::get(format!("{}/metrics/observability", flotilla.base_url)).await.unwrap().json().await.unwrap();
        if o["components"]["metrics"]["samples_total"].as_u64() >= Some(1) {
            break o;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{o}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let m = &observability["components"]["metrics"];
    for key in [
        "collections_total",
        "collections_per_second",
        "containers_processed_total",
        "containers_failed_total",
        "writer",
        "breaker",
        "current_interval_ms",
        "subscribers",
        "cache_samples",
        "last_collection_at",
        "last_write_at",
        "live_feed",
    ] {
        assert!(m.get(key).is_some(), "observability lacks {key}: {m}");
    }
    for key in ["batches_written", "rows_written", "write_failures", "buffered_rows", "dropped_rows"] {
        assert!(m["writer"].get(key).is_some(), "writer lacks {key}: {m}");
    }
    for key in ["state", "consecutive_failures"] {
        assert!(m["breaker"].get(key).is_some(), "breaker lacks {key}: {m}");
    }
    for key in ["active", "slow", "dropped"] {
        assert!(m["subscribers"].get(key).is_some(), "subscribers lacks {key}: {m}");
    }

    let text = reqwest::get(format!("{}/metrics", flotilla.base_url)).await.unwrap().text().await.unwrap();
    for name in [
        "flotilla_metrics_collections_total",
        "flotilla_metrics_docker_breaker_state",
        "flotilla_metrics_db_rows_written_total",
        "flotilla_api_live_subscribers",
        "flotilla_redis_live_samples_published_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} missing from /metrics");
    }
    let promtool = which_promtool();
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool check metrics refused /metrics:\n{said}\n---\n{text}");
    assert!(said.trim().is_empty(), "promtool had remarks:\n{said}");
    flotilla.stop().await;
}

fn which_promtool() -> String {
    for candidate in ["/usr/bin/promtool", "/usr/local/bin/promtool"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("promtool is missing; install it with scripts/dev-services.sh install (Debian's prometheus package)");
}
