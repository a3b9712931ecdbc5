use proptest::prelude::*;

use super::*;

fn node(id: &str, count: i32, max: i32, cpu_used: i64) -> Candidate {
    Candidate {
        node_id: NodeId::parse(id).unwrap(),
        address: format!("10.0.0.{}", id.len()),
        availability: "active".into(),
        status: "ready".into(),
        heartbeat_fresh: true,
        labels: BTreeMap::new(),
        total_cpu_millis: 4000,
        total_memory_bytes: 8 << 30,
        used_cpu_millis: cpu_used,
        reserved_cpu_millis: 0,
        reserved_memory_bytes: 0,
        deployment_count: count,
        max_deployments: max,
    }
}

fn request<'a>(strategy: PlacementStrategy, constraints: &'a Constraints, avoid: &'a [NodeId]) -> Request<'a> {
    Request { strategy, cpu_millis: 0, memory_bytes: 0, constraints, avoid }
}

fn id(s: &str) -> NodeId {
    NodeId::parse(s).unwrap()
}

fn chosen(placer: &Placer, request: &Request<'_>) -> String {
    placer.node(placer.choose(request).unwrap().index).node_id.to_string()
}

static NONE: Constraints = Constraints::empty();

#[test]
fn least_loaded_takes_fewest_deployments_then_lowest_cpu() {
    let placer = Placer::new(vec![node("a", 3, 10, 0), node("b", 1, 10, 500), node("c", 1, 10, 100)], None);
    assert_eq!(chosen(&placer, &request(PlacementStrategy::LeastLoaded, &NONE, &[])), "c");
}

#[test]
fn static_filters_remove_drained_down_and_silent_nodes_and_say_so() {
    let mut drained = node("a", 0, 10, 0);
    drained.availability = "drain".into();
    let mut down = node("b", 0, 10, 0);
    down.status = "down".into();
    let mut silent = node("c", 0, 10, 0);
    silent.heartbeat_fresh = false;
    let full = node("d", 5, 5, 0);
    let placer = Placer::new(vec![drained, down, silent, full], None);
    let err = placer.choose(&request(PlacementStrategy::Spread, &NONE, &[])).unwrap_err();
    assert_eq!(err.nodes, 4);
    assert_eq!(
        err.removed,
        BTreeMap::from([
            (Filter::NotActive, 1),
            (Filter::NotReady, 1),
            (Filter::HeartbeatStale, 1),
            (Filter::NoFreeSlot, 1)
        ])
    );
    let text = err.to_string();
    for part in ["1 drained or paused", "1 down or suspect", "1 without a recent heartbeat", "1 at their max"] {
        assert!(text.contains(part), "{text}");
    }
    let empty = Placer::new(Vec::new(), None);
    assert!(
        empty.choose(&request(PlacementStrategy::Spread, &NONE, &[])).unwrap_err().to_string().contains("no nodes")
    );
}

#[test]
fn requested_cpu_and_memory_must_fit_what_is_unreserved() {
    let mut small = node("a", 0, 10, 0);
    small.reserved_cpu_millis = 3800;
    let mut tight = node("b", 0, 10, 0);
    tight.reserved_memory_bytes = (8 << 30) - (100 << 20);
    let roomy = node("c", 9, 10, 0);
    let mut placer = Placer::new(vec![small, tight, roomy], None);
    let mut r = request(PlacementStrategy::LeastLoaded, &NONE, &[]);
    r.cpu_millis = 500;
    r.memory_bytes = 256 << 20;
    assert_eq!(chosen(&placer, &r), "c", "only c has 500m CPU and 256 MiB unreserved");
    placer.commit(2, &r);
    let err = placer.choose(&r).unwrap_err();
    assert_eq!(
        err.removed,
        BTreeMap::from([(Filter::NoFreeSlot, 1), (Filter::NotEnoughCpu, 1), (Filter::NotEnoughMemory, 1)])
    );
    assert!(err.to_string().contains("without 500m CPU unreserved"), "{err}");
    assert!(err.to_string().contains("without 256 MiB memory unreserved"), "{err}");
}

#[test]
fn constraints_select_nodes_by_label() {
    let mut eu = node("eu-1", 5, 10, 0);
    eu.labels = BTreeMap::from([("region".into(), "eu".into()), ("compute".into(), "true".into())]);
    let mut us = node("us-1", 0, 10, 0);
    us.labels = BTreeMap::from([("region".into(), "us".into()), ("compute".into(), "true".into())]);
    let placer = Placer::new(vec![eu, us], None);
    let want = Constraints::parse("c", &BTreeMap::from([("region".into(), "eu".into())])).unwrap();
    let choice = placer.choose(&request(PlacementStrategy::LeastLoaded, &want, &[])).unwrap();
    assert_eq!(placer.node(choice.index).node_id.as_str(), "eu-1");
    assert!(choice.reason.contains("matches region=eu"), "{}", choice.reason);
    let nowhere = Constraints::parse("c", &BTreeMap::from([("region".into(), "ap".into())])).unwrap();
    let err = placer.choose(&request(PlacementStrategy::LeastLoaded, &nowhere, &[])).unwrap_err();
    assert_eq!(err.removed, BTreeMap::from([(Filter::Constraints, 2)]));
    assert!(err.to_string().contains("2 not matching region=ap"), "{err}");
}

#[test]
fn replicas_avoid_a_node_running_their_sibling_unless_nothing_else_fits() {
    let placer = Placer::new(vec![node("a", 0, 10, 0), node("b", 5, 10, 0)], None);
    for strategy in PlacementStrategy::ALL {
        let avoid = [id("a")];
        let choice = placer.choose(&request(strategy, &NONE, &avoid)).unwrap();
        assert_eq!(placer.node(choice.index).node_id.as_str(), "b", "{strategy}");
    }
    let single = Placer::new(vec![node("a", 0, 10, 0)], None);
    let avoid = [id("a")];
    let choice = single.choose(&request(PlacementStrategy::LeastLoaded, &NONE, &avoid)).unwrap();
    assert_eq!(choice.index, 0);
    assert!(choice.reason.contains("no other node fits"), "{}", choice.reason);
}

#[test]
fn round_robin_rotates_from_the_stored_cursor() {
    let nodes = vec![node("a", 0, 10, 0), node("b", 9, 10, 0), node("c", 0, 10, 0)];
    let mut placer = Placer::new(nodes.clone(), None);
    let r = request(PlacementStrategy::RoundRobin, &NONE, &[]);
    let mut order = Vec::new();
    for _ in 0..5 {
        let choice = placer.choose(&r).unwrap();
        order.push(placer.node(choice.index).node_id.to_string());
        placer.commit(choice.index, &r);
    }
    // b fills up after one more (10 of 10) and drops out of the rotation.
    assert_eq!(order, ["a", "b", "c", "a", "c"]);
    assert_eq!(placer.cursor().map(NodeId::as_str), Some("c"));
    // A new orchestrator (restart, new leader) resumes after the stored cursor.
    let resumed = Placer::new(nodes, Some(id("a")));
    assert_eq!(chosen(&resumed, &r), "b");
    // A cursor naming a node that has gone resumes at the next id.
    let gone = Placer::new(vec![node("a", 0, 10, 0), node("c", 0, 10, 0)], Some(id("b")));
    assert_eq!(chosen(&gone, &r), "c");
}

#[test]
fn binpack_fills_a_node_before_it_opens_another() {
    let mut placer = Placer::new(vec![node("a", 0, 3, 0), node("b", 0, 3, 0), node("c", 0, 3, 0)], None);
    let r = request(PlacementStrategy::Binpack, &NONE, &[]);
    let mut order = Vec::new();
    while let Ok(choice) = placer.choose(&r) {
        order.push(placer.node(choice.index).node_id.to_string());
        placer.commit(choice.index, &r);
    }
    assert_eq!(order, ["a", "a", "a", "b", "b", "b", "c", "c", "c"]);
}

#[test]
fn releasing_a_replica_reopens_a_full_node() {
    let mut placer = Placer::new(vec![node("a", 2, 2, 0)], None);
    let r = request(PlacementStrategy::LeastLoaded, &NONE, &[]);
    assert!(placer.choose(&r).is_err());
    placer.release(0, 0, 0);
    assert_eq!(placer.choose(&r).unwrap().index, 0);
}

/// A random cluster: heterogeneous sizes and loads, some nodes unusable.
fn cluster() -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec((0..20i32, 1..25i32, 0..4000i64, 1..9i64, 1..17i64, 0..10u8, prop::bool::ANY), 1..40)
        .prop_map(|nodes| {
            nodes
                .into_iter()
                .enumerate()
                .map(|(i, (count, max, cpu_used, cores, gib, flag, eu))| {
                    let mut n = node(&format!("n{i:02}"), count.min(max), max, cpu_used);
                    n.total_cpu_millis = cores * 1000;
                    n.total_memory_bytes = gib << 30;
                    n.reserved_cpu_millis = (count as i64 * 100).min(n.total_cpu_millis);
                    n.reserved_memory_bytes = ((count as i64) << 27).min(n.total_memory_bytes);
                    match flag {
                        0 => n.availability = "drain".into(),
                        1 => n.status = "down".into(),
                        2 => n.heartbeat_fresh = false,
                        _ => {}
                    }
                    if eu {
                        n.labels.insert("region".into(), "eu".into());
                    }
                    n
                })
                .collect()
        })
}

fn strategy() -> impl Strategy<Value = PlacementStrategy> {
    prop::sample::select(PlacementStrategy::ALL.to_vec())
}

proptest! {
    /// Placing until nothing fits never puts a node past its max, its CPU
    /// or its memory, and never uses a node the static filters removed.
    #[test]
    fn no_node_ever_exceeds_its_capacity(nodes in cluster(), strategy in strategy(), cpu in 0..600i64, mib in 0..512i64, eu in prop::bool::ANY) {
        let constraints = if eu {
            Constraints::parse("c", &BTreeMap::from([("region".into(), "eu".into())])).unwrap()
        } else {
            Constraints::default()
        };
        let initial = nodes.clone();
        let mut placer = Placer::new(nodes, None);
        let r = Request { strategy, cpu_millis: cpu, memory_bytes: mib << 20, constraints: &constraints, avoid: &[] };
        let mut placed = 0;
        while let Ok(choice) = placer.choose(&r) {
            placer.commit(choice.index, &r);
            placed += 1;
            prop_assert!(placed < 10_000);
        }
        for node in placer.nodes() {
            let before = initial.iter().find(|n| n.node_id == node.node_id).unwrap();
            let added = node.deployment_count - before.deployment_count;
            if added > 0 {
                prop_assert!(node.deployment_count <= node.max_deployments);
                prop_assert!(cpu == 0 || node.reserved_cpu_millis <= node.total_cpu_millis);
                prop_assert!(mib == 0 || node.reserved_memory_bytes <= node.total_memory_bytes);
                prop_assert!(before.static_filter().is_none(), "{} was filtered out", node.node_id);
                prop_assert!(constraints.matches(&node.labels));
            }
        }
    }

    /// The indexes choose exactly what sorting every node would, with
    /// requests of varying size, with and without constraints, as replicas
    /// come and go (the indexes are updated, not rebuilt).
    #[test]
    fn indexed_choice_equals_sorting_everything(
        nodes in cluster(),
        strategy in prop::sample::select(vec![PlacementStrategy::LeastLoaded, PlacementStrategy::Binpack, PlacementStrategy::Spread]),
        asks in prop::collection::vec((0..1500i64, 0..2048i64, prop::bool::ANY, 0..4u8), 1..60),
        avoid_first in prop::bool::ANY,
    ) {
        let eu = Constraints::parse("c", &BTreeMap::from([("region".into(), "eu".into())])).unwrap();
        let mut placer = Placer::new(nodes, None);
        let avoid: Vec<NodeId> = if avoid_first { placer.nodes().iter().take(2).map(|n| n.node_id.clone()).collect() } else { Vec::new() };
        let mut placed: Vec<(usize, i64, i64)> = Vec::new();
        for (cpu, mib, constrained, release) in asks {
            let constraints = if constrained { &eu } else { &NONE };
            let r = Request { strategy, cpu_millis: cpu, memory_bytes: mib << 20, constraints, avoid: &avoid };
            let indexed = placer.choose(&r).ok().map(|c| c.index);
            let sorted = choose_by_sorting(placer.nodes(), &r);
            prop_assert_eq!(indexed, sorted);
            prop_assert_eq!(choose_by_scanning(placer.nodes(), &r), sorted);
            if let Some(i) = indexed {
                placer.commit(i, &r);
                placed.push((i, cpu, mib << 20));
            }
            if release == 0 && !placed.is_empty() {
                let (i, cpu, memory) = placed.remove(0);
                placer.release(i, cpu, memory);
            }
        }
    }

    /// Spread over equal nodes keeps their counts within one of each other.
    #[test]
    fn spread_keeps_equal_nodes_within_one(count in 1..12usize, replicas in 0..200usize) {
        let nodes: Vec<Candidate> = (0..count).map(|i| node(&format!("n{i}"), 0, 1000, 0)).collect();
        let mut placer = Placer::new(nodes, None);
        let r = Request { strategy: PlacementStrategy::Spread, cpu_millis: 10, memory_bytes: 32 << 20, constraints: &NONE, avoid: &[] };
        for _ in 0..replicas {
            let choice = placer.choose(&r).unwrap();
            placer.commit(choice.index, &r);
        }
        let counts: Vec<i32> = placer.nodes().iter().map(|n| n.deployment_count).collect();
        prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{:?}", counts);
    }

    /// Binpack opens a node only when every node already in use is full.
    #[test]
    fn binpack_opens_a_node_only_when_the_used_ones_are_full(count in 1..10usize, max in 1..8i32, replicas in 0..80usize) {
        let nodes: Vec<Candidate> = (0..count).map(|i| node(&format!("n{i}"), 0, max, 0)).collect();
        let mut placer = Placer::new(nodes, None);
        let r = Request { strategy: PlacementStrategy::Binpack, cpu_millis: 0, memory_bytes: 0, constraints: &NONE, avoid: &[] };
        for _ in 0..replicas {
            let Ok(choice) = placer.choose(&r) else { break };
            let opens = placer.node(choice.index).deployment_count == 0;
            if opens {
                prop_assert!(placer.nodes().iter().all(|n| n.deployment_count == 0 || n.deployment_count == n.max_deployments));
            }
            placer.commit(choice.index, &r);
        }
    }

    /// Round-robin visits every eligible node once before any twice.
    #[test]
    fn round_robin_is_a_fair_rotation(count in 1..15usize, replicas in 0..100usize) {
        let nodes: Vec<Candidate> = (0..count).map(|i| node(&format!("n{i:02}"), 0, 1000, (i as i64 * 37) % 500)).collect();
        let mut placer = Placer::new(nodes, None);
        let r = request(PlacementStrategy::RoundRobin, &NONE, &[]);
        for _ in 0..replicas {
            let choice = placer.choose(&r).unwrap();
            placer.commit(choice.index, &r);
        }
        let counts: Vec<i32> = placer.nodes().iter().map(|n| n.deployment_count).collect();
        prop_assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{:?}", counts);
    }
}

#[test]
fn round_robin_rotates_through_replicas_of_several_deployments() {
    let nodes = vec![node("a", 0, 10, 0), node("b", 0, 10, 0), node("c", 0, 10, 0)];
    let mut placer = Placer::new(nodes, Some(id("b")));
    let mut order = Vec::new();
    for _ in 0..3 {
        let mut avoid: Vec<NodeId> = Vec::new();
        for _ in 0..2 {
            let r = request(PlacementStrategy::RoundRobin, &NONE, &avoid);
            let choice = placer.choose(&r).unwrap();
            placer.commit(choice.index, &r);
            let node = placer.node(choice.index).node_id.clone();
            order.push(node.to_string());
            avoid.push(node);
        }
    }
    assert_eq!(order, ["c", "a", "b", "c", "a", "b"]);
}
