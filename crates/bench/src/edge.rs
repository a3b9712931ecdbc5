//! The edge's benchmarks:
//! - `route-table`: the route table at 10,000 and 100,000 routes (two
//!   replicas each): what one change costs (the read, the rendering and its
//!   gzip, done once), and a poll answered from it, beside rendering the
//!   table for every poll (the handler before issue 14), polls interleaved;
//! - `route-propagation`: real Traefiks in front of a real Flotilla: one
//!   taking the table long-polled as shipped, one polling every second
//!   without waiting (the plain HTTP-provider setup); from a replica
//!   recorded healthy to the first 200 through each, and from a stop's
//!   commit to the last request each routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::State;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use flotilla_e2e::{DEMO_IMAGE, TestFlotilla};
use flotilla_edge::metrics::EdgeStats;
use flotilla_edge::{EdgeServer, EdgeSettings, RouteTable};
use flotilla_store::Store;
use flotilla_store::tenant::ensure_organization;
use flotilla_test_utils::{TestDb, TestTraefik, TraefikOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::stats::{Samples, ms};

fn platform() -> EdgeSettings {
    EdgeSettings {
        platform_domains: vec![flotilla_types::Hostname::parse("domain", "apps.example.com").expect("a domain")],
        ..EdgeSettings::default()
    }
}

/// `routes` deployments with a route and two serving replicas each, on 100 nodes.
async fn seed(db: &TestDb, routes: usize) -> anyhow::Result<()> {
    let (org, project) = ensure_organization(db.pool(), "bench", "Bench").await?;
    let pool = db.pool();
    sqlx::query(
        "INSERT INTO node_metadata (node_id, hostname, address, status, last_heartbeat) \
         SELECT 'n' || i, 'n' || i, '10.0.' || (i / 256) || '.' || (i % 256), 'ready', now() \
         FROM generate_series(0, 99) AS i",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO deployments (id, organization_id, project_id, name, image, container_port, domain, replicas) \
         SELECT gen_random_uuid(), $1, $2, 'app-' || i, 'flotilla/demo-http:latest', 8080, \
         'app-' || i || '.apps.example.com', 2 FROM generate_series(1, $3) AS i",
    )
    .bind(org.as_uuid())
    .bind(project.as_uuid())
    .bind(i32::try_from(routes)?)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO deployment_routing (id, deployment_id, domain, path_prefix, tls_enabled) \
         SELECT gen_random_uuid(), id, domain, '/', false FROM deployments",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, \
         target_generation, status, health_status, address, port, container_port) \
         SELECT gen_random_uuid(), d.id, 'n' || (k % 100), r, 1, 1, 'running', 'healthy', \
         '10.0.' || ((k % 100) / 256) || '.' || ((k % 100) % 256), 20000 + k / 100, 8080 \
         FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM deployments) d, \
         generate_series(0, 1) AS r, LATERAL (SELECT (d.n * 2 + r)::int AS k) key",
    )
    .execute(pool)
    .await?;
    // Autovacuum would get to it later; a table seen only as empty gets the
    // plans of an empty table.
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// The baseline's handler: the table read and rendered for every poll.
async fn rendered_per_poll(State(store): State<Store>) -> axum::response::Response {
    match store.read_route_table(false).await {
        Ok(read) => {
            let table = flotilla_edge::render::render(&read.rows, &platform(), &[]);
            let canary = flotilla_edge::render::Canary { origin: "http://127.0.0.1:7800", proxy: "", table: 1 };
            ([(axum::http::header::CONTENT_TYPE, "application/json")], canary.complete(&table.public)).into_response()
        }
        Err(error) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

async fn serve(router: axum::Router, cancel: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let make = router.into_make_service_with_connect_info::<flotilla_edge::serve::Peer>();
        let _ = axum::serve(listener, make).with_graceful_shutdown(cancel.cancelled_owned()).await;
    });
    Ok(address)
}

/// One GET as Traefik's HTTP provider sends it: time to the last byte, and
/// the bytes on the wire.
async fn poll(client: &reqwest::Client, url: &str) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let response = client.get(url).header("accept-encoding", "gzip").send().await?;
    anyhow::ensure!(response.status().is_success(), "{url}: {}", response.status());
    let bytes = response.bytes().await?.len();
    Ok((started.elapsed(), bytes))
}

pub async fn table(sizes: &[usize], polls: usize) -> anyhow::Result<()> {
    println!("the route table: one render per change and polls answered from it, beside a render per poll");
    for &routes in sizes {
        let db = TestDb::new().await;
        seed(&db, routes).await.context("seeding the routes")?;
        let stats = Arc::new(EdgeStats::default());
        let table = RouteTable::new(db.store.clone(), platform(), None, Duration::from_secs(3600), stats.clone());
        let mut renders = Vec::new();
        let mut bytes = (0, 0);
        for _ in 0..5 {
            let started = Instant::now();
            let version = table.render_now().await?;
            renders.push(started.elapsed());
            bytes = (version.public.json.len(), version.public.gzip.len());
            anyhow::ensure!(version.routers == routes, "{} routers of {routes}", version.routers);
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = EdgeServer::new(
            table,
            db.store.clone(),
            "not-used".into(),
            Duration::ZERO,
            stats,
            &tracker,
            cancel.clone(),
        );
        let cached = serve(server.router(), cancel.clone()).await?;
        let baseline_router = axum::Router::new()
            .route("/traefik/dynamic", axum::routing::get(rendered_per_poll))
            .with_state(db.store.clone());
        let baseline = serve(baseline_router, cancel.clone()).await?;
        // No transparent decompression: the bytes are what goes on the wire.
        let client = reqwest::Client::builder().no_proxy().build()?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let (mut our_bytes, mut their_bytes) = (0, 0);
        for _ in 0..polls {
            let (took, n) = poll(&client, &format!("http://{cached}/traefik/dynamic")).await?;
            ours.push(took);
            our_bytes = n;
            let (took, n) = poll(&client, &format!("http://{baseline}/traefik/dynamic")).await?;
            theirs.push(took);
            their_bytes = n;
        }
        cancel.cancel();
        let (renders, ours, theirs) = (Samples::new(renders), Samples::new(ours), Samples::new(theirs));
        println!(
            "  {routes} routes, {} replica servers: the table is {} KiB, {} KiB gzipped",
            routes * 2,
            bytes.0 / 1024,
            bytes.1 / 1024
        );
        println!("    {}", renders.line("one render per change (read+gzip)"));
        println!("    {}  ({} KiB sent)", ours.line("poll answered from the render"), our_bytes / 1024);
        println!("    {}  ({} KiB sent)", theirs.line("poll rendering the table (baseline)"), their_bytes / 1024);
        println!(
            "    a poll costs {:.1}x less at p50 than rendering per poll ({:.1} ms vs {:.1} ms)",
            ms(theirs.percentile(50.0)) / ms(ours.percentile(50.0)).max(0.001),
            ms(ours.percentile(50.0)),
            ms(theirs.percentile(50.0))
        );
    }
    Ok(())
}

/// GETs through `traefik` for `host` every 5 ms until `status`; when it came.
async fn until_status(
    traefik: &TestTraefik,
    host: &str,
    status: u16,
    timeout: Duration,
) -> anyhow::Result<DateTime<Utc>> {
    let started = Instant::now();
    loop {
        if let Ok((got, _)) = traefik.get(host, "/").await
            && got == status
        {
            return Ok(Utc::now());
        }
        if started.elapsed() > timeout {
            bail!("{host} never answered {status} through {}", traefik.name);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the route table every 5 ms (as a person would: no wait, no name)
/// until it routes `host` (`routed`) or no longer does; when it did.
async fn until_in_table(flotilla: &TestFlotilla, host: &str, routed: bool) -> anyhow::Result<DateTime<Utc>> {
    let url = format!("{}/traefik/dynamic", flotilla.base_url);
    let rule = format!("Host(`{host}`)");
    let started = Instant::now();
    loop {
        let table = flotilla.http.get(&url).send().await?.text().await?;
        if table.contains(&rule) == routed {
            return Ok(Utc::now());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the route table never {} {host}", if routed { "routed" } else { "dropped" });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the proxies every 5 ms until the one whose id starts with
/// `proxy` serves a table including `snapshot` (what an agent waits for).
async fn until_serving(
    flotilla: &TestFlotilla,
    proxy: &str,
    snapshot: &flotilla_types::DbSnapshot,
    timeout: Duration,
) -> anyhow::Result<DateTime<Utc>> {
    let started = Instant::now();
    loop {
        let proxies = flotilla.db.store.live_edge_proxies(Duration::from_secs(60)).await?;
        if proxies.iter().any(|p| p.id.starts_with(proxy) && p.holds.as_ref().is_some_and(|h| h.includes(snapshot))) {
            return Ok(Utc::now());
        }
        if started.elapsed() > timeout {
            bail!("{proxy} never said it serves {snapshot}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn propagation(runs: usize) -> anyhow::Result<()> {
    let flotilla = TestFlotilla::start().await;
    let result = propagation_with(&flotilla, runs).await;
    flotilla.stop().await;
    result
}

async fn propagation_with(flotilla: &TestFlotilla, runs: usize) -> anyhow::Result<()> {
    let table = format!("{}/traefik/dynamic", flotilla.base_url);
    let long_polled = TestTraefik::start(
        &table,
        TraefikOptions { name: Some("long-polled".into()), wait_seconds: Some(5.0), ..TraefikOptions::default() },
    );
    let polling = TestTraefik::start(
        &table,
        TraefikOptions {
            name: Some("polling-1s".into()),
            poll_interval: Some("1s".into()),
            ..TraefikOptions::default()
        },
    );
    println!(
        "route propagation through a real Traefik, {runs} runs: long-polled as shipped (?wait=5, pollInterval 100ms) \
         beside polling every 1 s without waiting, both on the same table"
    );
    let (mut appear_healthy, mut appear_healthy_baseline) = (Vec::new(), Vec::new());
    let (mut appear, mut appear_baseline, mut disappear, mut disappear_baseline, mut disappear_confirmed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs + 2 {
        // A random pause before each change: the 1 s poller's ticks must not
        // fall into step with the runs.
        let jitter = || Duration::from_millis((uuid::Uuid::new_v4().as_u128() % 1000) as u64);
        tokio::time::sleep(jitter()).await;
        let host = format!("p{run}.example.test");
        let id = flotilla
            .create(json!({
                "name": format!("p{run}"), "image": DEMO_IMAGE, "port": 8080, "domain": host,
                "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 100 }
            }))
            .await;
        let (in_table, first, baseline) = tokio::join!(
            until_in_table(flotilla, &host, true),
            until_status(&long_polled, &host, 200, Duration::from_secs(60)),
            until_status(&polling, &host, 200, Duration::from_secs(60))
        );
        let (in_table, first, baseline) = (in_table?, first?, baseline?);
        // The agent records the replica's health only when it changes.
        let healthy: DateTime<Utc> = sqlx::query_scalar(
            "SELECT health_checked_at FROM deployment_locations WHERE deployment_id = $1::uuid AND health_status = 'healthy'",
        )
        .bind(&id)
        .fetch_one(flotilla.db.pool())
        .await
        .context("the replica recorded healthy")?;
        tokio::time::sleep(jitter()).await;
        let (status, body) = flotilla.connect_json("StopDeployment", json!({ "id": id })).await;
        anyhow::ensure!(status == 200, "stop: {body}");
        let after_stop = flotilla.db.store.current_snapshot().await?;
        let (out_of_table, gone, gone_baseline, confirmed) = tokio::join!(
            until_in_table(flotilla, &host, false),
            until_status(&long_polled, &host, 404, Duration::from_secs(60)),
            until_status(&polling, &host, 404, Duration::from_secs(60)),
            until_serving(flotilla, "long-polled@", &after_stop, Duration::from_secs(60))
        );
        let (out_of_table, gone, gone_baseline, confirmed) = (out_of_table?, gone?, gone_baseline?, confirmed?);
        let (status, body) = flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
        anyhow::ensure!(status == 200, "delete: {body}");
        flotilla.wait_for(&id, Duration::from_secs(60), |status, _| status == 404).await;
        if run < 2 {
            continue; // warm-up
        }
        let since = |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).to_std().unwrap_or_default();
        appear_healthy.push(since(healthy, first));
        appear_healthy_baseline.push(since(healthy, baseline));
        appear.push(since(in_table, first));
        appear_baseline.push(since(in_table, baseline));
        disappear.push(since(out_of_table, gone));
        disappear_baseline.push(since(out_of_table, gone_baseline));
        disappear_confirmed.push(since(out_of_table, confirmed));
    }
    for (name, samples) in [
        ("replica healthy -> first 200 (long-polled)", appear_healthy),
        ("replica healthy -> first 200 (1 s polls)", appear_healthy_baseline),
        ("route in the table -> first 200 (long-polled)", appear),
        ("route in the table -> first 200 (1 s polls)", appear_baseline),
        ("route out of the table -> 404 (long-polled)", disappear),
        ("route out of the table -> 404 (1 s polls)", disappear_baseline),
        ("route out of the table -> its canary says so (long-polled)", disappear_confirmed),
    ] {
        println!("  {}", Samples::new(samples).line(name));
    }
    let metrics = flotilla.http.get(format!("{}/metrics", flotilla.base_url)).send().await?.text().await?;
    for name in ["flotilla_edge_renders_total", "flotilla_edge_polls_total", "flotilla_edge_polls_held_total"] {
        let value = metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or("?");
        println!("  {name} {value}");
    }
    Ok(())
}
