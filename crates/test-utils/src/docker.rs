use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
};
use flotilla_types::NodeId;

use crate::{block_on_cleanup, unique_suffix};

/// Label every container and network a test makes carries, with the test's id.
pub const TEST_LABEL: &str = "flotilla-test.id";
/// The demo image `scripts/build-images.sh` builds.
pub const DEMO_IMAGE: &str = "flotilla/demo-http:latest";

/// A test's share of the local Docker Engine: a unique label value and node
/// ids derived from it. On drop, every container and network carrying the
/// label is removed.
#[derive(Debug)]
pub struct TestDocker {
    pub docker: Docker,
    pub test_id: String,
}

impl TestDocker {
    pub async fn new() -> Self {
        let docker = Docker::connect_with_socket_defaults()
            .expect("Docker socket")
            .negotiate_version()
            .await
            .expect("cannot reach the Docker Engine");
        Self { docker, test_id: unique_suffix() }
    }

    /// Labels to put on everything this test makes.
    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(TEST_LABEL.to_owned(), self.test_id.clone())])
    }

    /// A node id unique to this test; `n` tells several agents apart.
    pub fn node_id(&self, n: usize) -> NodeId {
        NodeId::parse(&format!("t{}-n{n}", self.test_id)).expect("valid node id")
    }

    /// Fails the test early, with the fix, when the demo image is missing.
    pub async fn require_demo_image(&self) {
        if self.docker.inspect_image(DEMO_IMAGE).await.is_err() {
            panic!("image {DEMO_IMAGE} is missing; build it with scripts/build-images.sh");
        }
    }

    /// Ids of this test's containers, running or not.
    pub async fn containers(&self) -> Vec<String> {
        list_labelled(&self.docker, &self.test_id).await
    }
}

async fn list_labelled(docker: &Docker, test_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label", vec![format!("{TEST_LABEL}={test_id}")])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    docker.list_containers(Some(options)).await.unwrap_or_default().into_iter().filter_map(|c| c.id).collect()
}

impl Drop for TestDocker {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let test_id = self.test_id.clone();
        block_on_cleanup(async move {
            let remove = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
            let ids = list_labelled(&docker, &test_id).await;
            futures::future::join_all(ids.iter().map(|id| docker.remove_container(id, Some(remove.clone())))).await;
            let filters = HashMap::from([("label", vec![format!("{TEST_LABEL}={test_id}")])]);
            let options = ListNetworksOptionsBuilder::default().filters(&filters).build();
            for network in docker.list_networks(Some(options)).await.unwrap_or_default() {
                if let Some(id) = network.id {
                    let _ = docker.remove_network(&id).await;
                }
            }
        });
    }
}
