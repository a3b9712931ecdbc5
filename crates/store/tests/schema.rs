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
                "labels",
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
        (
            "deployment_routing",
            &[
                "deployment_id",
                "domain",
                "path_prefix",
                "target_port",
                "protocol",
                "tls_enabled",
                "cert_resolver",
                "middlewares",
                "load_balancer_algo",
                "router_name",
            ],
        ),
    ];
    for (table, wanted) in expected {
        let have = columns(&db, table).await;
        for column in *wanted {
            assert!(have.iter().any(|c| c == column), "{table}.{column} missing; have {have:?}");
        }
    }
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
