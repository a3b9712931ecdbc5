//! Node selection over a snapshot of the schedulable nodes. Pure, so it is
//! tested directly; the snapshot's counts are updated as replicas are placed
//! within one round.

use flotilla_store::NodeRecord;
use flotilla_types::NodeId;

/// A node's load as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    pub node_id: NodeId,
    pub address: String,
    pub deployment_count: i32,
    pub max_deployments: i32,
    pub used_cpu_millis: i64,
}

impl From<&NodeRecord> for NodeLoad {
    fn from(node: &NodeRecord) -> Self {
        Self {
            node_id: node.node_id.clone(),
            address: node.address.clone(),
            deployment_count: node.deployment_count,
            max_deployments: node.max_deployments,
            used_cpu_millis: node.used_cpu_millis,
        }
    }
}

/// Why no node was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoNode {
    #[error("no schedulable node: none is active, ready and sending heartbeats")]
    NoNodes,
    #[error("every schedulable node is full ({0} nodes at their max deployments)")]
    AllFull(usize),
}

/// Least-loaded: the node with the fewest replicas, then the lowest CPU use,
/// then the smallest id (so the choice is deterministic). Nodes in `avoid`
/// (already running a replica of the same deployment) are taken only when
/// no other node has room.
pub fn least_loaded(nodes: &[NodeLoad], avoid: &[NodeId]) -> Result<usize, NoNode> {
    if nodes.is_empty() {
        return Err(NoNode::NoNodes);
    }
    let with_room = || nodes.iter().enumerate().filter(|(_, n)| n.deployment_count < n.max_deployments);
    let key = |n: &NodeLoad| (n.deployment_count, n.used_cpu_millis, n.node_id.clone());
    with_room()
        .filter(|(_, n)| !avoid.contains(&n.node_id))
        .min_by_key(|(_, n)| key(n))
        .or_else(|| with_room().min_by_key(|(_, n)| key(n)))
        .map(|(i, _)| i)
        .ok_or(NoNode::AllFull(nodes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, count: i32, max: i32, cpu: i64) -> NodeLoad {
        NodeLoad {
            node_id: NodeId::parse(id).unwrap(),
            address: "127.0.0.1".into(),
            deployment_count: count,
            max_deployments: max,
            used_cpu_millis: cpu,
        }
    }

    #[test]
    fn fewest_deployments_then_lowest_cpu() {
        let nodes = [node("a", 3, 10, 0), node("b", 1, 10, 500), node("c", 1, 10, 100)];
        assert_eq!(least_loaded(&nodes, &[]), Ok(2));
    }

    #[test]
    fn full_nodes_are_skipped_and_reported() {
        let nodes = [node("a", 10, 10, 0), node("b", 4, 5, 0)];
        assert_eq!(least_loaded(&nodes, &[]), Ok(1));
        let full = [node("a", 10, 10, 0)];
        assert_eq!(least_loaded(&full, &[]), Err(NoNode::AllFull(1)));
        assert_eq!(least_loaded(&[], &[]), Err(NoNode::NoNodes));
    }

    #[test]
    fn replicas_spread_unless_there_is_no_other_room() {
        let nodes = [node("a", 0, 10, 0), node("b", 5, 10, 0)];
        let a = NodeId::parse("a").unwrap();
        assert_eq!(least_loaded(&nodes, std::slice::from_ref(&a)), Ok(1));
        let only_a = [node("a", 0, 10, 0)];
        assert_eq!(least_loaded(&only_a, &[a]), Ok(0));
    }

    #[test]
    fn a_round_never_exceeds_a_nodes_max() {
        let mut nodes = vec![node("a", 0, 3, 0), node("b", 0, 2, 0)];
        let mut placed = 0;
        while let Ok(i) = least_loaded(&nodes, &[]) {
            nodes[i].deployment_count += 1;
            placed += 1;
        }
        assert_eq!(placed, 5);
        assert!(nodes.iter().all(|n| n.deployment_count <= n.max_deployments));
    }
}
