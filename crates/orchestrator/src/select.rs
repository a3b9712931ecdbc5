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

use std::cell::RefCell;
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

    fn cpu_class(&self) -> usize {
        if self.total_cpu_millis <= 0 {
            CPU_CLASSES - 1
        } else {
            cpu_class(self.total_cpu_millis - self.reserved_cpu_millis)
        }
    }
}

/// Whether a node can take a request.
enum Fit {
    No,
    /// It can, but runs a replica of the same deployment already.
    Avoided,
    Yes,
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

/// Free-CPU classes of the binpack index: class `c` holds nodes whose free
/// CPU has bit length `c` (free in `[2^(c-1), 2^c)` millis); the last one
/// also holds nodes whose CPU total is unknown.
const CPU_CLASSES: usize = 64;

fn cpu_class(free_millis: i64) -> usize {
    (64 - free_millis.max(0).leading_zeros() as usize).min(CPU_CLASSES - 1)
}

/// Ordered indexes over the eligible nodes with a free slot, among one set
/// of members: all nodes, or those matching one set of constraints (so a
/// constrained request never walks past nodes it cannot use).
#[derive(Debug, Clone)]
struct Index {
    /// Which nodes belong; `None`: all of them.
    members: Option<Vec<bool>>,
    /// By (deployment count, CPU use, index): least-loaded.
    by_load: BTreeSet<(i32, i64, u32)>,
    /// By (free score, index), per free-CPU class: binpack. A request only
    /// looks in the classes that can hold it, so nodes too full for it
    /// (which binpack keeps at the front) are not walked past.
    by_score: Vec<BTreeSet<(u64, u32)>>,
    /// Most free first, then by index: spread.
    by_free: BTreeSet<(Reverse<u64>, u32)>,
    /// By index (= by node id): round-robin.
    by_id: BTreeSet<u32>,
}

impl Index {
    fn new(members: Option<Vec<bool>>) -> Self {
        Self {
            members,
            by_load: BTreeSet::new(),
            by_score: vec![BTreeSet::new(); CPU_CLASSES],
            by_free: BTreeSet::new(),
            by_id: BTreeSet::new(),
        }
    }

    fn has(&self, i: usize) -> bool {
        self.members.as_ref().is_none_or(|m| m[i])
    }

    fn insert(&mut self, i: usize, node: &Candidate) {
        if !self.has(i) {
            return;
        }
        let (count, cpu) = node.load_key();
        let score = node.free_score();
        self.by_load.insert((count, cpu, i as u32));
        self.by_score[node.cpu_class()].insert((score, i as u32));
        self.by_free.insert((Reverse(score), i as u32));
        self.by_id.insert(i as u32);
    }

    fn remove(&mut self, i: usize, node: &Candidate) {
        if !self.has(i) {
            return;
        }
        let (count, cpu) = node.load_key();
        let score = node.free_score();
        self.by_load.remove(&(count, cpu, i as u32));
        self.by_score[node.cpu_class()].remove(&(score, i as u32));
        self.by_free.remove(&(Reverse(score), i as u32));
        self.by_id.remove(&(i as u32));
    }
}

/// The nodes of one round, indexed for each strategy.
#[derive(Debug, Clone)]
pub struct Placer {
    /// Sorted by node id, so an index into it orders nodes by id.
    nodes: Vec<Candidate>,
    static_filtered: Vec<Option<Filter>>,
    all: Index,
    /// One index per set of constraints asked for, built on first use and
    /// kept up to date from then on.
    constrained: RefCell<BTreeMap<Constraints, Index>>,
    /// The node round-robin chose last.
    cursor: Option<NodeId>,
    /// Where round-robin starts looking: the position after the cursor.
    rotation_start: u32,
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
            all: Index::new(None),
            constrained: RefCell::new(BTreeMap::new()),
            rotation_start: 0,
            cursor,
        };
        if let Some(cursor) = &placer.cursor {
            placer.rotation_start = placer.nodes.partition_point(|n| &n.node_id <= cursor) as u32;
        }
        let mut all = Index::new(None);
        for i in 0..placer.nodes.len() {
            if placer.indexed(i) {
                all.insert(i, &placer.nodes[i]);
            }
        }
        placer.all = all;
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

    /// Whether node `i` belongs in the indexes: eligible, with a free slot.
    fn indexed(&self, i: usize) -> bool {
        self.static_filtered[i].is_none() && self.nodes[i].deployment_count < self.nodes[i].max_deployments
    }

    fn index(&mut self, i: usize) {
        if !self.indexed(i) {
            return;
        }
        let node = &self.nodes[i];
        self.all.insert(i, node);
        for index in self.constrained.get_mut().values_mut() {
            index.insert(i, node);
        }
    }

    fn unindex(&mut self, i: usize) {
        let node = &self.nodes[i];
        self.all.remove(i, node);
        for index in self.constrained.get_mut().values_mut() {
            index.remove(i, node);
        }
    }

    /// Builds the index of the nodes matching `constraints` (once per set
    /// of constraints per round).
    fn constrained_index(&self, constraints: &Constraints) {
        if self.constrained.borrow().contains_key(constraints) {
            return;
        }
        let members: Vec<bool> = self.nodes.iter().map(|n| constraints.matches(&n.labels)).collect();
        let mut index = Index::new(Some(members));
        for i in 0..self.nodes.len() {
            if self.indexed(i) {
                index.insert(i, &self.nodes[i]);
            }
        }
        self.constrained.borrow_mut().insert(constraints.clone(), index);
    }

    /// Chooses a node for one replica. Nodes in `request.avoid` are taken
    /// only when no other node fits.
    pub fn choose(&self, request: &Request<'_>) -> Result<Choice, NoFit> {
        let chosen = if request.constraints.is_empty() {
            self.choose_in(&self.all, request)
        } else {
            self.constrained_index(request.constraints);
            let indexes = self.constrained.borrow();
            indexes.get(request.constraints).and_then(|index| self.choose_in(index, request))
        };
        match chosen {
            Some((i, shared)) => Ok(Choice { index: i, reason: self.reason(i, request, shared) }),
            None => Err(self.no_fit(request)),
        }
    }

    /// The best node of `index` for `request`, and whether it is one to avoid.
    fn choose_in(&self, index: &Index, request: &Request<'_>) -> Option<(usize, bool)> {
        if request.strategy == PlacementStrategy::Binpack {
            return self.choose_binpack(index, request);
        }
        let preference: Box<dyn Iterator<Item = usize> + '_> = match request.strategy {
            PlacementStrategy::LeastLoaded => Box::new(index.by_load.iter().map(|k| k.2 as usize)),
            PlacementStrategy::Spread => Box::new(index.by_free.iter().map(|k| k.1 as usize)),
            _ => {
                let start = self.rotation_start;
                Box::new(index.by_id.range(start..).chain(index.by_id.range(..start)).map(|i| *i as usize))
            }
        };
        let mut fallback = None;
        for i in preference {
            match self.fits(i, request) {
                Fit::No => {}
                // The best avoided node, should no other fit.
                Fit::Avoided => {
                    fallback.get_or_insert(i);
                }
                Fit::Yes => return Some((i, false)),
            }
        }
        fallback.map(|i| (i, true))
    }

    /// Binpack: the lowest free score among the classes that can hold the
    /// request; the first fitting node of each class is its best.
    fn choose_binpack(&self, index: &Index, request: &Request<'_>) -> Option<(usize, bool)> {
        let first_class = if request.cpu_millis > 0 { cpu_class(request.cpu_millis) } else { 0 };
        let mut best: Option<(u64, u32)> = None;
        let mut fallback: Option<(u64, u32)> = None;
        for class in &index.by_score[first_class..] {
            for key in class {
                if best.is_some_and(|b| *key > b) {
                    break;
                }
                match self.fits(key.1 as usize, request) {
                    Fit::No => {}
                    Fit::Avoided => {
                        if fallback.is_none_or(|f| *key < f) {
                            fallback = Some(*key);
                        }
                    }
                    Fit::Yes => {
                        best = Some(*key);
                        break;
                    }
                }
            }
        }
        best.map(|k| (k.1 as usize, false)).or(fallback.map(|k| (k.1 as usize, true)))
    }

    fn fits(&self, i: usize, request: &Request<'_>) -> Fit {
        let node = &self.nodes[i];
        if node.request_filter(request).is_some() {
            Fit::No
        } else if request.avoid.contains(&node.node_id) {
            Fit::Avoided
        } else {
            Fit::Yes
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
            self.rotation_start = i as u32 + 1;
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

/// A better baseline: one pass over every node, keeping the best that fits.
/// Same preferences as [`choose_by_sorting`].
pub fn choose_by_scanning(nodes: &[Candidate], request: &Request<'_>) -> Option<usize> {
    let key = |n: &Candidate| {
        let avoided = request.avoid.contains(&n.node_id);
        match request.strategy {
            PlacementStrategy::LeastLoaded | PlacementStrategy::RoundRobin => {
                (avoided, n.deployment_count as i64, n.used_cpu_millis)
            }
            PlacementStrategy::Binpack => (avoided, n.free_score() as i64, 0),
            PlacementStrategy::Spread => (avoided, -(n.free_score() as i64), 0),
        }
    };
    let mut best: Option<(usize, (bool, i64, i64))> = None;
    for (i, node) in nodes.iter().enumerate() {
        if node.static_filter().is_some() || node.request_filter(request).is_some() {
            continue;
        }
        let k = key(node);
        // Ties go to the lower node id, as in the sort.
        let better = match &best {
            None => true,
            Some((j, best_key)) => k < *best_key || (k == *best_key && node.node_id < nodes[*j].node_id),
        };
        if better {
            best = Some((i, k));
        }
    }
    best.map(|(i, _)| i)
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
