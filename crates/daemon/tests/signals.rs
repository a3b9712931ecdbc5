//! The real `flotillad` binary: SIGTERM drains and exits within the grace
//! period, and leaves user containers running.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::query_parameters::InspectContainerOptions;
use flotilla_test_utils::{DEMO_IMAGE, TEST_LABEL, TestDb, TestDocker, TestRedis, free_port};
use serde_json::{Value, json};

/// Kills the daemon if the test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
async fn sigterm_drains_and_exits_within_the_grace_period_leaving_apps_running() {
    let db = TestDb::empty().await;
    let redis = TestRedis::new().await;
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let state = std::env::temp_dir().join(format!("flotilla-sigterm-{}", docker.test_id));
    let port = free_port();
    let api = format!("http://127.0.0.1:{port}");
    let grace = Duration::from_secs(5);
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_flotillad"))
            .args(["all", "--insecure-dev-auth", "--publish-ip", "127.0.0.1", "--advertise-address", "127.0.0.1"])
            .args(["--database-url", &db.url, "--redis-url", &redis.url, "--redis-prefix", &redis.prefix])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", docker.node_id(0).as_str()])
            .args(["--node-id-file", &state.join("node-id").display().to_string()])
            .args(["--container-label", &format!("{TEST_LABEL}={}", docker.test_id)])
            .args(["--shutdown-grace", "5s"])
            .env("FLOTILLA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("flotillad starts"),
    );

    let http = reqwest::Client::new();
    let started = Instant::now();
    while !http.get(format!("{api}/health")).send().await.map(|r| r.status().is_success()).unwrap_or(false) {
        assert!(started.elapsed() < Duration::from_secs(30), "flotillad never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let created =
        call(&http, &api, "CreateDeployment", json!({ "name": "sig", "image": DEMO_IMAGE, "port": 8080 })).await;
    let id = created["deployment"]["id"].as_str().expect("id").to_owned();
    let container = loop {
        let got = call(&http, &api, "GetDeployment", json!({ "id": id })).await;
        if got["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING" {
            break got["deployment"]["replicas"][0]["containerId"].as_str().expect("container").to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never running: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let signalled = Instant::now();
    let status = Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = daemon.0.try_wait().expect("wait") {
            break exit;
        }
        assert!(signalled.elapsed() < grace + Duration::from_secs(2), "still running past its grace period");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "clean exit: {exit}");
    assert!(took < grace, "drained in {took:?}");

    let inspect = docker.docker.inspect_container(&container, None::<InspectContainerOptions>).await.expect("inspect");
    assert_eq!(inspect.state.and_then(|s| s.running), Some(true), "the app keeps running after flotillad exits");
    let _ = std::fs::remove_dir_all(state);
}
