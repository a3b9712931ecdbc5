//! What routing keeps in PostgreSQL: the route table read in one snapshot
//! that it reports, the edge proxies and the tables they hold, and the
//! change notices that make the edge render the table once per change.

use std::time::Duration;

use flotilla_store::changes::Change;
use flotilla_store::routes::EdgeProxySighting;
use flotilla_store::tenant::ensure_organization;
use flotilla_test_utils::{TestDb, demo_spec, node_heartbeat};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn each_route_table_read_reports_its_snapshot_and_later_ones_include_earlier_ones() {
    let db = TestDb::new().await;
    let store = &db.store;
    let first = store.read_route_table(false).await.unwrap();
    assert!(first.rows.is_empty());
    // A write in between: a later snapshot includes it, the earlier one does not.
    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    store.tenant(org).create_deployment(None, &demo_spec("web", "web.example.com")).await.unwrap();
    let after_write = store.current_snapshot().await.unwrap();
    let second = store.read_route_table(false).await.unwrap();
    assert!(after_write.includes(&first.snapshot));
    assert!(!first.snapshot.includes(&after_write), "{} vs {after_write}", first.snapshot);
    assert!(second.snapshot.includes(&after_write), "{} vs {after_write}", second.snapshot);
    assert!(second.snapshot.includes(&first.snapshot));
}

#[tokio::test]
async fn proxies_are_recorded_with_the_table_they_hold_and_taken_for_gone_when_quiet() {
    let db = TestDb::new().await;
    let store = &db.store;
    let holds = store.current_snapshot().await.unwrap();
    let seen = |holds| EdgeProxySighting { id: "edge-1@10.0.0.9", name: "edge-1", address: "10.0.0.9", holds };
    store.record_edge_proxy(&seen(None)).await.unwrap();
    let live = store.live_edge_proxies(Duration::from_secs(10)).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].holds.as_ref(), live[0].applied_at), (None, None), "seen, holding nothing yet");
    store.record_edge_proxy(&seen(Some(&holds))).await.unwrap();
    store.record_edge_proxy(&seen(None)).await.unwrap();
    let live = store.live_edge_proxies(Duration::from_secs(10)).await.unwrap();
    assert_eq!(live[0].holds.as_ref(), Some(&holds), "a sighting without a table keeps the last one");
    assert!(live[0].applied_at.is_some());

    sqlx::query("UPDATE edge_proxies SET seen_at = now() - interval '1 minute'").execute(db.pool()).await.unwrap();
    assert!(store.live_edge_proxies(Duration::from_secs(10)).await.unwrap().is_empty(), "quiet: gone");
    assert_eq!(store.forget_edge_proxies(Duration::from_secs(30)).await.unwrap(), 1);
}

/// Receives notices until `until` says stop; returns those before it.
async fn notices_until(changes: &mut broadcast::Receiver<Change>, until: impl Fn(&Change) -> bool) -> Vec<Change> {
    let mut before = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let change = tokio::time::timeout_at(deadline, changes.recv()).await.expect("a notice in time").unwrap();
        if until(&change) {
            return before;
        }
        before.push(change);
    }
}

#[tokio::test]
async fn what_the_route_table_reads_is_announced_and_heartbeats_are_not() {
    let db = TestDb::new().await;
    let store = db.store.clone();
    let (sender, mut changes) = broadcast::channel(64);
    let cancel = CancellationToken::new();
    let listening = tokio::spawn({
        let (store, cancel) = (store.clone(), cancel.clone());
        async move { store.announce_changes(sender, cancel).await }
    });
    assert_eq!(changes.recv().await.unwrap(), Change::Resync, "listening starts with a resync");

    let (org, _) = ensure_organization(db.pool(), "o", "O").await.unwrap();
    let created = store.tenant(org).create_deployment(None, &demo_spec("web", "")).await.unwrap();
    store.upsert_heartbeat(&node_heartbeat("n1")).await.unwrap();
    // Notices arrive in commit order: a heartbeat's would come before this one.
    sqlx::query("UPDATE deployments SET updated_at = now() WHERE id = $1")
        .bind(created.id.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let before = notices_until(&mut changes, |c| *c == Change::Deployment(created.id)).await;
    assert!(!before.contains(&Change::Routes), "creating a deployment or a heartbeat changes no route: {before:?}");

    // Scaling changes which replicas serve: announced.
    sqlx::query("UPDATE deployments SET replicas = 3 WHERE id = $1")
        .bind(created.id.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    notices_until(&mut changes, |c| *c == Change::Routes).await;
    // A node going down takes its replicas out: announced.
    sqlx::query("UPDATE node_metadata SET status = 'down'").execute(db.pool()).await.unwrap();
    notices_until(&mut changes, |c| *c == Change::Routes).await;
    cancel.cancel();
    listening.await.unwrap();
}
