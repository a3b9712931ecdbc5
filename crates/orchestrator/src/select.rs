//! Node selection over a snapshot of `node_metadata`. Pure: no I/O, so every
//! strategy and filter is tested directly, and the orchestrator's round keeps
//! one [`Placer`] per round, updating it as replicas are placed.
//!
//! A decision must not scan every node: the eligible nodes are kept in
//! ordered indexes (by load, by resource score, by id) that are updated as
//! replicas are placed, so a decision walks from the best end of one index
//! and stops at the first node that fits. [`choose_by_sorting`] is the naive
//! baseline (sort everything, every time) that the benchmark and the
//! property tests compare against.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use flotilla_store::NodeRecord;
use flotilla_types::{Constraints, NodeId, PlacementStrategy};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: NodeId,
    pub address: String,
    pub availability: String,
    pub status: String,
    /// Heard from within the heartbeat timeout.
    pub heartbeat_fresh: bool,
    pub labels: BTreeMap<String, String>,
    pub total_cpu_millis: i64,
    pub total_memory_bytes: i64,
    /// Measured use, from the heartbeat.
    pub used_cpu_millis: i64,
    /// The limits of the replicas placed on it.
    pub reserved_cpu_millis: i64,
    pub reserved_memory_bytes: i64,
    pub deployment_count: i32,
    pub max_deployments: i32,
}

impl Candidate {
    pub fn from_record(node: &NodeRecord, heartbeat_fresh: bool, reserved_cpu: i64, reserved_memory: i64) -> Self {
        Self {
            node_id: node.node_id.clone(),
            address: node.address.clone(),
            availability: node.availability.clone(),
            status: node.status.clone(),
            heartbeat_fresh,
            labels: node.labels.clone(),
            total_cpu_millis: node.total_cpu_millis,
            total_memory_bytes: node.total_memory_bytes,
            used_cpu_millis: node.used_cpu_millis,
            reserved_cpu_millis: reserved_cpu,
            reserved_memory_bytes: reserved_memory,
            deployment_count: node.deployment_count,
            max_deployments: node.max_deployments,
        }
    }

    /// Why this node can take no work at all, if it cannot.
    fn static_filter(&self) -> Option<Filter> {
        if self.availability != "active" {
            Some(Filter::NotActive)
        } else if self.status != "ready" {
            Some(Filter::NotReady)
        } else if !self.heartbeat_fresh {
            Some(Filter::HeartbeatStale)
        } else {
            None
        }
    }

    /// Why this node cannot take `request`, if it cannot.
    fn request_filter(&self, request: &Request<'_>) -> Option<Filter> {
        if self.deployment_count >= self.max_deployments {
            return Some(Filter::NoFreeSlot);
        }
        // A node whose totals are unknown (0) is not judged on them.
        if request.cpu_millis > 0
            && self.total_cpu_millis > 0
            && self.reserved_cpu_millis + request.cpu_millis > self.total_cpu_millis
        {
            return Some(Filter::NotEnoughCpu);
        }
        if request.memory_bytes > 0
            && self.total_memory_bytes > 0
            && self.reserved_memory_bytes + request.memory_bytes > self.total_memory_bytes
        {
            return Some(Filter::NotEnoughMemory);
        }
        if !request.constraints.matches(&self.labels) {
            return Some(Filter::Constraints);
        }
        None
    }

    /// Free CPU, memory and slots as fractions of the totals, summed: 0 (full)
    /// to 3 (empty), scaled to an integer so it can key an index.
    fn free_score(&self) -> u64 {
        let fraction = |total: i64, used: i64| {
            if total <= 0 { 1.0 } else { ((total - used) as f64 / total as f64).clamp(0.0, 1.0) }
        };
        let free = fraction(self.total_cpu_millis, self.reserved_cpu_millis)
            + fraction(self.total_memory_bytes, self.reserved_memory_bytes)
            + fraction(i64::from(self.max_deployments), i64::from(self.deployment_count));
        (free * 1_000_000.0) as u64
    }

    fn load_key(&self) -> (i32, i64) {
        (self.deployment_count, self.used_cpu_millis)
    }
}

/// A filter that removed a node from consideration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Filter {
    NotActive,
    NotReady,
    HeartbeatStale,
    NoFreeSlot,
    NotEnoughCpu,
    NotEnoughMemory,
    Constraints,
}

impl Filter {
    fn describe(self, request: Option<&Request<'_>>) -> String {
        match self {
            Self::NotActive => "drained or paused".to_owned(),
            Self::NotReady => "down or suspect".to_owned(),
            Self::HeartbeatStale => "without a recent heartbeat".to_owned(),
            Self::NoFreeSlot => "at their max deployments".to_owned(),
            Self::NotEnoughCpu => {
                format!("without {}m CPU unreserved", request.map_or(0, |r| r.cpu_millis))
            }
            Self::NotEnoughMemory => {
                format!("without {} MiB memory unreserved", request.map_or(0, |r| r.memory_bytes >> 20))
            }
            Self::Constraints => match request {
                Some(r) => format!("not matching {}", r.constraints),
                None => "not matching the constraints".to_owned(),
            },
        }
    }
}

/// What one replica asks of its node.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub strategy: PlacementStrategy,
    pub cpu_millis: i64,
    pub memory_bytes: i64,
    pub constraints: &'a Constraints,
    /// Nodes already running a replica of the same deployment: taken only
    /// when no other node fits (anti-affinity).
    pub avoid: &'a [NodeId],
}

/// A node chosen for a replica, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    pub reason: String,
}

/// Why no node fits a replica: how many nodes each filter removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NoFit {
    pub nodes: usize,
    pub removed: BTreeMap<Filter, usize>,
    description: String,
}

impl fmt::Display for NoFit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl NoFit {
    fn new(nodes: usize, removed: BTreeMap<Filter, usize>, request: &Request<'_>) -> Self {
        let description = if nodes == 0 {
            "no node fits: the cluster has no nodes".to_owned()
        } else {
            let parts: Vec<String> =
                removed.iter().map(|(filter, n)| format!("{n} {}", filter.describe(Some(request)))).collect();
            format!("no node fits ({nodes} nodes): {}", parts.join(", "))
        };
        Self { nodes, removed, description }
    }
}

/// The nodes of one round, indexed for each strategy.
#[derive(Debug, Clone)]
pub struct Placer {
    /// Sorted by node id, so an index into it orders nodes by id.
    nodes: Vec<Candidate>,
    static_filtered: Vec<Option<Filter>>,
    /// Eligible nodes with a free slot, by (deployment count, CPU use, index).
    by_load: BTreeSet<(i32, i64, u32)>,
    /// Eligible nodes with a free slot, by (free score, index): binpack.
    by_score: BTreeSet<(u64, u32)>,
    /// The same, most free first, then by index: spread.
    by_free: BTreeSet<(Reverse<u64>, u32)>,
    /// Eligible nodes with a free slot, by index (= by node id).
    by_id: BTreeSet<u32>,
    /// The node round-robin chose last.
    cursor: Option<NodeId>,
}

impl Placer {
    /// Indexes `nodes`; `cursor` is the node round-robin chose last (kept in
    /// the database, so the rotation survives restarts and leader changes).
    pub fn new(mut nodes: Vec<Candidate>, cursor: Option<NodeId>) -> Self {
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let static_filtered: Vec<Option<Filter>> = nodes.iter().map(Candidate::static_filter).collect();
        let mut placer = Self {
            nodes,
            static_filtered,
            by_load: BTreeSet::new(),
            by_score: BTreeSet::new(),
            by_free: BTreeSet::new(),
            by_id: BTreeSet::new(),
            cursor,
        };
        for i in 0..placer.nodes.len() {
            placer.index(i);
        }
        placer
    }

    pub fn nodes(&self) -> &[Candidate] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> &Candidate {
        &self.nodes[index]
    }

    /// The node round-robin chose last.
    pub fn cursor(&self) -> Option<&NodeId> {
        self.cursor.as_ref()
    }

    fn index(&mut self, i: usize) {
        let node = &self.nodes[i];
        if self.static_filtered[i].is_none() && node.deployment_count < node.max_deployments {
            let (count, cpu) = node.load_key();
            self.by_load.insert((count, cpu, i as u32));
            let score = node.free_score();
            self.by_score.insert((score, i as u32));
            self.by_free.insert((Reverse(score), i as u32));
            self.by_id.insert(i as u32);
        }
    }

    fn unindex(&mut self, i: usize) {
        let node = &self.nodes[i];
        let (count, cpu) = node.load_key();
        self.by_load.remove(&(count, cpu, i as u32));
        let score = node.free_score();
        self.by_score.remove(&(score, i as u32));
        self.by_free.remove(&(Reverse(score), i as u32));
        self.by_id.remove(&(i as u32));
    }

    /// The nodes in the order `strategy` prefers them.
    fn preference(&self, strategy: PlacementStrategy) -> Box<dyn Iterator<Item = usize> + '_> {
        match strategy {
            PlacementStrategy::LeastLoaded => Box::new(self.by_load.iter().map(|k| k.2 as usize)),
            PlacementStrategy::Binpack => Box::new(self.by_score.iter().map(|k| k.1 as usize)),
            PlacementStrategy::Spread => Box::new(self.by_free.iter().map(|k| k.1 as usize)),
            PlacementStrategy::RoundRobin => {
                let start = match &self.cursor {
                    Some(cursor) => self.nodes.partition_point(|n| &n.node_id <= cursor) as u32,
                    None => 0,
                };
                Box::new(self.by_id.range(start..).chain(self.by_id.range(..start)).map(|i| *i as usize))
            }
        }
    }

    /// Chooses a node for one replica. Nodes in `request.avoid` are taken
    /// only when no other node fits.
    pub fn choose(&self, request: &Request<'_>) -> Result<Choice, NoFit> {
        let mut fallback = None;
        for i in self.preference(request.strategy) {
            let node = &self.nodes[i];
            if node.request_filter(request).is_some() {
                continue;
            }
            if request.avoid.contains(&node.node_id) {
                // The best avoided node, should no other fit.
                fallback.get_or_insert(i);
                continue;
            }
            return Ok(Choice { index: i, reason: self.reason(i, request, false) });
        }
        match fallback {
            Some(i) => Ok(Choice { index: i, reason: self.reason(i, request, true) }),
            None => Err(self.no_fit(request)),
        }
    }

    fn reason(&self, i: usize, request: &Request<'_>, shared: bool) -> String {
        let node = &self.nodes[i];
        let mut reason = match request.strategy {
            PlacementStrategy::LeastLoaded => format!(
                "least-loaded: {} of {} deployments, {}m CPU in use",
                node.deployment_count, node.max_deployments, node.used_cpu_millis
            ),
            PlacementStrategy::RoundRobin => "round-robin: the next eligible node after the last one chosen".to_owned(),
            PlacementStrategy::Binpack | PlacementStrategy::Spread => format!(
                "{}: free score {:.2} of 3 ({}m of {}m CPU and {} of {} MiB reserved, {} of {} deployments)",
                request.strategy,
                node.free_score() as f64 / 1e6,
                node.reserved_cpu_millis,
                node.total_cpu_millis,
                node.reserved_memory_bytes >> 20,
                node.total_memory_bytes >> 20,
                node.deployment_count,
                node.max_deployments
            ),
        };
        if !request.constraints.is_empty() {
            reason.push_str(&format!("; matches {}", request.constraints));
        }
        if shared {
            reason.push_str("; shares the node with another replica: no other node fits");
        }
        reason
    }

    /// Counts why each node was removed (only when nothing fits).
    fn no_fit(&self, request: &Request<'_>) -> NoFit {
        let mut removed = BTreeMap::new();
        for (node, filter) in self.nodes.iter().zip(&self.static_filtered) {
            if let Some(filter) = filter.or_else(|| node.request_filter(request)) {
                *removed.entry(filter).or_insert(0) += 1;
            }
        }
        NoFit::new(self.nodes.len(), removed, request)
    }

    /// Records that a replica with `request`'s needs was placed on node `i`.
    pub fn commit(&mut self, i: usize, request: &Request<'_>) {
        self.unindex(i);
        let node = &mut self.nodes[i];
        node.deployment_count += 1;
        node.reserved_cpu_millis += request.cpu_millis.max(0);
        node.reserved_memory_bytes += request.memory_bytes.max(0);
        if request.strategy == PlacementStrategy::RoundRobin {
            self.cursor = Some(node.node_id.clone());
        }
        self.index(i);
    }

    /// Records that a replica with these needs left node `i`.
    pub fn release(&mut self, i: usize, cpu_millis: i64, memory_bytes: i64) {
        self.unindex(i);
        let node = &mut self.nodes[i];
        node.deployment_count = (node.deployment_count - 1).max(0);
        node.reserved_cpu_millis = (node.reserved_cpu_millis - cpu_millis.max(0)).max(0);
        node.reserved_memory_bytes = (node.reserved_memory_bytes - memory_bytes.max(0)).max(0);
        self.index(i);
    }
}

/// The naive baseline: filter every node and sort all that fit, for every
/// decision. Same preferences as [`Placer::choose`] (round-robin aside).
pub fn choose_by_sorting(nodes: &[Candidate], request: &Request<'_>) -> Option<usize> {
    let mut fit: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].static_filter().is_none() && nodes[i].request_filter(request).is_none())
        .collect();
    let key = |i: &usize| {
        let n = &nodes[*i];
        let avoided = request.avoid.contains(&n.node_id);
        match request.strategy {
            PlacementStrategy::LeastLoaded | PlacementStrategy::RoundRobin => {
                (avoided, n.deployment_count as i64, n.used_cpu_millis, n.node_id.clone())
            }
            PlacementStrategy::Binpack => (avoided, n.free_score() as i64, 0, n.node_id.clone()),
            PlacementStrategy::Spread => (avoided, -(n.free_score() as i64), 0, n.node_id.clone()),
        }
    };
    fit.sort_by_cached_key(key);
    fit.first().copied()
}

#[cfg(test)]
mod tests;
