//! GetDeployment over Connect JSON with OIDC authentication on, from a load
//! generator on loopback, beside the same server's `/health`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_e2e::TestFlotilla;
use flotilla_test_utils::TestOidcProvider;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::stats::{Samples, ms};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What one kind of request measured.
struct Load {
    per_second: f64,
    latencies: Samples,
    failures: usize,
}

pub async fn reads(connections: usize, seconds: u64, deployments: usize) -> anyhow::Result<()> {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let token = provider.sign_in("bench", "bench@example.com").await.id_token;
    let authorization = format!("Bearer {token}");
    let mut ids = Vec::new();
    for i in 0..deployments {
        let (status, created) = flotilla
            .connect_with(
                "flotilla.v1.DeploymentService/CreateDeployment",
                &[("authorization", &authorization)],
                json!({"name": format!("read-{i}"), "image": flotilla_e2e::DEMO_IMAGE, "port": 8080}),
            )
            .await;
        anyhow::ensure!(status == 200, "create: {created}");
        ids.push(created["deployment"]["id"].as_str().unwrap_or_default().to_owned());
    }
    let base = flotilla.base_url.clone();
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build_http();
    let bodies: Arc<Vec<Bytes>> = Arc::new(ids.iter().map(|id| Bytes::from(json!({"id": id}).to_string())).collect());

    let get_deployment = {
        let (client, base, authorization, bodies) =
            (client.clone(), base.clone(), authorization.clone(), bodies.clone());
        move |n: usize| {
            let request = hyper::Request::post(format!("{base}/flotilla.v1.DeploymentService/GetDeployment"))
                .header("content-type", "application/json")
                .header("authorization", &authorization)
                .body(Full::new(bodies[n % bodies.len()].clone()))
                .expect("request");
            let client = client.clone();
            async move { exchange(&client, request).await }
        }
    };
    let health = {
        let (client, base) = (client.clone(), base.clone());
        move |_: usize| {
            let request = hyper::Request::get(format!("{base}/health")).body(Full::new(Bytes::new())).expect("request");
            let client = client.clone();
            async move { exchange(&client, request).await }
        }
    };

    eprintln!("{connections} connections, {seconds} s each (after 2 s of warm-up), {deployments} deployments");
    let reads = run(connections, seconds, get_deployment).await;
    let baseline = run(connections, seconds, health).await;
    let hits = metric(&client, &base, "flotilla_api_view_cache_hits_total").await;
    let misses = metric(&client, &base, "flotilla_api_view_cache_misses_total").await;
    let jwt_hits = metric(&client, &base, "flotilla_oidc_verified_cache_hits_total").await;
    for (name, load) in [("GetDeployment (authenticated)", &reads), ("/health (baseline)", &baseline)] {
        println!(
            "{name:<30} {:>9.0} req/s  p50={:>6.2} ms  p99={:>6.2} ms  p99.9={:>6.2} ms  failed={}",
            load.per_second,
            ms(load.latencies.percentile(50.0)),
            ms(load.latencies.percentile(99.0)),
            ms(load.latencies.percentile(99.9)),
            load.failures
        );
    }
    println!(
        "GetDeployment at {:.0}% of /health's rate; view cache {hits:.0} hits / {misses:.0} misses; tokens verified once, then {jwt_hits:.0} cache hits",
        100.0 * reads.per_second / baseline.per_second
    );
    flotilla.stop().await;
    Ok(())
}

/// One request; whether it answered 200.
async fn exchange(client: &HttpClient, request: hyper::Request<Full<Bytes>>) -> bool {
    match client.request(request).await {
        Ok(response) => {
            let ok = response.status() == hyper::StatusCode::OK;
            ok && response.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// `connections` loops sending requests back to back for `seconds` (after a
/// warm-up that is not counted).
async fn run<F, Fut>(connections: usize, seconds: u64, send: F) -> Load
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (send, measuring, stop) = (send.clone(), measuring.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut latencies, mut failures, mut n) = (Vec::with_capacity(200_000), 0usize, worker);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let ok = send(n).await;
                    n += connections;
                    if measuring.load(Ordering::Relaxed) {
                        latencies.push(started.elapsed());
                        failures += usize::from(!ok);
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut failures) = (Vec::new(), 0);
    for worker in workers {
        let (latencies, failed) = worker.await.expect("worker");
        all.extend(latencies);
        failures += failed;
    }
    Load { per_second: all.len() as f64 / elapsed.as_secs_f64(), latencies: Samples::new(all), failures }
}

async fn metric(client: &HttpClient, base: &str, name: &str) -> f64 {
    let request = hyper::Request::get(format!("{base}/metrics")).body(Full::new(Bytes::new())).expect("request");
    let Ok(response) = client.request(request).await else { return f64::NAN };
    let Ok(body) = response.into_body().collect().await else { return f64::NAN };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(f64::NAN)
}
