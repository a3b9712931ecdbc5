//! The orchestrator's store operations against a real PostgreSQL: the
//! leader lease and its fencing, the node health watch, drains and the route
//! table.

use std::time::Duration;

use flotilla_store::placement::{HealthWatch, Lease, NewReplica, PlacementPlan, SilentNode};
use flotilla_store::replicas::ReplicaObservation;
use flotilla_store::routes::RouteRecord;
use flotilla_store::tenant::{CreatedOnce, ensure_organization};
use flotilla_store::{Store, StoreError};
use flotilla_test_utils::{TestDb, node_heartbeat};
use flotilla_types::status::Health;
use flotilla_types::{
    DeploymentId, DeploymentSpec, DeploymentSpecInput, Hostname, NodeId, OrganizationId, PathPrefix, ReplicaId,
    ReplicaState,
};

const TTL: Duration = Duration::from_secs(30);

/// The health watch as the orchestrator runs it by default, with nodes
/// found `unreachable` by its probes.
fn health_watch(unreachable: &[&str]) -> HealthWatch {
    HealthWatch {
        timeout: Duration::from_secs(15),
        unreachable: unreachable.iter().map(|n| NodeId::parse(n).unwrap()).collect(),
        suspect_after: Duration::from_secs(2),
        fence_margin: Duration::from_secs(4),
    }
}

async fn silent_for(db: &TestDb, node: &str, seconds: u32) {
    sqlx::query("UPDATE node_metadata SET last_heartbeat = now() - make_interval(secs => $2) WHERE node_id = $1")
        .bind(node)
        .bind(f64::from(seconds))
        .execute(db.pool())
        .await
        .unwrap();
}

async fn deployment(store: &Store, org: OrganizationId, name: &str, domain: &str) -> (DeploymentId, i64) {
    let spec = DeploymentSpec::validate(DeploymentSpecInput {
        name: name.into(),
        image: "flotilla/demo-http:latest".into(),
        port: 8080,
        domain: domain.into(),
        ..Default::default()
    })
    .unwrap();
    let d = store.tenant(org).create_deployment(None, &spec).await.unwrap();
    (d.id, d.generation)
}

fn replica(node: &str, index: i32) -> NewReplica {
    NewReplica {
        id: ReplicaId::new(),
        replica_index: index,
        node_id: NodeId::parse(node).unwrap(),
        address: format!("10.0.0.{}", node.len()),
        reason: format!("test: {node}"),
    }
}

fn plan(deployment: DeploymentId, generation: i64, replicas: Vec<NewReplica>, domain: &str) -> PlacementPlan {
    let route = (!domain.is_empty()).then(|| RouteRecord {
        deployment_id: deployment,
        domain: Hostname::parse("domain", domain).unwrap(),
        path_prefix: PathPrefix::root(),
        tls_enabled: false,
        cert_resolver: None,
    });
    PlacementPlan { deployment_id: deployment, generation, replicas, route, unplaced: None }
}

async fn running(store: &Store, node: &str, id: ReplicaId, port: u16) {
    let seen = ReplicaObservation {
        id,
        status: ReplicaState::Running,
        health: Health::None,
        container_id: Some(format!("c-{id}")),
        container_name: None,
        port: Some(port),
        generation: None,
        message: None,
        started_at: None,
    };
    assert!(store.record_replica(&NodeId::parse(node).unwrap(), &seen).await.unwrap());
}

/// The route table's servers for `domain`, as "address:port".
async fn servers(store: &Store, domain: &str) -> Vec<String> {
    let table = store.read_route_table(false).await.unwrap();
    table
        .rows
        .iter()
        .filter(|r| r.domain == domain)
        .flat_map(|r| r.servers.iter().zip(&r.ports).map(|(a, p)| format!("{a}:{p}")))
        .collect()
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_deposed_leader_writes_nothing() {
    let db = TestDb::new().await;
    let store = &db.store;
    let a = store.acquire_lease("a", TTL).await.unwrap().expect("a leads");
    assert_eq!(store.acquire_lease("b", TTL).await.unwrap(), None, "b must wait");
    let renewed = store.acquire_lease("a", TTL).await.unwrap().unwrap();
    assert_eq!(renewed.term, a.term, "renewing keeps the term");
    assert_eq!(store.current_leader().await.unwrap(), Some(a.clone()));

    // a stops renewing (paused, cut off): once the lease expires, b takes over.
    sqlx::query("UPDATE orchestrator_lease SET expires_at = now() - interval '1 second'")
        .execute(db.pool())
        .await
        .unwrap();
    let b = store.acquire_lease("b", TTL).await.unwrap().expect("b takes over");
    assert_eq!(b.term, a.term + 1);

    // a wakes up and tries to place with its old lease: refused, nothing written.
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    let (d, generation) = deployment(store, org, "web", "").await;
    let err = store.commit_placements(&a, &[plan(d, generation, vec![replica("n1", 0)], "")], None).await.unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err}");
    assert!(matches!(store.watch_node_health(&a, &health_watch(&[])).await, Err(StoreError::NotLeader { .. })));
    assert_eq!(store.deployments_to_place(10).await.unwrap().len(), 1, "still unplaced");
    assert_eq!(store.acquire_lease("a", TTL).await.unwrap(), None, "a cannot take it back while b holds it");

    // b places it; releasing hands over at once.
    assert_eq!(
        store.commit_placements(&b, &[plan(d, generation, vec![replica("n1", 0)], "")], None).await.unwrap().placed,
        1
    );
    store.release_lease(&b).await.unwrap();
    let a_again = store.acquire_lease("a", TTL).await.unwrap().expect("free after release");
    assert!(a_again.term > b.term);
}

#[tokio::test]
async fn a_silent_node_goes_down_its_replicas_are_freed_and_it_comes_back() {
    let db = TestDb::new().await;
    let store = &db.store;
    let lease: Lease = store.acquire_lease("leader", TTL).await.unwrap().unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    for node in ["n1", "n22"] {
        store.upsert_heartbeat(&node_heartbeat(node)).await.unwrap();
    }
    let (d, generation) = deployment(store, org, "web", "web.example.com").await;
    let first = replica("n1", 0);
    let second = replica("n22", 1);
    let spec_replicas: i32 = 2;
    // Replaced at once, two copies or not (fence: the next test).
    sqlx::query("UPDATE deployments SET replicas = $1, node_loss = 'replace'")
        .bind(spec_replicas)
        .execute(db.pool())
        .await
        .unwrap();
    store
        .commit_placements(&lease, &[plan(d, generation, vec![first.clone(), second.clone()], "web.example.com")], None)
        .await
        .unwrap();
    running(store, "n1", first.id, 30001).await;
    running(store, "n22", second.id, 30002).await;
    assert_eq!(servers(store, "web.example.com").await, ["10.0.0.2:30001", "10.0.0.3:30002"]);

    // n1 falls silent past the timeout.
    sqlx::query("UPDATE node_metadata SET last_heartbeat = now() - interval '20 seconds' WHERE node_id = 'n1'")
        .execute(db.pool())
        .await
        .unwrap();
    let changes = store.watch_node_health(&lease, &health_watch(&[])).await.unwrap();
    assert_eq!(changes.down, [NodeId::parse("n1").unwrap()]);
    assert_eq!(changes.evicted, 1);
    assert_eq!(servers(store, "web.example.com").await, ["10.0.0.3:30002"], "out of the route table at once");
    let needs = store.deployments_to_place(10).await.unwrap();
    assert_eq!(needs.len(), 1);
    assert_eq!(needs[0].placed, [1], "index 0 is to be placed again");
    assert_eq!(needs[0].nodes, [NodeId::parse("n22").unwrap()]);
    let node = store.node(&NodeId::parse("n1").unwrap()).await.unwrap().unwrap();
    assert_eq!((node.status.as_str(), node.deployment_count), ("down", 0));
    // Idempotent: a second pass changes nothing.
    assert_eq!(store.watch_node_health(&lease, &health_watch(&[])).await.unwrap(), Default::default());

    // Heard from again: ready, and placeable.
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let changes = store.watch_node_health(&lease, &health_watch(&[])).await.unwrap();
    assert_eq!(changes.back, [NodeId::parse("n1").unwrap()]);
    let (snapshot, _) = store.placement_snapshot(Duration::from_secs(15)).await.unwrap();
    assert!(snapshot.iter().all(|n| n.node.status == "ready" && n.heartbeat_fresh));
}

#[tokio::test]
async fn fence_replicas_move_only_once_their_cut_off_node_has_surely_stopped_them() {
    let db = TestDb::new().await;
    let store = &db.store;
    let lease: Lease = store.acquire_lease("leader", TTL).await.unwrap().unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    for node in ["n1", "n22", "n333"] {
        let mut beat = node_heartbeat(node);
        beat.fence_after = Some(Duration::from_secs(3));
        store.upsert_heartbeat(&beat).await.unwrap();
        store.set_agent_url(&NodeId::parse(node).unwrap(), &format!("http://{node}:7800")).await.unwrap();
    }
    let (fenced, fenced_generation) = deployment(store, org, "job", "").await;
    let (replaced, replaced_generation) = deployment(store, org, "web", "").await;
    sqlx::query("UPDATE deployments SET node_loss = 'replace' WHERE id = $1")
        .bind(replaced.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    store
        .commit_placements(
            &lease,
            &[
                plan(fenced, fenced_generation, vec![replica("n1", 0)], ""),
                plan(replaced, replaced_generation, vec![replica("n1", 0)], ""),
            ],
            None,
        )
        .await
        .unwrap();
    let n1 = NodeId::parse("n1").unwrap();
    let placed = |needs: Vec<flotilla_store::placement::PlacementNeed>| {
        needs.into_iter().map(|n| n.deployment_id).collect::<Vec<_>>()
    };

    // Silent for 5 s: only suspect; its agent found unreachable: down, and
    // the `replace` replica is freed at once; the `fence` one waits for the
    // node's fence time (3 s) and the margin (4 s).
    silent_for(&db, "n1", 5).await;
    assert_eq!(store.watch_node_health(&lease, &health_watch(&[])).await.unwrap(), Default::default());
    assert_eq!(store.silent_nodes(Duration::from_secs(2), Duration::from_secs(15)).await.unwrap()[0].node_id, n1);
    let changes = store.watch_node_health(&lease, &health_watch(&["n1"])).await.unwrap();
    assert_eq!((changes.down.as_slice(), changes.evicted), (std::slice::from_ref(&n1), 1));
    assert_eq!(placed(store.deployments_to_place(10).await.unwrap()), [replaced]);
    assert_eq!(
        store.silent_nodes(Duration::from_secs(2), Duration::from_secs(15)).await.unwrap(),
        [],
        "known unreachable: asked no more"
    );

    // Past the fence time and margin, but most of the cluster silent too
    // (this side of a cut may be the minority): still held.
    silent_for(&db, "n1", 8).await;
    silent_for(&db, "n22", 30).await;
    assert_eq!(store.watch_node_health(&lease, &health_watch(&[])).await.unwrap().evicted, 0);
    assert_eq!(placed(store.deployments_to_place(10).await.unwrap()), [replaced]);

    // A majority heard from again: the fenced replica moves.
    store.upsert_heartbeat(&node_heartbeat("n22")).await.unwrap();
    let changes = store.watch_node_health(&lease, &health_watch(&[])).await.unwrap();
    assert_eq!(changes.evicted, 1);
    let mut to_place = placed(store.deployments_to_place(10).await.unwrap());
    to_place.sort();
    let mut both = vec![fenced, replaced];
    both.sort();
    assert_eq!(to_place, both);

    // The node's next heartbeat: ready again, no longer unreachable.
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let changes = store.watch_node_health(&lease, &health_watch(&[])).await.unwrap();
    assert_eq!(changes.back, [n1]);
}

#[tokio::test]
async fn an_agent_stopping_on_purpose_is_known_restarting_until_the_grace_ends() {
    let db = TestDb::new().await;
    let store = &db.store;
    let n1 = NodeId::parse("n1").unwrap();
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    store.announce_agent_stopping(&n1).await.unwrap();
    silent_for(&db, "n1", 5).await;
    let (suspect, grace) = (Duration::from_secs(2), Duration::from_secs(15));
    let restarting =
        |silent: Vec<SilentNode>| silent.iter().map(|n| (n.node_id.clone(), n.restarting)).collect::<Vec<_>>();
    assert_eq!(
        restarting(store.silent_nodes(suspect, grace).await.unwrap()),
        [(n1.clone(), true)],
        "an update: its node, not its agent, is asked"
    );
    sqlx::query("UPDATE node_metadata SET agent_stopping_at = now() - interval '20 seconds'")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(
        restarting(store.silent_nodes(suspect, grace).await.unwrap()),
        [(n1.clone(), false)],
        "not back in time: its agent asked"
    );
    // The restarted agent's first heartbeat clears it.
    store.announce_agent_stopping(&n1).await.unwrap();
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let stopping: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT agent_stopping_at FROM node_metadata").fetch_one(db.pool()).await.unwrap();
    assert_eq!(stopping, None);
}

#[tokio::test]
async fn beating_nodes_are_where_the_engine_probe_port_is_checked() {
    let db = TestDb::new().await;
    let store = &db.store;
    for (node, address) in [("n1", "10.0.0.11"), ("n22", "10.0.0.12")] {
        let mut beat = node_heartbeat(node);
        beat.address = address.to_owned();
        store.upsert_heartbeat(&beat).await.unwrap();
    }
    silent_for(&db, "n22", 5).await;
    let beating = store.beating_node_addresses(Duration::from_secs(2), 3).await.unwrap();
    assert_eq!(beating, ["10.0.0.11"], "the silent node is no reference");
}

#[tokio::test]
async fn a_node_alive_but_silent_keeps_its_fence_replicas() {
    let db = TestDb::new().await;
    let store = &db.store;
    let lease: Lease = store.acquire_lease("leader", TTL).await.unwrap().unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    for node in ["n1", "n22", "n333"] {
        store.upsert_heartbeat(&node_heartbeat(node)).await.unwrap();
        store.set_agent_url(&NodeId::parse(node).unwrap(), &format!("http://{node}:7800")).await.unwrap();
    }
    let (d, generation) = deployment(store, org, "job", "").await;
    store.commit_placements(&lease, &[plan(d, generation, vec![replica("n1", 0)], "")], None).await.unwrap();

    // Past the heartbeat timeout, its agent answering (cut off from the
    // database only): down, but its copy runs on and is not placed twice.
    silent_for(&db, "n1", 20).await;
    let changes = store.watch_node_health(&lease, &health_watch(&[])).await.unwrap();
    assert_eq!((changes.down.len(), changes.evicted), (1, 0));
    assert!(store.deployments_to_place(10).await.unwrap().is_empty());
    assert_eq!(
        store.silent_nodes(Duration::from_secs(2), Duration::from_secs(15)).await.unwrap().len(),
        1,
        "still asked"
    );
    // Then found unreachable: it moves.
    let changes = store.watch_node_health(&lease, &health_watch(&["n1"])).await.unwrap();
    assert_eq!(changes.evicted, 1);
    assert_eq!(store.deployments_to_place(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_drained_replica_keeps_serving_until_its_replacement_does() {
    let db = TestDb::new().await;
    let store = &db.store;
    let lease = store.acquire_lease("leader", TTL).await.unwrap().unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    for node in ["n1", "n22"] {
        store.upsert_heartbeat(&node_heartbeat(node)).await.unwrap();
    }
    let (d, generation) = deployment(store, org, "web", "web.example.com").await;
    let old = replica("n1", 0);
    store.commit_placements(&lease, &[plan(d, generation, vec![old.clone()], "web.example.com")], None).await.unwrap();
    running(store, "n1", old.id, 30001).await;

    assert!(store.set_node_availability(&NodeId::parse("n1").unwrap(), "drain", false).await.unwrap());
    assert!(!store.set_node_availability(&NodeId::parse("nope").unwrap(), "drain", false).await.unwrap());
    let step = store.advance_drains(&lease).await.unwrap();
    assert_eq!((step.moving, step.retiring.len(), step.in_flight), (1, 0, 1));
    assert_eq!(servers(store, "web.example.com").await, ["10.0.0.2:30001"], "moving still serves");
    let needs = store.deployments_to_place(10).await.unwrap();
    assert_eq!(needs[0].placed, Vec::<i32>::new(), "a replacement is wanted");

    let new = replica("n22", 0);
    store.commit_placements(&lease, &[plan(d, generation, vec![new.clone()], "web.example.com")], None).await.unwrap();
    // Not healthy yet: the old one keeps serving.
    assert!(store.advance_drains(&lease).await.unwrap().retiring.is_empty());
    running(store, "n22", new.id, 30002).await;
    assert_eq!(servers(store, "web.example.com").await, ["10.0.0.2:30001", "10.0.0.3:30002"]);
    let step = store.advance_drains(&lease).await.unwrap();
    assert_eq!(step.retiring, [NodeId::parse("n1").unwrap()]);
    assert_eq!(step.in_flight, 1, "retiring until its agent removes it");
    assert_eq!(servers(store, "web.example.com").await, ["10.0.0.3:30002"], "retiring is out of routing");
    let on_n1 = store.node_assignments(&NodeId::parse("n1").unwrap()).await.unwrap();
    assert!(on_n1[0].replica.retiring, "its agent stops it once the edge has taken that in");
    assert_eq!(store.nodes_with_due_retirements().await.unwrap(), [NodeId::parse("n1").unwrap()]);
    assert!(store.deployments_to_place(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn drain_now_retires_at_once_and_activate_restores_what_has_not_moved() {
    let db = TestDb::new().await;
    let store = &db.store;
    let lease = store.acquire_lease("leader", TTL).await.unwrap().unwrap();
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let (a, ga) = deployment(store, org, "a", "a.example.com").await;
    let (b, gb) = deployment(store, org, "b", "").await;
    let ra = replica("n1", 0);
    let rb = replica("n1", 0);
    store
        .commit_placements(&lease, &[plan(a, ga, vec![ra.clone()], "a.example.com"), plan(b, gb, vec![rb], "")], None)
        .await
        .unwrap();
    running(store, "n1", ra.id, 30001).await;

    // Graceful drain with nowhere to go: moving, still serving...
    store.set_node_availability(&NodeId::parse("n1").unwrap(), "drain", false).await.unwrap();
    assert_eq!(store.advance_drains(&lease).await.unwrap().moving, 2);
    // ...and activated again before any replacement: live again.
    store.set_node_availability(&NodeId::parse("n1").unwrap(), "active", false).await.unwrap();
    assert_eq!(store.advance_drains(&lease).await.unwrap().restored, 2);
    assert!(store.deployments_to_place(10).await.unwrap().is_empty());

    // drain --now: out of routing and due at once.
    store.set_node_availability(&NodeId::parse("n1").unwrap(), "drain", true).await.unwrap();
    assert!(servers(store, "a.example.com").await.is_empty());
    let rows = store.node_assignments(&NodeId::parse("n1").unwrap()).await.unwrap();
    assert!(rows.iter().all(|r| r.replica.retiring), "{rows:?}");
    assert_eq!(store.deployments_to_place(10).await.unwrap().len(), 2, "both need a new node");
}

#[tokio::test]
async fn idempotency_keys_return_the_first_result_and_expire() {
    let db = TestDb::new().await;
    let store = &db.store;
    let (org, _) = ensure_organization(store.pool(), "idem", "Idem").await.unwrap();
    let tenant = store.tenant(org);
    let spec = DeploymentSpec::validate(DeploymentSpecInput {
        name: "once".into(),
        image: "flotilla/demo-http:latest".into(),
        port: 8080,
        ..Default::default()
    })
    .unwrap();
    let CreatedOnce::Created(first) = tenant.create_deployment_once(None, &spec, "alice", "k1").await.unwrap() else {
        panic!("a new key creates")
    };
    let CreatedOnce::Replayed(again) = tenant.create_deployment_once(None, &spec, "alice", "k1").await.unwrap() else {
        panic!("a known key replays")
    };
    assert_eq!(again.deployment.id, first.id);
    // Keys are the caller's own: another subject's "k1" is another request.
    let other = tenant.create_deployment_once(None, &spec, "bob", "k1").await;
    assert!(matches!(other, Err(StoreError::AlreadyExists { .. })), "{other:?}");
    let changed = DeploymentSpec { port: 9090, ..spec.clone() };
    let reused = tenant.create_deployment_once(None, &changed, "alice", "k1").await;
    assert!(matches!(reused, Err(StoreError::IdempotencyKeyReused { .. })), "{reused:?}");
    // Another organization cannot see the key or its deployment.
    let (other_org, _) = ensure_organization(store.pool(), "other", "Other").await.unwrap();
    let theirs = store.tenant(other_org).create_deployment_once(None, &spec, "alice", "k1").await.unwrap();
    assert!(matches!(theirs, CreatedOnce::Created(d) if d.id != first.id), "another organization's key is its own");

    assert_eq!(store.expire_idempotency_keys(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(store.expire_idempotency_keys(Duration::ZERO).await.unwrap(), 2);
    // Forgotten: the same request now tries to create again (and meets the name).
    let after = tenant.create_deployment_once(None, &spec, "alice", "k1").await;
    assert!(matches!(after, Err(StoreError::AlreadyExists { .. })), "{after:?}");
}

/// A heartbeat's recount never overwrites a change of the node's rows
/// committed while it waited for the node's row.
#[tokio::test]
async fn a_heartbeat_waiting_on_the_node_row_recounts_after_it() {
    let db = TestDb::new().await;
    let store = db.store.clone();
    let (org, _) = ensure_organization(store.pool(), "race", "Race").await.unwrap();
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let lease = store.acquire_lease("a", TTL).await.unwrap().unwrap();
    let (d, generation) = deployment(&store, org, "race", "").await;
    store.commit_placements(&lease, &[plan(d, generation, vec![replica("n1", 0)], "")], None).await.unwrap();
    let count = || async {
        let (count, rows): (i32, i64) = sqlx::query_as(
            "SELECT deployment_count, (SELECT count(*) FROM deployment_locations) FROM node_metadata \
             WHERE node_id = 'n1'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        (i64::from(count), rows)
    };
    assert_eq!(count().await, (1, 1));

    // A replica leaves, as the agent records it: row and count in one transaction.
    let mut leaving = store.pool().begin().await.unwrap();
    sqlx::query("DELETE FROM deployment_locations WHERE node_id = 'n1'").execute(&mut *leaving).await.unwrap();
    sqlx::query("UPDATE node_metadata SET deployment_count = deployment_count - 1 WHERE node_id = 'n1'")
        .execute(&mut *leaving)
        .await
        .unwrap();
    // Meanwhile a heartbeat arrives and waits for the node's row.
    let beat = {
        let store = store.clone();
        tokio::spawn(async move { store.upsert_heartbeat(&node_heartbeat("n1")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!beat.is_finished(), "the heartbeat waits for the row lock");
    leaving.commit().await.unwrap();
    beat.await.unwrap().unwrap();
    assert_eq!(count().await, (0, 0), "the recount saw the committed removal");
}
