//! A client that vanishes inside a transaction (its container killed, its
//! connection through a proxy left open) must not hold its locks for good:
//! the server ends the session after the store's idle-in-transaction
//! timeout, and the others' writes go through.

use std::time::Duration;

use flotilla_store::{Store, StoreConfig};
use flotilla_test_utils::{TestDb, node_heartbeat, wait_until};
use sqlx::Connection;

#[tokio::test]
async fn a_transaction_left_open_by_a_vanished_client_does_not_block_the_others() {
    let db = TestDb::new().await;
    db.store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    let url = db.url.clone();
    let config = StoreConfig { idle_in_transaction_timeout: Duration::from_millis(500), ..StoreConfig::new(&url) };
    let store = Store::connect_lazy(&config).unwrap();

    // A connection of that store locks n1's row and goes silent.
    let mut vanished = store.pool().acquire().await.unwrap().detach();
    sqlx::query("BEGIN").execute(&mut vanished).await.unwrap();
    sqlx::query("UPDATE node_metadata SET hostname = 'stuck' WHERE node_id = 'n1'")
        .execute(&mut vanished)
        .await
        .unwrap();

    // Another process's heartbeat for n1 goes through once the server ends it.
    let other = db.store.clone();
    wait_until("n1's heartbeat recorded", Duration::from_secs(30), || async {
        tokio::time::timeout(Duration::from_secs(2), other.upsert_heartbeat(&node_heartbeat("n1"))).await.ok()?.ok()
    })
    .await;
    let hostname: String = sqlx::query_scalar("SELECT hostname FROM node_metadata WHERE node_id = 'n1'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_ne!(hostname, "stuck", "the abandoned update was rolled back");
    assert!(vanished.ping().await.is_err(), "the server ended the abandoned session");
}
