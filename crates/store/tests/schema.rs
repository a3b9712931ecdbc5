//! The migrations applied to a fresh database give the schema the code and
//! the design rely on.

use flotilla_test_utils::TestDb;

async fn columns(db: &TestDb, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(db.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_create_the_control_schema() {
    let db = TestDb::empty().await;
    db.store.migrate().await.expect("migrations apply");
    // Applying again is a no-op, as at every start-up.
    db.store.migrate().await.expect("migrations are idempotent");

    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(db.pool()).await.unwrap();
    assert_eq!(applied as usize, flotilla_store::migrator().iter().count());

    let expected: &[(&str, &[&str])] = &[
        ("organizations", &["id", "slug", "name", "created_at"]),
        ("projects", &["id", "organization_id", "name", "is_default"]),
        (
            "deployments",
            &[
                "id",
                "organization_id",
                "project_id",
                "name",
                "image",
                "container_port",
                "env",
                "domain",
                "memory_limit_bytes",
                "cpu_limit_millis",
                "replicas",
                "desired_state",
                "generation",
            ],
        ),
        (
            "deployment_locations",
            &[
                "deployment_id",
                "node_id",
                "container_id",
                "status",
                "port",
                "domain",
                "health_status",
                "resource_usage",
                "replica_index",
                "address",
            ],
        ),
        (
            "node_metadata",
            &[
                "node_id",
                "hostname",
                "address",
                "role",
                "availability",
                "status",
                "labels",
                "total_cpu_millis",
                "total_memory_bytes",
                "used_cpu_millis",
                "used_memory_bytes",
                "deployment_count",
                "max_deployments",
                "agent_version",
                "last_heartbeat",
            ],
        ),
        ("deployment_routing", &["deployment_id", "domain", "path_prefix", "tls_enabled", "cert_resolver"]),
        ("edge_proxies", &["id", "name", "address", "snapshot", "applied_at", "seen_at"]),
    ];
    for (table, wanted) in expected {
        let have = columns(&db, table).await;
        for column in *wanted {
            assert!(have.iter().any(|c| c == column), "{table}.{column} missing; have {have:?}");
        }
    }
    // Written and never read, or never written: dropped (one road to the edge).
    let gone: &[(&str, &[&str])] = &[
        ("deployment_routing", &["router_name", "target_port", "protocol", "middlewares", "load_balancer_algo"]),
        ("deployment_locations", &["labels"]),
    ];
    for (table, dropped) in gone {
        let have = columns(&db, table).await;
        for column in *dropped {
            assert!(!have.iter().any(|c| c == column), "{table}.{column} should be gone");
        }
    }
}

/// `flotilla_types::serving::is_serving` and its SQL twin agree on every
/// combination of the facts they look at: one replica row (of a deployment
/// of its own) per combination, then one query.
#[tokio::test]
async fn the_serving_rule_and_its_sql_twin_agree() {
    use flotilla_types::serving::{all_combinations, is_serving};
    let db = TestDb::new().await;
    let (org, project) = flotilla_store::tenant::ensure_organization(db.pool(), "twins", "Twins").await.unwrap();
    // Down and found unreachable: a node down only by its heartbeats (its
    // agent answers) still serves.
    for (node, status) in [("ready-node", "ready"), ("down-node", "down")] {
        sqlx::query(
            "INSERT INTO node_metadata (node_id, hostname, address, status, last_heartbeat, unreachable_at) \
             VALUES ($1, $1, '10.0.0.1', $2, now(), CASE WHEN $2 = 'down' THEN now() END)",
        )
        .bind(node)
        .bind(status)
        .execute(db.pool())
        .await
        .unwrap();
    }
    let facts = all_combinations();
    let deployments: Vec<uuid::Uuid> = facts.iter().map(|_| uuid::Uuid::now_v7()).collect();
    let replicas: Vec<uuid::Uuid> = facts.iter().map(|_| uuid::Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO deployments (id, organization_id, project_id, name, image, container_port, replicas, desired_state) \
         SELECT t.id, $1, $2, 'd' || t.n, 'busybox', 80, t.replicas, t.desired \
         FROM unnest($3::uuid[], $4::int[], $5::int[], $6::text[]) AS t(id, n, replicas, desired)",
    )
    .bind(org.as_uuid())
    .bind(project.as_uuid())
    .bind(&deployments)
    .bind((0..facts.len() as i32).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.wanted_replicas as i32).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.desired.as_str().to_owned()).collect::<Vec<_>>())
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO deployment_locations (id, deployment_id, node_id, replica_index, generation, target_generation, \
         status, health_status, drain_state, retire_at, address, port, container_port) \
         SELECT t.id, t.deployment, t.node, t.index, 1, 1, t.status, t.health, \
         CASE WHEN t.retiring THEN 'retiring' END, CASE WHEN t.retiring THEN now() END, \
         CASE WHEN t.endpoint THEN '10.0.0.1' END, CASE WHEN t.endpoint THEN t.n END, 80 \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[], $7::bool[], $8::bool[], $9::int[]) \
         AS t(id, deployment, node, index, status, health, retiring, endpoint, n)",
    )
    .bind(&replicas)
    .bind(&deployments)
    .bind(facts.iter().map(|f| if f.node_reachable { "ready-node" } else { "down-node" }.to_owned()).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.replica_index).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.state.as_str().to_owned()).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.health.as_str().to_owned()).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.retiring).collect::<Vec<_>>())
    .bind(facts.iter().map(|f| f.has_endpoint).collect::<Vec<_>>())
    .bind((1..=facts.len() as i32).collect::<Vec<_>>())
    .execute(db.pool())
    .await
    .unwrap();
    let serving: std::collections::HashSet<flotilla_types::ReplicaId> =
        db.store.serving_replica_ids().await.unwrap().into_iter().collect();
    let mut disagree = Vec::new();
    for (fact, id) in facts.iter().zip(&replicas) {
        if is_serving(fact) != serving.contains(&flotilla_types::ReplicaId::from(*id)) {
            disagree.push(fact);
        }
    }
    assert!(disagree.is_empty(), "{} of {} combinations disagree: {disagree:#?}", disagree.len(), facts.len());
    assert!(!serving.is_empty() && serving.len() < facts.len());
}

#[tokio::test]
async fn constraints_refuse_impossible_rows() {
    let db = TestDb::new().await;
    let (org, project) = flotilla_store::tenant::ensure_organization(db.pool(), "acme", "Acme").await.unwrap();
    let insert = |name: &'static str, port: i32, memory: i64| {
        sqlx::query(
            "INSERT INTO deployments (id, organization_id, project_id, name, image, container_port, memory_limit_bytes) \
             VALUES (gen_random_uuid(), $1, $2, $3, 'busybox', $4, $5)",
        )
        .bind(org.as_uuid())
        .bind(project.as_uuid())
        .bind(name)
        .bind(port)
        .bind(memory)
        .execute(db.pool())
    };
    insert("ok", 8080, 0).await.expect("a valid row");
    assert!(insert("Bad_Name", 8080, 0).await.is_err(), "name must be a DNS label");
    assert!(insert("p", 70000, 0).await.is_err(), "port out of range");
    assert!(insert("m", 8080, -1).await.is_err(), "negative memory");
    assert!(insert("ok", 8080, 0).await.is_err(), "name unique per project");

    // A deployment cannot point into another organization's project.
    let (other_org, _) = flotilla_store::tenant::ensure_organization(db.pool(), "other", "Other").await.unwrap();
    let cross = sqlx::query(
        "INSERT INTO deployments (id, organization_id, project_id, name, image, container_port) \
         VALUES (gen_random_uuid(), $1, $2, 'x', 'busybox', 80)",
    )
    .bind(other_org.as_uuid())
    .bind(project.as_uuid())
    .execute(db.pool())
    .await;
    assert!(cross.is_err(), "cross-organization project reference accepted");
}
