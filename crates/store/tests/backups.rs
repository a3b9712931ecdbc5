//! The control database's backups as the data plane's backup task records
//! them (images/data/flotilla-data backup writes the rows with the same
//! columns), read back newest first with the last good one.

use flotilla_test_utils::TestDb;

async fn record(db: &TestDb, label: &str, minutes_ago: i32, succeeded: bool) {
    sqlx::query(
        "INSERT INTO database_backups (label, started_at, finished_at, succeeded, size_bytes, wal_start, location, error) \
         VALUES ($1, now() - make_interval(mins => $2 + 1), now() - make_interval(mins => $2), $3, \
                 CASE WHEN $3 THEN 4096 END, CASE WHEN $3 THEN '000000010000000000000003' END, \
                 '/backups/base/' || $1, CASE WHEN $3 THEN NULL ELSE 'could not connect' END)",
    )
    .bind(label)
    .bind(minutes_ago)
    .bind(succeeded)
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn backups_are_listed_newest_first_with_the_last_good_one_even_beyond_the_limit() {
    let db = TestDb::new().await;
    let none = db.store.database_backups(20).await.unwrap();
    assert!(none.recent.is_empty() && none.last_good.is_none(), "{none:?}");

    record(&db, "good-old", 30, true).await;
    record(&db, "failed-1", 20, false).await;
    record(&db, "failed-2", 10, false).await;

    let all = db.store.database_backups(20).await.unwrap();
    let labels: Vec<&str> = all.recent.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels, ["failed-2", "failed-1", "good-old"]);
    assert_eq!(all.recent[0].error.as_deref(), Some("could not connect"));
    let good = all.last_good.expect("a good backup");
    assert_eq!((good.label.as_str(), good.size_bytes), ("good-old", Some(4096)));

    // Only the two failures fit the limit: the last good one is still said.
    let two = db.store.database_backups(2).await.unwrap();
    assert_eq!(two.recent.len(), 2);
    assert!(two.recent.iter().all(|b| !b.succeeded));
    assert_eq!(two.last_good.map(|b| b.label), Some("good-old".to_owned()));
}
