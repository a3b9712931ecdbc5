//! The node agent as a real Swarm global service: the `flotillad` binary in
//! an image built here (no registry), one task per node, registering under
//! its Swarm node id and running what the orchestrator places on it.
//!
//! Runs where the engine can be in a swarm (see docs/environment.md); the
//! swarm is joined for the test and left afterwards if it was not active.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    Mount, MountType, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode, SwarmInitRequest, TaskSpec,
    TaskSpecContainerSpec,
};
use bollard::query_parameters::{
    LeaveSwarmOptionsBuilder, ListContainersOptionsBuilder, ListTasksOptionsBuilder, RemoveImageOptionsBuilder,
};
use flotilla_daemon::{Daemon, DaemonSettings, MetricsSettings, Roles};
use flotilla_test_utils::{DEMO_IMAGE, TEST_LABEL, TestDb, TestDocker, TestRedis, block_on_cleanup};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Swarm state and objects made for the test, undone on drop.
struct SwarmFixture {
    docker: Docker,
    joined: bool,
    service: Option<String>,
    image: Option<String>,
}

impl SwarmFixture {
    /// Joins a single-node swarm unless the engine is in one; `None` when the
    /// engine cannot.
    async fn ensure(docker: &Docker) -> Option<Self> {
        let active = docker
            .info()
            .await
            .ok()
            .and_then(|i| i.swarm)
            .and_then(|s| s.local_node_state)
            .is_some_and(|s| s.to_string() == "active");
        let mut joined = false;
        if !active {
            let request = SwarmInitRequest {
                listen_addr: Some("127.0.0.1:2377".to_owned()),
                advertise_addr: Some("127.0.0.1".to_owned()),
                ..Default::default()
            };
            if let Err(error) = docker.init_swarm(request).await {
                eprintln!("SKIPPED: this engine cannot enter swarm mode: {error}");
                return None;
            }
            joined = true;
        }
        Some(Self { docker: docker.clone(), joined, service: None, image: None })
    }
}

impl Drop for SwarmFixture {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let (service, image, joined) = (self.service.take(), self.image.take(), self.joined);
        block_on_cleanup(async move {
            if let Some(service) = service {
                let _ = docker.delete_service(&service).await;
                // Its task's container goes shortly after.
                let filters = HashMap::from([("label", vec![format!("com.docker.swarm.service.name={service}")])]);
                for _ in 0..50 {
                    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
                    if docker.list_containers(Some(options)).await.map(|c| c.is_empty()).unwrap_or(true) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if let Some(image) = image {
                let options = RemoveImageOptionsBuilder::default().force(true).build();
                let _ = docker.remove_image(&image, Some(options), None).await;
            }
            if joined {
                let _ = docker.leave_swarm(Some(LeaveSwarmOptionsBuilder::default().force(true).build())).await;
            }
        });
    }
}

/// Builds an image holding this test's `flotillad` and the shared
/// libraries it links, from scratch: nothing is pulled.
fn build_flotillad_image(tag: &str) {
    let binary = Path::new(env!("CARGO_BIN_EXE_flotillad"));
    let context = std::env::temp_dir().join(format!("flotillad-image-{}", flotilla_test_utils::unique_suffix()));
    let root = context.join("rootfs");
    std::fs::create_dir_all(root.join("usr/local/bin")).expect("context");
    std::fs::copy(binary, root.join("usr/local/bin/flotillad")).expect("copy the binary");
    let ldd = Command::new("ldd").arg(binary).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
        let path = line.split("=>").last().and_then(|s| s.split_whitespace().next()).unwrap_or_default();
        if path.starts_with('/') {
            let target = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().expect("parent")).expect("lib dir");
            std::fs::copy(path, &target).expect("copy a library");
        }
    }
    std::fs::create_dir_all(root.join("tmp")).expect("tmp");
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/usr/local/bin/flotillad\"]\n",
    )
    .expect("Dockerfile");
    let built = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(&context)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build");
    let _ = std::fs::remove_dir_all(&context);
    assert!(built.status.success(), "image build failed: {}", String::from_utf8_lossy(&built.stderr));
}

async fn call(http: &reqwest::Client, api: &str, method: &str, body: Value) -> Value {
    http.post(format!("{api}/flotilla.v1.DeploymentService/{method}"))
        .json(&body)
        .send()
        .await
        .expect("API")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test]
async fn the_node_agent_runs_as_a_swarm_global_service() {
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let Some(mut swarm) = SwarmFixture::ensure(&docker.docker).await else { return };
    let swarm_node = docker.docker.info().await.expect("info").swarm.and_then(|s| s.node_id).expect("a swarm node id");
    let db = TestDb::empty().await;
    let redis = TestRedis::new().await;

    // API and orchestrator in this process; the agent only in the swarm.
    let mut settings = DaemonSettings {
        roles: Roles { api: true, orchestrator: true, agent: false },
        database_url: db.url.clone(),
        redis: Some((redis.url.clone(), redis.prefix.clone())),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        auth: flotilla_daemon::AuthSettings::InsecureDevelopment,
        docker: Default::default(),
        agent: Default::default(),
        orchestrator: Default::default(),
        metrics: MetricsSettings::default(),
        rate_limits: Default::default(),
        shutdown_grace: Duration::from_secs(5),
        internal_token: None,
        domains: Default::default(),
        certificates: None,
    };
    settings.orchestrator.interval = Duration::from_secs(1);
    let daemon = Daemon::start(settings, CancellationToken::new()).await.expect("API and orchestrator");
    let api = format!("http://{}", daemon.local_addr);

    let image = format!("flotilla/flotillad:test-{}", docker.test_id);
    build_flotillad_image(&image);
    swarm.image = Some(image.clone());
    let agent_port = flotilla_test_utils::free_port();
    let service_name = format!("flotilla-agent-{}", docker.test_id);
    let spec = ServiceSpec {
        name: Some(service_name.clone()),
        labels: Some(HashMap::from([(TEST_LABEL.to_owned(), docker.test_id.clone())])),
        mode: Some(ServiceSpecMode { global: Some(HashMap::new()), ..Default::default() }),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.clone()),
                args: Some(
                    [
                        "agent",
                        "--database-url",
                        &db.url,
                        "--redis-url",
                        &redis.url,
                        "--redis-prefix",
                        &redis.prefix,
                        "--listen",
                        &format!("127.0.0.1:{agent_port}"),
                        "--publish-ip",
                        "127.0.0.1",
                        "--heartbeat-interval",
                        "1s",
                        "--container-label",
                        &format!("{TEST_LABEL}={}", docker.test_id),
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                ),
                mounts: Some(vec![Mount {
                    typ: Some(MountType::BIND),
                    source: Some("/var/run/docker.sock".to_owned()),
                    target: Some("/var/run/docker.sock".to_owned()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            // The host's network: PostgreSQL and Redis listen on its loopback here.
            networks: Some(vec![NetworkAttachmentConfig { target: Some("host".to_owned()), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker.docker.create_service(spec, None).await.expect("create the global service");
    swarm.service = Some(service_name.clone());

    // The agent's task registers the node under its Swarm id.
    let started = Instant::now();
    loop {
        let nodes = db.store.list_nodes().await.expect("nodes");
        if let Some(node) = nodes.iter().find(|n| n.node_id.as_str() == swarm_node) {
            assert_eq!(node.role, "manager");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the global service never registered its node");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let filters = HashMap::from([("service", vec![service_name.clone()])]);
    let tasks = docker
        .docker
        .list_tasks(Some(ListTasksOptionsBuilder::default().filters(&filters).build()))
        .await
        .expect("tasks");
    assert_eq!(tasks.len(), 1, "one task per node in global mode: {tasks:?}");

    // A deployment lands on the swarm node and serves.
    let http = reqwest::Client::new();
    let created =
        call(&http, &api, "CreateDeployment", json!({ "name": "swarm", "image": DEMO_IMAGE, "port": 8080 })).await;
    let id = created["deployment"]["id"].as_str().expect("id").to_owned();
    let deployment = loop {
        let got = call(&http, &api, "GetDeployment", json!({ "id": id })).await;
        if got["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING" {
            break got["deployment"].clone();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never running: {got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(deployment["replicas"][0]["nodeId"], swarm_node.as_str());
    let endpoint = deployment["replicas"][0]["endpoint"].as_str().expect("endpoint");
    let page = reqwest::get(format!("{endpoint}/")).await.expect("GET").text().await.expect("page");
    assert!(page.contains("Hello from swarm"), "{page}");
    assert!(page.contains(&swarm_node), "the page names the swarm node: {page}");

    // Delete it while the agent still runs, so it removes the container.
    call(&http, &api, "DeleteDeployment", json!({ "id": id })).await;
    loop {
        let got = http
            .post(format!("{api}/flotilla.v1.DeploymentService/GetDeployment"))
            .json(&json!({ "id": id }))
            .send()
            .await
            .expect("API");
        if got.status().as_u16() == 404 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(150), "never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.shutdown().await;
}
