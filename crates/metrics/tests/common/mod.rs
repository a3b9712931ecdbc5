//! What the metrics pipeline's tests share: containers labelled as a
//! Flotilla agent would label them (for a node id unique to the test), made
//! from the demo image with a shell command, and independent readings of
//! their counters to check the pipeline against.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, StatsOptionsBuilder};
use flotilla_docker::{DockerClient, DockerConfig};
use flotilla_metrics::{MetricsConfig, MetricsPipeline, SourceChoice};
use flotilla_store::metrics::MetricsStore;
use flotilla_telemetry::Telemetry;
use flotilla_test_utils::{DEMO_IMAGE, TestDocker};
use flotilla_types::{DeploymentId, NodeId, OrganizationId, labels};
use futures::StreamExt;

/// Keeps one core... half of it, with a 0.5 CPU limit.
pub const CPU_LOOP: &str = "while :; do :; done";
/// Serves a 2 MiB file, /big.
pub const BIG_FILE_SERVER: &str = "/bin/busybox mkdir -p /www && /bin/busybox dd if=/dev/zero of=/www/big bs=1024 \
     count=2048 2>/dev/null && exec /bin/busybox httpd -f -p 8080 -h /www";
pub const BIG_FILE_BYTES: u64 = 2048 * 1024;
/// Does nothing, cheaply.
pub const SLEEPER: &str = "exec /bin/busybox sleep 3600";

pub struct Fixture {
    pub docker: TestDocker,
    pub client: DockerClient,
    pub node: NodeId,
    pub organization: OrganizationId,
}

impl Fixture {
    pub async fn new() -> Self {
        flotilla_test_utils::init_tracing();
        let docker = TestDocker::new().await;
        docker.require_demo_image().await;
        let client = DockerClient::connect(&DockerConfig::default()).await.expect("Docker");
        let node = docker.node_id(0);
        Self { docker, client, node, organization: OrganizationId::new() }
    }

    /// Starts a managed container of `deployment` running `/bin/busybox sh -c script`.
    pub async fn start(
        &self,
        deployment: DeploymentId,
        index: i32,
        script: &str,
        nano_cpus: i64,
        memory: i64,
    ) -> String {
        let mut container_labels = self.docker.labels();
        container_labels.extend([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::NODE_ID.to_owned(), self.node.to_string()),
            (labels::DEPLOYMENT_ID.to_owned(), deployment.to_string()),
            (labels::ORGANIZATION_ID.to_owned(), self.organization.to_string()),
            (labels::REPLICA_INDEX.to_owned(), index.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(DEMO_IMAGE.to_owned()),
            entrypoint: Some(vec!["/bin/busybox".to_owned(), "sh".to_owned(), "-c".to_owned(), script.to_owned()]),
            labels: Some(container_labels),
            host_config: Some(HostConfig {
                nano_cpus: (nano_cpus > 0).then_some(nano_cpus),
                memory: (memory > 0).then_some(memory),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let name = format!("flotilla-test-{}-{}", self.docker.test_id, flotilla_test_utils::unique_suffix());
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let id = self.docker.docker.create_container(Some(options), body).await.expect("create").id;
        self.docker.docker.start_container(&id, None).await.expect("start");
        id
    }

    pub async fn ip(&self, id: &str) -> IpAddr {
        let inspect = self.docker.docker.inspect_container(id, None).await.expect("inspect");
        let networks = inspect.network_settings.and_then(|n| n.networks).unwrap_or_default();
        networks.values().find_map(|e| e.ip_address.as_deref().and_then(|ip| ip.parse().ok())).expect("an address")
    }

    pub async fn pid(&self, id: &str) -> u32 {
        let inspect = self.docker.docker.inspect_container(id, None).await.expect("inspect");
        inspect.state.and_then(|s| s.pid).expect("a pid") as u32
    }

    /// A pipeline for this test's node with its own telemetry.
    pub async fn pipeline(
        &self,
        config: MetricsConfig,
        store: Option<MetricsStore>,
    ) -> (Arc<MetricsPipeline>, Telemetry) {
        self.pipeline_with(self.client.clone(), config, store).await
    }

    pub async fn pipeline_with(
        &self,
        client: DockerClient,
        config: MetricsConfig,
        store: Option<MetricsStore>,
    ) -> (Arc<MetricsPipeline>, Telemetry) {
        self.pipeline_full(client, config, store, None).await
    }

    pub async fn pipeline_full(
        &self,
        client: DockerClient,
        config: MetricsConfig,
        store: Option<MetricsStore>,
        feed: Option<flotilla_redis::LiveFeed>,
    ) -> (Arc<MetricsPipeline>, Telemetry) {
        let telemetry = Telemetry::new("metrics-test", "0");
        let pipeline = MetricsPipeline::new(config, self.node.clone(), client, store, feed, telemetry.clone())
            .await
            .expect("pipeline");
        (pipeline, telemetry)
    }
}

pub fn config(source: SourceChoice) -> MetricsConfig {
    MetricsConfig { source, ..MetricsConfig::default() }
}

/// Downloads /big from `ip` `times` times; returns the bytes received.
pub async fn download(ip: IpAddr, times: usize) -> u64 {
    let client = reqwest::Client::new();
    let mut total = 0;
    for _ in 0..times {
        let body =
            client.get(format!("http://{ip}:8080/big")).send().await.expect("GET /big").bytes().await.expect("body");
        total += body.len() as u64;
    }
    total
}

/// Waits until the server in the container answers.
pub async fn wait_serving(ip: IpAddr) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    for _ in 0..100 {
        if client.get(format!("http://{ip}:8080/big")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the container at {ip} never served /big");
}

/// The container's CPU time from its cgroup files, read here independently
/// of the pipeline (v1 `cpuacct.usage`, or v2 `cpu.stat`).
pub fn cgroup_cpu_ns(id: &str) -> u64 {
    let v1 = format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage");
    if let Ok(text) = std::fs::read_to_string(&v1) {
        return text.trim().parse().expect("cpuacct.usage");
    }
    for dir in [format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"), format!("/sys/fs/cgroup/docker/{id}")] {
        if let Ok(text) = std::fs::read_to_string(format!("{dir}/cpu.stat")) {
            let usec: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .expect("usage_usec");
            return usec * 1000;
        }
    }
    panic!("no cgroup CPU file for {id}");
}

/// What `docker stats` shows, from the engine's stats API.
#[derive(Debug, Clone, Copy)]
pub struct EngineStats {
    pub cpu_ns: u64,
    /// Usage minus inactive file cache, as the docker CLI computes it.
    pub memory_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub pids: u64,
}

pub async fn engine_stats(docker: &TestDocker, id: &str) -> EngineStats {
    let options = StatsOptionsBuilder::default().stream(false).one_shot(true).build();
    let stats = docker.docker.stats(id, Some(options)).next().await.expect("stats").expect("stats ok");
    let memory = stats.memory_stats.expect("memory stats");
    let inactive: u64 = memory
        .stats
        .as_ref()
        .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied())
        .unwrap_or(0);
    let networks: HashMap<String, _> = stats.networks.unwrap_or_default();
    EngineStats {
        cpu_ns: stats.cpu_stats.and_then(|c| c.cpu_usage).and_then(|u| u.total_usage).expect("cpu"),
        memory_bytes: memory.usage.unwrap_or(0).saturating_sub(inactive),
        net_rx_bytes: networks.values().map(|n| n.rx_bytes.unwrap_or(0)).sum(),
        net_tx_bytes: networks.values().map(|n| n.tx_bytes.unwrap_or(0)).sum(),
        pids: stats.pids_stats.and_then(|p| p.current).unwrap_or(0),
    }
}

/// `/proc/<pid>/net/dev` of the container's init, every interface but lo:
/// (received, sent).
pub fn proc_net_bytes(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).expect("net/dev");
    text.lines().skip(2).fold((0, 0), |(rx, tx), line| {
        let (name, rest) = line.split_once(':').expect("an interface line");
        if name.trim() == "lo" {
            return (rx, tx);
        }
        let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().expect("a number")).collect();
        (rx + fields[0], tx + fields[8])
    })
}

/// `|a - b| <= tolerance * |b|` (plus an absolute slack for values near 0).
pub fn close(a: f64, b: f64, tolerance: f64, slack: f64) -> bool {
    (a - b).abs() <= tolerance * b.abs() + slack
}

/// Serves `telemetry`'s routes (`/health`, `/metrics`, ...) on a loopback
/// port until the returned token is cancelled; returns the base URL.
pub async fn serve_telemetry(telemetry: &Telemetry) -> (String, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("address");
    let cancel = tokio_util::sync::CancellationToken::new();
    let router = telemetry.router::<()>();
    let stop = cancel.clone().cancelled_owned();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).with_graceful_shutdown(stop).await;
    });
    (format!("http://{address}"), cancel)
}

/// `GET base/path`: status and JSON body.
pub async fn get_json(base: &str, path: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("{base}{path}")).await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}
