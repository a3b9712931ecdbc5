//! The node agent against the real engine and PostgreSQL: what it does when
//! things change behind its back, rolling updates, several agents on one
//! engine, the engine or the database going away, and logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use flotilla_docker::LogOptions;
use flotilla_e2e::proxy::Proxy;
use flotilla_e2e::{BROKEN_IMAGE, DEMO_IMAGE, DEMO_V2, TestFlotilla, is_running, replica_container};
use flotilla_types::{ReplicaId, labels};
use futures::StreamExt;
use serde_json::{Value, json};

async fn remove_by_hand(flotilla: &TestFlotilla, container: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    flotilla.docker.docker.remove_container(container, Some(options)).await.expect("docker rm -f");
}

async fn is_container_running(flotilla: &TestFlotilla, container: &str) -> bool {
    flotilla
        .docker
        .docker
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.state)
        .and_then(|s| s.running)
        .unwrap_or(false)
}

async fn containers_of(flotilla: &TestFlotilla, deployment_id: &str) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([("label", vec![format!("{}={deployment_id}", labels::DEPLOYMENT_ID)])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    flotilla.docker.docker.list_containers(Some(options)).await.expect("list containers")
}

/// Waits until replica 0's row names a running container other than `old`
/// (the row corrected, the container recreated); returns it and how long
/// that took.
async fn wait_replaced(flotilla: &TestFlotilla, id: &str, old: &str, timeout: Duration) -> (String, Duration) {
    let started = Instant::now();
    let (_, body) = flotilla
        .wait_for(id, timeout, |status, body| {
            status == 200
                && body["deployment"]["replicas"].as_array().is_some_and(|replicas| {
                    replicas.iter().any(|r| {
                        r["index"].as_u64().unwrap_or(0) == 0
                            && r["status"] == "REPLICA_STATUS_RUNNING"
                            && r["containerId"].as_str().is_some_and(|c| c != old)
                    })
                })
        })
        .await;
    let new = replica_container(&body["deployment"], 0).expect("a container");
    (new, started.elapsed())
}

#[tokio::test]
async fn a_container_removed_behind_the_agents_back_is_recreated_within_two_seconds() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("rm-events", 1).await;
    let old = replica_container(&flotilla.get(&id).await, 0).expect("a container");

    remove_by_hand(&flotilla, &old).await;
    let (new, took) = wait_replaced(&flotilla, &id, &old, Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(2), "recovered in {took:?}");
    assert!(is_container_running(&flotilla, &new).await, "the new container runs");
    assert!(flotilla.agent().event_stats().received > 0, "the events path saw it");
    assert_eq!(containers_of(&flotilla, &id).await.len(), 1);

    flotilla.stop().await;
}

#[tokio::test]
async fn without_events_one_full_pass_recovers_a_removed_container() {
    let interval = Duration::from_secs(3);
    let flotilla = TestFlotilla::start_with(|s| {
        s.agent.events = false;
        s.agent.reconcile_interval = interval;
    })
    .await;
    let id = flotilla.deploy_demo("rm-passes", 1).await;
    let old = replica_container(&flotilla.get(&id).await, 0).expect("a container");

    remove_by_hand(&flotilla, &old).await;
    let (_, took) = wait_replaced(&flotilla, &id, &old, interval + Duration::from_secs(3)).await;
    assert!(took <= interval + Duration::from_secs(2), "recovered in {took:?}, one pass is {interval:?}");
    assert_eq!(flotilla.agent().event_stats().received, 0, "events are off");

    flotilla.stop().await;
}

#[tokio::test]
async fn a_container_stopped_by_hand_is_started_again() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("stopped", 1).await;
    let container = replica_container(&flotilla.get(&id).await, 0).expect("a container");

    let options = StopContainerOptionsBuilder::default().t(1).build();
    flotilla.docker.docker.stop_container(&container, Some(options)).await.expect("docker stop");
    // Running again, and the row says so: the same container, or a
    // replacement when its host port was taken while it was stopped.
    let started = Instant::now();
    let now = loop {
        let deployment = flotilla.get(&id).await;
        if deployment["replicas"][0]["status"] == "REPLICA_STATUS_RUNNING"
            && let Some(now) = replica_container(&deployment, 0)
            && is_container_running(&flotilla, &now).await
        {
            break now;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "not running again: {deployment}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if now != container {
        let gone = flotilla.docker.docker.inspect_container(&container, None::<InspectContainerOptions>).await;
        assert!(gone.is_err(), "a replaced container is removed");
    }
    assert_eq!(containers_of(&flotilla, &id).await.len(), 1);

    flotilla.stop().await;
}

#[tokio::test]
async fn a_managed_container_that_lost_its_row_is_adopted() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("adopt", 1).await;
    let container = replica_container(&flotilla.get(&id).await, 0).expect("a container");
    let replica: uuid::Uuid = sqlx::query_scalar("SELECT id FROM deployment_locations")
        .fetch_one(flotilla.db.pool())
        .await
        .expect("the replica row");

    sqlx::query("DELETE FROM deployment_locations").execute(flotilla.db.pool()).await.expect("delete by hand");
    let report = flotilla.agent().run_pass().await;
    assert_eq!(report.adopted, 1, "{report:?}");

    let (row_id, row_container): (uuid::Uuid, Option<String>) =
        sqlx::query_as("SELECT id, container_id FROM deployment_locations")
            .fetch_one(flotilla.db.pool())
            .await
            .expect("the row is back");
    assert_eq!(row_id, replica, "the same replica");
    assert_eq!(row_container.as_deref(), Some(container.as_str()), "the same container");
    assert!(is_container_running(&flotilla, &container).await, "never restarted");
    flotilla.wait_for(&id, Duration::from_secs(5), is_running).await;

    flotilla.stop().await;
}

/// The node's agent was silent long enough for the orchestrator to take the
/// node's rows off it and, with no other node, to place the replica back on
/// it. When the agent speaks again, the running container is adopted into
/// that new row instead of a second container being started and the first
/// removed (the app would lose its port: the stack test saw this when a
/// failed update of the agent kept it away for 20 s).
#[tokio::test]
async fn a_replica_placed_back_on_its_returning_node_keeps_its_container() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("returning", 1).await;
    let view = flotilla.get(&id).await;
    let container = replica_container(&view, 0).expect("a container");
    let port = view["replicas"][0]["hostPort"].as_i64().expect("a port");
    let started_at = |c: &str| {
        let c = c.to_owned();
        let docker = flotilla.docker.docker.clone();
        async move {
            docker.inspect_container(&c, None::<InspectContainerOptions>).await.ok().and_then(|c| c.state?.started_at)
        }
    };
    let first_start = started_at(&container).await.expect("started");

    // What the health watch (rows off the down node) and the next placement
    // (the replica on the node that is back) write.
    let deployment: uuid::Uuid = id.parse().expect("uuid");
    let placed_again = uuid::Uuid::now_v7();
    let mut tx = flotilla.db.pool().begin().await.expect("tx");
    let (node, address): (String, String) =
        sqlx::query_as("DELETE FROM deployment_locations WHERE deployment_id = $1 RETURNING node_id, address")
            .bind(deployment)
            .fetch_one(&mut *tx)
            .await
            .expect("the row taken off the node");
    sqlx::query(
        "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, \
         target_generation, status, address, container_port, domain, placement_reason) \
         SELECT $1, d.id, $3, 0, d.generation, d.generation, 'pending', $4, d.container_port, d.domain, \
         'least-loaded' FROM deployments d WHERE d.id = $2",
    )
    .bind(placed_again)
    .bind(deployment)
    .bind(&node)
    .bind(&address)
    .execute(&mut *tx)
    .await
    .expect("placed again on the same node");
    tx.commit().await.expect("commit");
    flotilla.agent().run_pass().await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row: Option<(uuid::Uuid, Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT id, container_id, port FROM deployment_locations WHERE deployment_id = $1 AND status = 'running'",
        )
        .bind(deployment)
        .fetch_optional(flotilla.db.pool())
        .await
        .expect("the row");
        if let Some(row) = row {
            break row;
        }
        assert!(Instant::now() < deadline, "the replica never ran again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(row.1.as_deref(), Some(container.as_str()), "the running container serves the replica");
    assert_eq!(row.2.map(i64::from), Some(port), "on the port it had");
    assert_ne!(row.0, placed_again, "the container's own replica row took the new row's place");
    // A later pass changes nothing: no second container, no restart.
    flotilla.agent().run_pass().await;
    assert_eq!(containers_of(&flotilla, &id).await.len(), 1, "no second container");
    assert_eq!(started_at(&container).await, Some(first_start), "never restarted");
    let count: i32 = sqlx::query_scalar("SELECT deployment_count FROM node_metadata WHERE node_id = $1")
        .bind(&node)
        .fetch_one(flotilla.db.pool())
        .await
        .expect("the node");
    assert_eq!(count, 1, "the node counts the replica once");
    flotilla.wait_for(&id, Duration::from_secs(5), is_running).await;

    flotilla.stop().await;
}

/// Creates a container of the demo image with `labels` (plus the test's), outside Flotilla.
async fn container_by_hand(flotilla: &TestFlotilla, mut container_labels: HashMap<String, String>) -> String {
    container_labels.extend(flotilla.docker.labels());
    let body = ContainerCreateBody {
        image: Some(DEMO_IMAGE.to_owned()),
        labels: Some(container_labels),
        ..Default::default()
    };
    let name = format!("by-hand-{}", flotilla_test_utils::unique_suffix());
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    let created = flotilla.docker.docker.create_container(Some(options), body).await.expect("create");
    flotilla.docker.docker.start_container(&created.id, None).await.expect("start");
    created.id
}

#[tokio::test]
async fn a_managed_container_without_a_deployment_is_removed_after_the_grace_period() {
    let grace = Duration::from_secs(1);
    let flotilla = TestFlotilla::start_with(|s| {
        s.agent.orphan_grace = grace;
        s.agent.stop_grace = Duration::from_secs(1);
    })
    .await;
    let orphan = container_by_hand(
        &flotilla,
        HashMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::NODE_ID.to_owned(), flotilla.node_id.to_string()),
            (labels::DEPLOYMENT_ID.to_owned(), uuid::Uuid::now_v7().to_string()),
            (labels::REPLICA_ID.to_owned(), ReplicaId::new().to_string()),
            (labels::REPLICA_INDEX.to_owned(), "0".to_owned()),
        ]),
    )
    .await;

    let first = flotilla.agent().run_pass().await;
    assert_eq!(first.orphans_waiting, 1, "{first:?}");
    assert!(is_container_running(&flotilla, &orphan).await, "not removed within the grace period");

    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let second = flotilla.agent().run_pass().await;
    assert_eq!(second.orphans_removed, 1, "{second:?}");
    let gone = flotilla.docker.docker.inspect_container(&orphan, None::<InspectContainerOptions>).await;
    assert!(gone.is_err(), "the orphan is removed");
    let metrics = flotilla.http.get(format!("{}/metrics", flotilla.base_url)).send().await.expect("metrics");
    let text = metrics.text().await.expect("body");
    assert!(text.contains("flotilla_agent_orphans_removed_total 1"), "reported: {text}");

    flotilla.stop().await;
}

#[tokio::test]
async fn containers_not_labelled_for_this_node_are_never_touched() {
    let flotilla = TestFlotilla::start_with(|s| s.agent.orphan_grace = Duration::ZERO).await;
    let unlabelled = container_by_hand(&flotilla, HashMap::new()).await;
    let other_node = container_by_hand(
        &flotilla,
        HashMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::NODE_ID.to_owned(), "some-other-node".to_owned()),
        ]),
    )
    .await;
    for _ in 0..3 {
        let report = flotilla.agent().run_pass().await;
        assert_eq!(report.containers, 0, "the agent does not even see them: {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(is_container_running(&flotilla, &unlabelled).await);
    assert!(is_container_running(&flotilla, &other_node).await);

    flotilla.stop().await;
}

/// Sends requests until stopped, each to the endpoint of a running replica
/// as the API lists it at that moment (as a proxy would). Counts successes
/// and failures.
struct LoopingClient {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LoopingClient {
    fn start(base_url: &str, id: &str) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (api, id) = (format!("{base_url}/flotilla.v1.DeploymentService/GetDeployment"), id.to_owned());
        let (ok2, failed2, failures2, stop2) = (ok.clone(), failed.clone(), failures.clone(), stop.clone());
        let task = tokio::spawn(async move {
            // A fresh connection per request, as a proxy to a changing backend would have.
            let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
            let mut turn = 0usize;
            while !stop2.is_cancelled() {
                let listed: Value = match client.post(&api).json(&json!({ "id": id })).send().await {
                    Ok(response) => response.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                let endpoints: Vec<String> = listed["deployment"]["replicas"]
                    .as_array()
                    .map(|replicas| {
                        replicas
                            .iter()
                            .filter(|r| r["status"] == "REPLICA_STATUS_RUNNING")
                            .filter_map(|r| r["endpoint"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if endpoints.is_empty() {
                    failed2.fetch_add(1, Ordering::Relaxed);
                    failures2.lock().expect("lock").push(format!("no running replica listed: {listed}"));
                    continue;
                }
                turn += 1;
                let endpoint = &endpoints[turn % endpoints.len()];
                match client.get(format!("{endpoint}/")).send().await {
                    Ok(response) if response.status().is_success() => {
                        ok2.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed2.fetch_add(1, Ordering::Relaxed);
                        failures2.lock().expect("lock").push(format!("{endpoint}: {other:?}"));
                    }
                }
            }
        });
        Self { ok, failed, failures, stop, task }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.cancel();
        self.task.await.expect("client task");
        let failures = self.failures.lock().expect("lock").clone();
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed), failures)
    }
}

fn rollout_state(deployment: &Value) -> String {
    deployment["rollout"]["state"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_new_image_rolls_out_with_no_failed_request() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("rolling", 2).await;
    let before = flotilla.get(&id).await;
    let client = LoopingClient::start(&flotilla.base_url, &id);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (status, updated) = flotilla.connect_json("UpdateDeployment", json!({ "id": id, "image": DEMO_V2 })).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["deployment"]["generation"], "2");
    let (_, done) = flotilla
        .wait_for(&id, Duration::from_secs(60), |status, body| {
            is_running(status, body)
                && rollout_state(&body["deployment"]) == "ROLLOUT_STATE_COMPLETE"
                && body["deployment"]["replicas"].as_array().is_some_and(|r| r.iter().all(|r| r["generation"] == "2"))
        })
        .await;
    // Let the old containers' drain end while the client keeps going.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failed, failures) = client.finish().await;

    assert_eq!(failed, 0, "failed requests during the update: {failures:?}");
    assert!(ok > 100, "the client kept sending ({ok} requests)");
    for index in 0..2 {
        let old = replica_container(&before, index).expect("old container");
        let new = replica_container(&done["deployment"], index).expect("new container");
        assert_ne!(old, new, "replica {index} was replaced");
    }
    for replica in done["deployment"]["replicas"].as_array().expect("replicas") {
        let page = reqwest::get(format!("{}/", replica["endpoint"].as_str().expect("endpoint")))
            .await
            .expect("GET")
            .text()
            .await
            .expect("page");
        assert!(page.contains("version 2"), "{page}");
    }
    // The old containers are gone after the drain: one container per replica.
    assert_eq!(containers_of(&flotilla, &id).await.len(), 2);

    flotilla.stop().await;
}

#[tokio::test]
async fn a_new_image_that_never_becomes_healthy_is_rolled_back() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("rollback", 1).await;
    let serving = replica_container(&flotilla.get(&id).await, 0).expect("a container");
    let client = LoopingClient::start(&flotilla.base_url, &id);

    let (status, body) = flotilla
        .connect_json(
            "UpdateDeployment",
            json!({ "id": id, "image": BROKEN_IMAGE, "healthCheck": { "startupTimeoutMs": 1500 } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, rolled_back) = flotilla
        .wait_for(&id, Duration::from_secs(30), |_, body| {
            rollout_state(&body["deployment"]) == "ROLLOUT_STATE_ROLLED_BACK"
        })
        .await;
    let (ok, failed, failures) = client.finish().await;

    let deployment = &rolled_back["deployment"];
    let message = deployment["rollout"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("rolled back") && message.contains("not healthy"), "{message}");
    assert_eq!(deployment["status"], "DEPLOYMENT_STATUS_RUNNING", "the old version keeps running");
    assert_eq!(replica_container(deployment, 0).as_deref(), Some(serving.as_str()), "the same container serves");
    assert_eq!(failed, 0, "failed requests during the failed update: {failures:?}");
    assert!(ok > 10);
    // The broken container is gone, and is not tried again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let containers = containers_of(&flotilla, &id).await;
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(flotilla.agent().run_pass().await.rollouts_started, 0);

    flotilla.stop().await;
}

#[tokio::test]
async fn two_agents_on_one_engine_keep_their_rows_and_containers_apart() {
    let mut flotilla = TestFlotilla::start().await;
    let second = flotilla.add_agent(1, |_| {}).await;
    // Both nodes registered.
    let started = Instant::now();
    while flotilla.count("SELECT count(*) FROM node_metadata").await < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "second node never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = flotilla.deploy_demo("two-nodes", 2).await;

    let deployment = flotilla.get(&id).await;
    let replicas = deployment["replicas"].as_array().expect("replicas");
    let nodes: std::collections::BTreeSet<&str> = replicas.iter().filter_map(|r| r["nodeId"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "one replica per node: {deployment}");
    for replica in replicas {
        let container = replica["containerId"].as_str().expect("container");
        let inspect = flotilla
            .docker
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .expect("inspect");
        let node_label = inspect.config.and_then(|c| c.labels).and_then(|l| l.get(labels::NODE_ID).cloned());
        assert_eq!(node_label.as_deref(), replica["nodeId"].as_str(), "container labelled for its row's node");
    }
    // Each agent sees only its own container.
    assert_eq!(flotilla.agent().run_pass().await.containers, 1);
    assert_eq!(second.run_pass().await.containers, 1);

    // The second node's container removed: the second agent, and only it, recreates it.
    let on_second = replicas
        .iter()
        .find(|r| r["nodeId"] == second.node_id().as_str())
        .and_then(|r| r["containerId"].as_str())
        .expect("a replica on the second node")
        .to_owned();
    remove_by_hand(&flotilla, &on_second).await;
    let (_, body) = flotilla
        .wait_for(&id, Duration::from_secs(5), |status, body| {
            is_running(status, body)
                && body["deployment"]["replicas"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|r| r["containerId"] != on_second.as_str()))
        })
        .await;
    let recreated = body["deployment"]["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["nodeId"] == second.node_id().as_str()).cloned())
        .expect("still on the second node");
    assert_ne!(recreated["containerId"], on_second.as_str());

    flotilla.stop().await;
}

#[tokio::test]
async fn the_agent_survives_the_docker_socket_going_away_and_recovers_by_itself() {
    let dir = flotilla_e2e::TempDir::new();
    let socket = dir.0.join("docker.sock");
    let proxy = Proxy::unix(&socket, std::path::Path::new("/var/run/docker.sock")).await;
    let socket_path = socket.display().to_string();
    let flotilla = TestFlotilla::start_with(|s| s.docker.socket = Some(socket_path)).await;
    let id = flotilla.deploy_demo("socket", 1).await;
    let old = replica_container(&flotilla.get(&id).await, 0).expect("a container");

    proxy.cut();
    let report = flotilla.agent().run_pass().await;
    assert!(report.error.as_deref().is_some_and(|e| e.contains("unreachable")), "{report:?}");
    let health: Value = flotilla
        .http
        .get(format!("{}/health", flotilla.base_url))
        .send()
        .await
        .expect("/health answers while Docker is away")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["components"]["agent"]["health"], "degraded");
    // While the agent cannot see the engine, its container goes.
    remove_by_hand(&flotilla, &old).await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore().await;
    let (new, _) = wait_replaced(&flotilla, &id, &old, Duration::from_secs(40)).await;
    assert!(is_container_running(&flotilla, &new).await);
    let health: Value = flotilla
        .http
        .get(format!("{}/health", flotilla.base_url))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["components"]["agent"]["health"], "ok", "{health}");
    assert!(flotilla.agent().event_stats().reconnects > 0, "the events stream was resubscribed");

    flotilla.stop().await;
}

#[tokio::test]
async fn containers_keep_running_while_postgresql_is_away_and_changes_apply_when_it_returns() {
    // The daemon reaches PostgreSQL through a proxy this test can cut.
    let admin = std::env::var("FLOTILLA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| flotilla_test_utils::DEFAULT_DATABASE_URL.to_owned());
    let admin: reqwest::Url = admin.parse().expect("database URL");
    let target = std::net::SocketAddr::new(
        admin.host_str().expect("host").parse().expect("an IP host"),
        admin.port().expect("a port"),
    );
    let proxy = Proxy::tcp(target).await;
    let proxy_port = proxy.tcp_address().port();
    let flotilla = TestFlotilla::start_with(move |s| {
        let mut url: reqwest::Url = s.database_url.parse().expect("database URL");
        url.set_port(Some(proxy_port)).expect("port");
        s.database_url = url.to_string();
    })
    .await;
    let id = flotilla.deploy_demo("postgres", 1).await;
    let old = replica_container(&flotilla.get(&id).await, 0).expect("a container");

    proxy.cut();
    let report = flotilla.agent().run_pass().await;
    assert!(report.error.is_some(), "the pass cannot reach PostgreSQL: {report:?}");
    assert!(is_container_running(&flotilla, &old).await, "user containers keep running");
    remove_by_hand(&flotilla, &old).await;
    // The orchestrator says so too, also once it has let its lease go.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: Value =
            flotilla.http.get(format!("{}/health", flotilla.base_url)).send().await.unwrap().json().await.unwrap();
        let orchestrator = &health["components"]["orchestrator"];
        if orchestrator["health"] == "degraded" && orchestrator["detail"]["leader"] == false {
            assert!(orchestrator["message"].as_str().unwrap().contains("lease"), "{orchestrator}");
            break;
        }
        assert!(Instant::now() < deadline, "the orchestrator did not say the database is away: {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    proxy.restore().await;
    let (new, _) = wait_replaced(&flotilla, &id, &old, Duration::from_secs(40)).await;
    assert!(is_container_running(&flotilla, &new).await, "the change was applied once PostgreSQL returned");

    flotilla.stop().await;
}

#[tokio::test]
async fn logs_stream_in_order_with_follow() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("logs", 1).await;
    let deployment = flotilla.get(&id).await;
    let endpoint = deployment["replicas"][0]["endpoint"].as_str().expect("endpoint").to_owned();
    let replica: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM deployment_locations").fetch_one(flotilla.db.pool()).await.expect("replica");

    // The stream subscribes when first read: ask for everything since now.
    let since = chrono::Utc::now().timestamp() as i32 - 1;
    let options = LogOptions { tail: None, follow: true, timestamps: true, since: Some(since) };
    let mut logs = flotilla.agent().replica_logs(ReplicaId::from(replica), &options).await.expect("logs");
    for n in 0..20 {
        let _ = reqwest::get(format!("{endpoint}/n-{n:02}")).await.expect("request");
    }
    let mut seen = Vec::new();
    let mut stamps = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 20 {
        let line = tokio::time::timeout_at(deadline, logs.next())
            .await
            .expect("lines arrive")
            .expect("the stream goes on")
            .expect("a line");
        if let Some(path) = line.text.split("url:").nth(1) {
            seen.push(path.to_owned());
            stamps.push(line.timestamp.clone().expect("a timestamp"));
        }
    }
    let expected: Vec<String> = (0..20).map(|n| format!("/n-{n:02}")).collect();
    assert_eq!(seen, expected, "in order");
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "timestamps never go back: {stamps:?}");

    // Follow: a later request shows up on the same stream.
    let _ = reqwest::get(format!("{endpoint}/after")).await.expect("request");
    loop {
        let line = tokio::time::timeout(Duration::from_secs(5), logs.next())
            .await
            .expect("followed")
            .expect("the stream goes on")
            .expect("a line");
        if line.text.contains("url:/after") {
            break;
        }
    }

    flotilla.stop().await;
}

#[tokio::test]
async fn a_missing_image_fails_the_deployment_with_the_reason() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.create(json!({ "name": "missing", "image": "flotilla/does-not-exist:1", "port": 8080 })).await;
    let (_, body) = flotilla
        .wait_for(&id, Duration::from_secs(60), |_, body| body["deployment"]["status"] == "DEPLOYMENT_STATUS_FAILED")
        .await;
    let message = body["deployment"]["statusMessage"].as_str().unwrap_or_default();
    assert!(message.contains("flotilla/does-not-exist:1") && message.contains("could not be pulled"), "{message}");
    assert!(containers_of(&flotilla, &id).await.is_empty(), "nothing is left half-made");

    flotilla.stop().await;
}

fn replica_health(deployment: &Value) -> String {
    deployment["replicas"][0]["health"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn http_command_and_no_health_checks() {
    let flotilla = TestFlotilla::start().await;
    let http_ok = flotilla
        .create(json!({ "name": "hc-http", "image": DEMO_IMAGE, "port": 8080,
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 200 } }))
        .await;
    let http_missing = flotilla
        .create(json!({ "name": "hc-http-404", "image": DEMO_IMAGE, "port": 8080,
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/missing", "intervalMs": 200,
                "startupTimeoutMs": 1500 } }))
        .await;
    let command = flotilla
        .create(json!({ "name": "hc-command", "image": DEMO_IMAGE, "port": 8080,
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_COMMAND", "intervalMs": 500,
                "command": ["/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/"] } }))
        .await;
    let none = flotilla
        .create(json!({ "name": "hc-none", "image": DEMO_IMAGE, "port": 8080,
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_NONE" } }))
        .await;

    for (id, health) in
        [(&http_ok, "REPLICA_HEALTH_HEALTHY"), (&command, "REPLICA_HEALTH_HEALTHY"), (&none, "REPLICA_HEALTH_NONE")]
    {
        let (_, body) = flotilla.wait_for(id, Duration::from_secs(30), is_running).await;
        assert_eq!(replica_health(&body["deployment"]), health, "{body}");
    }
    // A 404 is not healthy: the deployment says so and why.
    let (_, body) = flotilla
        .wait_for(&http_missing, Duration::from_secs(30), |_, body| {
            body["deployment"]["status"] == "DEPLOYMENT_STATUS_FAILED"
        })
        .await;
    assert_eq!(replica_health(&body["deployment"]), "REPLICA_HEALTH_UNHEALTHY");
    let message = body["deployment"]["statusMessage"].as_str().unwrap_or_default();
    assert!(message.contains("404"), "{message}");

    // Docker runs the command check: its container has a HEALTHCHECK.
    let container = replica_container(&flotilla.get(&command).await, 0).expect("container");
    let inspect =
        flotilla.docker.docker.inspect_container(&container, None::<InspectContainerOptions>).await.expect("inspect");
    let test = inspect.config.and_then(|c| c.healthcheck).and_then(|h| h.test).unwrap_or_default();
    assert_eq!(test.first().map(String::as_str), Some("CMD"), "{test:?}");

    flotilla.stop().await;
}

#[tokio::test]
async fn an_isolated_deployment_gets_a_network_of_its_own_removed_with_it() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla
        .create(json!({ "name": "isolated", "image": DEMO_IMAGE, "port": 8080, "replicas": 2,
            "networkMode": "NETWORK_MODE_ISOLATED" }))
        .await;
    flotilla.wait_for(&id, Duration::from_secs(30), is_running).await;
    let network = format!("flotilla-d-{}", id.replace('-', ""));
    for container in containers_of(&flotilla, &id).await {
        let networks = container.network_settings.and_then(|n| n.networks).unwrap_or_default();
        assert_eq!(networks.keys().cloned().collect::<Vec<_>>(), vec![network.clone()], "only its own network");
    }
    flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
    flotilla.wait_for(&id, Duration::from_secs(30), |status, _| status == 404).await;
    let started = Instant::now();
    while flotilla.docker.docker.inspect_network(&network, None).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "the network outlived its deployment");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    flotilla.stop().await;
}

#[tokio::test]
async fn the_heartbeat_reports_the_node() {
    let flotilla = TestFlotilla::start_with(|s| {
        s.agent.node_labels = [("region".to_owned(), "eu".to_owned())].into_iter().collect();
        s.agent.max_deployments = 7;
    })
    .await;
    flotilla.deploy_demo("beat", 2).await;
    // A heartbeat after the deployment counts it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The swarm tests put the engine in a swarm for a while: the role is the
    // engine's at the heartbeat (checked when it did not change meanwhile).
    let swarm_role = || async {
        let info = flotilla.docker.docker.info().await.expect("engine info");
        let active = info.swarm.and_then(|s| s.local_node_state).is_some_and(|s| s.to_string() == "active");
        if active { "manager" } else { "standalone" }
    };
    let role_before = swarm_role().await;
    let asked = chrono::Utc::now();
    let node = loop {
        let node = flotilla.db.store.node(&flotilla.node_id).await.expect("read").expect("registered");
        if node.last_heartbeat > asked {
            break node;
        }
        assert!(chrono::Utc::now() - asked < chrono::TimeDelta::seconds(10), "no heartbeat for 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if swarm_role().await == role_before {
        assert_eq!(node.role, role_before);
    }
    assert_eq!(node.address, "127.0.0.1");
    assert_eq!(node.availability, "active");
    assert_eq!(node.labels.get("region").map(String::as_str), Some("eu"));
    assert!(node.total_cpu_millis >= 1000 && node.total_memory_bytes > 0, "{node:?}");
    assert!(node.used_memory_bytes > 0 && node.used_memory_bytes <= node.total_memory_bytes, "{node:?}");
    assert!((0..=node.total_cpu_millis).contains(&node.used_cpu_millis), "{node:?}");
    assert_eq!(node.deployment_count, 2);
    assert_eq!(node.max_deployments, 7);
    assert_eq!(node.agent_version, flotilla_agent::AGENT_VERSION);
    assert!(chrono::Utc::now() - node.last_heartbeat < chrono::Duration::seconds(3));

    flotilla.stop().await;
}
