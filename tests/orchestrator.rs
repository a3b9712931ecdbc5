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
    jsonschema::draft7::new(&serde_json::from_str(&text).expect("JSON")).expect("a valid schema")
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
    let table = flotilla.route_table().await;
    assert_valid(&validator, &table);
    assert_eq!(servers(&table, &id), endpoints(deployment));
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
    let table = flotilla.route_table().await;
    assert_valid(&validator, &table);
    let now_serving = servers(&table, &id);
    assert_eq!(now_serving, endpoints(&moved));
    assert!(!now_serving.iter().any(|u| dead_endpoint.contains(u)), "the dead node's replica is gone from routing");

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
    flotilla.stop().await;
}
