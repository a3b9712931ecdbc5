//! `cluster-failover`, on scripts/cluster.sh's cluster (three engines in
//! their own network namespaces, the real stack, Traefik on node 1): node 3
//! lost `runs` times, by a power cut and a partition in turn. Each loss hits
//! at once, so the figures are paired:
//! - a `fence` deployment and a `replace` deployment, three replicas each
//!   (one per node), each with a client looping through Traefik every 50 ms;
//! - the baseline: a Swarm service of the same image, three replicas spread
//!   over the nodes, rescheduled by Swarm itself (what a Swarm PaaS that
//!   leaves failover to Swarm gets; no edge in front: the routing mesh does
//!   not work here).
//!
//! Measured from the loss: the node down, the lost replica serving
//! elsewhere, routed (the first answer through Traefik from the
//! replacement), requests failed; Swarm's node down and task running
//! elsewhere; after the node's return, the time until one container per
//! replica is left across the engines. Then `drains` drains of node 2 under
//! the same client.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_test_utils::cluster::replica_nodes;
use flotilla_test_utils::{LoopingClient, Sample, TestCluster, unique_suffix, wait_until};
use serde_json::json;

use crate::stats::Samples;

const EVERY: Duration = Duration::from_millis(50);
const LIMIT: Duration = Duration::from_secs(120);
const LOST: usize = 3;

/// What one node loss cost one deployment.
#[derive(Debug, Default)]
struct Moved {
    serving: Duration,
    routed: Duration,
    failed: usize,
    requests: usize,
}

#[derive(Debug, Default)]
struct Figures {
    down: Vec<Duration>,
    fence: Vec<Moved>,
    replace: Vec<Moved>,
    swarm_down: Vec<Duration>,
    swarm_running: Vec<Duration>,
    converged: Vec<Duration>,
}

pub async fn failover(runs: usize, drains: usize, flotillad: &Path) -> anyhow::Result<()> {
    let cluster = TestCluster::ensure(flotillad).await;
    println!("cluster-failover: {runs} losses of node {LOST} of {}, {drains} drains", cluster.addresses.len());
    let mut power = Figures::default();
    let mut partition = Figures::default();
    for run in 0..runs {
        let (how, back, figures) = match run % 2 {
            0 => ("kill-node", "start-node", &mut power),
            _ => ("partition", "heal", &mut partition),
        };
        lose(&cluster, run, how, back, figures).await?;
        cluster.restore().await;
    }
    for (what, figures) in [("power cut", &power), ("partition", &partition)] {
        report(what, figures);
    }
    let mut drained = Vec::new();
    let mut drain_failed = (0, 0);
    for _ in 0..drains {
        let (took, failed, requests) = drain(&cluster).await?;
        drained.push(took);
        drain_failed = (drain_failed.0 + failed, drain_failed.1 + requests);
    }
    if drains > 0 {
        println!("{}", Samples::new(drained).line("drain of node 2: replicas moved"));
        println!("drain: {} of {} requests through Traefik failed", drain_failed.0, drain_failed.1);
    }
    Ok(())
}

fn report(what: &str, figures: &Figures) {
    if figures.down.is_empty() {
        return;
    }
    println!("\n{what} of node {LOST} ({} runs):", figures.down.len());
    let line = |name: &str, samples: Vec<Duration>| println!("  {}", Samples::new(samples).line(name));
    line("flotilla: node down", figures.down.clone());
    for (policy, moved) in [("fence", &figures.fence), ("replace", &figures.replace)] {
        line(&format!("flotilla {policy}: serving elsewhere"), moved.iter().map(|m| m.serving).collect());
        line(&format!("flotilla {policy}: routed"), moved.iter().map(|m| m.routed).collect());
        let (failed, requests) = moved.iter().fold((0, 0), |(f, r), m| (f + m.failed, r + m.requests));
        println!("  flotilla {policy}: {failed} of {requests} requests through Traefik failed");
    }
    line("baseline swarm: node down", figures.swarm_down.clone());
    line("baseline swarm: task running elsewhere", figures.swarm_running.clone());
    line("node back: one copy per replica", figures.converged.clone());
}

/// The nodes (hostnames) the Swarm service's running tasks are on.
async fn swarm_tasks(cluster: &TestCluster, service: &str) -> Vec<String> {
    let out = cluster
        .docker_async(
            1,
            &["service", "ps", service, "--filter", "desired-state=running", "--format", "{{.Node}}|{{.CurrentState}}"],
        )
        .await
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(_, state)| state.starts_with("Running"))
        .map(|(node, _)| node.to_owned())
        .collect()
}

async fn lose(cluster: &TestCluster, run: usize, how: &str, back: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let suffix = unique_suffix();
    let image = cluster.demo_image();
    let (fence, fence_domain) = cluster.create(&format!("bench-fence-{suffix}"), &image, 3, "fence").await;
    let (replace, replace_domain) = cluster.create(&format!("bench-replace-{suffix}"), &image, 3, "replace").await;
    let service = format!("bench-swarm-{suffix}");
    cluster
        .docker_async(
            1,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                &service,
                "--replicas",
                "3",
                "--placement-pref",
                "spread=node.id",
                &image,
            ],
        )
        .await
        .map_err(anyhow::Error::msg)
        .context("creating the baseline Swarm service")?;
    let lost_host = format!("node{LOST}");
    let spread = || async {
        let mut nodes = swarm_tasks(cluster, &service).await;
        nodes.sort();
        nodes.dedup();
        (nodes.len() == 3).then_some(())
    };
    // Swarm places tasks once: a node it took back late gets none until
    // the service is updated.
    if tokio::time::timeout(Duration::from_secs(30), wait_until("the Swarm service spread", LIMIT, spread))
        .await
        .is_err()
    {
        cluster
            .docker_async(1, &["service", "update", "--detach", "--force", &service])
            .await
            .map_err(anyhow::Error::msg)?;
        wait_until("the Swarm service on every node", LIMIT, spread).await;
    }
    let lost_id = cluster.node_id(LOST).await;
    let mut watched = Vec::new();
    for (id, domain) in [(&fence, &fence_domain), (&replace, &replace_domain)] {
        let deployment = cluster.wait_running(id, 3, LIMIT).await;
        let (index, _) = replica_nodes(&deployment)
            .into_iter()
            .find(|(_, node)| *node == lost_id)
            .context("no replica on the node to lose")?;
        wait_until("served through Traefik", LIMIT, || async {
            let answer =
                cluster.http.get(format!("{}/", cluster.edge)).header("host", domain.as_str()).send().await.ok()?;
            (answer.status() == 200 && answer.text().await.ok()?.contains(&format!("replica {index},"))).then_some(())
        })
        .await;
        watched.push((
            id.clone(),
            index,
            LoopingClient::start_at(cluster.edge.clone(), cluster.http.clone(), domain, EVERY),
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let lost_at = Instant::now();
    let since = watched[0].2.now();
    cluster.script(&[how, &LOST.to_string()]);
    let flotilla_down = async {
        wait_until("node down in Flotilla", LIMIT, || async {
            let nodes = cluster.nodes().await;
            nodes.iter().any(|n| n["id"] == lost_id.as_str() && n["status"] == "down").then_some(())
        })
        .await;
        lost_at.elapsed()
    };
    let swarm_down = async {
        wait_until("node down in Swarm", LIMIT, || async {
            let out = cluster.docker_async(1, &["node", "ls", "--format", "{{.Hostname}} {{.Status}}"]).await.ok()?;
            out.lines().any(|l| l == format!("{lost_host} Down")).then_some(())
        })
        .await;
        lost_at.elapsed()
    };
    let swarm_running = async {
        wait_until("the Swarm task running elsewhere", LIMIT, || async {
            let nodes = swarm_tasks(cluster, &service).await;
            (nodes.len() == 3 && !nodes.contains(&lost_host)).then_some(())
        })
        .await;
        lost_at.elapsed()
    };
    let (down, swarm_down, swarm_running, fenced, replaced) = tokio::join!(
        flotilla_down,
        swarm_down,
        swarm_running,
        moved(cluster, &lost_id, &watched[0], since, lost_at),
        moved(cluster, &lost_id, &watched[1], since, lost_at)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut outcomes = Vec::new();
    for (_, _, client) in watched {
        let samples = client.stop().await;
        let failed = samples.iter().filter(|s| s.outcome != Ok(200)).count();
        outcomes.push((failed, samples.len()));
    }
    println!(
        "run {run} ({how}): down {:.1} s; fence serving {:.1} s routed {:.1} s, {} of {} failed; replace serving {:.1} s \
         routed {:.1} s, {} of {} failed; swarm down {:.1} s, running elsewhere {:.1} s",
        down.as_secs_f64(),
        fenced.0.as_secs_f64(),
        fenced.1.as_secs_f64(),
        outcomes[0].0,
        outcomes[0].1,
        replaced.0.as_secs_f64(),
        replaced.1.as_secs_f64(),
        outcomes[1].0,
        outcomes[1].1,
        swarm_down.as_secs_f64(),
        swarm_running.as_secs_f64()
    );
    figures.down.push(down);
    figures.swarm_down.push(swarm_down);
    figures.swarm_running.push(swarm_running);
    figures.fence.push(Moved { serving: fenced.0, routed: fenced.1, failed: outcomes[0].0, requests: outcomes[0].1 });
    figures.replace.push(Moved {
        serving: replaced.0,
        routed: replaced.1,
        failed: outcomes[1].0,
        requests: outcomes[1].1,
    });

    let returned = Instant::now();
    cluster.script(&[back, &LOST.to_string()]);
    wait_until("one container per replica across the engines", LIMIT, || async {
        (cluster.all_containers_of(&fence).len() == 3 && cluster.all_containers_of(&replace).len() == 3).then_some(())
    })
    .await;
    figures.converged.push(returned.elapsed());
    cluster.docker_async(1, &["service", "rm", &service]).await.map_err(anyhow::Error::msg)?;
    cluster.delete(&fence).await;
    cluster.delete(&replace).await;
    Ok(())
}

/// Waits until replica `index` of `id` serves off `lost_id`, then until
/// Traefik answers from it: both since `lost_at`.
async fn moved(
    cluster: &TestCluster,
    lost_id: &str,
    (id, index, client): &(String, u64, LoopingClient),
    since: Duration,
    lost_at: Instant,
) -> (Duration, Duration) {
    let elsewhere = wait_until("the lost replica serving elsewhere", LIMIT, || async {
        let deployment = cluster.deployment(id).await;
        let replica =
            deployment["replicas"].as_array()?.iter().find(|r| r["index"].as_u64().unwrap_or(0) == *index)?.clone();
        (replica["nodeId"] != lost_id && replica["serving"] == true)
            .then(|| replica["nodeId"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    let serving = lost_at.elapsed();
    let page = (format!("replica {index},"), format!("on node {elsewhere}"));
    client
        .wait_for(since, "the replacement through Traefik", LIMIT, |s: &Sample| {
            s.body.contains(&page.0) && s.body.contains(&page.1)
        })
        .await;
    (serving, lost_at.elapsed())
}

/// Drains node 2 under a client looping through Traefik: how long until its
/// replica serves elsewhere, and what failed.
async fn drain(cluster: &TestCluster) -> anyhow::Result<(Duration, usize, usize)> {
    let (id, domain) = cluster.create(&format!("bench-drain-{}", unique_suffix()), &cluster.demo_image(), 3, "").await;
    cluster.wait_running(&id, 3, LIMIT).await;
    wait_until("served through Traefik", LIMIT, || async {
        let answer =
            cluster.http.get(format!("{}/", cluster.edge)).header("host", domain.as_str()).send().await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;
    let node = cluster.node_id(2).await;
    let client = LoopingClient::start_at(cluster.edge.clone(), cluster.http.clone(), &domain, EVERY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let (status, body) = cluster.call("NodeService", "DrainNode", json!({ "id": node })).await;
    anyhow::ensure!(status == 200, "DrainNode: {body}");
    wait_until("node 2 drained", LIMIT, || async {
        let deployment = cluster.deployment(&id).await;
        let placed = replica_nodes(&deployment);
        let serving = deployment["replicas"].as_array()?.iter().filter(|r| r["serving"] == true).count();
        (placed.len() == 3 && placed.iter().all(|(_, n)| *n != node) && serving == 3).then_some(())
    })
    .await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples = client.stop().await;
    let failed = samples.iter().filter(|s| s.outcome != Ok(200)).count();
    println!("drain: {:.1} s, {failed} of {} failed", took.as_secs_f64(), samples.len());
    cluster.restore().await;
    cluster.delete(&id).await;
    Ok((took, failed, samples.len()))
}
