//! Flotilla on a real multi-node cluster (scripts/cluster.sh): three Docker
//! Engines in their own network namespaces joined into one swarm, Flotilla
//! installed by `docker stack deploy` of stack/flotilla.yml, the real
//! Traefik on node 1, images pulled from the cluster's registry. Each test
//! loops a client through Traefik while a node is lost, cut off or drained,
//! and counts what failed.
//!
//! The cluster is shared: the first test brings it up (about 35 s), the
//! others reuse it, one at a time (nextest test group `cluster`).

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use flotilla_test_utils::cluster::replica_nodes;
use flotilla_test_utils::connect::{Envelopes, Frame, envelope};
use flotilla_test_utils::{LoopingClient, Sample, TestCluster, unique_suffix, wait_until};
use serde_json::{Value, json};

const EVERY: Duration = Duration::from_millis(50);

async fn cluster() -> TestCluster {
    TestCluster::ensure(Path::new(env!("CARGO_BIN_EXE_flotillad"))).await
}

async fn create(cluster: &TestCluster, name: &str, image: &str, replicas: u32) -> (String, String) {
    cluster.create(name, image, replicas, "").await
}

fn demo(cluster: &TestCluster) -> String {
    cluster.demo_image()
}

fn index(replica: &Value) -> u64 {
    replica["index"].as_u64().unwrap_or(0)
}

fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.outcome != Ok(200)).collect()
}

fn client(cluster: &TestCluster, domain: &str) -> LoopingClient {
    LoopingClient::start_at(cluster.edge.clone(), cluster.http.clone(), domain, EVERY)
}

/// Waits until Traefik answered for `domain`, 200 with a page that names
/// `needle`.
async fn through_edge(cluster: &TestCluster, domain: &str, needle: &str) {
    wait_until(&format!("{domain} answering with {needle:?} through Traefik"), Duration::from_secs(60), || async {
        let answer = cluster.http.get(format!("{}/", cluster.edge)).header("host", domain).send().await.ok()?;
        let ok = answer.status() == 200;
        (ok && answer.text().await.ok()?.contains(needle)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_spread_over_the_nodes_are_served_measured_and_logged_by_each_node() {
    let cluster = cluster().await;
    // An image no engine has: each node pulls it from the registry.
    let image = format!("{}/flotilla/demo-http:pulled-{}", cluster.registry, unique_suffix());
    for args in [vec!["tag", &demo(&cluster), &image], vec!["push", "-q", &image], vec!["rmi", &image]] {
        cluster.docker(1, &args).expect("a fresh tag in the registry");
    }
    for node in 1..=3 {
        assert!(cluster.docker(node, &["image", "inspect", &image]).is_err(), "node {node} has {image} already");
    }
    let name = format!("spread-{}", unique_suffix());
    let (id, domain) = create(&cluster, &name, &image, 3).await;
    let deployment = cluster.wait_running(&id, 3, Duration::from_secs(120)).await;
    let mut nodes: Vec<usize> = Vec::new();
    for (_, node) in replica_nodes(&deployment) {
        nodes.push(cluster.node_number(&node).await);
    }
    nodes.sort();
    assert_eq!(nodes, [1, 2, 3], "one replica on each node: {deployment}");
    for node in 1..=3 {
        let running = cluster.containers_of(node, &id).expect("the engine answers");
        assert_eq!(running.len(), 1, "node {node} runs its replica from the pulled image");
    }

    // Traefik on node 1 reaches the replicas on nodes 2 and 3.
    for replica in 0..3 {
        through_edge(&cluster, &domain, &format!("replica {replica},")).await;
    }

    // Each node's agent measures its own replica...
    let measured = wait_until("metrics of every replica", Duration::from_secs(60), || async {
        let (status, body) =
            cluster.call("DeploymentService", "GetDeploymentMetrics", json!({ "deploymentId": id })).await;
        assert_eq!(status, 200, "{body}");
        let points = body["points"].as_array().cloned().unwrap_or_default();
        let mut replicas: Vec<u64> = points.iter().map(|p| p["replicaIndex"].as_u64().unwrap_or(0)).collect();
        replicas.sort();
        replicas.dedup();
        (replicas == [0, 1, 2]).then_some(points.len())
    })
    .await;
    // ...and serves its logs: the app logs each request Traefik sent it.
    for replica in 0..3 {
        let lines = logs(&cluster, &id, replica).await;
        assert!(lines.iter().any(|l| l.contains("url:/")), "replica {replica}'s log: {lines:?}");
    }
    eprintln!("spread: replicas on nodes {nodes:?}, {measured} metric points, logs from each node");
    cluster.delete(&id).await;
    assert!(cluster.all_containers_of(&id).is_empty(), "deleted everywhere");
}

/// The last lines of one replica's log, through the API (Connect streaming
/// over JSON: 5-byte envelopes).
async fn logs(cluster: &TestCluster, id: &str, replica: i32) -> Vec<String> {
    let request = serde_json::to_vec(&json!({ "deploymentId": id, "tail": 50, "replicaIndex": replica })).unwrap();
    let answer = cluster
        .http
        .post(format!("{}/flotilla.v1.DeploymentService/StreamDeploymentLogs", cluster.apis[0]))
        .bearer_auth(&cluster.token)
        .header("content-type", "application/connect+json")
        .body(envelope(&request))
        .send()
        .await
        .expect("the logs stream");
    let bytes = answer.bytes().await.expect("the stream's body");
    let mut lines = Vec::new();
    for frame in Envelopes::default().push(&bytes) {
        match frame {
            Frame::Message(json) => {
                let line: Value = serde_json::from_slice(&json).unwrap_or(Value::Null);
                lines.push(line["text"].as_str().unwrap_or_default().to_owned());
            }
            Frame::End(json) => {
                let end: Value = serde_json::from_slice(&json).unwrap_or(Value::Null);
                assert!(end.get("error").is_none(), "the logs stream ended with {end}");
            }
        }
    }
    lines
}

/// What a node's loss cost, measured from the moment it was lost.
struct Loss {
    down: Duration,
    serving: Duration,
    routed: Duration,
    requests: usize,
    failed: Vec<Sample>,
}

impl Loss {
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: down after {:.1} s, replica serving elsewhere after {:.1} s, routed after {:.1} s; \
             {} of {} requests through Traefik failed: {:?}",
            self.down.as_secs_f64(),
            self.serving.as_secs_f64(),
            self.routed.as_secs_f64(),
            self.failed.len(),
            self.requests,
            self.failed.iter().map(|s| (s.at, s.outcome.clone())).collect::<Vec<_>>()
        );
    }
}

/// How a test loses a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lose {
    /// `scripts/cluster.sh kill-node`.
    PowerCut,
    /// `scripts/cluster.sh partition`.
    Partition,
    /// Its agent stopped (as Swarm stops it to update or replace it), then
    /// a power cut before Swarm starts the new one.
    PowerCutWhileAgentRestarts,
}

impl Lose {
    fn script(self) -> &'static str {
        match self {
            Lose::PowerCut | Lose::PowerCutWhileAgentRestarts => "kill-node",
            Lose::Partition => "partition",
        }
    }
}

/// Loses node `lost` (by `how`), with a client looping through Traefik:
/// waits until Flotilla marks it down, runs its replica elsewhere and
/// Traefik serves that replacement.
async fn lose_node(cluster: &TestCluster, lost: usize, how: Lose, name: &str) -> (String, Loss) {
    let (id, domain) = create(cluster, name, &demo(cluster), 3).await;
    let deployment = cluster.wait_running(&id, 3, Duration::from_secs(120)).await;
    let lost_id = cluster.node_id(lost).await;
    let (moved, _) =
        replica_nodes(&deployment).into_iter().find(|(_, node)| *node == lost_id).expect("a replica there");
    through_edge(cluster, &domain, &format!("replica {moved},")).await;
    let client = client(cluster, &domain);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let since = client.now();
    if how == Lose::PowerCutWhileAgentRestarts {
        // Stopped, it says so (its node's silence is then a restart); Swarm
        // starts the next one after its restart delay (2 s).
        cluster.docker(lost, &["stop", &agent_container(cluster, lost)]).expect("stop the agent");
    }
    let lost_at = Instant::now();
    cluster.script(&[how.script(), &lost.to_string()]);
    wait_until(&format!("node {lost} down"), Duration::from_secs(60), || async {
        let nodes = cluster.nodes().await;
        nodes.iter().any(|n| n["id"] == lost_id.as_str() && n["status"] == "down").then_some(())
    })
    .await;
    let down = lost_at.elapsed();
    let elsewhere = wait_until("the lost replica running elsewhere", Duration::from_secs(60), || async {
        let deployment = cluster.deployment(&id).await;
        let replica = deployment["replicas"].as_array()?.iter().find(|r| index(r) == moved)?.clone();
        (replica["nodeId"] != lost_id.as_str() && replica["serving"] == true)
            .then(|| replica["nodeId"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    let serving = lost_at.elapsed();
    let new_node = format!("on node {elsewhere}");
    client
        .wait_for(since, "the replacement serving", Duration::from_secs(30), |s| {
            s.body.contains(&format!("replica {moved},")) && s.body.contains(&new_node)
        })
        .await;
    let routed = lost_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = client.stop().await;
    let failed: Vec<Sample> = failures(&samples).into_iter().cloned().collect();
    (id, Loss { down, serving, routed, requests: samples.len(), failed })
}

#[tokio::test]
async fn a_node_that_loses_power_is_replaced_and_cleaned_up_when_it_returns() {
    let cluster = cluster().await;
    let (id, loss) = lose_node(&cluster, 3, Lose::PowerCut, &format!("power-{}", unique_suffix())).await;
    loss.report("power cut of node 3");
    // Only a request already on its way to the node may be lost.
    assert!(loss.failed.len() <= 1, "{} requests failed", loss.failed.len());

    // Back: its stale container is removed and it takes work again.
    let back = Instant::now();
    cluster.script(&["start-node", "3"]);
    wait_until("node 3's stale replica removed", Duration::from_secs(90), || async {
        // The engine answering with none, not an engine still starting.
        cluster.containers_of(3, &id).is_ok_and(|c| c.is_empty()).then_some(())
    })
    .await;
    let cleaned = back.elapsed();
    cluster.restore().await;
    let (status, body) = cluster.call("DeploymentService", "ScaleDeployment", json!({ "id": id, "replicas": 4 })).await;
    assert_eq!(status, 200, "{body}");
    let deployment = cluster.wait_running(&id, 4, Duration::from_secs(90)).await;
    let node3 = cluster.node_id(3).await;
    assert!(replica_nodes(&deployment).iter().any(|(_, n)| *n == node3), "node 3 takes work again: {deployment}");
    assert_eq!(cluster.all_containers_of(&id).len(), 4, "one container per replica across the engines");
    eprintln!("node 3 back: stale container removed {:.1} s after its engine started", cleaned.as_secs_f64());
    cluster.delete(&id).await;
}

/// The id of node `node`'s agent container.
fn agent_container(cluster: &TestCluster, node: usize) -> String {
    let agent = cluster
        .docker(node, &["ps", "-q", "--filter", "label=com.docker.swarm.service.name=flotilla_agent"])
        .expect("the node's agent container");
    let agent = agent.trim();
    assert!(!agent.is_empty() && !agent.contains('\n'), "one agent container on node {node}: {agent:?}");
    agent.to_owned()
}

#[tokio::test]
async fn a_node_lost_while_its_agent_restarts_is_found_lost_by_its_engine() {
    let cluster = cluster().await;
    // First only a restart: its engine answers, so the node stays up while
    // Swarm starts the next agent.
    let node3 = cluster.node_id(3).await;
    let stopped = agent_container(&cluster, 3);
    cluster.docker(3, &["stop", &stopped]).expect("stop the agent");
    let went_down = std::sync::atomic::AtomicBool::new(false);
    wait_until("node 3's next agent beating", Duration::from_secs(60), || async {
        let nodes = cluster.nodes().await;
        let node = nodes.iter().find(|n| n["id"] == node3.as_str())?;
        if node["status"] == "down" {
            went_down.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let next = cluster.docker(3, &["ps", "-q", "--filter", "label=com.docker.swarm.service.name=flotilla_agent"]);
        let beat = node["lastHeartbeat"].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok())?;
        let restarted = next.is_ok_and(|id| !id.trim().is_empty() && id.trim() != stopped);
        (restarted && (Utc::now() - beat.to_utc()).num_milliseconds() < 2_000).then_some(())
    })
    .await;
    assert!(!went_down.into_inner(), "node 3 taken down while its agent restarted");
    cluster.restore().await;

    let name = format!("restart-cut-{}", unique_suffix());
    let (id, loss) = lose_node(&cluster, 3, Lose::PowerCutWhileAgentRestarts, &name).await;
    loss.report("power cut of node 3 while its agent restarted");
    assert!(loss.failed.len() <= 1, "{} requests failed: {:?}", loss.failed.len(), loss.failed);
    // Its agent said it stops, so it is not asked; its engine is, and does
    // not answer: down well before the heartbeat timeout (15 s), and the
    // `fence` replica moved without waiting out the restart grace (60 s).
    assert!(loss.down < Duration::from_secs(10), "down after {:?}: left to the heartbeat timeout", loss.down);
    assert!(loss.routed < Duration::from_secs(30), "routed after {:?}: held for the restart grace", loss.routed);
    cluster.script(&["start-node", "3"]);
    cluster.restore().await;
    cluster.delete(&id).await;
}

/// A container of replica `index` of `id` on `node`, as its engine tells.
#[derive(Debug)]
struct Run {
    node: usize,
    running: bool,
    started: DateTime<Utc>,
    finished: Option<DateTime<Utc>>,
}

/// Every container (running or not) of replica `index` of `id`, on every
/// engine.
fn runs(cluster: &TestCluster, id: &str, index: u64) -> Vec<Run> {
    let (deployment, replica) =
        (format!("label=flotilla.deployment.id={id}"), format!("label=flotilla.replica.index={index}"));
    let mut runs = Vec::new();
    for node in 1..=cluster.addresses.len() {
        let ids =
            cluster.docker(node, &["ps", "-aq", "--filter", &deployment, "--filter", &replica]).unwrap_or_default();
        for container in ids.lines() {
            let Ok(state) = cluster.docker(
                node,
                &["inspect", "-f", "{{.State.Running}} {{.State.StartedAt}} {{.State.FinishedAt}}", container],
            ) else {
                continue;
            };
            let fields: Vec<&str> = state.split_whitespace().collect();
            let time = |i: usize| fields.get(i).and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc());
            // Docker says 0001-01-01 for "never finished".
            let finished = time(2).filter(|t| t.timestamp() > 0);
            if let Some(started) = time(1) {
                runs.push(Run { node, running: fields.first() == Some(&"true"), started, finished });
            }
        }
    }
    runs
}

#[tokio::test]
async fn a_node_cut_off_is_replaced_and_no_replica_runs_twice_once_it_is_back() {
    let cluster = cluster().await;
    // Beside the default (`fence`) deployment lose_node makes: one that
    // prefers running twice to waiting.
    let (replaced, _) =
        cluster.create(&format!("cut-replace-{}", unique_suffix()), &demo(&cluster), 3, "replace").await;
    let before = cluster.wait_running(&replaced, 3, Duration::from_secs(120)).await;
    let node3 = cluster.node_id(3).await;
    let (replaced_index, _) =
        replica_nodes(&before).into_iter().find(|(_, n)| *n == node3).expect("a replica on node 3");

    let (id, loss) = lose_node(&cluster, 3, Lose::Partition, &format!("cut-{}", unique_suffix())).await;
    loss.report("partition of node 3");
    assert!(loss.failed.len() <= 1, "{} requests failed: {:?}", loss.failed.len(), loss.failed);

    // `fence`: node 3 stopped its copy before the replacement started.
    let cut_index = replica_nodes(&cluster.deployment(&id).await)
        .into_iter()
        .map(|(i, _)| i)
        .find(|i| runs(&cluster, &id, *i).iter().any(|r| r.node == 3))
        .expect("a container of the fenced deployment on node 3");
    let fenced = runs(&cluster, &id, cut_index);
    let old = fenced.iter().find(|r| r.node == 3).expect("node 3's container");
    let new = fenced.iter().find(|r| r.node != 3 && r.running).expect("the replacement");
    assert!(!old.running, "node 3 fenced its copy: {fenced:?}");
    let gap = new.started - old.finished.expect("stopped");
    assert!(gap > chrono::TimeDelta::zero(), "the copy stopped before the replacement started: {fenced:?}");
    eprintln!("fence: node 3's copy stopped {:.1} s before its replacement started", gap.as_seconds_f64());
    // `replace`: moved at once, node 3's copy ran on meanwhile.
    let both = wait_until("the replace deployment's replacement running", Duration::from_secs(30), || async {
        let runs = runs(&cluster, &replaced, replaced_index);
        (runs.iter().filter(|r| r.running).count() == 2).then_some(runs)
    })
    .await;
    assert!(both.iter().any(|r| r.node == 3 && r.running), "node 3's copy runs on during the cut: {both:?}");

    let healed = Instant::now();
    cluster.script(&["heal", "3"]);
    wait_until("one container per replica across the engines", Duration::from_secs(90), || async {
        let running = (cluster.all_containers_of(&id), cluster.all_containers_of(&replaced));
        (running.0.len() == 3 && running.1.len() == 3).then_some(running)
    })
    .await;
    let converged = healed.elapsed();
    cluster.restore().await;
    // Stays so: node 3's agent does not start its old replicas again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for deployment in [&id, &replaced] {
        let running = cluster.all_containers_of(deployment);
        assert_eq!(
            running.len(),
            3,
            "no replica runs twice after the heal: containers by node {running:?}; nodes {:?}; deployment {}",
            cluster.nodes().await,
            cluster.deployment(deployment).await
        );
    }
    eprintln!("partition healed: converged in {:.1} s", converged.as_secs_f64());
    cluster.delete(&id).await;
    cluster.delete(&replaced).await;
}

#[tokio::test]
async fn draining_a_node_moves_its_replicas_without_a_failed_request() {
    let cluster = cluster().await;
    let (id, domain) = create(&cluster, &format!("drain-{}", unique_suffix()), &demo(&cluster), 3).await;
    cluster.wait_running(&id, 3, Duration::from_secs(120)).await;
    // Traefik takes the route moments after the API says it runs.
    through_edge(&cluster, &domain, "Hello from").await;
    let client = client(&cluster, &domain);
    let node2 = cluster.node_id(2).await;
    let started = Instant::now();
    let (status, body) = cluster.call("NodeService", "DrainNode", json!({ "id": node2 })).await;
    assert_eq!(status, 200, "{body}");
    wait_until("node 2 emptied", Duration::from_secs(90), || async {
        let deployment = cluster.deployment(&id).await;
        let moved = replica_nodes(&deployment).iter().all(|(_, n)| *n != node2);
        let emptied = cluster.containers_of(2, &id).is_ok_and(|c| c.is_empty());
        (moved && emptied && deployment["status"] == "DEPLOYMENT_STATUS_RUNNING").then_some(())
    })
    .await;
    let drained = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = client.stop().await;
    let failed = failures(&samples);
    eprintln!("drain of node 2: {:.1} s, {} of {} requests failed", drained.as_secs_f64(), failed.len(), samples.len());
    assert!(failed.is_empty(), "{failed:?}");
    let (status, body) = cluster.call("NodeService", "ActivateNode", json!({ "id": node2 })).await;
    assert_eq!(status, 200, "{body}");
    let nodes = cluster.nodes().await;
    assert!(nodes.iter().any(|n| n["id"] == node2.as_str() && n["availability"] == "active"), "{nodes:?}");
    cluster.delete(&id).await;
}

#[tokio::test]
async fn the_orchestrator_leader_s_node_lost_another_leads_and_nothing_is_placed_twice() {
    let cluster = cluster().await;
    let (status, body) = cluster.call("NodeService", "ListNodes", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let leader = body["leader"].as_str().unwrap_or_default().to_owned();
    // The stack names an orchestrator's host after its node.
    let lost: usize = leader
        .strip_prefix("orchestrator@node")
        .and_then(|rest| rest.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the leader {leader:?} names its node"));
    assert_ne!(lost, 1, "orchestrators run off the edge node");
    let lost_address = cluster.addresses[lost - 1].clone();
    let lost_at = Instant::now();
    cluster.script(&["kill-node", &lost.to_string()]);
    let new_leader = wait_until("another orchestrator leading", Duration::from_secs(60), || async {
        let (_, body) = cluster.call("NodeService", "ListNodes", json!({})).await;
        let now = body["leader"].as_str().unwrap_or_default().to_owned();
        (!now.is_empty() && now != leader).then_some(now)
    })
    .await;
    let took_over = lost_at.elapsed();
    // The new leader's node watch, not the old leader's, notices the loss.
    wait_until("the lost node marked down", Duration::from_secs(60), || async {
        let nodes = cluster.nodes().await;
        nodes.iter().any(|n| n["address"] == lost_address.as_str() && n["status"] == "down").then_some(())
    })
    .await;
    let down_after = lost_at.elapsed();
    // The new leader places a new deployment, each replica once.
    let (id, domain) = create(&cluster, &format!("lead-{}", unique_suffix()), &demo(&cluster), 2).await;
    let deployment = cluster.wait_running(&id, 2, Duration::from_secs(120)).await;
    through_edge(&cluster, &domain, "Hello from").await;
    let indexes: Vec<u64> = replica_nodes(&deployment).into_iter().map(|(i, _)| i).collect();
    assert_eq!(indexes, [0, 1], "{deployment}");
    assert_eq!(cluster.all_containers_of(&id).len(), 2, "each replica placed once");
    eprintln!(
        "leader {leader} lost with node {lost}: {new_leader} leads after {:.1} s, node down after {:.1} s",
        took_over.as_secs_f64(),
        down_after.as_secs_f64()
    );
    cluster.restore().await;
    assert_eq!(cluster.all_containers_of(&id).len(), 2, "still each replica once with node {lost} back");
    cluster.delete(&id).await;
}

#[tokio::test]
async fn the_control_database_restarted_loses_nothing_and_the_agents_catch_up() {
    let cluster = cluster().await;
    let (id, domain) = create(&cluster, &format!("db-{}", unique_suffix()), &demo(&cluster), 2).await;
    cluster.wait_running(&id, 2, Duration::from_secs(120)).await;
    // Traefik takes the route moments after the API says it runs.
    through_edge(&cluster, &domain, "Hello from").await;
    let client = client(&cluster, &domain);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.script(&["restart-db"]);
    // Everything is still there, and the cluster works on.
    let deployment = cluster.wait_running(&id, 2, Duration::from_secs(60)).await;
    assert_eq!(deployment["replicas"].as_array().map(Vec::len), Some(2));
    let restarted = Instant::now();
    cluster.restore().await;
    let (second, second_domain) = create(&cluster, &format!("db2-{}", unique_suffix()), &demo(&cluster), 1).await;
    cluster.wait_running(&second, 1, Duration::from_secs(120)).await;
    through_edge(&cluster, &second_domain, "Hello from").await;
    let caught_up = restarted.elapsed();
    let samples = client.stop().await;
    let failed = failures(&samples);
    eprintln!(
        "database restarted: a new deployment served {:.1} s later; {} of {} requests failed",
        caught_up.as_secs_f64(),
        failed.len(),
        samples.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    cluster.delete(&id).await;
    cluster.delete(&second).await;
}
