//! The HA data plane on the real cluster (scripts/cluster.sh with
//! `FLOTILLA_CLUSTER_DATA=ha`: PostgreSQL under Patroni with etcd, Redis
//! with Sentinel, each member on its own node). Each test loses a part of
//! it while a client deploys, scales and reads through the API and an app
//! is served through Traefik, then compares what the client was told with
//! what is stored: nothing acknowledged may be lost.
//!
//! Shares the cluster with the other cluster tests (nextest test group
//! `cluster`, one at a time).

use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_test_utils::{LoopingClient, TestCluster, unique_suffix, wait_until};
use serde_json::{Value, json};

async fn cluster() -> TestCluster {
    let cluster = TestCluster::ensure(Path::new(env!("CARGO_BIN_EXE_flotillad"))).await;
    assert!(
        cluster.data_leader("pg").await.is_some(),
        "these tests need the HA data plane: scripts/cluster.sh down, then run them again (they bring it up \
         with FLOTILLA_CLUSTER_DATA=ha); members: {:?}",
        cluster.data_members().await
    );
    cluster
}

/// What the API answered to one write.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Acked,
    /// An error answer (`unavailable` while the database fails over):
    /// the write may or may not have been made.
    Refused(String),
    /// No API replica answered.
    Silence,
}

/// One write and what the client was told, when.
#[derive(Debug, Clone)]
struct Write {
    at: Instant,
    what: WriteKind,
    answer: Answer,
}

#[derive(Debug, Clone, PartialEq)]
enum WriteKind {
    /// A deployment created with this name (its id if acknowledged).
    Create { name: String, id: Option<String> },
    /// The scaled deployment set to this many replicas.
    Scale(u32),
}

#[derive(Default)]
struct Reads {
    ok: usize,
    failed: usize,
}

/// A client doing what users do, in a loop, until `stop`: a deployment
/// created every 8th turn, the `scaled` deployment scaled between 1 and 2
/// every other turn, reads in between.
async fn client_loop(
    cluster: &TestCluster,
    prefix: &str,
    scaled: &str,
    stop: &AtomicBool,
    writes: &Mutex<Vec<Write>>,
    reads: &Mutex<Reads>,
) {
    let answer = |result: Result<(u16, Value), String>| match result {
        Ok((200, body)) => (Answer::Acked, body),
        Ok((status, body)) => (Answer::Refused(format!("{status} {}", body["code"])), body),
        Err(_) => (Answer::Silence, Value::Null),
    };
    let mut turn = 0u32;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let at = Instant::now();
        if turn.is_multiple_of(8) {
            let name = format!("{prefix}-{turn}");
            let body = json!({ "name": name, "image": cluster.demo_image(), "port": 8080, "replicas": 1 });
            let (answer, body) = answer(cluster.try_call("DeploymentService", "CreateDeployment", body).await);
            let id = body["deployment"]["id"].as_str().map(str::to_owned);
            writes.lock().unwrap().push(Write { at, what: WriteKind::Create { name, id }, answer });
        } else if turn.is_multiple_of(2) {
            let replicas = 1 + (turn / 2) % 2;
            let body = json!({ "id": scaled, "replicas": replicas });
            let (answer, _) = answer(cluster.try_call("DeploymentService", "ScaleDeployment", body).await);
            writes.lock().unwrap().push(Write { at, what: WriteKind::Scale(replicas), answer });
        } else {
            let listed = cluster.try_call("DeploymentService", "ListDeployments", json!({})).await;
            let mut reads = reads.lock().unwrap();
            match listed {
                Ok((200, _)) => reads.ok += 1,
                _ => reads.failed += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// What a fault cost, as the client and the app's visitors saw it.
struct Outcome {
    /// Fault to the first write acknowledged after it.
    first_write: Duration,
    writes: usize,
    acked: usize,
    refused_or_unanswered: usize,
    reads: (usize, usize),
    requests: usize,
    /// Requests through Traefik that failed: when, from the fault, and how.
    requests_failed: Vec<(f64, String)>,
}

impl Outcome {
    fn report(&self, what: &str) {
        eprintln!(
            "{what}: first write acknowledged {:.1} s after; {} writes, {} acknowledged, {} refused or unanswered; \
             reads {} ok, {} failed; {} of {} requests through Traefik failed: {:?}",
            self.first_write.as_secs_f64(),
            self.writes,
            self.acked,
            self.refused_or_unanswered,
            self.reads.0,
            self.reads.1,
            self.requests_failed.len(),
            self.requests,
            self.requests_failed
        );
    }
}

/// Runs the client loop and an app's visitors around `fault`, then checks
/// that every acknowledged write is stored: each acknowledged deployment
/// exists, and the scaled one holds its last acknowledged size or the size
/// of a later write whose answer was not a success (it may have been
/// made). Returns what it cost.
async fn under_load<F, Fut>(cluster: &TestCluster, label: &str, fault: F) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let prefix = format!("{label}-{}", unique_suffix());
    let (app, domain) = cluster.create(&format!("{prefix}-app"), &cluster.demo_image(), 3, "replace").await;
    cluster.wait_running(&app, 3, Duration::from_secs(120)).await;
    let (scaled, _) = cluster.create(&format!("{prefix}-scaled"), &cluster.demo_image(), 1, "").await;
    cluster.wait_running(&scaled, 1, Duration::from_secs(120)).await;
    wait_until("the app answering through Traefik", Duration::from_secs(60), || async {
        let answer = cluster.http.get(format!("{}/", cluster.edge)).header("host", &domain).send().await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    let visitors =
        LoopingClient::start_at(cluster.edge.clone(), cluster.http.clone(), &domain, Duration::from_millis(50));

    let (stop, writes, reads) = (AtomicBool::new(false), Mutex::new(Vec::new()), Mutex::new(Reads::default()));
    let clients = client_loop(cluster, &prefix, &scaled, &stop, &writes, &reads);
    let acked_after =
        |since: Instant| writes.lock().unwrap().iter().filter(|w| w.at >= since && w.answer == Answer::Acked).count();
    let run = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let fault_at = Instant::now();
        let fault_on_visitors_clock = visitors.now();
        fault().await;
        // Writes acknowledged again, several of them.
        wait_until("writes acknowledged after the fault", Duration::from_secs(90), || async {
            (acked_after(fault_at) >= 6).then_some(())
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        (fault_at, fault_on_visitors_clock)
    };
    let ((), (fault_at, fault_on_visitors_clock)) = tokio::join!(clients, run);
    let samples = visitors.stop().await;
    let writes = writes.into_inner().unwrap();
    let reads = reads.into_inner().unwrap();
    let first_write = writes
        .iter()
        .filter(|w| w.at >= fault_at && w.answer == Answer::Acked)
        .map(|w| w.at - fault_at)
        .min()
        .unwrap_or_default();

    // Nothing acknowledged lost.
    for write in writes.iter().filter(|w| w.answer == Answer::Acked) {
        if let WriteKind::Create { name, id } = &write.what {
            let id = id.as_deref().unwrap_or_else(|| panic!("{name}: acknowledged without an id"));
            let stored = cluster.read("DeploymentService", "GetDeployment", json!({ "id": id })).await;
            assert_eq!(stored["deployment"]["name"], name.as_str(), "acknowledged deployment {name} lost");
        }
    }
    let scales: Vec<&Write> = writes.iter().filter(|w| matches!(w.what, WriteKind::Scale(_))).collect();
    let last_acked = scales.iter().rposition(|w| w.answer == Answer::Acked).expect("a scale acknowledged");
    let possible: Vec<u32> = scales[last_acked..]
        .iter()
        .enumerate()
        .filter(|(i, w)| *i == 0 || w.answer != Answer::Acked)
        .filter_map(|(_, w)| if let WriteKind::Scale(n) = w.what { Some(n) } else { None })
        .collect();
    let stored = cluster.read("DeploymentService", "GetDeployment", json!({ "id": scaled })).await;
    let stored = stored["deployment"]["replicaCount"].as_u64().unwrap_or(u64::MAX) as u32;
    assert!(
        possible.contains(&stored),
        "scaled deployment holds {stored}; the client was told {possible:?} at the end"
    );

    // Placing resumed: a deployment made now runs.
    let (after, _) = cluster.create(&format!("{prefix}-after"), &cluster.demo_image(), 1, "").await;
    cluster.wait_running(&after, 1, Duration::from_secs(90)).await;

    // Clean up what the client made, acknowledged or not.
    let listed = cluster.read("DeploymentService", "ListDeployments", json!({ "pageSize": 200 })).await;
    for deployment in listed["deployments"].as_array().cloned().unwrap_or_default() {
        if deployment["name"].as_str().is_some_and(|n| n.starts_with(&prefix)) {
            cluster.delete(deployment["id"].as_str().unwrap_or_default()).await;
        }
    }
    let acked = writes.iter().filter(|w| w.answer == Answer::Acked).count();
    Outcome {
        first_write,
        writes: writes.len(),
        acked,
        refused_or_unanswered: writes.len() - acked,
        reads: (reads.ok, reads.failed),
        requests: samples.len(),
        requests_failed: samples
            .iter()
            .filter(|s| s.outcome != Ok(200))
            .map(|s| {
                let at = s.at.as_secs_f64() - fault_on_visitors_clock.as_secs_f64();
                ((at * 10.0).round() / 10.0, format!("{:?}", s.outcome))
            })
            .collect(),
    }
}

#[tokio::test]
async fn the_primary_s_node_lost_twice_in_a_row_loses_no_acknowledged_write() {
    let cluster = cluster().await;
    for round in 1..=2 {
        // Wherever it is: on node 1, Traefik is lost with it and the
        // visitors' failures count the edge's loss too (reported only).
        let primary = cluster.data_leader("pg").await.expect("a PostgreSQL primary");
        let outcome = under_load(&cluster, &format!("pgloss{round}"), || async {
            cluster.script(&["kill-node", &primary.to_string()]);
        })
        .await;
        outcome.report(&format!("primary's node {primary} lost (round {round})"));
        let now = cluster.data_leader("pg").await.expect("a new primary");
        assert_ne!(now, primary, "a standby took over");
        assert!(outcome.first_write < Duration::from_secs(30), "first write {:?} after the loss", outcome.first_write);
        cluster.restore().await;
    }
}

#[tokio::test]
async fn the_etcd_member_beside_the_primary_killed_changes_nothing_for_clients() {
    let cluster = cluster().await;
    let primary = cluster.data_leader("pg").await.expect("a PostgreSQL primary");
    let outcome = under_load(&cluster, "etcdkill", || async {
        cluster.script(&["kill-member", &format!("etcd{primary}")]);
    })
    .await;
    outcome.report(&format!("etcd{primary} killed beside the primary"));
    assert_eq!(cluster.data_leader("pg").await, Some(primary), "the primary kept its leader key");
    cluster.restore().await;
}

#[tokio::test]
async fn the_redis_master_killed_loses_nothing_and_placing_goes_on() {
    let cluster = cluster().await;
    let master = cluster.data_leader("redis").await.expect("a Redis master");
    let outcome = under_load(&cluster, "rediskill", || async {
        cluster.script(&["kill-member", &format!("redis{master}")]);
    })
    .await;
    outcome.report(&format!("redis{master} (the master) killed"));
    // One master again, with both others replicating it (restore waits for
    // that): a new one, or the old one if Swarm started it again before
    // the sentinels agreed it was down.
    cluster.restore().await;
    eprintln!("Redis master now redis{:?}", cluster.data_leader("redis").await);
}
