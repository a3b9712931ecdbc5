//! A whole Flotilla (`flotillad all`) started in-process for one test, on its
//! own database, Redis prefix and Docker label, with helpers to call its API
//! the way clients do, to add agents on the same engine, and to cut the
//! services it depends on.

pub use flotilla_test_utils::proxy;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_agent::{Agent, AgentConfig};
use flotilla_daemon::{Daemon, DaemonSettings, MetricsSettings, RateLimitSettings, Roles};
use flotilla_docker::{DockerClient, DockerConfig};
use flotilla_edge::EdgeSettings;
use flotilla_orchestrator::OrchestratorConfig;
use flotilla_redis::WakeBus;
use flotilla_telemetry::Telemetry;
use flotilla_test_utils::connect::{Envelopes, Frame};
use flotilla_test_utils::{TestDb, TestDocker, TestRedis, init_tracing};
use flotilla_types::NodeId;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use flotilla_test_utils::DEMO_IMAGE;

pub const DEMO_V2: &str = "flotilla/demo-http:2";
pub const BROKEN_IMAGE: &str = "flotilla/demo-broken:latest";

/// `flotillad all` for one test.
pub struct TestFlotilla {
    pub daemon: Option<Daemon>,
    pub base_url: String,
    pub node_id: NodeId,
    pub http: reqwest::Client,
    /// One gRPC channel for the test's calls (it connects on first use).
    grpc: tonic::transport::Channel,
    pub settings: DaemonSettings,
    extra_agents: Vec<ExtraAgent>,
    // Dropped last, in this order: containers, then Redis keys, then the database.
    pub docker: TestDocker,
    pub redis: TestRedis,
    pub db: TestDb,
    _state_dir: TempDir,
}

/// Settings tests start from: quick heartbeats, short grace periods.
fn test_settings(db: &TestDb, redis: &TestRedis, docker: &TestDocker, state_dir: &TempDir) -> DaemonSettings {
    DaemonSettings {
        roles: Roles::ALL,
        database_url: db.url.clone(),
        redis: Some((redis.url.clone(), redis.prefix.clone())),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        auth: flotilla_daemon::AuthSettings::InsecureDevelopment,
        docker: DockerConfig::default(),
        agent: test_agent_config(docker, state_dir, 0),
        orchestrator: OrchestratorConfig {
            // The domains tests route without proving them; tests of custom
            // domains use others (e.g. example.org).
            edge: EdgeSettings {
                platform_domains: ["example.com", "example.test", "flotilla.test"]
                    .iter()
                    .map(|d| flotilla_types::Hostname::parse("domain", d).expect("a hostname"))
                    .collect(),
                ..EdgeSettings::default()
            },
            ..OrchestratorConfig::default()
        },
        metrics: MetricsSettings::default(),
        // Tests that are about rate limits set them.
        rate_limits: RateLimitSettings::default(),
        shutdown_grace: Duration::from_secs(5),
        internal_token: None,
        domains: flotilla_daemon::DomainSettings::default(),
        certificates: None,
        route_table: flotilla_edge::ServeConfig::default(),
    }
}

fn test_agent_config(docker: &TestDocker, state_dir: &TempDir, n: usize) -> AgentConfig {
    // A slice of the port range of its own, so parallel tests rarely race
    // for the same host port (the agent copes when they do).
    let slice = (uuid::Uuid::new_v4().as_u128() % 40) as u16;
    let start = 20_000 + slice * 250;
    AgentConfig {
        port_range: start..=start + 249,
        node_id: Some(docker.node_id(n)),
        node_id_file: state_dir.0.join(format!("node-id-{n}")),
        advertise_address: Some("127.0.0.1".to_owned()),
        publish_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        heartbeat_interval: Duration::from_secs(1),
        stop_grace: Duration::from_secs(5),
        extra_container_labels: docker.labels().into_iter().collect::<BTreeMap<_, _>>(),
        ..AgentConfig::default()
    }
}

impl TestFlotilla {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test settings as changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut DaemonSettings)) -> Self {
        init_tracing();
        let db = TestDb::empty().await;
        let redis = TestRedis::new().await;
        let docker = TestDocker::new().await;
        docker.require_demo_image().await;
        let state_dir = TempDir::new();
        let mut settings = test_settings(&db, &redis, &docker, &state_dir);
        configure(&mut settings);
        let node_id = settings.agent.node_id.clone().unwrap_or_else(|| docker.node_id(0));
        let daemon = Daemon::start(settings.clone(), CancellationToken::new()).await.expect("flotillad starts");
        let base_url = format!("http://{}", daemon.local_addr);
        let grpc = tonic::transport::Endpoint::from_shared(base_url.clone()).expect("URL").connect_lazy();
        Self {
            daemon: Some(daemon),
            base_url,
            node_id,
            http: reqwest::Client::new(),
            grpc,
            settings,
            extra_agents: Vec::new(),
            docker,
            redis,
            db,
            _state_dir: state_dir,
        }
    }

    /// An API-only Flotilla that accepts the tokens of `provider` (with
    /// `configure` applied to its OIDC settings); subject `root` is a
    /// platform administrator.
    pub async fn start_trusting(
        provider: &flotilla_test_utils::TestOidcProvider,
        configure: impl FnOnce(&mut flotilla_oidc::OidcSettings),
    ) -> Self {
        let mut oidc = flotilla_oidc::OidcSettings::new(&provider.issuer, flotilla_test_utils::oidc::TEST_AUDIENCE);
        configure(&mut oidc);
        Self::start_with(|settings| {
            settings.roles = Roles { api: true, orchestrator: false, agent: false };
            settings.auth =
                flotilla_daemon::AuthSettings::Oidc { settings: oidc, platform_admins: vec!["root".to_owned()] };
        })
        .await
    }

    /// The daemon's node agent.
    pub fn agent(&self) -> Arc<Agent> {
        self.daemon.as_ref().and_then(|d| d.agent.clone()).expect("the daemon runs an agent")
    }

    /// Starts another agent on the same engine, as node `n` (n > 0), with
    /// the test settings as changed by `configure`.
    pub async fn add_agent(&mut self, n: usize, configure: impl FnOnce(&mut AgentConfig)) -> Arc<Agent> {
        let mut config = test_agent_config(&self.docker, &self._state_dir, n);
        configure(&mut config);
        let docker = DockerClient::connect(&DockerConfig::default()).await.expect("Docker");
        let wake = WakeBus::with_redis(&self.redis.url, &self.redis.prefix).expect("Redis");
        let telemetry = Telemetry::new("agent", "test");
        let agent = Agent::new(config, self.db.store.clone(), docker, wake.clone(), telemetry, "extra-agent".into())
            .await
            .expect("agent starts");
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let listener = wake.spawn_listener(vec![flotilla_redis::agent_topic(agent.node_id().as_str())], cancel.clone());
        tracker.spawn(async move {
            let _ = listener.await;
        });
        agent.spawn(&tracker, cancel.clone());
        tracker.close();
        self.extra_agents.push(ExtraAgent { cancel, tracker });
        agent
    }

    /// Stops the `i`-th extra agent at once, as if its process died: its
    /// heartbeats stop; its containers keep running.
    pub async fn kill_agent(&mut self, i: usize) {
        let extra = self.extra_agents.remove(i);
        extra.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), extra.tracker.wait()).await.expect("extra agent stops");
    }

    /// Calls a NodeService method with Connect's JSON encoding.
    pub async fn connect_node(&self, method: &str, body: Value) -> (u16, Value) {
        self.connect_with(&format!("flotilla.v1.NodeService/{method}"), &[], body).await
    }

    /// The route table Traefik polls, as JSON.
    pub async fn route_table(&self) -> Value {
        let url = format!("{}/traefik/dynamic", self.base_url);
        let response = self.http.get(url).send().await.expect("the route table answers");
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.expect("JSON")
    }

    /// The route table once `holds` is true of it (it is rendered a moment
    /// after each change: waits up to 10 s).
    pub async fn route_table_where(&self, what: &str, holds: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let table = self.route_table().await;
            if holds(&table) {
                return table;
            }
            assert!(Instant::now() < deadline, "the route table never showed {what}: {table}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls a DeploymentService method with Connect's JSON encoding over
    /// plain HTTP, as a browser or curl would. Returns the HTTP status and body.
    pub async fn connect_json(&self, method: &str, body: Value) -> (u16, Value) {
        self.connect_with(&format!("flotilla.v1.DeploymentService/{method}"), &[], body).await
    }

    /// Calls `service/method` with Connect's JSON encoding and these extra
    /// headers (credentials, organization). Returns the HTTP status and body.
    pub async fn connect_with(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/{path}", self.base_url))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .json(&body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, value)
    }

    /// Calls a server-streaming DeploymentService method with Connect's
    /// streaming JSON encoding (enveloped messages) and reads up to `want`
    /// messages, or until the stream ends or `timeout` passes. Returns the
    /// messages and the end-of-stream message, if it came.
    pub async fn connect_stream(
        &self,
        method: &str,
        body: Value,
        want: usize,
        timeout: Duration,
    ) -> (Vec<Value>, Option<Value>) {
        self.connect_stream_with(&format!("flotilla.v1.DeploymentService/{method}"), &[], body, want, timeout).await
    }

    /// [`Self::connect_stream`] of `service/method` with extra headers. A
    /// call refused before the stream starts (not HTTP 200) ends at once,
    /// with `{"error": <the error>}` as its end message.
    pub async fn connect_stream_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
        want: usize,
        timeout: Duration,
    ) -> (Vec<Value>, Option<Value>) {
        let payload = serde_json::to_vec(&body).expect("JSON");
        let (messages, end) =
            self.connect_stream_raw(path, "application/connect+json", headers, payload, want, timeout).await;
        let messages = messages.iter().map(|bytes| serde_json::from_slice(bytes).expect("a JSON message")).collect();
        (messages, end)
    }

    /// A Connect server stream in `content_type`: the messages as they came
    /// (bytes) and the end-of-stream message (always JSON).
    async fn connect_stream_raw(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        payload: Vec<u8>,
        want: usize,
        timeout: Duration,
    ) -> (Vec<Vec<u8>>, Option<Value>) {
        let envelope = flotilla_test_utils::connect::envelope(&payload);
        let mut request = self
            .http
            .post(format!("{}/{path}", self.base_url))
            .header("content-type", content_type)
            .header("connect-protocol-version", "1")
            .body(envelope);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send().await.expect("the API answers");
        if response.status().as_u16() != 200 {
            let error = response.json::<Value>().await.unwrap_or(Value::Null);
            return (Vec::new(), Some(serde_json::json!({ "error": error })));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut envelopes, mut messages, mut end) = (Envelopes::default(), Vec::new(), None);
        while messages.len() < want && end.is_none() {
            let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(chunk) => chunk.expect("reading the stream"),
                Err(_) => break,
            };
            let Some(chunk) = chunk else { break };
            for frame in envelopes.push(&chunk) {
                match frame {
                    Frame::Message(message) => messages.push(message),
                    Frame::End(json) => end = Some(serde_json::from_slice(&json).expect("a JSON end of stream")),
                }
            }
        }
        (messages, end)
    }

    /// Creates a deployment and returns its id.
    pub async fn create(&self, body: Value) -> String {
        let (status, created) = self.connect_json("CreateDeployment", body).await;
        assert_eq!(status, 200, "{created}");
        created["deployment"]["id"].as_str().expect("an id").to_owned()
    }

    /// Creates a deployment of the demo image called `name` and waits until
    /// it runs; returns its id.
    pub async fn deploy_demo(&self, name: &str, replicas: u32) -> String {
        let id = self.create(json!({ "name": name, "image": DEMO_IMAGE, "port": 8080, "replicas": replicas })).await;
        self.wait_for(&id, Duration::from_secs(30), is_running).await;
        id
    }

    pub async fn get(&self, id: &str) -> Value {
        let (status, body) = self.connect_json("GetDeployment", json!({ "id": id })).await;
        assert_eq!(status, 200, "{body}");
        body["deployment"].clone()
    }

    /// Polls GetDeployment (Connect JSON) until `done` holds or `timeout`.
    pub async fn wait_for(&self, id: &str, timeout: Duration, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
        let started = Instant::now();
        loop {
            let (status, body) = self.connect_json("GetDeployment", json!({ "id": id })).await;
            if done(status, &body) {
                return (status, body);
            }
            assert!(started.elapsed() < timeout, "timed out after {timeout:?}; last answer {status}: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rows of `table` matching `condition` (SQL, trusted test input).
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(self.db.pool()).await.expect("count rows")
    }

    /// Stops the daemon and the extra agents; the fixtures then remove what
    /// the test made.
    pub async fn stop(mut self) {
        for extra in self.extra_agents.drain(..) {
            extra.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(10), extra.tracker.wait()).await.expect("extra agent stops");
        }
        if let Some(daemon) = self.daemon.take() {
            assert!(daemon.shutdown().await, "flotillad drained within its grace period");
        }
    }
}

struct ExtraAgent {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// `status` 200 and the deployment running.
pub fn is_running(status: u16, body: &Value) -> bool {
    status == 200 && body["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING"
}

/// The container id of replica `index` as the API shows it.
pub fn replica_container(deployment: &Value, index: u64) -> Option<String> {
    deployment["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["index"].as_u64().unwrap_or(0) == index)
        .and_then(|r| r["containerId"].as_str())
        .map(str::to_owned)
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("flotilla-test-{}", flotilla_test_utils::unique_suffix()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GETs `url` until it answers 200 or `timeout` passes; returns the body.
pub async fn http_get_eventually(url: &str, timeout: Duration) -> String {
    let started = Instant::now();
    loop {
        match reqwest::get(url).await {
            Ok(response) if response.status().is_success() => {
                return response.text().await.expect("body");
            }
            other => {
                assert!(started.elapsed() < timeout, "{url} did not answer 200 within {timeout:?}: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Every `package.Service/Method` the proto files declare.
pub fn every_rpc() -> std::collections::BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/flotilla/v1");
    let mut rpcs = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("proto dir") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("proto file");
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_owned);
            } else if let (Some(rest), Some(service)) = (line.strip_prefix("rpc "), &service) {
                let method = rest.split('(').next().expect("rpc name").trim();
                rpcs.insert(format!("flotilla.v1.{service}/{method}"));
            }
        }
    }
    rpcs
}

/// Whether `rpc` (as [`every_rpc`] names it) answers with a stream.
pub fn is_streaming(rpc: &str) -> bool {
    rpc.rsplit('/').next().is_some_and(|method| method.starts_with("Stream"))
}

/// How a test client speaks to the API: every RPC answers all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    ConnectJson,
    ConnectProto,
    Grpc,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::ConnectJson, Protocol::ConnectProto, Protocol::Grpc];
}

/// Turns the JSON a test writes into any RPC's protobuf request, and its
/// protobuf answers back into Connect's JSON, from the API's descriptors.
pub struct RpcCodec {
    pool: prost_reflect::DescriptorPool,
}

impl Default for RpcCodec {
    fn default() -> Self {
        let pool = prost_reflect::DescriptorPool::decode(flotilla_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
        Self { pool }
    }
}

impl RpcCodec {
    /// The method `flotilla.v1.Service/Method`.
    pub fn method(&self, rpc: &str) -> prost_reflect::MethodDescriptor {
        let (service, method) = rpc.split_once('/').expect("service/method");
        let service = self.pool.get_service_by_name(service).unwrap_or_else(|| panic!("no service {service}"));
        service.methods().find(|m| m.name() == method).unwrap_or_else(|| panic!("no method {rpc}"))
    }

    pub fn encode_request(&self, rpc: &str, body: &Value) -> Vec<u8> {
        let message = prost_reflect::DynamicMessage::deserialize(self.method(rpc).input(), body.clone())
            .unwrap_or_else(|e| panic!("{rpc} request {body}: {e}"));
        prost::Message::encode_to_vec(&message)
    }

    pub fn decode_response(&self, rpc: &str, bytes: &[u8]) -> Value {
        let message = prost_reflect::DynamicMessage::decode(self.method(rpc).output(), bytes)
            .unwrap_or_else(|e| panic!("{rpc} answer: {e}"));
        serde_json::to_value(&message).expect("JSON")
    }
}

/// A gRPC codec passing messages through as bytes: [`RpcCodec`] does the rest.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let remaining = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, remaining).to_vec()))
    }
}

/// A gRPC status as the Connect error JSON the tests read, with the HTTP
/// status Connect would have answered.
fn grpc_error(status: &tonic::Status) -> (u16, Value) {
    let (name, http) = match status.code() {
        tonic::Code::Ok => ("ok", 200),
        tonic::Code::Cancelled => ("canceled", 499),
        tonic::Code::Unknown => ("unknown", 500),
        tonic::Code::InvalidArgument => ("invalid_argument", 400),
        tonic::Code::DeadlineExceeded => ("deadline_exceeded", 504),
        tonic::Code::NotFound => ("not_found", 404),
        tonic::Code::AlreadyExists => ("already_exists", 409),
        tonic::Code::PermissionDenied => ("permission_denied", 403),
        tonic::Code::ResourceExhausted => ("resource_exhausted", 429),
        tonic::Code::FailedPrecondition => ("failed_precondition", 400),
        tonic::Code::Aborted => ("aborted", 409),
        tonic::Code::OutOfRange => ("out_of_range", 400),
        tonic::Code::Unimplemented => ("unimplemented", 501),
        tonic::Code::Internal => ("internal", 500),
        tonic::Code::Unavailable => ("unavailable", 503),
        tonic::Code::DataLoss => ("data_loss", 500),
        tonic::Code::Unauthenticated => ("unauthenticated", 401),
    };
    (http, json!({"code": name, "message": status.message()}))
}

impl TestFlotilla {
    /// A gRPC request of raw bytes with these headers as metadata.
    fn grpc_request(headers: &[(&str, &str)], payload: Vec<u8>) -> tonic::Request<Vec<u8>> {
        let mut request = tonic::Request::new(payload);
        for (name, value) in headers {
            let name = tonic::metadata::MetadataKey::from_bytes(name.as_bytes()).expect("header name");
            request.metadata_mut().insert(name, value.parse().expect("header value"));
        }
        request
    }

    /// Calls a unary `service/method` in `protocol`, the request and the
    /// answer written as Connect JSON whatever the wire carried. Errors come
    /// back as Connect's error JSON (`code`, `message`) with the HTTP status
    /// Connect gives that code.
    pub async fn call(&self, protocol: Protocol, rpc: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let codec = RpcCodec::default();
        match protocol {
            Protocol::ConnectJson => self.connect_with(rpc, headers, body).await,
            Protocol::ConnectProto => {
                let mut request = self
                    .http
                    .post(format!("{}/{rpc}", self.base_url))
                    .header("content-type", "application/proto")
                    .header("connect-protocol-version", "1")
                    .body(codec.encode_request(rpc, &body));
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                let response = request.send().await.expect("the API answers");
                let status = response.status().as_u16();
                let bytes = response.bytes().await.expect("the answer");
                if status == 200 {
                    (status, codec.decode_response(rpc, &bytes))
                } else {
                    // Connect's unary errors are JSON whatever the request's codec.
                    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
                }
            }
            Protocol::Grpc => {
                let mut client = tonic::client::Grpc::new(self.grpc.clone());
                client.ready().await.expect("gRPC ready");
                let path = http::uri::PathAndQuery::try_from(format!("/{rpc}")).expect("path");
                let request = Self::grpc_request(headers, codec.encode_request(rpc, &body));
                match client.unary(request, path, RawCodec).await {
                    Ok(answer) => (200, codec.decode_response(rpc, answer.get_ref())),
                    Err(status) => grpc_error(&status),
                }
            }
        }
    }

    /// [`Self::connect_stream_with`] in `protocol`: up to `want` messages
    /// within `timeout`, and the end of the stream if it came (`{}` for a
    /// normal end, `{"error": ..}` for a refusal or an error at the end).
    pub async fn stream(
        &self,
        protocol: Protocol,
        rpc: &str,
        headers: &[(&str, &str)],
        body: Value,
        want: usize,
        timeout: Duration,
    ) -> (Vec<Value>, Option<Value>) {
        let codec = RpcCodec::default();
        match protocol {
            Protocol::ConnectJson => self.connect_stream_with(rpc, headers, body, want, timeout).await,
            Protocol::ConnectProto => {
                let payload = codec.encode_request(rpc, &body);
                let (messages, end) =
                    self.connect_stream_raw(rpc, "application/connect+proto", headers, payload, want, timeout).await;
                let messages = messages.iter().map(|bytes| codec.decode_response(rpc, bytes)).collect();
                (messages, end)
            }
            Protocol::Grpc => {
                let mut client = tonic::client::Grpc::new(self.grpc.clone());
                client.ready().await.expect("gRPC ready");
                let path = http::uri::PathAndQuery::try_from(format!("/{rpc}")).expect("path");
                let request = Self::grpc_request(headers, codec.encode_request(rpc, &body));
                let mut stream = match client.server_streaming(request, path, RawCodec).await {
                    Ok(answer) => answer.into_inner(),
                    Err(status) => return (Vec::new(), Some(json!({"error": grpc_error(&status).1}))),
                };
                let deadline = tokio::time::Instant::now() + timeout;
                let (mut messages, mut end) = (Vec::new(), None);
                while messages.len() < want && end.is_none() {
                    match tokio::time::timeout_at(deadline, stream.message()).await {
                        Err(_) => break,
                        Ok(Ok(Some(bytes))) => messages.push(codec.decode_response(rpc, &bytes)),
                        Ok(Ok(None)) => end = Some(json!({})),
                        Ok(Err(status)) => end = Some(json!({"error": grpc_error(&status).1})),
                    }
                }
                (messages, end)
            }
        }
    }
}
