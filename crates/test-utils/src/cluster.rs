//! The multi-node cluster of `scripts/cluster.sh`, shared by the cluster
//! tests: the first test brings it up (about 35 s), later ones reuse it.
//! `up` is idempotent and repackages flotillad only when the binary the test
//! gives changed. Tests take it one at a time (they cut nodes off), and each
//! starts by undoing what an earlier one may have left: every node started,
//! linked and active, and ready in Flotilla.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};

use crate::wait_until;

/// Cluster tests in one process take turns (nextest runs them in a test
/// group of one).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Nodes the tests' cluster has.
pub const CLUSTER_NODES: usize = 3;

pub struct TestCluster {
    /// `http://address:port` of each node's API replica, node 1 first.
    pub apis: Vec<String>,
    /// Each node's address, node 1 first.
    pub addresses: Vec<String>,
    pub token: String,
    /// Traefik on node 1: `http://address:80`.
    pub edge: String,
    /// The platform domain: apps under it are routed at once.
    pub domain: String,
    /// The registry the nodes pull from (`address:port`).
    pub registry: String,
    pub http: reqwest::Client,
    script: PathBuf,
    _turn: MutexGuard<'static, ()>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl TestCluster {
    /// The cluster, up and running `flotillad` (packaged into its image),
    /// with every node back and ready.
    pub async fn ensure(flotillad: &Path) -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let script = root().join("scripts/cluster.sh");
        // The HA data plane unless told otherwise: the tests lose nodes
        // that hold PostgreSQL and Redis members.
        let data = std::env::var("FLOTILLA_CLUSTER_DATA").unwrap_or_else(|_| "ha".to_owned());
        let up = Command::new(&script)
            .args(["up", &CLUSTER_NODES.to_string()])
            .env("FLOTILLA_BINARY", flotillad)
            .env("FLOTILLA_CLUSTER_DATA", &data)
            .output()
            .expect("scripts/cluster.sh runs");
        assert!(
            up.status.success(),
            "scripts/cluster.sh up failed:\n{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        let env = run(&script, &["env"]).expect("scripts/cluster.sh env");
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")).map(str::to_owned))
                .unwrap_or_else(|| panic!("cluster.sh env has no {name}: {env}"))
        };
        let addresses: Vec<String> = var("FLOTILLA_CLUSTER_ADDRESSES").split(',').map(str::to_owned).collect();
        let api_port = var("FLOTILLA_API").rsplit(':').next().expect("the API's port").to_owned();
        let cluster = Self {
            apis: addresses.iter().map(|a| format!("http://{a}:{api_port}")).collect(),
            addresses,
            token: var("FLOTILLA_TOKEN"),
            edge: var("FLOTILLA_CLUSTER_EDGE"),
            domain: var("FLOTILLA_CLUSTER_DOMAIN"),
            registry: var("FLOTILLA_CLUSTER_REGISTRY"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("HTTP client"),
            script,
            _turn: turn,
        };
        cluster.restore().await;
        cluster
    }

    /// Every node's engine started and link up, active in Flotilla, and
    /// every node ready.
    pub async fn restore(&self) {
        for node in 1..=self.addresses.len() {
            self.script(&["heal", &node.to_string()]);
            self.script(&["start-node", &node.to_string()]);
        }
        // Ready, and beating now: an agent Swarm just restarted (after a
        // heal, an update) keeps its node `ready` until the timeout.
        let beating = |node: &Value| {
            node["lastHeartbeat"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| (chrono::Utc::now() - t.to_utc()).num_milliseconds() < 3_000)
        };
        // And Swarm done replacing agent tasks: it replaces a returned
        // node's agent some seconds after the node is back, and a node lost
        // while its agent restarts is a case of its own, not a test's
        // leftover.
        let nodes =
            wait_until("every node ready and beating, its agent task settled", Duration::from_secs(120), || async {
                let settled = self.settled().await;
                let nodes = self.nodes().await;
                (settled
                    && nodes.len() == self.addresses.len()
                    && nodes.iter().all(|n| n["status"] == "ready" && beating(n)))
                .then_some(nodes)
            })
            .await;
        for node in nodes.iter().filter(|n| n["availability"] != "active") {
            let (status, body) = self.call("NodeService", "ActivateNode", json!({ "id": node["id"] })).await;
            assert_eq!(status, 200, "activating {node}: {body}");
        }
    }

    /// `scripts/cluster.sh settled`: no service updating, every node Ready
    /// in the swarm with one agent task running, none starting or stopping.
    pub async fn settled(&self) -> bool {
        let script = self.script.clone();
        tokio::task::spawn_blocking(move || run(&script, &["settled"]).is_ok()).await.unwrap_or(false)
    }

    /// scripts/cluster.sh, for a caller that runs it itself (off the async
    /// threads, say).
    pub fn script_path(&self) -> PathBuf {
        self.script.clone()
    }

    /// `scripts/cluster.sh ARGS`: its output; panics if it fails.
    pub fn script(&self, args: &[&str]) -> String {
        run(&self.script, args).unwrap_or_else(|e| panic!("scripts/cluster.sh {args:?}: {e}"))
    }

    /// The docker CLI against node `node`'s engine (1-based).
    pub fn docker(&self, node: usize, args: &[&str]) -> Result<String, String> {
        run(&self.script, &docker_args(node, args))
    }

    /// [`Self::docker`] off the async threads (for loops that must keep
    /// time while the CLI runs).
    pub async fn docker_async(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let (script, args) = (self.script.clone(), docker_args(node, args));
        tokio::task::spawn_blocking(move || run(&script, &args)).await.map_err(|e| e.to_string())?
    }

    /// A Connect JSON call of `flotilla.v1.SERVICE/METHOD` as the cluster's
    /// administrator, on the first node whose API answers.
    pub async fn call(&self, service: &str, method: &str, body: Value) -> (u16, Value) {
        self.try_call(service, method, body).await.unwrap_or_else(|last| panic!("no API replica answers; last: {last}"))
    }

    /// [`Self::call`], or why no API replica answered.
    pub async fn try_call(&self, service: &str, method: &str, body: Value) -> Result<(u16, Value), String> {
        let mut last = String::new();
        for api in &self.apis {
            let sent = self
                .http
                .post(format!("{api}/flotilla.v1.{service}/{method}"))
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    return Ok((status, response.json().await.unwrap_or(Value::Null)));
                }
                Err(error) => last = format!("{api}: {error}"),
            }
        }
        Err(last)
    }

    /// The HA data plane's members (`scripts/cluster.sh data`): name, node
    /// number and what the member says it is (`master`, `replica`,
    /// `slave`...).
    pub async fn data_members(&self) -> Vec<(String, usize, String)> {
        let script = self.script.clone();
        let out =
            tokio::task::spawn_blocking(move || run(&script, &["data"])).await.unwrap_or_else(|e| Err(e.to_string()));
        out.unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let name = words.next()?.to_owned();
                let node = words.nth(1)?.parse().ok()?;
                Some((name, node, words.next().unwrap_or_default().to_owned()))
            })
            .collect()
    }

    /// The node of the member of `kind` (`pg`, `redis`) that leads now.
    pub async fn data_leader(&self, kind: &str) -> Option<usize> {
        self.data_members()
            .await
            .into_iter()
            .find(|(name, _, role)| {
                name.strip_prefix(kind).is_some_and(|n| n.parse::<u8>().is_ok())
                    && (role == "master" || role == "primary")
            })
            .map(|(_, node, _)| node)
    }

    /// A read, asked again while the API answers unavailable (the control
    /// database failing over, with the HA data plane); any other answer but
    /// success fails the test.
    pub async fn read(&self, service: &str, method: &str, body: Value) -> Value {
        wait_until(&format!("{method} answering"), Duration::from_secs(60), || async {
            let (status, answer) = self.call(service, method, body.clone()).await;
            if status == 503 && answer["code"] == "unavailable" {
                return None;
            }
            assert_eq!(status, 200, "{method}: {answer}");
            Some(answer)
        })
        .await
    }

    pub async fn nodes(&self) -> Vec<Value> {
        let body = self.read("NodeService", "ListNodes", json!({})).await;
        body["nodes"].as_array().cloned().unwrap_or_default()
    }

    /// The 1-based number of the node with Flotilla id `id`.
    pub async fn node_number(&self, id: &str) -> usize {
        let nodes = self.nodes().await;
        let node = nodes.iter().find(|n| n["id"] == id).unwrap_or_else(|| panic!("no node {id}"));
        self.number_of_address(node["address"].as_str().unwrap_or_default())
    }

    pub fn number_of_address(&self, address: &str) -> usize {
        1 + self.addresses.iter().position(|a| a == address).unwrap_or_else(|| panic!("no node at {address}"))
    }

    /// The Flotilla id of node `number`.
    pub async fn node_id(&self, number: usize) -> String {
        let nodes = self.nodes().await;
        let node = nodes.iter().find(|n| n["address"] == self.addresses[number - 1].as_str()).expect("node listed");
        node["id"].as_str().unwrap_or_default().to_owned()
    }

    pub async fn deployment(&self, id: &str) -> Value {
        self.read("DeploymentService", "GetDeployment", json!({ "id": id })).await["deployment"].clone()
    }

    /// Waits until the deployment runs `replicas` healthy replicas, and
    /// returns it.
    pub async fn wait_running(&self, id: &str, replicas: usize, limit: Duration) -> Value {
        wait_until(&format!("{id} running {replicas} replicas"), limit, || async {
            let deployment = self.deployment(id).await;
            let running = deployment["replicas"]
                .as_array()
                .map(|r| r.iter().filter(|r| r["status"] == "REPLICA_STATUS_RUNNING" && r["serving"] == true).count())
                .unwrap_or(0);
            (deployment["status"] == "DEPLOYMENT_STATUS_RUNNING" && running == replicas).then_some(deployment)
        })
        .await
    }

    /// Deletes a deployment and waits until it is gone.
    pub async fn delete(&self, id: &str) {
        let (status, body) = self.call("DeploymentService", "DeleteDeployment", json!({ "id": id })).await;
        assert_eq!(status, 200, "{body}");
        wait_until(&format!("{id} deleted"), Duration::from_secs(60), || async {
            let (status, _) = self.call("DeploymentService", "GetDeployment", json!({ "id": id })).await;
            (status == 404).then_some(())
        })
        .await;
    }

    /// Creates `name` with `replicas` replicas of `image`, one per node
    /// (`spread`), routed at `name.<platform domain>`, checked over HTTP
    /// every 500 ms, with node-loss policy `node_loss` (empty: the
    /// default); returns its id and domain.
    pub async fn create(&self, name: &str, image: &str, replicas: u32, node_loss: &str) -> (String, String) {
        let domain = format!("{name}.{}", self.domain);
        let (status, body) = self
            .call(
                "DeploymentService",
                "CreateDeployment",
                json!({
                    "name": name, "image": image, "port": 8080, "domain": domain, "replicas": replicas,
                    "placement": { "strategy": "spread", "nodeLoss": node_loss },
                    "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 500 }
                }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (body["deployment"]["id"].as_str().expect("id").to_owned(), domain)
    }

    /// The demo app in the cluster's registry.
    pub fn demo_image(&self) -> String {
        format!("{}/flotilla/demo-http:1", self.registry)
    }

    /// Running containers of deployment `id` on every engine that answers
    /// (a node that is off runs nothing), by node number.
    pub fn all_containers_of(&self, id: &str) -> Vec<(usize, String)> {
        (1..=self.addresses.len())
            .flat_map(|node| self.containers_of(node, id).unwrap_or_default().into_iter().map(move |c| (node, c)))
            .collect()
    }

    /// Running containers of deployment `id` on node `node`'s engine; an
    /// error when the engine does not answer.
    pub fn containers_of(&self, node: usize, id: &str) -> Result<Vec<String>, String> {
        let filter = format!("label=flotilla.deployment.id={id}");
        self.docker(node, &["ps", "-q", "--filter", &filter]).map(|out| out.lines().map(str::to_owned).collect())
    }
}

/// A deployment's replicas as (replica index, node id), by index.
pub fn replica_nodes(deployment: &Value) -> Vec<(u64, String)> {
    let mut placed: Vec<(u64, String)> = deployment["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| (r["index"].as_u64().unwrap_or(0), r["nodeId"].as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    placed.sort();
    placed
}

/// `scripts/cluster.sh docker NODE ARGS...`'s arguments.
fn docker_args(node: usize, args: &[&str]) -> Vec<String> {
    ["docker".to_owned(), node.to_string()].into_iter().chain(args.iter().map(|a| (*a).to_owned())).collect()
}

fn run(script: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Result<String, String> {
    let output = Command::new(script).args(args).output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
    }
}
