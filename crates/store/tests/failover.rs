//! What the store makes of a PostgreSQL cluster failing over.

use flotilla_test_utils::TestDb;

/// A standby still finishing its promotion refuses writes; the store says
/// unavailable (the API answers `unavailable`, clients retry) rather than
/// failing the call as an internal error.
#[tokio::test]
async fn a_server_refusing_writes_during_a_fail_over_is_unavailable_not_an_error() {
    let db = TestDb::new().await;
    // The name is the test harness's own (letters, digits, underscores).
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE \"{}\" SET default_transaction_read_only = on", db.name)))
        .execute(db.pool())
        .await
        .unwrap();
    // New sessions start read-only, as on a hot standby.
    let standby = flotilla_store::Store::connect_lazy(&flotilla_store::StoreConfig::new(db.url.clone())).unwrap();
    let error = standby.create_organization("failover", "Fail-over", uuid::Uuid::new_v4()).await.unwrap_err();
    assert!(error.is_unavailable(), "{error}");
    // Reads still work there.
    standby.ping().await.unwrap();
}
