//! One deployment end to end through the real API, a real Docker Engine,
//! PostgreSQL and Redis: create, run, serve, report, delete; over Connect
//! JSON, Connect binary and gRPC; and bad input refused without a trace.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use flotilla_e2e::{TestFlotilla, http_get_eventually};
use flotilla_proto::v1 as pb;
use serde_json::{Value, json};

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

async fn containers_of(flotilla: &TestFlotilla, deployment_id: &str) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([("label", vec![format!("flotilla.deployment.id={deployment_id}")])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    flotilla.docker.docker.list_containers(Some(options)).await.expect("list containers")
}

/// The rows of one deployment in the three tables it owns.
async fn row_counts(flotilla: &TestFlotilla, deployment_id: &str) -> (i64, i64, i64) {
    let id: uuid::Uuid = deployment_id.parse().expect("a UUID");
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql).bind(id).fetch_one(flotilla.db.pool()).await.expect("count rows")
    };
    (
        count("SELECT count(*) FROM deployments WHERE id = $1").await,
        count("SELECT count(*) FROM deployment_locations WHERE deployment_id = $1").await,
        count("SELECT count(*) FROM deployment_routing WHERE deployment_id = $1").await,
    )
}

async fn table_count(flotilla: &TestFlotilla, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(flotilla.db.pool()).await.expect("count rows")
}

fn is_running(status: u16, body: &Value) -> bool {
    status == 200 && body["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING"
}

#[tokio::test]
async fn a_deployment_runs_serves_reports_and_is_deleted_over_connect_json() {
    let flotilla = TestFlotilla::start().await;
    let name = format!("web-{}", &flotilla.docker.test_id[..6]);
    let domain = format!("{name}.example.test");

    let (status, created) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({
                "name": name,
                "image": flotilla_e2e::DEMO_IMAGE,
                "port": 8080,
                "domain": domain,
                "env": [
                    {"name": "GREETING", "value": "hi"},
                    {"name": "API_TOKEN", "value": "s3cret-value", "secret": true}
                ],
                "limits": {"memoryBytes": 64 * 1024 * 1024, "cpuMillis": 500}
            }),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["deployment"]["id"].as_str().expect("an id").to_owned();
    assert_eq!(created["deployment"]["status"], "DEPLOYMENT_STATUS_PENDING");
    // The secret's value never comes back.
    assert!(!created.to_string().contains("s3cret-value"), "{created}");

    // By name in the default project, the way `flo` names it.
    let (status, named) = flotilla.connect_json("GetDeployment", json!({ "name": name })).await;
    assert_eq!((status, named["deployment"]["id"].as_str()), (200, Some(id.as_str())), "{named}");
    assert_eq!(named["deployment"]["placement"]["nodeLoss"], "fence", "the default policy: {named}");
    let (status, both) = flotilla.connect_json("GetDeployment", json!({ "id": id, "name": name })).await;
    assert_eq!((status, both["code"].as_str()), (400, Some("invalid_argument")), "{both}");
    let (status, other) = flotilla.connect_json("GetDeployment", json!({ "name": "no-such-app" })).await;
    assert_eq!((status, other["code"].as_str()), (404, Some("not_found")), "{other}");

    let (_, running) = flotilla.wait_for(&id, RUN_TIMEOUT, is_running).await;
    let deployment = &running["deployment"];
    let replica = &deployment["replicas"][0];
    assert_eq!(replica["status"], "REPLICA_STATUS_RUNNING");
    assert_eq!(replica["nodeId"], flotilla.node_id.as_str());
    let port = replica["hostPort"].as_u64().expect("a host port") as u16;
    let container_id = replica["containerId"].as_str().expect("a container id").to_owned();

    // Independently, through the Docker API: one container, running, ours.
    let containers = containers_of(&flotilla, &id).await;
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].id.as_deref(), Some(container_id.as_str()));
    let inspect = flotilla
        .docker
        .docker
        .inspect_container(&container_id, None::<InspectContainerOptions>)
        .await
        .expect("inspect");
    assert_eq!(inspect.state.as_ref().and_then(|s| s.running), Some(true));
    let labels = inspect.config.as_ref().and_then(|c| c.labels.clone()).expect("labels");
    assert_eq!(labels["flotilla.managed"], "true");
    assert_eq!(labels["flotilla.deployment.id"], id);
    assert_eq!(labels["flotilla.node.id"], flotilla.node_id.as_str());
    assert!(!labels.keys().any(|k| k.starts_with("traefik.")), "one road to the edge, the route table: {labels:?}");
    let host_config = inspect.host_config.expect("host config");
    assert_eq!(host_config.memory, Some(64 * 1024 * 1024));
    assert_eq!(host_config.nano_cpus, Some(500_000_000));
    let bindings = host_config.port_bindings.expect("port bindings");
    let binding = &bindings["8080/tcp"].as_ref().expect("8080 published")[0];
    assert_eq!(binding.host_port.as_deref(), Some(port.to_string().as_str()));
    let env = inspect.config.and_then(|c| c.env).unwrap_or_default();
    assert!(env.contains(&"GREETING=hi".to_owned()));
    assert!(env.contains(&format!("FLOTILLA_DEPLOYMENT_NAME={name}")));

    // The app serves its page on the published port.
    let page = http_get_eventually(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(10)).await;
    assert!(page.contains(&format!("Hello from {name}")), "{page}");
    assert!(page.contains(&id), "{page}");

    // Placement and routing rows exist.
    assert_eq!(row_counts(&flotilla, &id).await, (1, 1, 1));

    // Listed, too.
    let (status, list) = flotilla.connect_json("ListDeployments", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(list["deployments"].as_array().map(Vec::len), Some(1));

    // Delete: the container, its rows and the deployment all go.
    let (status, deleting) = flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{deleting}");
    assert_eq!(deleting["deployment"]["status"], "DEPLOYMENT_STATUS_DELETING");
    let (status, gone) = flotilla.wait_for(&id, RUN_TIMEOUT, |status, _| status == 404).await;
    assert_eq!(gone["code"], "not_found", "{status}: {gone}");
    assert!(containers_of(&flotilla, &id).await.is_empty(), "the container is removed");
    assert_eq!(row_counts(&flotilla, &id).await, (0, 0, 0), "no rows are left");

    flotilla.stop().await;
}

#[tokio::test]
async fn the_same_calls_work_over_grpc_and_connect_binary() {
    let flotilla = TestFlotilla::start().await;
    let name = format!("rpc-{}", &flotilla.docker.test_id[..6]);

    // gRPC through tonic.
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let created = grpc
        .create_deployment(pb::CreateDeploymentRequest {
            name: name.clone(),
            image: flotilla_e2e::DEMO_IMAGE.to_owned(),
            port: 8080,
            replicas: Some(2),
            ..Default::default()
        })
        .await
        .expect("gRPC create")
        .into_inner()
        .deployment
        .expect("a deployment");
    assert_eq!(created.name, name);
    assert_eq!(created.replica_count, 2);

    // Connect with binary protobuf through the generated client.
    let binary = pb::deployment_service_connect_client::DeploymentServiceClient::builder(flotilla.base_url.clone())
        .use_proto()
        .build()
        .expect("Connect client");
    let (_, running) = flotilla.wait_for(&created.id, RUN_TIMEOUT, is_running).await;
    assert_eq!(running["deployment"]["replicas"].as_array().map(Vec::len), Some(2));
    let fetched = binary
        .get_deployment(&pb::GetDeploymentRequest { id: created.id.clone(), ..Default::default() })
        .await
        .expect("Connect binary get")
        .into_inner()
        .deployment
        .expect("a deployment");
    assert_eq!(fetched.status, pb::DeploymentStatus::Running as i32);
    let ports: Vec<u32> = fetched.replicas.iter().map(|r| r.host_port).collect();
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], ports[1], "each replica has its own host port");
    for port in ports {
        let page = http_get_eventually(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(10)).await;
        assert!(page.contains(&name), "{page}");
    }

    let listed = grpc.list_deployments(pb::ListDeploymentsRequest::default()).await.expect("gRPC list").into_inner();
    assert_eq!(listed.deployments.len(), 1);

    // Errors carry the right code on both protocols.
    let missing = grpc
        .get_deployment(pb::GetDeploymentRequest {
            id: "00000000-0000-0000-0000-000000000000".into(),
            ..Default::default()
        })
        .await
        .expect_err("not found");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let invalid = binary
        .get_deployment(&pb::GetDeploymentRequest { id: "not-a-uuid".into(), ..Default::default() })
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), connectrpc_axum_client::Code::InvalidArgument);

    binary
        .delete_deployment(&pb::DeleteDeploymentRequest { id: created.id.clone() })
        .await
        .expect("Connect binary delete");
    flotilla.wait_for(&created.id, RUN_TIMEOUT, |status, _| status == 404).await;
    assert!(containers_of(&flotilla, &created.id).await.is_empty());

    flotilla.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let flotilla = TestFlotilla::start().await;
    let valid = json!({ "name": "ok", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080 });
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().expect("object").remove(field);
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("invalid image reference", with("image", json!("Not A/Valid::Image")), "image"),
        ("image with a shell", with("image", json!("demo;rm -rf /")), "image"),
        ("name not a DNS label", with("name", json!("Bad_Name")), "name"),
        ("name too long", with("name", json!("a".repeat(64))), "name"),
        ("domain not a hostname", with("domain", json!("exa mple.com")), "domain"),
        ("domain injecting a rule", with("domain", json!("a.com`) || Host(`evil.com")), "domain"),
        ("port out of range", with("port", json!(70000)), "port"),
        ("negative port", with("port", json!(-1)), "port"),
        ("negative memory", with("limits", json!({ "memoryBytes": -1 })), "limits.memory_bytes"),
        ("negative cpu", with("limits", json!({ "cpuMillis": -5 })), "limits.cpu_millis"),
        // Zero is allowed: the deployment is kept, nothing runs (503).
        ("too many replicas", with("replicas", json!(101)), "replicas"),
        ("negative replicas", with("replicas", json!(-1)), "replicas"),
        ("missing name", without("name"), "name"),
        ("missing image", without("image"), "image"),
        ("missing port", without("port"), "port"),
        ("bad project id", with("projectId", json!("nope")), "project_id"),
        ("reserved variable", with("env", json!([{ "name": "FLOTILLA_NODE_ID", "value": "x" }])), "env[0].name"),
        (
            "two replica counts that disagree",
            {
                let mut body = with("replicaCount", json!(3));
                body["replicas"] = json!(2);
                body
            },
            "replica_count",
        ),
        ("unknown node-loss policy", with("placement", json!({ "nodeLoss": "maybe" })), "placement.node_loss"),
    ];
    for (case, body, field) in &cases {
        let (status, answer) = flotilla.connect_json("CreateDeployment", body.clone()).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert_eq!(answer["code"], "invalid_argument", "{case}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("{field}:")), "{case}: message {message:?} does not name {field}");
    }

    // The same code over gRPC.
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let refused = grpc
        .create_deployment(pb::CreateDeploymentRequest {
            name: "ok".into(),
            image: flotilla_e2e::DEMO_IMAGE.into(),
            port: 8080,
            limits: Some(pb::ResourceLimits { memory_bytes: -1, cpu_millis: 0 }),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().starts_with("limits.memory_bytes:"), "{}", refused.message());

    // Nothing was created: no deployment row, no placement, no container.
    assert_eq!(table_count(&flotilla, "SELECT count(*) FROM deployments").await, 0);
    assert_eq!(table_count(&flotilla, "SELECT count(*) FROM deployment_locations").await, 0);
    // Give a (wrongly) placed replica time to show up before checking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(flotilla.docker.containers().await.is_empty());

    // A valid request right after is accepted, so the refusals were not luck.
    let (status, body) = flotilla.connect_json("CreateDeployment", valid).await;
    assert_eq!(status, 200, "{body}");

    flotilla.stop().await;
}

#[tokio::test]
async fn a_retried_create_with_an_idempotency_key_creates_nothing_twice() {
    let flotilla = TestFlotilla::start().await;
    let body = json!({
        "name": "once", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080, "idempotencyKey": "4b0c1e0a-retry-1"
    });
    let (status, first) = flotilla.connect_json("CreateDeployment", body.clone()).await;
    assert_eq!(status, 200, "{first}");
    let id = first["deployment"]["id"].as_str().unwrap().to_owned();
    let (status, again) = flotilla.connect_json("CreateDeployment", body.clone()).await;
    assert_eq!(status, 200, "a retry succeeds: {again}");
    assert_eq!(again["deployment"]["id"], id.as_str(), "and returns the first result");

    // The same key over gRPC (another protocol, same caller): the same deployment.
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let request = pb::CreateDeploymentRequest {
        name: "once".to_owned(),
        image: flotilla_e2e::DEMO_IMAGE.to_owned(),
        port: 8080,
        idempotency_key: "4b0c1e0a-retry-1".to_owned(),
        ..Default::default()
    };
    let over_grpc = grpc.create_deployment(request.clone()).await.expect("gRPC create").into_inner();
    assert_eq!(over_grpc.deployment.map(|d| d.id), Some(id.clone()));

    // The same key with a different request is refused and changes nothing.
    let changed = pb::CreateDeploymentRequest { port: 9090, ..request };
    let refused = grpc.create_deployment(changed).await.expect_err("a different request");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("idempotency_key"), "{refused:?}");
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 1);
    assert_eq!(flotilla.get(&id).await["port"], 8080);

    // Retries racing each other: one creates, the others wait for it and get its result.
    let racing =
        json!({ "name": "raced", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080, "idempotencyKey": "race-2" });
    let answers =
        futures::future::join_all((0..8).map(|_| flotilla.connect_json("CreateDeployment", racing.clone()))).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            body["deployment"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "eight racing retries, one deployment: {ids:?}");
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 2);

    // Keys that are not 1-128 printable ASCII characters are refused.
    for bad in ["has space", "tab\tkey", "é", &"k".repeat(129)] {
        let (status, error) = flotilla
            .connect_json(
                "CreateDeployment",
                json!({ "name": "badkey", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080, "idempotencyKey": bad }),
            )
            .await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{bad:?}: {error}");
    }
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 2);
    flotilla.stop().await;
}

#[tokio::test]
async fn every_mutating_call_is_in_the_audit_log_and_reads_are_not() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.create(json!({ "name": "audited", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080 })).await;
    let (status, _) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({ "name": "audited-bad", "image": flotilla_e2e::DEMO_IMAGE, "port": 70000 }),
        )
        .await;
    assert_eq!(status, 400);
    flotilla.get(&id).await;
    let (status, body) = flotilla.connect_json("UpdateDeployment", json!({ "id": id, "replicas": 2 })).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = flotilla.connect_node("DrainNode", json!({ "id": "no-such-node" })).await;
    assert_eq!(status, 404);
    let node = flotilla.node_id.to_string();
    // The node exists once its agent's first heartbeat is in.
    let started = Instant::now();
    while flotilla.connect_node("GetNode", json!({ "id": node })).await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "the node registers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = flotilla.connect_node("ActivateNode", json!({ "id": node })).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{body}");

    let rows: Vec<(String, String, String, String, Option<String>)> =
        sqlx::query_as("SELECT method, target, code, subject, message FROM audit_log ORDER BY id")
            .fetch_all(flotilla.db.pool())
            .await
            .unwrap();
    let summary: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str())).collect();
    assert_eq!(
        summary,
        [
            ("CreateDeployment", id.as_str(), "ok"),
            ("CreateDeployment", "audited-bad", "invalid_argument"),
            ("UpdateDeployment", id.as_str(), "ok"),
            ("DrainNode", "no-such-node", "not_found"),
            ("ActivateNode", node.as_str(), "ok"),
            ("DeleteDeployment", id.as_str(), "ok"),
        ],
        "{rows:?}"
    );
    assert!(rows.iter().all(|r| r.3 == "dev"), "who: {rows:?}");
    assert!(rows[1].4.as_deref().is_some_and(|m| m.contains("port")), "why it failed: {rows:?}");
    assert!(rows[0].4.is_none());

    // Read back through the store, scoped to the organization.
    let org: uuid::Uuid = sqlx::query_scalar("SELECT DISTINCT organization_id FROM audit_log")
        .fetch_one(flotilla.db.pool())
        .await
        .unwrap();
    let log = flotilla.db.store.tenant(org.into()).audit_log(10).await.unwrap();
    assert_eq!(log.len(), 6);
    assert_eq!(log[0].method, "DeleteDeployment", "newest first");
    let other = flotilla.db.store.tenant(flotilla_types::OrganizationId::new()).audit_log(10).await.unwrap();
    assert!(other.is_empty(), "another organization sees none of it");
    flotilla.stop().await;
}

/// ListDeployments on `base` over Connect JSON: (HTTP status, body, retry-after header).
async fn list_at(http: &reqwest::Client, base: &str) -> (u16, Value, Option<String>) {
    let response = http
        .post(format!("{base}/flotilla.v1.DeploymentService/ListDeployments"))
        .header("content-type", "application/json")
        .json(&json!({}))
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, response.json().await.unwrap_or(Value::Null), retry_after)
}

#[tokio::test]
async fn rate_limits_are_shared_by_api_replicas_through_redis_and_outlive_it() {
    let redis_url = std::env::var("FLOTILLA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned());
    let redis_addr: std::net::SocketAddr =
        redis_url.trim_start_matches("redis://").trim_end_matches('/').parse().expect("host:port");
    let proxy = flotilla_e2e::proxy::Proxy::tcp(redis_addr).await;
    let proxied = format!("redis://{}", proxy.tcp_address());
    let limit = flotilla_redis::ratelimit::Limit { per_second: 0.2, burst: 10 };
    let flotilla = TestFlotilla::start_with(|s| {
        s.rate_limits.per_user = Some(limit);
        if let Some((url, _)) = &mut s.redis {
            url.clone_from(&proxied);
        }
    })
    .await;
    // A second API replica on the same database and Redis.
    let mut settings = flotilla.settings.clone();
    settings.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false };
    let second =
        flotilla_daemon::Daemon::start(settings, tokio_util::sync::CancellationToken::new()).await.expect("second API");
    let bases = [flotilla.base_url.clone(), format!("http://{}", second.local_addr)];
    let http = reqwest::Client::new();

    // Twenty requests spread over both replicas: the user's burst of ten
    // holds for the cluster, not for each replica.
    let mut allowed = 0;
    for i in 0..20 {
        let (status, body, retry_after) = list_at(&http, &bases[i % 2]).await;
        match status {
            200 => allowed += 1,
            429 => {
                assert_eq!(body["code"], "resource_exhausted", "{body}");
                assert!(body["message"].as_str().unwrap().contains("retry in"), "{body}");
                assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)), "a retry-after header");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(allowed, 10, "one burst across both replicas");
    // gRPC clients get the wait as google.rpc.RetryInfo too.
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(bases[1].clone()).await.unwrap();
    let refused = grpc.list_deployments(pb::ListDeploymentsRequest::default()).await.expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");

    // Redis goes away: every request is still answered (limits now per replica).
    proxy.cut();
    let mut answered = Vec::new();
    for i in 0..8 {
        answered.push(list_at(&http, &bases[i % 2]).await.0);
    }
    assert!(answered.iter().all(|s| *s == 200 || *s == 429), "{answered:?}");
    assert!(answered.contains(&200), "each replica has its own burst while Redis is away: {answered:?}");
    let metrics = http.get(format!("{}/metrics", bases[0])).send().await.unwrap().text().await.unwrap();
    let fallbacks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_api_rate_limit_local_fallbacks_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(fallbacks >= 4.0, "fallbacks are counted: {fallbacks}");

    // Redis is back: the shared limit holds again (this user is still over it).
    // (Pooled connections broken by the cut may each cost one more local
    // decision; each replica still has local burst left, so a refusal can
    // only come from Redis.)
    proxy.restore().await;
    let mut refused_by_redis = false;
    for _ in 0..20 {
        if list_at(&http, &bases[0]).await.0 == 429 {
            refused_by_redis = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused_by_redis, "the shared state in Redis counts again");
    assert!(second.shutdown().await);
    flotilla.stop().await;
}

#[tokio::test]
async fn stop_start_restart_and_scale() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("cycled", 1).await;
    let first = flotilla_e2e::replica_container(&flotilla.get(&id).await, 0).expect("a container");
    let running = |id: &str| {
        let id = id.to_owned();
        move |status: u16, body: &Value| {
            flotilla_e2e::is_running(status, body)
                && body["deployment"]["replicas"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|r| r["status"] == "REPLICA_STATUS_RUNNING") && !r.is_empty())
                && body["deployment"]["id"] == id.as_str()
        }
    };

    // Stop over Connect JSON: the container stops, the spec and placement stay.
    let (status, body) = flotilla.connect_json("StopDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{body}");
    flotilla.wait_for(&id, RUN_TIMEOUT, |_, b| b["deployment"]["status"] == "DEPLOYMENT_STATUS_STOPPED").await;
    let started = Instant::now();
    loop {
        let inspect = flotilla.docker.docker.inspect_container(&first, None::<InspectContainerOptions>).await;
        let state = inspect.expect("stopped, not removed").state.and_then(|s| s.running);
        if state == Some(false) {
            break;
        }
        assert!(started.elapsed() < RUN_TIMEOUT, "the container stops");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, error) = flotilla.connect_json("RestartDeployment", json!({ "id": id })).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("failed_precondition")), "{error}");

    // Start over gRPC: the same container runs again.
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    grpc.start_deployment(pb::StartDeploymentRequest { id: id.clone() }).await.expect("gRPC start");
    let (_, body) = flotilla.wait_for(&id, RUN_TIMEOUT, running(&id)).await;
    assert_eq!(flotilla_e2e::replica_container(&body["deployment"], 0).as_deref(), Some(first.as_str()));
    let generation = body["deployment"]["generation"].as_str().unwrap().parse::<i64>().unwrap();

    // Restart: a new generation, a fresh container, start-first.
    let (status, body) = flotilla.connect_json("RestartDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = flotilla
        .wait_for(&id, RUN_TIMEOUT, |s, b| {
            running(&id)(s, b)
                && flotilla_e2e::replica_container(&b["deployment"], 0).is_some_and(|c| c != first)
                && b["deployment"]["rollout"]["state"] == "ROLLOUT_STATE_COMPLETE"
        })
        .await;
    assert_eq!(body["deployment"]["generation"], (generation + 1).to_string());
    // The old container keeps serving for the rollout's drain, then goes.
    let started = Instant::now();
    while containers_of(&flotilla, &id).await.len() != 1 {
        assert!(started.elapsed() < RUN_TIMEOUT, "the old container is removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Scale up and down.
    let (status, body) = flotilla.connect_json("ScaleDeployment", json!({ "id": id, "replicas": 3 })).await;
    assert_eq!(status, 200, "{body}");
    flotilla
        .wait_for(&id, RUN_TIMEOUT, |s, b| {
            running(&id)(s, b) && b["deployment"]["replicas"].as_array().unwrap().len() == 3
        })
        .await;
    grpc.scale_deployment(pb::ScaleDeploymentRequest { id: id.clone(), replicas: 1 }).await.expect("gRPC scale");
    flotilla
        .wait_for(&id, RUN_TIMEOUT, |s, b| {
            running(&id)(s, b) && b["deployment"]["replicas"].as_array().unwrap().len() == 1
        })
        .await;
    let (status, error) = flotilla.connect_json("ScaleDeployment", json!({ "id": id, "replicas": -1 })).await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{error}");

    // The same calls in Connect's binary protobuf encoding.
    let binary = pb::deployment_service_connect_client::DeploymentServiceClient::builder(flotilla.base_url.clone())
        .use_proto()
        .build()
        .expect("Connect client");
    let stopped = binary.stop_deployment(&pb::StopDeploymentRequest { id: id.clone() }).await.expect("binary stop");
    assert_eq!(stopped.into_inner().deployment.map(|d| d.id), Some(id.clone()));
    flotilla.wait_for(&id, RUN_TIMEOUT, |_, b| b["deployment"]["status"] == "DEPLOYMENT_STATUS_STOPPED").await;
    binary.start_deployment(&pb::StartDeploymentRequest { id: id.clone() }).await.expect("binary start");
    flotilla.wait_for(&id, RUN_TIMEOUT, running(&id)).await;
    let restarted =
        binary.restart_deployment(&pb::RestartDeploymentRequest { id: id.clone() }).await.expect("binary restart");
    assert!(restarted.into_inner().deployment.is_some_and(|d| d.generation > generation + 1));
    let scaled = binary
        .scale_deployment(&pb::ScaleDeploymentRequest { id: id.clone(), replicas: 2 })
        .await
        .expect("binary scale")
        .into_inner();
    assert_eq!(scaled.deployment.map(|d| d.replica_count), Some(2));
    flotilla
        .wait_for(&id, RUN_TIMEOUT, |s, b| {
            running(&id)(s, b)
                && b["deployment"]["replicas"].as_array().unwrap().len() == 2
                && b["deployment"]["rollout"]["state"] == "ROLLOUT_STATE_COMPLETE"
        })
        .await;
    for method in ["StartDeployment", "StopDeployment", "RestartDeployment", "ScaleDeployment"] {
        let mut missing = json!({ "id": uuid::Uuid::now_v7().to_string() });
        if method == "ScaleDeployment" {
            missing["replicas"] = json!(1);
        }
        let (status, error) = flotilla.connect_json(method, missing).await;
        assert_eq!((status, error["code"].as_str()), (404, Some("not_found")), "{method}: {error}");
        let (status, error) = flotilla.connect_json(method, json!({ "id": "nope" })).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{method}: {error}");
    }
    flotilla.stop().await;
}

#[tokio::test]
async fn deployments_are_listed_by_status_and_node_page_by_page() {
    let flotilla = TestFlotilla::start().await;
    let mut ids = Vec::new();
    for name in ["list-a", "list-b", "list-c", "list-d"] {
        ids.push(flotilla.deploy_demo(name, 1).await);
    }
    let (status, body) = flotilla.connect_json("StopDeployment", json!({ "id": ids[1] })).await;
    assert_eq!(status, 200, "{body}");
    flotilla.wait_for(&ids[1], RUN_TIMEOUT, |_, b| b["deployment"]["status"] == "DEPLOYMENT_STATUS_STOPPED").await;

    // An empty list is left out of the JSON, as proto3 does.
    let names = |body: &Value| -> Vec<String> {
        assert!(body.get("code").is_none(), "an error: {body}");
        body["deployments"]
            .as_array()
            .map(|list| list.iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let (_, stopped) = flotilla.connect_json("ListDeployments", json!({ "status": "DEPLOYMENT_STATUS_STOPPED" })).await;
    assert_eq!(names(&stopped), ["list-b"]);
    // Running ones, one per page: every page token leads on, none is lost.
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let (status, page) = flotilla
            .connect_json(
                "ListDeployments",
                json!({ "status": "DEPLOYMENT_STATUS_RUNNING", "pageSize": 1, "pageToken": token }),
            )
            .await;
        assert_eq!(status, 200, "{page}");
        seen.extend(names(&page));
        token = page["nextPageToken"].as_str().unwrap_or("").to_owned();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ["list-a", "list-c", "list-d"]);

    let node = flotilla.node_id.to_string();
    let (_, on_node) = flotilla.connect_json("ListDeployments", json!({ "nodeId": node })).await;
    assert_eq!(names(&on_node).len(), 4);
    let (_, elsewhere) = flotilla.connect_json("ListDeployments", json!({ "nodeId": "some-other-node" })).await;
    assert!(names(&elsewhere).is_empty(), "{elsewhere}");
    for bad in [json!({ "nodeId": "bad node!" }), json!({ "status": 99 })] {
        let (status, error) = flotilla.connect_json("ListDeployments", bad.clone()).await;
        assert_eq!((status, error["code"].as_str()), (400, Some("invalid_argument")), "{bad}: {error}");
    }
    flotilla.stop().await;
}

#[tokio::test]
async fn env_vars_and_routings_are_read_masked_and_changed_through_their_rpcs() {
    let flotilla = TestFlotilla::start().await;
    let (status, created) = flotilla
        .connect_json(
            "CreateDeployment",
            json!({"name": "configured", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080, "domain": "configured.example.com",
                   "env": [{"name": "MODE", "value": "a"}, {"name": "TOKEN", "value": "s3cret", "secret": true}]}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["deployment"]["id"].as_str().expect("id").to_owned();
    let (_, running) = flotilla.wait_for(&id, RUN_TIMEOUT, flotilla_e2e::is_running).await;
    let first = flotilla_e2e::replica_container(&running["deployment"], 0).expect("a container");

    // Read: the secret is masked.
    let (status, env) = flotilla.connect_json("GetEnvVars", json!({"id": id})).await;
    assert_eq!(status, 200, "{env}");
    assert_eq!(
        env["vars"],
        json!([{"name": "MODE", "value": "a"}, {"name": "TOKEN", "value": "********", "secret": true}])
    );

    // Change: MODE changes, the masked secret keeps its value, NEW appears;
    // new containers carry it.
    let generation = env["generation"].clone();
    let (status, updated) = flotilla
        .connect_json(
            "UpdateEnvVars",
            json!({"id": id, "expected_generation": generation, "vars": [
                {"name": "MODE", "value": "b"}, {"name": "TOKEN", "value": "********", "secret": true}, {"name": "NEW", "value": "1"}]}),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert!(!updated.to_string().contains("s3cret"), "{updated}");
    let (_, rolled) = flotilla
        .wait_for(&id, RUN_TIMEOUT, |s, b| {
            flotilla_e2e::is_running(s, b)
                && flotilla_e2e::replica_container(&b["deployment"], 0).is_some_and(|c| c != first)
        })
        .await;
    let container = flotilla_e2e::replica_container(&rolled["deployment"], 0).expect("the new container");
    let inspect =
        flotilla.docker.docker.inspect_container(&container, None::<InspectContainerOptions>).await.expect("inspect");
    let env_in_container = inspect.config.and_then(|c| c.env).unwrap_or_default();
    for expected in ["MODE=b", "TOKEN=s3cret", "NEW=1"] {
        assert!(env_in_container.iter().any(|e| e == expected), "{expected} not in {env_in_container:?}");
    }
    // A stale generation is refused and changes nothing.
    let (status, stale) =
        flotilla.connect_json("UpdateEnvVars", json!({"id": id, "expected_generation": generation, "vars": []})).await;
    assert_eq!((status, stale["code"].as_str()), (409, Some("aborted")), "{stale}");
    let (status, bad) =
        flotilla.connect_json("UpdateEnvVars", json!({"id": id, "vars": [{"name": "1BAD", "value": "x"}]})).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_argument")), "{bad}");
    let (_, env) = flotilla.connect_json("GetEnvVars", json!({"id": id})).await;
    assert_eq!(env["vars"].as_array().map(Vec::len), Some(3), "{env}");

    // Routings: the row the edge serves, then a domain and prefix change
    // that the routing row follows.
    let (status, routings) = flotilla.connect_json("GetRoutings", json!({"id": id})).await;
    assert_eq!(status, 200, "{routings}");
    assert_eq!(routings["domain"], "configured.example.com");
    assert_eq!(routings["routings"][0]["domain"], "configured.example.com", "{routings}");
    let (status, bad) =
        flotilla.connect_json("UpdateRoutings", json!({"id": id, "domain": "evil.com`) || Host(`x"})).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_argument")), "{bad}");
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let request = pb::UpdateRoutingsRequest {
        id: id.clone(),
        domain: Some("moved.example.com".to_owned()),
        path_prefix: Some("/api".to_owned()),
        ..Default::default()
    };
    grpc.update_routings(request).await.expect("gRPC update routings");
    let started = Instant::now();
    loop {
        let reply = grpc.get_routings(pb::GetRoutingsRequest { id: id.clone() }).await.expect("gRPC get").into_inner();
        if reply.routings.iter().any(|r| r.domain == "moved.example.com" && r.path_prefix == "/api") {
            assert_eq!(reply.routings.len(), 1, "the old route is gone: {reply:?}");
            break;
        }
        assert!(started.elapsed() < RUN_TIMEOUT, "the routing row never followed: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    flotilla.connect_json("DeleteDeployment", json!({"id": id})).await;
}

#[tokio::test]
async fn status_changes_stream_until_the_deployment_is_gone() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.create(json!({"name": "watched", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080})).await;
    let watch = flotilla.connect_stream(
        "StreamDeploymentStatus",
        json!({"id": id, "max_duration_seconds": 120}),
        1000,
        Duration::from_secs(100),
    );
    let drive = async {
        flotilla.wait_for(&id, RUN_TIMEOUT, flotilla_e2e::is_running).await;
        let (status, body) = flotilla.connect_json("StopDeployment", json!({"id": id})).await;
        assert_eq!(status, 200, "{body}");
        flotilla.wait_for(&id, RUN_TIMEOUT, |_, b| b["deployment"]["status"] == "DEPLOYMENT_STATUS_STOPPED").await;
        flotilla.connect_json("DeleteDeployment", json!({"id": id})).await;
    };
    let ((messages, end), ()) = tokio::join!(watch, drive);
    let mut statuses: Vec<&str> = messages.iter().filter_map(|m| m["deployment"]["status"].as_str()).collect();
    statuses.dedup();
    eprintln!("statuses seen: {statuses:?}");
    let position = |wanted: &str| statuses.iter().position(|s| *s == wanted);
    let (running, stopped) = (position("DEPLOYMENT_STATUS_RUNNING"), position("DEPLOYMENT_STATUS_STOPPED"));
    assert!(running.is_some() && stopped.is_some() && running < stopped, "{statuses:?}");
    assert!(messages.iter().all(|m| m["deployment"]["id"] == id.as_str()), "only this deployment");
    // Gone: the stream ended by itself, without an error.
    let end = end.expect("the stream ended when the deployment was gone");
    assert!(end.get("error").is_none(), "{end}");

    // A client that goes away ends its stream; the server keeps serving.
    let other = flotilla.create(json!({"name": "left", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080})).await;
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let mut stream = grpc
        .stream_deployment_status(pb::StreamDeploymentStatusRequest { id: other.clone(), max_duration_seconds: 0 })
        .await
        .expect("gRPC stream")
        .into_inner();
    let first = stream.message().await.expect("a message").expect("the current state");
    assert_eq!(first.deployment.map(|d| d.id), Some(other.clone()));
    drop(stream);
    let missing = grpc
        .stream_deployment_status(pb::StreamDeploymentStatusRequest {
            id: uuid::Uuid::new_v4().to_string(),
            max_duration_seconds: 0,
        })
        .await
        .expect_err("an unknown deployment");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    flotilla.connect_json("DeleteDeployment", json!({"id": other})).await;
}

#[tokio::test]
async fn cached_reads_follow_changes_on_every_api_replica() {
    let flotilla = TestFlotilla::start().await;
    // A second API replica on the same database: its cache hears of changes
    // only through PostgreSQL's notices.
    let mut settings = flotilla.settings.clone();
    settings.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false };
    let second =
        flotilla_daemon::Daemon::start(settings, tokio_util::sync::CancellationToken::new()).await.expect("second API");
    let second_url = format!("http://{}", second.local_addr);
    let http = reqwest::Client::new();
    let get = |base: &str, id: &str| {
        let request = http
            .post(format!("{base}/flotilla.v1.DeploymentService/GetDeployment"))
            .header("content-type", "application/json")
            .json(&json!({"id": id}));
        async move { request.send().await.expect("GetDeployment").json::<Value>().await.expect("JSON") }
    };

    let id = flotilla.deploy_demo("cached", 1).await;
    // Reaching "running" through the second replica needs the agent's writes
    // to invalidate its cache.
    let started = Instant::now();
    while !flotilla_e2e::is_running(200, &get(&second_url, &id).await) {
        assert!(started.elapsed() < RUN_TIMEOUT, "the second replica never saw the deployment run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        get(&second_url, &id).await;
    }
    let metrics = http.get(format!("{second_url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let hits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_api_view_cache_hits_total ").and_then(|v| v.trim().parse().ok()))
        .expect("the hits counter");
    assert!(hits >= 19.0, "repeated reads are served from the cache ({hits} hits)");

    // Ten changes through the first replica: the writer reads its own write
    // at once; the second replica follows within a second.
    let mut lags = Vec::new();
    for round in 0..10 {
        let (status, updated) = flotilla
            .connect_json(
                "UpdateDeployment",
                json!({"id": id, "env": {"vars": [{"name": "ROUND", "value": round.to_string()}]}}),
            )
            .await;
        assert_eq!(status, 200, "{updated}");
        let generation = updated["deployment"]["generation"].clone();
        let own = get(&flotilla.base_url, &id).await;
        assert_eq!(own["deployment"]["generation"], generation, "read your own write: {own}");
        let changed = Instant::now();
        loop {
            let seen = get(&second_url, &id).await;
            if seen["deployment"]["generation"] == generation {
                break;
            }
            assert!(changed.elapsed() < Duration::from_secs(1), "the second replica kept a stale answer: {seen}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lags.push(changed.elapsed());
    }
    lags.sort();
    eprintln!("second replica caught up after {:?} (median) / {:?} (max)", lags[lags.len() / 2], lags[lags.len() - 1]);
    second.shutdown().await;
    flotilla.connect_json("DeleteDeployment", json!({"id": id})).await;
}

#[tokio::test]
async fn gzip_is_accepted_and_oversized_requests_are_refused_without_a_trace() {
    use std::io::Write as _;
    let flotilla =
        TestFlotilla::start_with(|s| s.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false })
            .await;
    let url = format!("{}/flotilla.v1.DeploymentService/CreateDeployment", flotilla.base_url);

    // Connect JSON, gzip-compressed request, gzip accepted for the answer.
    let body = json!({"name": "zipped", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080}).to_string();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body.as_bytes()).expect("gzip");
    let response = flotilla
        .http
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(encoder.finish().expect("gzip"))
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["deployment"]["name"], "zipped");

    // gRPC with gzip both ways.
    let channel =
        tonic::transport::Endpoint::from_shared(flotilla.base_url.clone()).expect("URL").connect().await.expect("gRPC");
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::new(channel)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let listed = grpc.list_deployments(pb::ListDeploymentsRequest::default()).await.expect("gRPC gzip").into_inner();
    assert_eq!(listed.deployments.len(), 1);

    // Larger than the 4 MiB limit: refused, nothing created.
    let huge = json!({"name": "huge", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080, "env": [{"name": "BIG", "value": "x".repeat(5 * 1024 * 1024)}]});
    let (status, refused) = flotilla.connect_json("CreateDeployment", huge).await;
    assert!((400..500).contains(&status), "{status}: {refused}");
    assert_eq!(refused["code"], "resource_exhausted", "{refused}");
    // A small body that inflates past the limit (a gzip bomb) is refused too.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(
        format!(r#"{{"name": "bomb", "image": "x", "port": 1, "domain": "{}"}}"#, "a".repeat(16 * 1024 * 1024))
            .as_bytes(),
    )
    .expect("gzip");
    let bomb = bomb.finish().expect("gzip");
    assert!(bomb.len() < 100 * 1024, "the compressed body is small ({} bytes)", bomb.len());
    let response = flotilla
        .http
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!((400..500).contains(&status), "{status}: {answer}");
    assert_eq!(flotilla.count("SELECT count(*) FROM deployments").await, 1, "only the gzip-compressed one was created");
    flotilla.stop().await;
}

#[tokio::test]
async fn logs_stream_from_the_replicas_node_in_order_and_follow() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.deploy_demo("chatty", 2).await;
    let deployment = flotilla.get(&id).await;
    let endpoints: Vec<String> = deployment["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["endpoint"].as_str().expect("endpoint").to_owned())
        .collect();
    for (replica, endpoint) in endpoints.iter().enumerate() {
        for n in 0..10 {
            let _ = reqwest::get(format!("{endpoint}/r{replica}-{n:02}")).await.expect("request");
        }
    }
    // Not following: the lines there are, then the end.
    let (lines, end) = flotilla
        .connect_stream(
            "StreamDeploymentLogs",
            json!({"deployment_id": id, "tail": 1000}),
            10_000,
            Duration::from_secs(20),
        )
        .await;
    assert!(end.as_ref().is_some_and(|e| e.get("error").is_none()), "ends cleanly: {end:?}");
    for replica in 0..2 {
        let paths: Vec<String> = lines
            .iter()
            .filter(|l| l["replicaIndex"].as_i64().unwrap_or(0) == replica)
            .filter_map(|l| l["text"].as_str()?.split("url:").nth(1).map(str::to_owned))
            .collect();
        let expected: Vec<String> = (0..10).map(|n| format!("/r{replica}-{n:02}")).collect();
        assert_eq!(paths, expected, "replica {replica}'s lines, in order");
    }
    // Following one replica: a later request arrives on the open stream.
    let follow = flotilla.connect_stream(
        "StreamDeploymentLogs",
        json!({"deployment_id": id, "follow": true, "tail": 1, "replica_index": 1}),
        1000,
        Duration::from_secs(3),
    );
    let poke = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = reqwest::get(format!("{}/later", endpoints[1])).await.expect("request");
    };
    let ((followed, _), ()) = tokio::join!(follow, poke);
    assert!(followed.iter().any(|l| l["text"].as_str().is_some_and(|t| t.contains("url:/later"))), "{followed:?}");
    assert!(followed.iter().all(|l| l["replicaIndex"] == 1), "only replica 1");
    let (_, missing) = flotilla
        .connect_stream(
            "StreamDeploymentLogs",
            json!({"deployment_id": id, "replica_index": 7}),
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(missing.as_ref().and_then(|e| e["error"]["code"].as_str()), Some("not_found"), "{missing:?}");
    flotilla.connect_json("DeleteDeployment", json!({"id": id})).await;
}

#[tokio::test]
async fn reads_never_fail_while_redis_goes_away_and_comes_back() {
    let redis_url = std::env::var("FLOTILLA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:56379".to_owned());
    let redis_addr: std::net::SocketAddr =
        redis_url.trim_start_matches("redis://").trim_end_matches('/').parse().expect("host:port");
    let proxy = flotilla_e2e::proxy::Proxy::tcp(redis_addr).await;
    let proxied = format!("redis://{}", proxy.tcp_address());
    // Limits high enough never to refuse, so every request asks Redis.
    let limit = flotilla_redis::ratelimit::Limit { per_second: 10_000.0, burst: 10_000 };
    let flotilla = TestFlotilla::start_with(|s| {
        s.rate_limits.per_user = Some(limit);
        s.rate_limits.per_organization = Some(limit);
        if let Some((url, _)) = &mut s.redis {
            url.clone_from(&proxied);
        }
    })
    .await;
    let id = flotilla.deploy_demo("steady", 1).await;
    let (mut reads, mut failed) = (0, Vec::new());
    let started = Instant::now();
    let (mut cut, mut restored) = (false, false);
    let mut said_away = false;
    let redis_health = || async {
        let health: Value =
            flotilla.http.get(format!("{}/health", flotilla.base_url)).send().await.unwrap().json().await.unwrap();
        health["components"]["redis"]["health"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(redis_health().await, "ok");
    while started.elapsed() < Duration::from_secs(9) {
        if !cut && started.elapsed() > Duration::from_secs(1) {
            proxy.cut();
            cut = true;
        }
        if !restored && started.elapsed() > Duration::from_secs(7) {
            proxy.restore().await;
            restored = true;
        }
        if cut && !restored && !said_away && reads % 20 == 0 {
            said_away = redis_health().await == "degraded";
        }
        let (status, body) = if reads % 2 == 0 {
            flotilla.connect_json("GetDeployment", json!({"id": id})).await
        } else {
            flotilla.connect_json("ListDeployments", json!({})).await
        };
        reads += 1;
        if status != 200 {
            failed.push(format!("{status} {body}"));
        }
    }
    eprintln!("{reads} reads across a 6 s Redis outage, {} failed", failed.len());
    assert!(reads > 100, "the reads kept going: {reads}");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(said_away, "/health said Redis was away while it was");
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_health().await != "ok" {
        assert!(Instant::now() < deadline, "/health did not see Redis back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back to the shared limiter: Redis decisions resume.
    let metrics =
        flotilla.http.get(format!("{}/metrics", flotilla.base_url)).send().await.unwrap().text().await.unwrap();
    let fallbacks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_api_rate_limit_local_fallbacks_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(fallbacks >= 1.0, "decisions while Redis was away were taken locally and counted: {fallbacks}");
    flotilla.connect_json("DeleteDeployment", json!({"id": id})).await;
}
