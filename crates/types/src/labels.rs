//! Labels Flotilla puts on the containers it manages. The agent only ever
//! touches containers carrying [`MANAGED`] and its own [`NODE_ID`].

pub const MANAGED: &str = "flotilla.managed";
pub const DEPLOYMENT_ID: &str = "flotilla.deployment.id";
pub const DEPLOYMENT_NAME: &str = "flotilla.deployment.name";
/// The organization the deployment belongs to (metrics are kept per organization).
pub const ORGANIZATION_ID: &str = "flotilla.organization.id";
pub const NODE_ID: &str = "flotilla.node.id";
pub const REPLICA_ID: &str = "flotilla.replica.id";
pub const REPLICA_INDEX: &str = "flotilla.replica.index";
pub const GENERATION: &str = "flotilla.generation";

/// Label filter (`key=value`) selecting the managed containers of one node.
pub fn node_filter(node_id: &str) -> [String; 2] {
    [format!("{MANAGED}=true"), format!("{NODE_ID}={node_id}")]
}
