//! The orchestrator on one engine with three agents (distinct node ids):
//! anti-affinity, the route table Traefik polls (validated against Traefik's
//! schema), and a node whose agent dies.

use std::time::{Duration, Instant};

use flotilla_e2e::{DEMO_IMAGE, TestFlotilla, is_running};
use serde_json::{Value, json};

fn dynamic_schema() -> jsonschema::Validator {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("traefik/schemas/traefik-v3-dynamic-config.schema.json"))
        .expect("the vendored schema");
    if let Ok(shared) = std::fs::read_to_string(root.join("../shared/schemas/traefik-v3-dynamic-config.schema.json")) {
        assert_eq!(shared, text, "traefik/schemas/ must be the same as ../shared/schemas/");
    }
    let mut schema: Value = serde_json::from_str(&text).expect("JSON");
    // Traefik 3.7 takes the retry middleware's `status` (SchemaStore's copy
    // predates it); tests/edge.rs shows the real Traefik taking it.
    schema["definitions"]["retryMiddleware"]["properties"]["status"] =
        json!({ "type": "array", "items": { "type": "string" } });
    jsonschema::draft7::new(&schema).expect("a valid schema")
}

fn assert_valid(validator: &jsonschema::Validator, config: &Value) {
    let errors: Vec<String> = validator.iter_errors(config).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "the route table is not valid Traefik configuration: {errors:?}\n{config}");
}

/// The strings at `field` of every element of `array`, sorted.
fn sorted_strings(array: &Value, field: &str) -> Vec<String> {
    let mut strings: Vec<String> = array
        .as_array()
        .map(|items| items.iter().filter_map(|v| v[field].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    strings.sort();
    strings
}

/// The server URLs of the router for `deployment_id` in the route table.
fn servers(table: &Value, deployment_id: &str) -> Vec<String> {
    let name = format!("flo-{}", deployment_id.replace('-', ""));
    sorted_strings(&table["http"]["services"][&name]["loadBalancer"]["servers"], "url")
}

fn endpoints(deployment: &Value) -> Vec<String> {
    sorted_strings(&deployment["replicas"], "endpoint")
}

fn nodes_of(deployment: &Value) -> Vec<String> {
    sorted_strings(&deployment["replicas"], "nodeId")
}

#[tokio::test]
async fn replicas_spread_the_route_table_follows_and_a_dead_node_is_replaced() {
    let mut flotilla = TestFlotilla::start_with(|s| {
        s.orchestrator.heartbeat_timeout = Duration::from_secs(3);
        s.orchestrator.interval = Duration::from_secs(1);
    })
    .await;
    flotilla.add_agent(1, |_| {}).await;
    flotilla.add_agent(2, |_| {}).await;
    let validator = dynamic_schema();
    // Anti-affinity is "when possible": wait until all three nodes are known.
    let started = Instant::now();
    loop {
        let (_, nodes) = flotilla.connect_node("ListNodes", json!({})).await;
        if nodes["nodes"].as_array().is_some_and(|n| n.len() == 3) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "three nodes register: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let id = flotilla
        .create(json!({
            "name": "spread", "image": DEMO_IMAGE, "port": 8080, "replicas": 3,
            "domain": "spread.flotilla.test", "placement": { "strategy": "spread" }
        }))
        .await;
    let (_, running) = flotilla.wait_for(&id, Duration::from_secs(60), is_running).await;
    let deployment = &running["deployment"];
    let nodes = nodes_of(deployment);
    let mut distinct = nodes.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "anti-affinity: one replica per node, got {nodes:?}");
    assert!(
        deployment["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["placementReason"].as_str().is_some_and(|s| s.starts_with("spread"))),
        "{deployment}"
    );
    assert_eq!(deployment["placement"]["strategy"], "spread");

    // The route table names exactly the replicas that serve, and Traefik accepts it.
    let table = flotilla.route_table_where("the replicas", |t| servers(t, &id) == endpoints(deployment)).await;
    assert_valid(&validator, &table);
    let router = format!("flo-{}", id.replace('-', ""));
    assert_eq!(table["http"]["routers"][&router]["rule"], "Host(`spread.flotilla.test`)");
    // Each server answers.
    for url in servers(&table, &id) {
        let body = flotilla.http.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(body.contains("spread"), "{url}: {body}");
    }

    // Node 2's agent dies. Within the heartbeat timeout (3 s) plus a round,
    // the node is down, its replica runs elsewhere and the route table
    // follows.
    let dead = flotilla.docker.node_id(2).to_string();
    let dead_endpoint: Vec<String> = deployment["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["nodeId"] == dead.as_str())
        .map(|r| r["endpoint"].as_str().unwrap().to_owned())
        .collect();
    let killed = Instant::now();
    flotilla.kill_agent(1).await;
    let mut down_after = None;
    let moved = loop {
        let (status, node) = flotilla.connect_node("GetNode", json!({ "id": dead })).await;
        assert_eq!(status, 200, "{node}");
        if down_after.is_none() && node["node"]["status"] == "down" {
            down_after = Some(killed.elapsed());
        }
        let current = flotilla.get(&id).await;
        let nodes = nodes_of(&current);
        if down_after.is_some()
            && current["status"] == "DEPLOYMENT_STATUS_RUNNING"
            && nodes.len() == 3
            && !nodes.contains(&dead)
        {
            break current;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "not replaced in time: {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let down_after = down_after.unwrap();
    eprintln!("node down after {down_after:?}, replica replaced after {:?}", killed.elapsed());
    assert!(down_after < Duration::from_secs(3 + 3), "down after {down_after:?}");
    let table = flotilla.route_table_where("the moved replica", |t| servers(t, &id) == endpoints(&moved)).await;
    assert_valid(&validator, &table);
    let now_serving = servers(&table, &id);
    assert!(!now_serving.iter().any(|u| dead_endpoint.contains(u)), "the dead node's replica is gone from routing");

    // The node comes back: its agent removes the stale container at once
    // (well within the 60 s grace for unknown containers) and the node
    // rejoins as ready, taking work again.
    let stale = flotilla.docker.containers().await;
    let back = Instant::now();
    flotilla.add_agent(2, |_| {}).await;
    loop {
        let (_, node) = flotilla.connect_node("GetNode", json!({ "id": dead })).await;
        let containers = flotilla.docker.containers().await;
        if node["node"]["status"] == "ready" && containers.len() == 3 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "not rejoined: {node}; containers {containers:?} (before {stale:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("node back: stale container removed and node ready after {:?}", back.elapsed());
    assert_eq!(stale.len(), 4, "the dead node's container was still there: {stale:?}");
    let current = flotilla.get(&id).await;
    assert_eq!(endpoints(&current), endpoints(&moved), "the replicas that serve stay where they are");
    flotilla.route_table_where("the moved replicas", |t| servers(t, &id) == endpoints(&moved)).await;

    flotilla.stop().await;
}

#[tokio::test]
async fn no_node_fitting_is_explained_and_hostile_placement_is_refused() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla
        .create(json!({
            "name": "nowhere", "image": DEMO_IMAGE, "port": 8080,
            "placement": { "constraints": { "region": "mars" } }
        }))
        .await;
    let (_, body) = flotilla
        .wait_for(&id, Duration::from_secs(20), |_, b| {
            !b["deployment"]["placementMessage"].as_str().unwrap_or("").is_empty()
        })
        .await;
    let message = body["deployment"]["placementMessage"].as_str().unwrap();
    assert!(message.contains("1 not matching region=mars"), "{message}");
    assert!(flotilla.count("SELECT count(*) FROM deployment_locations").await == 0);

    for placement in [
        json!({ "strategy": "fastest" }),
        json!({ "constraints": { "region": "eu`) || Host(`evil.com" } }),
        json!({ "constraints": { "bad key": "x" } }),
    ] {
        let (status, error) = flotilla
            .connect_json(
                "CreateDeployment",
                json!({ "name": "bad", "image": DEMO_IMAGE, "port": 8080, "placement": placement }),
            )
            .await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{placement}: {error}");
        assert!(error["message"].as_str().unwrap().contains("placement."), "{error}");
    }
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments WHERE name = 'bad'").await, 0);

    // Not a platform administrator's request? In development mode every
    // caller is one; the node API answers.
    let (status, nodes) = flotilla.connect_node("ListNodes", json!({})).await;
    assert_eq!(status, 200, "{nodes}");
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    assert!(!nodes["leader"].as_str().unwrap().is_empty(), "{nodes}");
    let (status, error) = flotilla.connect_node("DrainNode", json!({ "id": "no-such-node" })).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("not_found")), "{error}");
    let (status, error) = flotilla.connect_node("DrainNode", json!({ "id": "" })).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{error}");

    // No backup task here: none recorded, and a limit out of range refused.
    let (status, backups) = flotilla.connect_node("ListDatabaseBackups", json!({})).await;
    assert_eq!(status, 200, "{backups}");
    assert!(backups.get("lastGood").is_none() && backups.get("backups").is_none_or(|b| b == &json!([])), "{backups}");
    let (status, error) = flotilla.connect_node("ListDatabaseBackups", json!({ "limit": 500 })).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{error}");
    assert!(error["message"].as_str().unwrap().contains("limit"), "{error}");
    flotilla.stop().await;
}

/// Waits until ListNodes shows `n` nodes.
async fn wait_for_nodes(flotilla: &TestFlotilla, n: usize) {
    let started = Instant::now();
    loop {
        let (_, nodes) = flotilla.connect_node("ListNodes", json!({})).await;
        if nodes["nodes"].as_array().is_some_and(|list| list.len() == n) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{n} nodes register: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Live placements: (deployment name, node, reason), in creation order.
async fn placements(flotilla: &TestFlotilla) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT d.name, l.node_id, coalesce(l.placement_reason, '') FROM deployment_locations l \
         JOIN deployments d ON d.id = l.deployment_id WHERE l.drain_state IS NULL \
         ORDER BY d.created_at, d.name",
    )
    .fetch_all(flotilla.db.pool())
    .await
    .expect("placements")
}

#[tokio::test]
async fn thirty_deployments_per_strategy_land_as_the_strategy_says() {
    let mut flotilla = TestFlotilla::start_with(|s| {
        s.orchestrator.interval = Duration::from_secs(1);
        s.agent.max_deployments = 12;
    })
    .await;
    flotilla.add_agent(1, |c| c.max_deployments = 12).await;
    flotilla.add_agent(2, |c| c.max_deployments = 12).await;
    wait_for_nodes(&flotilla, 3).await;
    let nodes: Vec<String> = (0..3).map(|n| flotilla.docker.node_id(n).to_string()).collect();

    for strategy in ["spread", "least-loaded", "round-robin", "binpack"] {
        let mut ids = Vec::new();
        for i in 0..30 {
            let name = format!("{strategy}-{i:02}");
            ids.push(
                flotilla
                    .create(json!({
                        "name": name, "image": DEMO_IMAGE, "port": 8080,
                        "placement": { "strategy": strategy }
                    }))
                    .await,
            );
        }
        let started = Instant::now();
        let placed = loop {
            let placed = placements(&flotilla).await;
            if placed.len() == 30 {
                break placed;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{strategy}: {} of 30 placed", placed.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let per_node: Vec<usize> = nodes.iter().map(|n| placed.iter().filter(|p| &p.1 == n).count()).collect();
        eprintln!("{strategy}: {per_node:?}");
        assert!(placed.iter().all(|p| p.2.starts_with(strategy)), "{strategy}: every reason names it: {placed:?}");
        match strategy {
            // Equal nodes: the counts stay level.
            "spread" | "least-loaded" => assert_eq!(per_node, [10, 10, 10], "{strategy}"),
            "round-robin" => {
                assert_eq!(per_node, [10, 10, 10], "{strategy}");
                // A rotation: each node again every third deployment, never twice in a row.
                for (i, p) in placed.iter().enumerate().skip(1) {
                    assert_ne!(p.1, placed[i - 1].1, "round-robin repeated a node at {i}: {placed:?}");
                    if i >= 3 {
                        assert_eq!(p.1, placed[i - 3].1, "round-robin is not a rotation at {i}: {placed:?}");
                    }
                }
            }
            // Fills a node (12 slots) before it opens another.
            _ => {
                let mut sorted = per_node.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, [6, 12, 12], "binpack");
                let first = &placed[0].1;
                assert!(placed[..12].iter().all(|p| &p.1 == first), "binpack filled one node first: {placed:?}");
            }
        }
        for id in &ids {
            let (status, body) = flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
            assert_eq!(status, 200, "{body}");
        }
        let started = Instant::now();
        while flotilla.count("SELECT count(*) FROM deployments").await > 0
            || flotilla.count("SELECT coalesce(sum(deployment_count), 0)::bigint FROM node_metadata").await > 0
        {
            assert!(started.elapsed() < Duration::from_secs(60), "{strategy}: deployments removed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    flotilla.stop().await;
}

/// Requests every server of `deployment_id` in a freshly polled route
/// table, as Traefik would with a short poll interval, until `stop`.
/// Returns (requests, failures).
async fn looping_client(
    base_url: String,
    deployment_id: String,
    stop: tokio_util::sync::CancellationToken,
) -> (usize, Vec<String>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let (mut requests, mut failures) = (0, Vec::new());
    while !stop.is_cancelled() {
        let table: Value = match http.get(format!("{base_url}/traefik/dynamic")).send().await {
            Ok(response) => response.json().await.unwrap_or(Value::Null),
            Err(e) => {
                failures.push(format!("route table: {e}"));
                continue;
            }
        };
        let urls = servers(&table, &deployment_id);
        if urls.is_empty() {
            failures.push("no server in the route table".to_owned());
        }
        for url in urls {
            requests += 1;
            match http.get(&url).send().await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => failures.push(format!("{url}: HTTP {}", response.status())),
                Err(e) => failures.push(format!("{url}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (requests, failures)
}

#[tokio::test]
async fn a_drained_node_hands_its_replicas_over_with_no_failed_request() {
    let mut flotilla = TestFlotilla::start_with(|s| {
        s.orchestrator.interval = Duration::from_secs(1);
    })
    .await;
    flotilla.add_agent(1, |_| {}).await;
    flotilla.add_agent(2, |_| {}).await;
    wait_for_nodes(&flotilla, 3).await;
    let id = flotilla
        .create(json!({
            "name": "drained", "image": DEMO_IMAGE, "port": 8080, "replicas": 2,
            "domain": "drained.flotilla.test", "placement": { "strategy": "spread" },
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 200 }
        }))
        .await;
    let (_, running) = flotilla
        .wait_for(&id, Duration::from_secs(60), |s, b| {
            is_running(s, b) && b["deployment"]["replicas"].as_array().is_some_and(|r| r.len() == 2)
        })
        .await;
    let drained = nodes_of(&running["deployment"])[0].clone();

    let stop = tokio_util::sync::CancellationToken::new();
    let client = tokio::spawn(looping_client(flotilla.base_url.clone(), id.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = flotilla.connect_node("DrainNode", json!({ "id": drained })).await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let moved = loop {
        let current = flotilla.get(&id).await;
        let nodes = nodes_of(&current);
        let left = flotilla.count("SELECT count(*) FROM deployment_locations").await;
        if current["status"] == "DEPLOYMENT_STATUS_RUNNING"
            && nodes.len() == 2
            && !nodes.contains(&drained)
            && left == 2
        {
            break current;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not moved: {current}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("drain moved the replica in {:?}", started.elapsed());
    // The old container is gone from the drained node, and a new replica takes no work there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let (requests, failures) = client.await.unwrap();
    eprintln!("looping client: {requests} requests, {} failed", failures.len());
    assert!(requests > 50, "the client ran: {requests} requests");
    assert!(failures.is_empty(), "{} of {requests} requests failed: {failures:?}", failures.len());
    flotilla.route_table_where("the moved replicas", |t| servers(t, &id) == endpoints(&moved)).await;

    let (_, node) = flotilla.connect_node("GetNode", json!({ "id": drained })).await;
    assert_eq!(node["node"]["availability"], "drain", "{node}");
    let extra =
        flotilla.create(json!({ "name": "after-drain", "image": DEMO_IMAGE, "port": 8080, "replicas": 2 })).await;
    let (_, after) = flotilla.wait_for(&extra, Duration::from_secs(60), is_running).await;
    assert!(!nodes_of(&after["deployment"]).contains(&drained), "a drained node takes no new work: {after}");
    let (status, body) = flotilla.connect_node("ActivateNode", json!({ "id": drained })).await;
    assert_eq!(status, 200, "{body}");
    let (_, node) = flotilla.connect_node("GetNode", json!({ "id": drained })).await;
    assert_eq!(node["node"]["availability"], "active", "{node}");
    flotilla.stop().await;
}

/// An orchestrator replica on a runtime of its own, so that it can be killed
/// the hard way: its runtime dropped, nothing released.
struct OrchestratorProcess {
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OrchestratorProcess {
    fn start(flotilla: &TestFlotilla, holder: &str) -> Self {
        let (database_url, redis_url, prefix) =
            (flotilla.db.url.clone(), flotilla.redis.url.clone(), flotilla.redis.prefix.clone());
        let holder = holder.to_owned();
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            runtime.spawn(async move {
                let store =
                    flotilla_store::Store::connect_lazy(&flotilla_store::StoreConfig::new(database_url)).unwrap();
                let wake = flotilla_redis::WakeBus::with_redis(&redis_url, &prefix).unwrap();
                let cancel = tokio_util::sync::CancellationToken::new();
                let _listener =
                    wake.spawn_listener(vec![flotilla_redis::ORCHESTRATOR_TOPIC.to_owned()], cancel.clone());
                let config = flotilla_orchestrator::OrchestratorConfig {
                    holder,
                    lease_ttl: Duration::from_secs(3),
                    interval: Duration::from_secs(1),
                    ..flotilla_orchestrator::OrchestratorConfig::default()
                };
                let orchestrator = flotilla_orchestrator::Orchestrator::new(
                    config,
                    store,
                    wake,
                    flotilla_telemetry::Telemetry::new("orchestrator", "test"),
                    None,
                );
                orchestrator.spawn(&tokio_util::task::TaskTracker::new(), cancel);
                std::future::pending::<()>().await;
            });
            let _ = killed.recv();
            runtime.shutdown_background();
        });
        Self { kill: Some(kill), thread: Some(thread) }
    }

    fn kill(&mut self) {
        drop(self.kill.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for OrchestratorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn lease(flotilla: &TestFlotilla) -> Option<(String, i64)> {
    sqlx::query_as("SELECT holder, term FROM orchestrator_lease WHERE expires_at > now()")
        .fetch_optional(flotilla.db.pool())
        .await
        .expect("the lease row")
}

/// Every deployment has exactly its replicas placed, each index once.
async fn assert_placed_once(flotilla: &TestFlotilla, deployments: i64, replicas: i64) {
    let started = Instant::now();
    loop {
        let live = flotilla.count("SELECT count(*) FROM deployment_locations WHERE drain_state IS NULL").await;
        if live == deployments * replicas {
            break;
        }
        assert!(live < deployments * replicas, "more replicas placed than asked for: {live}");
        assert!(started.elapsed() < Duration::from_secs(30), "{live} of {} placed", deployments * replicas);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let twice = flotilla
        .count(
            "SELECT count(*) FROM (SELECT deployment_id, replica_index FROM deployment_locations \
             GROUP BY 1, 2 HAVING count(*) > 1) AS t",
        )
        .await;
    assert_eq!(twice, 0, "a replica was placed twice");
}

#[tokio::test]
async fn the_leader_dies_and_the_other_orchestrator_takes_over_placing_nothing_twice() {
    let mut flotilla = TestFlotilla::start_with(|s| s.roles.orchestrator = false).await;
    flotilla.add_agent(1, |_| {}).await;
    flotilla.add_agent(2, |_| {}).await;
    wait_for_nodes(&flotilla, 3).await;
    let mut first = OrchestratorProcess::start(&flotilla, "orchestrator-a");
    let started = Instant::now();
    let (leader, term) = loop {
        if let Some(lease) = lease(&flotilla).await {
            break lease;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "a leader is elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(leader, "orchestrator-a");
    let mut second = OrchestratorProcess::start(&flotilla, "orchestrator-b");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lease(&flotilla).await, Some((leader.clone(), term)), "one leader while it lives");
    let (_, nodes) = flotilla.connect_node("ListNodes", json!({})).await;
    assert_eq!(nodes["leader"], "orchestrator-a", "{nodes}");

    for i in 0..4 {
        flotilla
            .create(json!({
                "name": format!("before-{i}"), "image": DEMO_IMAGE, "port": 8080, "replicas": 2,
                "placement": { "strategy": "round-robin" }
            }))
            .await;
    }
    assert_placed_once(&flotilla, 4, 2).await;

    // The leader dies without a word; work keeps coming.
    first.kill();
    let killed = Instant::now();
    for i in 0..4 {
        flotilla
            .create(json!({
                "name": format!("after-{i}"), "image": DEMO_IMAGE, "port": 8080, "replicas": 2,
                "placement": { "strategy": "round-robin" }
            }))
            .await;
    }
    let (holder, new_term) = loop {
        if let Some((holder, t)) = lease(&flotilla).await.filter(|(h, _)| h != "orchestrator-a") {
            break (holder, t);
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took_over = killed.elapsed();
    eprintln!("orchestrator-b leads (term {new_term}) {took_over:?} after the leader died");
    assert_eq!(holder, "orchestrator-b");
    assert!(new_term > term, "a new term fences the old leader");
    assert!(took_over < Duration::from_secs(3 + 2), "took over after {took_over:?} (lease 3 s)");
    assert_placed_once(&flotilla, 8, 2).await;
    let reasons = flotilla.count("SELECT count(*) FROM deployment_locations WHERE placement_reason IS NULL").await;
    assert_eq!(reasons, 0);
    // The rotation went on across the change of leader: its cursor is in the database.
    let order: Vec<String> =
        sqlx::query_scalar("SELECT node_id FROM deployment_locations ORDER BY deployment_id, replica_index")
            .fetch_all(flotilla.db.pool())
            .await
            .unwrap();
    for i in 3..order.len() {
        assert_eq!(order[i], order[i - 3], "round-robin did not rotate at {i}: {order:?}");
        assert_ne!(order[i], order[i - 1], "round-robin repeated a node at {i}: {order:?}");
    }
    for i in 0..4 {
        let name = format!("after-{i}");
        let (_, list) = flotilla.connect_json("ListDeployments", json!({})).await;
        let id = list["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name.as_str())
            .and_then(|d| d["id"].as_str())
            .unwrap()
            .to_owned();
        flotilla.wait_for(&id, Duration::from_secs(60), is_running).await;
    }
    // One container per replica: nothing was started twice.
    let containers = flotilla.docker.containers().await;
    assert_eq!(containers.len(), 16, "{containers:?}");
    second.kill();
    flotilla.stop().await;
}

#[tokio::test]
async fn hostile_domains_are_refused_with_invalid_argument_and_change_nothing() {
    let flotilla = TestFlotilla::start().await;
    let taken = flotilla
        .create(json!({ "name": "owner", "image": DEMO_IMAGE, "port": 8080, "domain": "taken.flotilla.test" }))
        .await;
    let hostile = [
        "evil.com`) || Host(`victim.com",
        "a.com`)",
        "a.com && PathPrefix(`/admin`)",
        "a.com || Host(`b.com`)",
        "(a.com)",
        "a.com\nHost(`b.com`)",
        "a.com\r\n",
        "a .com",
        "a\tb.com",
        "*.*.example.com",
        "a.*.example.com",
        "*",
        "-leading.example.com",
        "trailing-.example.com",
        "under_score.example.com",
        ".example.com",
        "example..com",
        "a.com/path",
        "a.com:8080",
        "user@a.com",
        "a.com?x=1",
        "a.com#frag",
        "a.com\\b",
        "a.com\"",
        "a.com'",
        "a.com;b.com",
        "a.com,b.com",
        "{{ .Host }}.com",
        "$(whoami).com",
        "a.com\u{0}",
        "ex\u{200b}ample.com",
        &format!("{}.com", "a".repeat(64)),
        &format!("{}.com", ["abcdefghi"; 26].join(".")),
    ];
    for domain in hostile {
        let (status, error) = flotilla
            .connect_json(
                "CreateDeployment",
                json!({ "name": "hostile", "image": DEMO_IMAGE, "port": 8080, "domain": domain }),
            )
            .await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "create {domain:?}: {error}");
        assert!(error["message"].as_str().unwrap_or("").contains("domain"), "{domain:?}: {error}");
        let (status, error) = flotilla.connect_json("UpdateDeployment", json!({ "id": taken, "domain": domain })).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "update {domain:?}: {error}");
    }
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 1, "nothing was created");
    let domains: Vec<String> =
        sqlx::query_scalar("SELECT domain FROM deployment_routing").fetch_all(flotilla.db.pool()).await.unwrap();
    assert!(domains.iter().all(|d| d == "taken.flotilla.test"), "routing unchanged: {domains:?}");

    // Names a user may mean are accepted, in the form Traefik matches on.
    let (status, body) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "idn", "image": DEMO_IMAGE, "port": 8080, "domain": "Bücher.Example.COM" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deployment"]["domain"], "xn--bcher-kva.example.com");
    let (status, body) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "wild", "image": DEMO_IMAGE, "port": 8080, "domain": "*.apps.flotilla.test" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // One domain belongs to one deployment.
    let (status, error) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "thief", "image": DEMO_IMAGE, "port": 8080, "domain": "TAKEN.flotilla.test" }),
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (409, Some("already_exists")), "{error}");

    // Paths: a prefix routes part of a domain; hostile ones are refused.
    let hostile_paths = [
        "api",
        "/api`) || Host(`evil.com",
        "/api`)",
        "/a && Host(`b`)",
        "/a||b",
        "/(a)",
        "/a b",
        "/a\nb",
        "/a\r\n",
        "/a/../b",
        "/a/./b",
        "//a",
        "/a//b",
        "/a?b=1",
        "/a#b",
        "/a%20b",
        "/a\\b",
        "/a\"b",
        "/a'b",
        "/a;b",
        "/a,b",
        "/{a}",
        "/$(id)",
        "/ä",
        &format!("/{}", "a".repeat(300)),
    ];
    for path in hostile_paths {
        let body = json!({
            "name": "hostile-path", "image": DEMO_IMAGE, "port": 8080,
            "domain": "paths.flotilla.test", "pathPrefix": path
        });
        let (status, error) = flotilla.connect_json("CreateDeployment", body).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "create {path:?}: {error}");
        assert!(error["message"].as_str().unwrap_or("").contains("path_prefix"), "{path:?}: {error}");
        let (status, error) =
            flotilla.connect_json("UpdateDeployment", json!({ "id": taken, "pathPrefix": path })).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "update {path:?}: {error}");
    }
    let (status, error) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "nodomain", "image": DEMO_IMAGE, "port": 8080, "pathPrefix": "/api" }),
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "a path needs a domain: {error}");
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 3, "nothing more was created");

    // One domain, two paths, two deployments; the same domain and path again is taken.
    let site = flotilla
        .create(json!({ "name": "site", "image": DEMO_IMAGE, "port": 8080, "domain": "shared.flotilla.test" }))
        .await;
    let api = flotilla
        .create(json!({
            "name": "api", "image": DEMO_IMAGE, "port": 8080,
            "domain": "shared.flotilla.test", "pathPrefix": "/api/"
        }))
        .await;
    assert_eq!(flotilla.get(&api).await["pathPrefix"], "/api");
    let (status, error) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "api2", "image": DEMO_IMAGE, "port": 8080, "domain": "shared.flotilla.test", "pathPrefix": "/api" }),
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (409, Some("already_exists")), "{error}");

    for id in [&taken, &site, &api] {
        flotilla.wait_for(id, Duration::from_secs(60), is_running).await;
    }
    let ours = |t: &Value| {
        t["http"]["routers"].as_object().map_or(0, |routers| {
            routers
                .values()
                .filter(|r| r["rule"].as_str().is_some_and(|rule| rule.contains("taken.") || rule.contains("shared.")))
                .count()
        })
    };
    let table = flotilla.route_table_where("the three routes", |t| ours(t) == 3).await;
    assert_valid(&dynamic_schema(), &table);
    let mut rules: Vec<(String, u64)> = table["http"]["routers"]
        .as_object()
        .unwrap()
        .values()
        .filter(|r| r["service"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|r| (r["rule"].as_str().unwrap().to_owned(), r["priority"].as_u64().unwrap_or(0)))
        .filter(|(rule, _)| rule.contains("taken.") || rule.contains("shared."))
        .collect();
    rules.sort();
    let expected = [
        "Host(`shared.flotilla.test`)",
        "Host(`shared.flotilla.test`) && PathPrefix(`/api`)",
        "Host(`taken.flotilla.test`)",
    ];
    assert_eq!(rules.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), expected, "{table}");
    assert!(rules[1].1 > rules[0].1, "the longer prefix wins: {rules:?}");
    flotilla.stop().await;
}
