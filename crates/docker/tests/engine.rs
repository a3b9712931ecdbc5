//! The Docker client against the real engine.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_docker::{ContainerSpec, DockerClient, DockerConfig, RunState};
use flotilla_test_utils::{DEMO_IMAGE, TEST_LABEL, TestDocker, free_port};
use flotilla_types::RestartPolicy;

fn spec(docker: &TestDocker, name: &str, port: u16) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: DEMO_IMAGE.to_owned(),
        env: vec!["PORT=8080".to_owned()],
        labels: HashMap::from([(TEST_LABEL.to_owned(), docker.test_id.clone())]),
        container_port: 8080,
        host_ip: "127.0.0.1".to_owned(),
        host_port: port,
        memory_bytes: 32 * 1024 * 1024,
        nano_cpus: 250_000_000,
        restart_policy: RestartPolicy::OnFailure { max_retries: 3 },
        healthcheck: None,
        network: None,
        stop_grace: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn create_start_restart_stop_remove() {
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let client = DockerClient::connect(&DockerConfig::default()).await.expect("engine");
    let name = format!("engine-test-{}", docker.test_id);
    let id = client.create_container(&spec(&docker, &name, free_port())).await.expect("create");
    client.start_container(&id).await.expect("start");
    let status = client.status(&id).await.unwrap().expect("exists");
    assert_eq!(status.state, RunState::Running);
    assert!(status.ip_address.is_some());

    let raw = docker.docker.inspect_container(&id, None).await.unwrap();
    let host = raw.host_config.unwrap();
    assert_eq!(host.memory, Some(32 * 1024 * 1024));
    assert_eq!(host.nano_cpus, Some(250_000_000));
    assert_eq!(host.init, Some(true));
    let policy = host.restart_policy.unwrap();
    assert_eq!(policy.name.map(|n| n.to_string()).as_deref(), Some("on-failure"));
    assert_eq!(policy.maximum_retry_count, Some(3));
    let started_before = raw.state.unwrap().started_at;

    client.restart_container(&id, Duration::from_secs(2)).await.expect("restart");
    let raw = docker.docker.inspect_container(&id, None).await.unwrap();
    assert_ne!(raw.state.unwrap().started_at, started_before, "started again");

    client.stop_container(&id, Duration::from_secs(2)).await.expect("stop");
    assert_eq!(client.status(&id).await.unwrap().unwrap().state, RunState::Exited);
    client.stop_container(&id, Duration::from_secs(2)).await.expect("stopping twice is fine");
    client.remove_container(&id).await.expect("remove");
    assert!(client.status(&id).await.unwrap().is_none());
    client.remove_container(&id).await.expect("removing twice is fine");
}

#[tokio::test]
async fn a_taken_host_port_is_reported_as_such() {
    let docker = TestDocker::new().await;
    docker.require_demo_image().await;
    let client = DockerClient::connect(&DockerConfig::default()).await.expect("engine");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let id = client.create_container(&spec(&docker, &format!("port-test-{}", docker.test_id), port)).await.unwrap();
    let error = client.start_container(&id).await.expect_err("the port is taken");
    assert!(matches!(error, flotilla_docker::DockerError::PortInUse { .. }), "{error}");
    client.remove_container(&id).await.unwrap();
}

#[tokio::test]
async fn concurrent_network_creates_converge_on_one_network() {
    let docker = TestDocker::new().await;
    let name = format!("flotilla-test-net-{}", docker.test_id);
    let labels = docker.labels();
    // Three processes' worth of clients, two callers each, all at once.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(DockerClient::connect(&DockerConfig::default()).await.expect("engine"));
    }
    let racing = futures::future::join_all(
        clients.iter().flat_map(|c| [c.ensure_network(&name, &labels), c.ensure_network(&name, &labels)]),
    )
    .await;
    for result in &racing {
        result.as_ref().expect("ensure");
    }
    // Callers of one client always agree.
    for pair in racing.chunks(2) {
        assert_eq!(pair[0].as_ref().unwrap(), pair[1].as_ref().unwrap());
    }
    // Afterwards everyone settles on one network, and it is the only one left.
    let settled = futures::future::join_all(clients.iter().map(|c| c.ensure_network(&name, &labels))).await;
    let settled: Vec<String> = settled.into_iter().map(|r| r.expect("ensure")).collect();
    assert!(settled.iter().all(|id| *id == settled[0]), "{settled:?}");
    let filters = HashMap::from([("name", vec![name.clone()])]);
    let options = bollard::query_parameters::ListNetworksOptionsBuilder::default().filters(&filters).build();
    let left: Vec<_> = docker
        .docker
        .list_networks(Some(options))
        .await
        .unwrap()
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name.as_str()))
        .collect();
    assert_eq!(left.len(), 1, "duplicates removed");
    assert_eq!(left[0].id.as_deref(), Some(settled[0].as_str()));
    assert!(clients[0].remove_network(&name).await.unwrap());
}
