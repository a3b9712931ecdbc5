//! Flotilla on a real swarm, from the image built here (no registry):
//! - the node agent as a global service, one task per node, registering under
//!   its Swarm node id and running what the orchestrator places on it;
//! - `docker stack deploy` of the real stack file (stack/flotilla.yml): agent,
//!   orchestrators and API come up, the agent registers its node, an app is
//!   deployed through the API, and a rolling update of every flotillad
//!   service keeps the app (and an API replica) answering throughout.
//!
//! Runs where the engine can be in a swarm (see docs/environment.md); the
//! swarm is joined for the test and left afterwards if it was not active.
//! One test at a time: nextest puts this binary in the `swarm` group
//! (.config/nextest.toml), and [`SWARM`] does the same under `cargo test`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use flotilla_test_utils::oidc::TEST_AUDIENCE;
use flotilla_test_utils::proxy::Proxy;
use flotilla_test_utils::{DEMO_IMAGE, TEST_LABEL, TestDb, TestDocker, TestOidcProvider, TestRedis, block_on_cleanup};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Held by each test for its whole run (see the module's comment).
static SWARM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Swarm state and objects made for the test, undone on drop.
struct SwarmFixture {
    docker: Docker,
    joined: bool,
    service: Option<String>,
    images: Vec<String>,
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
        Some(Self { docker: docker.clone(), joined, service: None, images: Vec::new() })
    }
}

impl Drop for SwarmFixture {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let (service, images, joined) = (self.service.take(), std::mem::take(&mut self.images), self.joined);
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
            for image in images {
                let options = RemoveImageOptionsBuilder::default().force(true).build();
                let _ = docker.remove_image(&image, Some(options), None).await;
            }
            if joined {
                let _ = docker.leave_swarm(Some(LeaveSwarmOptionsBuilder::default().force(true).build())).await;
            }
        });
    }
}

/// Builds the flotillad image with the install's own script, around this
/// test's `flotillad` (the script copies the libraries it links): nothing is
/// pulled.
fn build_flotillad_image(tag: &str) {
    build_image(tag, Path::new(env!("CARGO_BIN_EXE_flotillad")));
}

/// The image script around another `binary` (one that is not flotillad
/// makes an image that cannot run).
fn build_image(tag: &str, binary: &Path) {
    let built = Command::new(root().join("scripts/build-flotillad-image.sh"))
        .args(["--tag", tag, "--binary"])
        .arg(binary)
        .output()
        .expect("the image script runs");
    assert!(built.status.success(), "image build failed: {}", String::from_utf8_lossy(&built.stderr));
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Connect JSON call of DeploymentService, with `token` as the bearer
/// token (none: the development mode without authentication); the HTTP
/// status and the answer.
async fn call(http: &reqwest::Client, api: &str, token: Option<&str>, method: &str, body: Value) -> (u16, Value) {
    let mut request = http.post(format!("{api}/flotilla.v1.DeploymentService/{method}")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What a swarm test starts from: its turn, the engine in a swarm (`None`
/// where it cannot be), this node's Swarm id, a database and a Redis prefix.
async fn swarm_test()
-> Option<(tokio::sync::MutexGuard<'static, ()>, TestDocker, SwarmFixture, String, TestDb, TestRedis)> {
    let turn = SWARM.lock().await;
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let swarm = SwarmFixture::ensure(&docker.docker).await?;
    let swarm_node = docker.docker.info().await.expect("info").swarm.and_then(|s| s.node_id).expect("a swarm node id");
    Some((turn, docker, swarm, swarm_node, TestDb::empty().await, TestRedis::new().await))
}

#[tokio::test]
async fn the_node_agent_runs_as_a_swarm_global_service() {
    let Some((_one_at_a_time, docker, mut swarm, swarm_node, db, redis)) = swarm_test().await else { return };

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
        route_table: Default::default(),
    };
    settings.orchestrator.interval = Duration::from_secs(1);
    let daemon = Daemon::start(settings, CancellationToken::new()).await.expect("API and orchestrator");
    let api = format!("http://{}", daemon.local_addr);

    let image = format!("flotilla/flotillad:test-{}", docker.test_id);
    build_flotillad_image(&image);
    swarm.images.push(image.clone());
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
        call(&http, &api, None, "CreateDeployment", json!({ "name": "swarm", "image": DEMO_IMAGE, "port": 8080 }))
            .await
            .1;
    let id = created["deployment"]["id"].as_str().expect("id").to_owned();
    let deployment = loop {
        let (_, got) = call(&http, &api, None, "GetDeployment", json!({ "id": id })).await;
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
    call(&http, &api, None, "DeleteDeployment", json!({ "id": id })).await;
    loop {
        if call(&http, &api, None, "GetDeployment", json!({ "id": id })).await.0 == 404 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(150), "never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.shutdown().await;
}

/// `docker ARGS`, its stdout; `Err` with what it said when it fails.
fn docker_cli(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker").args(args).output().map_err(|e| format!("docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn unix_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    i64::try_from(now.as_secs()).expect("seconds")
}

/// A proxy on `ip` to the service at `url` (`scheme://[user@]ip:port[/path]`),
/// and `url` pointing at the proxy instead.
async fn proxied(url: &str, ip: IpAddr) -> (Proxy, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, service) = match authority.rsplit_once('@') {
        Some((user, service)) => (format!("{user}@"), service),
        None => (String::new(), authority),
    };
    let proxy = Proxy::tcp_on(ip, service.parse().expect("an IP:port service address")).await;
    let url = format!("{scheme}://{userinfo}{}{path}", proxy.tcp_address());
    (proxy, url)
}

/// docker_gwbridge addresses of a service's running containers: how this
/// host reaches a container that is only on overlay networks.
fn task_addresses(service: &str) -> Vec<String> {
    let filter = format!("label=com.docker.swarm.service.name={service}");
    let running =
        docker_cli(&["ps", "-q", "--no-trunc", "--filter", &filter, "--filter", "status=running"]).unwrap_or_default();
    let bridge = docker_cli(&[
        "network",
        "inspect",
        "docker_gwbridge",
        "--format",
        "{{range $id, $c := .Containers}}{{$id}} {{$c.IPv4Address}}\n{{end}}",
    ])
    .unwrap_or_default();
    let addresses: HashMap<&str, &str> = bridge
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(id, address)| (id, address.split('/').next().unwrap_or(address)))
        .collect();
    running.lines().filter_map(|id| addresses.get(id.trim()).map(|a| (*a).to_owned())).collect()
}

/// The secrets stack/flotilla.yml names, as stack/create-secrets.sh makes them.
const STACK_SECRETS: [&str; 10] = [
    "flotilla_postgres_password",
    "flotilla_replication_password",
    "flotilla_db_password",
    "flotilla_redis_password",
    "flotilla_database_url",
    "flotilla_redis_url",
    "flotilla_grafana_password",
    "flotilla_certificate_key",
    "flotilla_internal_token",
    "flotilla_traefik_static",
];

/// A stack deployed from the real stack file and a test override, with the
/// secrets (suffixed with the test id), node label and volumes it needed;
/// all removed on drop.
struct Stack {
    name: String,
    suffix: String,
    overlay: PathBuf,
    env: Vec<(String, String)>,
    node: String,
    /// Node labels this test added (removed on drop).
    labelled: Vec<&'static str>,
}

impl Stack {
    fn deploy(&self, image: &str) -> Duration {
        let started = Instant::now();
        let stack_file = root().join("stack/flotilla.yml");
        let output = Command::new("docker")
            .args(["stack", "deploy", "--resolve-image", "never", "-c"])
            .arg(&stack_file)
            .arg("-c")
            .arg(&self.overlay)
            .arg(&self.name)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("FLOTILLA_IMAGE", image)
            .output()
            .expect("docker stack deploy runs");
        assert!(
            output.status.success(),
            "docker stack deploy failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        started.elapsed()
    }

    fn service(&self, service: &str) -> String {
        format!("{}_{service}", self.name)
    }

    /// `{{.Image}}` of a service's tasks that should be running.
    fn task_images(&self, service: &str) -> Vec<String> {
        docker_cli(&[
            "service",
            "ps",
            &self.service(service),
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Image}}",
        ])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Deploys the stack with `image` while the app at `endpoint` and the
    /// API replicas are asked all the time, and waits until the update ends
    /// in `done` with every task on `running`: how long that took, and what
    /// the app and the API replicas answered meanwhile.
    async fn update_watched(
        &self,
        http: &reqwest::Client,
        (endpoint, host): (&str, &str),
        image: &str,
        done: &str,
        running: &str,
    ) -> (Duration, AvailabilityReport, AvailabilityReport) {
        let watch = Watch::start(http, endpoint, host, &self.service("api"));
        let started = Instant::now();
        let since = unix_now() - 1;
        self.deploy(image);
        self.wait_update(since, done, running).await;
        let took = started.elapsed();
        let (app, api) = watch.finish().await;
        (took, app, api)
    }

    /// Waits until the update of every flotillad service that began after
    /// `since` (Unix seconds) ended in `done` (`completed`,
    /// `rollback_completed`) with all its tasks on `image`; fails on any
    /// other end, or after five minutes.
    async fn wait_update(&self, since: i64, done: &str, image: &str) {
        let started = Instant::now();
        for service in ["agent", "orchestrator", "api"] {
            loop {
                let (began, state) = self.update_state(service);
                let current = began >= since;
                let images = self.task_images(service);
                if current && state.starts_with(done) && !images.is_empty() && images.iter().all(|i| i == image) {
                    break;
                }
                let ended_otherwise = current
                    && !state.starts_with(done)
                    && ["completed", "paused", "rollback_completed", "rollback_paused"]
                        .iter()
                        .any(|end| state.starts_with(end));
                let tasks =
                    || docker_cli(&["service", "ps", "--no-trunc", &self.service(service)]).unwrap_or_else(|e| e);
                assert!(!ended_otherwise, "{service}: the update ended in {state}, not {done}\n{}", tasks());
                assert!(
                    started.elapsed() < Duration::from_secs(300),
                    "{service}: still {state}, not {done}\n{}",
                    tasks()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// When the service's last update began (Unix seconds; 0: none yet), and
    /// its state and message.
    fn update_state(&self, service: &str) -> (i64, String) {
        let format = "{{if .UpdateStatus}}{{.UpdateStatus.StartedAt.Unix}} {{.UpdateStatus.State}} {{.UpdateStatus.Message}}{{end}}";
        let status =
            docker_cli(&["service", "inspect", &self.service(service), "--format", format]).unwrap_or_else(|e| e);
        match status.split_once(' ') {
            Some((began, state)) if began.parse::<i64>().is_ok() => {
                (began.parse().unwrap_or_default(), state.to_owned())
            }
            _ => (0, status),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let namespace = format!("label=com.docker.stack.namespace={}", self.name);
        let _ = docker_cli(&["stack", "rm", &self.name]);
        for _ in 0..150 {
            if docker_cli(&["ps", "-aq", "--filter", &namespace]).is_ok_and(|ids| ids.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Networks go once their last container has; volumes after that.
        for _ in 0..50 {
            let networks = docker_cli(&["network", "ls", "-q", "--filter", &namespace]).unwrap_or_default();
            if networks.is_empty() {
                break;
            }
            for network in networks.lines() {
                let _ = docker_cli(&["network", "rm", network]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for volume in docker_cli(&["volume", "ls", "-q", "--filter", &namespace]).unwrap_or_default().lines() {
            let _ = docker_cli(&["volume", "rm", volume]);
        }
        for secret in STACK_SECRETS {
            let _ = docker_cli(&["secret", "rm", &format!("{secret}{}", self.suffix)]);
        }
        for label in &self.labelled {
            let _ = docker_cli(&["node", "update", "--label-rm", label, &self.node]);
        }
        let _ = std::fs::remove_file(&self.overlay);
    }
}

/// What the stack's override changes for a single-node test swarm: the
/// data plane (tests/cluster.rs runs it) and the services whose images
/// cannot be had here (Prometheus, Grafana: no registry) run no task, and flotillad reaches the host's
/// PostgreSQL and Redis through the secrets instead. The agent advertises
/// the host's address on docker_gwbridge (`gateway`): the swarm advertises
/// 127.0.0.1, which Traefik's container would take for itself. Everything
/// else, Traefik included, is the real file.
fn stack_override(suffix: &str, test_id: &str, redis_prefix: &str, gateway: IpAddr) -> String {
    let flotillad = format!("    environment:\n      FLOTILLA_REDIS_PREFIX: \"{redis_prefix}\"\n");
    let mut yaml = String::from("version: \"3.8\"\nservices:\n");
    yaml.push_str(&format!(
        "  agent:\n{flotillad}      FLOTILLA_HEARTBEAT_INTERVAL: 1s\n      FLOTILLA_CONTAINER_LABELS: \"{TEST_LABEL}={test_id}\"\n      FLOTILLA_ADVERTISE_ADDRESS: \"{gateway}\"\n"
    ));
    // Two replicas and start-first updates on one node need room for three.
    for service in ["orchestrator", "api"] {
        yaml.push_str(&format!(
            "  {service}:\n{flotillad}    deploy:\n      placement:\n        max_replicas_per_node: 3\n"
        ));
    }
    for kind in ["etcd", "pg", "redis", "sentinel"] {
        for member in 1..=3 {
            yaml.push_str(&format!("  {kind}{member}:\n    deploy:\n      replicas: 0\n"));
        }
    }
    for service in ["backup", "prometheus", "grafana"] {
        yaml.push_str(&format!("  {service}:\n    deploy:\n      replicas: 0\n"));
    }
    yaml.push_str(
        "  db-proxy:\n    deploy:\n      placement:\n        constraints: [node.labels.no-such-label == true]\n",
    );
    yaml.push_str("secrets:\n");
    for secret in STACK_SECRETS {
        yaml.push_str(&format!("  {secret}:\n    external: true\n    name: {secret}{suffix}\n"));
    }
    yaml
}

/// The first replica of the API service `service` that answers `/health`,
/// as `http://address:7800`.
async fn answering_api(http: &reqwest::Client, service: &str) -> Option<String> {
    let service = service.to_owned();
    let addresses = tokio::task::spawn_blocking(move || task_addresses(&service)).await.expect("docker CLI");
    for address in addresses {
        let base = format!("http://{address}:7800");
        let health = http.get(format!("{base}/health")).timeout(Duration::from_secs(1)).send().await;
        if health.is_ok_and(|r| r.status().is_success()) {
            return Some(base);
        }
    }
    None
}

/// Waits until the deployment runs `replicas` replicas; their endpoints.
async fn wait_running(http: &reqwest::Client, stack: &Stack, token: &str, id: &str, replicas: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        if let Some(api) = answering_api(http, &stack.service("api")).await {
            let (_, got) = call(http, &api, Some(token), "GetDeployment", json!({ "id": id })).await;
            let deployment = &got["deployment"];
            let endpoints: Vec<String> = deployment["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["status"] == "REPLICA_STATUS_RUNNING")
                .filter_map(|r| r["endpoint"].as_str().map(str::to_owned))
                .collect();
            if deployment["status"] == "DEPLOYMENT_STATUS_RUNNING" && endpoints.len() == replicas {
                return endpoints;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "never {replicas} running: {got}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no API replica answers");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Counts answers and failures of something polled until `stop`.
#[derive(Default)]
struct Availability {
    answered: AtomicU64,
    failed: AtomicU64,
    first_failures: std::sync::Mutex<Vec<String>>,
}

impl Availability {
    fn record(&self, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_failures.lock().expect("lock");
                if first.len() < 5 {
                    first.push(error);
                }
            }
        }
    }

    fn report(&self) -> AvailabilityReport {
        let (answered, failed) = (self.answered.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        let first_failures = self.first_failures.lock().expect("lock").clone();
        AvailabilityReport { answered, asked: answered + failed, first_failures }
    }
}

struct AvailabilityReport {
    answered: u64,
    asked: u64,
    first_failures: Vec<String>,
}

impl AvailabilityReport {
    fn assert_always(&self, what: &str) {
        assert!(self.asked > 20, "{what}: asked throughout ({} times)", self.asked);
        assert_eq!(self.answered, self.asked, "{what}: did not always answer: {:?}", self.first_failures);
    }
}

/// The app (every 50 ms, through Traefik: `endpoint` with `Host: host`) and
/// the API replicas (every 250 ms) asked until [`Watch::finish`].
struct Watch {
    stop: CancellationToken,
    app: Arc<Availability>,
    api: Arc<Availability>,
    pollers: Vec<tokio::task::JoinHandle<()>>,
}

impl Watch {
    fn start(http: &reqwest::Client, endpoint: &str, host: &str, api_service: &str) -> Self {
        let (stop, app, api) =
            (CancellationToken::new(), Arc::new(Availability::default()), Arc::new(Availability::default()));
        let started = Instant::now();
        let app_poller = tokio::spawn({
            let (stop, app, http, endpoint) = (stop.clone(), app.clone(), http.clone(), endpoint.to_owned());
            let host = host.to_owned();
            async move {
                while !stop.is_cancelled() {
                    let request = http.get(&endpoint).header(reqwest::header::HOST, &host);
                    let result = match request.timeout(Duration::from_secs(2)).send().await {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => Err(format!("{:?}: {}", started.elapsed(), r.status())),
                        Err(e) => Err(format!("{:?}: {e}", started.elapsed())),
                    };
                    app.record(result);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        let api_poller = tokio::spawn({
            let (stop, api, http, api_service) = (stop.clone(), api.clone(), http.clone(), api_service.to_owned());
            async move {
                while !stop.is_cancelled() {
                    let answered = answering_api(&http, &api_service).await;
                    api.record(
                        answered.map(|_| ()).ok_or_else(|| format!("{:?}: no replica answered", started.elapsed())),
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Self { stop, app, api, pollers: vec![app_poller, api_poller] }
    }

    /// Stops asking: what the app and the API replicas answered.
    async fn finish(self) -> (AvailabilityReport, AvailabilityReport) {
        self.stop.cancel();
        for poller in self.pollers {
            poller.await.expect("a poller");
        }
        (self.app.report(), self.api.report())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_deploys_and_a_rolling_update_keeps_apps_answering() {
    let Some((_one_at_a_time, docker, mut swarm, swarm_node, db, redis)) = swarm_test().await else { return };

    // Containers on overlay networks reach this host at docker_gwbridge's
    // gateway: the test's PostgreSQL, Redis and OIDC provider listen there.
    let gateway: IpAddr =
        docker_cli(&["network", "inspect", "docker_gwbridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"])
            .expect("docker_gwbridge exists once the engine is in a swarm")
            .parse()
            .expect("the gateway's address");
    let (_postgres_proxy, database_url) = proxied(&db.url, gateway).await;
    let (_redis_proxy, redis_url) = proxied(&redis.url, gateway).await;
    let provider = TestOidcProvider::start_on(&gateway.to_string(), 3600);

    let suffix = format!("_{}", docker.test_id);
    let secrets = Command::new(root().join("stack/create-secrets.sh"))
        .args(["--suffix", &suffix])
        .env("FLOTILLA_DATABASE_URL", &database_url)
        .env("FLOTILLA_REDIS_URL", &redis_url)
        .env("FLOTILLA_GRAFANA_PASSWORD", "not-used-in-this-test")
        .output()
        .expect("stack/create-secrets.sh runs");
    let labels: Vec<&'static str> = ["compute", "edge"]
        .into_iter()
        .filter(|label| {
            let format = format!("{{{{index .Spec.Labels \"{label}\"}}}}");
            docker_cli(&["node", "inspect", "self", "--format", &format]).unwrap_or_default() != "true"
        })
        .collect();
    let overlay = std::env::temp_dir().join(format!("flotilla-stack-{}.yml", docker.test_id));
    std::fs::write(&overlay, stack_override(&suffix, &docker.test_id, &redis.prefix, gateway)).expect("override file");
    // The edge's image, built offline from the Traefik binary the other tests run.
    let traefik_image = format!("flotilla/traefik:test-{}", docker.test_id);
    let built = Command::new(root().join("scripts/build-traefik-image.sh"))
        .args(["--tag", &traefik_image])
        .output()
        .expect("the Traefik image script runs");
    assert!(built.status.success(), "Traefik image: {}", String::from_utf8_lossy(&built.stderr));
    swarm.images.push(traefik_image.clone());
    let edge_port = flotilla_test_utils::free_port();
    let stack = Stack {
        name: format!("flotilla-{}", docker.test_id),
        suffix: suffix.clone(),
        overlay,
        env: vec![
            ("FLOTILLA_AGENT_PORT".to_owned(), flotilla_test_utils::free_port().to_string()),
            ("FLOTILLA_OIDC_ISSUER".to_owned(), provider.issuer.clone()),
            ("FLOTILLA_OIDC_AUDIENCE".to_owned(), TEST_AUDIENCE.to_owned()),
            ("FLOTILLA_PLATFORM_DOMAINS".to_owned(), "example.test".to_owned()),
            ("TRAEFIK_IMAGE".to_owned(), traefik_image.clone()),
            ("FLOTILLA_EDGE_HTTP_PORT".to_owned(), edge_port.to_string()),
            ("FLOTILLA_EDGE_HTTPS_PORT".to_owned(), flotilla_test_utils::free_port().to_string()),
            // No certificate is due in this test; the directory is never asked.
            ("FLOTILLA_ACME_DIRECTORY".to_owned(), "http://127.0.0.1:9/directory".to_owned()),
        ],
        node: swarm_node.clone(),
        labelled: labels.clone(),
    };
    assert!(secrets.status.success(), "create-secrets.sh: {}", String::from_utf8_lossy(&secrets.stderr));
    let created = String::from_utf8_lossy(&secrets.stdout);
    for secret in STACK_SECRETS {
        assert!(created.contains(&format!("created {secret}{suffix}")), "{secret} was created: {created}");
    }
    // The agent runs only on nodes labelled compute=true, Traefik on edge=true.
    for label in ["compute", "edge"] {
        docker_cli(&["node", "update", "--label-add", &format!("{label}=true"), &swarm_node]).expect("label the node");
    }

    let image_1 = format!("flotilla/flotillad:test-{}-1", docker.test_id);
    let image_2 = format!("flotilla/flotillad:test-{}-2", docker.test_id);
    build_flotillad_image(&image_1);
    swarm.images.push(image_1.clone());

    let started = Instant::now();
    stack.deploy(&image_1);
    let http = reqwest::Client::new();
    let api = loop {
        if let Some(api) = answering_api(&http, &stack.service("api")).await {
            break api;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no API replica became healthy: {}",
            docker_cli(&["stack", "ps", "--no-trunc", &stack.name]).unwrap_or_else(|e| e)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let api_up = started.elapsed();

    // The agent's global task registers the node under its Swarm id.
    let node = loop {
        let nodes = db.store.list_nodes().await.unwrap_or_default();
        if let Some(node) = nodes.into_iter().find(|n| n.node_id.as_str() == swarm_node) {
            break node;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the agent never registered its node");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let node_registered = started.elapsed();
    assert_eq!(node.role, "manager");
    assert_eq!(stack.task_images("agent"), [image_1.as_str()], "one agent task per node (global mode)");
    assert_eq!(
        docker_cli(&[
            "service",
            "inspect",
            &stack.service("agent"),
            "--format",
            "{{if .Spec.Mode.Global}}global{{end}}"
        ])
        .expect("inspect"),
        "global"
    );

    // A user deploys an app through the stack's API with a provider's token.
    let token = provider.sign_in("stack-user", "stack-user@example.com").await.id_token;
    let (status, created) = call(
        &http,
        &api,
        Some(&token),
        "CreateDeployment",
        json!({ "name": "stacked", "image": DEMO_IMAGE, "port": 8080, "domain": "stacked.example.test" }),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["deployment"]["id"].as_str().expect("id").to_owned();
    let endpoint = wait_running(&http, &stack, &token, &id, 1).await.remove(0);
    let app_running = started.elapsed();
    let page = http.get(&endpoint).send().await.expect("the app").text().await.expect("page");
    assert!(page.contains("Hello from stacked"), "{page}");
    // Through the stack's Traefik, by its domain.
    let edge = format!("http://127.0.0.1:{edge_port}/");
    let through_edge = (edge.as_str(), "stacked.example.test");
    let page = loop {
        let answer = http.get(&edge).header(reqwest::header::HOST, through_edge.1).send().await;
        if let Ok(response) = answer
            && response.status().is_success()
        {
            break response.text().await.expect("page");
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the app never answered through the stack's Traefik: {}",
            docker_cli(&["service", "ps", "--no-trunc", &stack.service("traefik")]).unwrap_or_else(|e| e)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(page.contains("Hello from stacked"), "{page}");
    let app_through_edge = started.elapsed();
    // Traefik's canary reaches the orchestrator that sent it the table (at
    // the task's own address): agents know what it serves.
    let serving = loop {
        let proxies = db.store.live_edge_proxies(Duration::from_secs(30)).await.expect("edge proxies");
        if let Some(proxy) = proxies.into_iter().find(|p| p.holds.is_some()) {
            break proxy;
        }
        assert!(started.elapsed() < Duration::from_secs(200), "Traefik never said which table it serves");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("stack: Traefik {} serves the table of snapshot {:?}", serving.id, serving.holds);
    let app_container = || {
        docker_cli(&[
            "ps",
            "--no-trunc",
            "--filter",
            &format!("label={TEST_LABEL}={}", docker.test_id),
            "--format",
            "{{.ID}}",
        ])
        .expect("docker ps")
    };
    let container_before = app_container();
    let started_before =
        docker_cli(&["inspect", "--format", "{{.State.StartedAt}}", &container_before]).expect("inspect");

    // Rolling update of every flotillad service to a new image while the app
    // and the API are asked all the time.
    build_flotillad_image(&image_2);
    swarm.images.push(image_2.clone());
    let (update_took, app, api_replicas) =
        stack.update_watched(&http, through_edge, &image_2, "completed", &image_2).await;
    eprintln!(
        "stack: API healthy {api_up:?} after deploy, node registered {node_registered:?}, app running {app_running:?}, \
         through Traefik {app_through_edge:?}; rolling update of agent, orchestrator and api took {update_took:?}: \
         the app answered {} of {} requests through Traefik, an API replica answered {} of {} probes",
        app.answered, app.asked, api_replicas.answered, api_replicas.asked
    );
    app.assert_always("the app, during the update");
    api_replicas.assert_always("an API replica, during the update");

    // An image that cannot run (busybox as flotillad: it exits at once) is
    // rolled back on every service, the app answering throughout.
    let broken = format!("flotilla/flotillad:test-{}-broken", docker.test_id);
    build_image(&broken, Path::new("/bin/busybox"));
    swarm.images.push(broken.clone());
    let (rollback_took, app, api_replicas) =
        stack.update_watched(&http, through_edge, &broken, "rollback_completed", &image_2).await;
    eprintln!(
        "stack: update to a broken image rolled back in {rollback_took:?}: app answered {} of {} requests through Traefik, \
         an API replica answered {} of {} probes",
        app.answered, app.asked, api_replicas.answered, api_replicas.asked
    );
    app.assert_always("the app, during the failed update and its rollback");
    api_replicas.assert_always("an API replica, during the failed update and its rollback");

    // The app's container was left alone by the new agent.
    assert_eq!(app_container(), container_before, "the same container serves the app");
    assert_eq!(
        docker_cli(&["inspect", "--format", "{{.State.StartedAt}}", &container_before]).expect("inspect"),
        started_before,
        "and it was not restarted"
    );
    // The updated agent heartbeats, and the updated control plane places a
    // second replica that the updated agent runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node = db.store.list_nodes().await.expect("nodes").into_iter().find(|n| n.node_id.as_str() == swarm_node);
    let heartbeat_age = unix_now() - node.expect("the node").last_heartbeat.timestamp();
    assert!(heartbeat_age <= 5, "the updated agent heartbeats (last {heartbeat_age} s ago)");
    let api = answering_api(&http, &stack.service("api")).await.expect("an API replica");
    let (status, scaled) = call(&http, &api, Some(&token), "ScaleDeployment", json!({ "id": id, "replicas": 2 })).await;
    assert_eq!(status, 200, "{scaled}");
    let endpoints = wait_running(&http, &stack, &token, &id, 2).await;
    for endpoint in &endpoints {
        let page = http.get(endpoint).send().await.expect("a replica").text().await.expect("page");
        assert!(page.contains("Hello from stacked"), "{page}");
    }

    // Deleted through the API, the agent removes the containers.
    let (status, deleted) = call(&http, &api, Some(&token), "DeleteDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{deleted}");
    let deleting = Instant::now();
    while !docker.containers().await.is_empty() {
        assert!(deleting.elapsed() < Duration::from_secs(60), "the app's containers were never removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(stack);
}
