//! Desired state, placement and observed state through the store's queries,
//! against a real PostgreSQL.

use std::time::Duration;

use flotilla_store::Store;
use flotilla_store::StoreError;
use flotilla_store::placement::{CommitReport, Lease, NewReplica, PlacementPlan};
use flotilla_store::replicas::ReplicaObservation;
use flotilla_store::tenant::ensure_organization;
use flotilla_test_utils::{TestDb, demo_spec as spec, node_heartbeat};
use flotilla_types::status::Health;
use flotilla_types::{DeploymentId, DeploymentStatus, NodeId, ReplicaId, ReplicaState};

/// Commits one deployment's placement as the orchestrator's leader would.
async fn place(store: &Store, deployment: DeploymentId, generation: i64, replicas: &[NewReplica]) -> CommitReport {
    let lease: Lease = store.acquire_lease("test-leader", Duration::from_secs(30)).await.unwrap().unwrap();
    let plan = PlacementPlan {
        deployment_id: deployment,
        generation,
        replicas: replicas.to_vec(),
        route: None,
        unplaced: None,
    };
    store.commit_placements(&lease, &[plan], None).await.unwrap()
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_deployments() {
    let db = TestDb::new().await;
    let (org_a, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let (org_b, project_b) = ensure_organization(db.pool(), "b", "B").await.unwrap();
    let a = db.store.tenant(org_a);
    let b = db.store.tenant(org_b);

    let created = a.create_deployment(None, &spec("web", "web.example.com")).await.unwrap();
    assert_eq!(a.get_deployment(created.id).await.unwrap().deployment, created);

    assert!(matches!(b.get_deployment(created.id).await, Err(StoreError::NotFound { .. })));
    assert!(b.list_deployments(None, None, None, 50).await.unwrap().deployments.is_empty());
    assert!(matches!(b.delete_deployment(created.id).await, Err(StoreError::NotFound { .. })));
    // Organization A cannot deploy into B's project either.
    assert!(matches!(
        a.create_deployment(Some(project_b), &spec("x", "")).await,
        Err(StoreError::NotFound { entity: "project", .. })
    ));
    // B's failed delete changed nothing.
    assert_eq!(a.get_deployment(created.id).await.unwrap().status().0, DeploymentStatus::Pending);
}

#[tokio::test]
async fn names_and_domains_are_claimed_once() {
    let db = TestDb::new().await;
    let (org, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let t = db.store.tenant(org);
    t.create_deployment(None, &spec("web", "web.example.com")).await.unwrap();
    let same_name = t.create_deployment(None, &spec("web", "")).await.unwrap_err();
    assert!(matches!(same_name, StoreError::AlreadyExists { .. }), "{same_name}");
    let (other, _) = ensure_organization(db.pool(), "b", "B").await.unwrap();
    let same_domain = db.store.tenant(other).create_deployment(None, &spec("x", "web.example.com")).await.unwrap_err();
    assert!(same_domain.to_string().contains("web.example.com"), "{same_domain}");
}

#[tokio::test]
async fn listing_pages_through_everything_once() {
    let db = TestDb::new().await;
    let (org, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let t = db.store.tenant(org);
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(t.create_deployment(None, &spec(&format!("app-{i}"), "")).await.unwrap().id);
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = t.list_deployments(None, None, after, 3).await.unwrap();
        assert!(page.deployments.len() <= 3);
        seen.extend(page.deployments.iter().map(|d| d.deployment.id));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, created);
}

#[tokio::test]
async fn placement_then_observation_then_deletion() {
    let db = TestDb::new().await;
    let store = &db.store;
    let (org, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let node = NodeId::parse("node-1").unwrap();
    store.upsert_heartbeat(&node_heartbeat(node.as_str())).await.unwrap();
    let (nodes, _) = store.placement_snapshot(Duration::from_secs(15)).await.unwrap();
    assert_eq!(nodes.iter().filter(|n| n.heartbeat_fresh && n.node.status == "ready").count(), 1);

    let deployment = store.tenant(org).create_deployment(None, &spec("web", "web.example.com")).await.unwrap();
    let needs = store.deployments_to_place(100).await.unwrap();
    assert_eq!(needs.len(), 1);
    assert_eq!(needs[0].placed, Vec::<i32>::new());

    let replica = NewReplica {
        id: ReplicaId::new(),
        replica_index: 0,
        node_id: node.clone(),
        address: "127.0.0.1".into(),
        reason: "test".into(),
    };
    let outcome = place(store, deployment.id, deployment.generation, std::slice::from_ref(&replica)).await;
    assert_eq!(outcome, CommitReport { placed: 1, stale: Vec::new() });
    // Placing the same index again writes nothing: no double placement.
    let again = NewReplica { id: ReplicaId::new(), ..replica.clone() };
    assert_eq!(place(store, deployment.id, deployment.generation, &[again]).await.placed, 0);
    // A stale generation writes nothing.
    let stale = NewReplica { id: ReplicaId::new(), replica_index: 1, ..replica.clone() };
    assert_eq!(
        place(store, deployment.id, deployment.generation + 1, &[stale]).await,
        CommitReport { placed: 0, stale: vec![deployment.id] }
    );
    assert!(store.deployments_to_place(100).await.unwrap().is_empty());

    let work = store.node_assignments(&node).await.unwrap();
    assert_eq!(work.len(), 1);
    assert_eq!(work[0].replica.id, replica.id);
    assert!(store.node_assignments(&NodeId::parse("other").unwrap()).await.unwrap().is_empty());

    let seen = ReplicaObservation {
        id: replica.id,
        status: ReplicaState::Running,
        health: Health::Healthy,
        generation: Some(deployment.generation),
        container_id: Some("c0ffee".into()),
        container_name: Some("flotilla-web".into()),
        port: Some(20001),
        message: None,
        started_at: Some(chrono::Utc::now()),
    };
    // Another node's agent cannot write this node's row.
    assert!(!store.record_replica(&NodeId::parse("other").unwrap(), &seen).await.unwrap());
    assert!(store.record_replica(&node, &seen).await.unwrap());
    let view = store.tenant(org).get_deployment(deployment.id).await.unwrap();
    assert_eq!(view.status().0, DeploymentStatus::Running);
    assert_eq!(view.replicas[0].endpoint().as_deref(), Some("http://127.0.0.1:20001"));

    let deleting = store.tenant(org).delete_deployment(deployment.id).await.unwrap();
    assert_eq!(deleting.status().0, DeploymentStatus::Deleting);
    // Not finalized while a replica row remains.
    assert!(store.finalize_deleted_deployments(Duration::from_secs(15)).await.unwrap().is_empty());
    assert!(store.delete_replica(&node, replica.id).await.unwrap());
    assert_eq!(store.finalize_deleted_deployments(Duration::from_secs(15)).await.unwrap(), vec![deployment.id]);
    assert!(matches!(store.tenant(org).get_deployment(deployment.id).await, Err(StoreError::NotFound { .. })));
}

#[tokio::test]
async fn a_deleted_deployment_on_a_silent_node_is_finalized_without_its_agent() {
    let db = TestDb::new().await;
    let store = &db.store;
    let (org, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let node = NodeId::parse("gone-node").unwrap();
    store.upsert_heartbeat(&node_heartbeat(node.as_str())).await.unwrap();
    let deployment = store.tenant(org).create_deployment(None, &spec("web", "")).await.unwrap();
    let replica = NewReplica {
        id: ReplicaId::new(),
        replica_index: 0,
        node_id: node.clone(),
        address: "127.0.0.1".into(),
        reason: "test".into(),
    };
    place(store, deployment.id, deployment.generation, &[replica]).await;
    store.tenant(org).delete_deployment(deployment.id).await.unwrap();

    // The node is still heard from: its agent must remove the replica first.
    assert!(store.finalize_deleted_deployments(Duration::from_secs(15)).await.unwrap().is_empty());
    // Silent for longer than the timeout: nobody will; the rows go.
    sqlx::query("UPDATE node_metadata SET last_heartbeat = now() - interval '1 minute'")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(store.finalize_deleted_deployments(Duration::from_secs(15)).await.unwrap(), vec![deployment.id]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM deployment_locations").fetch_one(db.pool()).await.unwrap();
    assert_eq!(rows, 0);
    assert_eq!(store.node(&node).await.unwrap().unwrap().deployment_count, 0);
}
