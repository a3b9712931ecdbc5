//! Ten minutes of real collection: the minute aggregates' byte sums equal
//! the counters' difference from the first sample to the last, read here
//! from the container's own `/proc/<pid>/net/dev` (no overlap, no gap), and
//! every minute is there once.

mod common;

use std::time::Duration;

use common::*;
use flotilla_metrics::SourceChoice;
use flotilla_store::metrics::{MetricsStore, Retention};
use flotilla_test_utils::TestDb;
use flotilla_test_utils::wait_until;
use flotilla_types::DeploymentId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const LOAD: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minute_sums_equal_the_counter_difference_over_ten_minutes() {
    let f = Fixture::new().await;
    let db = TestDb::new().await;
    let store = MetricsStore::setup(db.pool().clone(), Retention::default()).await.unwrap();
    let web = f.start(DeploymentId::new(), 0, BIG_FILE_SERVER, 0, 0).await;
    let ip = f.ip(&web).await;
    wait_serving(ip).await;
    let pid = f.pid(&web).await;

    let (pipeline, _telemetry) = f.pipeline(config(SourceChoice::Cgroup), Some(store)).await;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    // Quiet: the first sample's counters (its baseline) lie between a read
    // before the first round and one after it; they are equal unless a stray
    // packet (ARP, IPv6 neighbour discovery) came in between.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first_before = proc_net_bytes(pid);
    pipeline.spawn(&tracker, cancel.clone());
    wait_until("the first round", Duration::from_secs(10), || async {
        (pipeline.snapshot().collections_total >= 1).then_some(())
    })
    .await;
    let first_after = proc_net_bytes(pid);

    // Irregular traffic for ten minutes.
    let started = tokio::time::Instant::now();
    let mut downloads = 0u64;
    let mut pause = 1u64;
    while started.elapsed() < LOAD {
        download(ip, 1).await;
        downloads += 1;
        pause = pause * 7 % 11 + 1; // 1..11 × 300 ms, never in step with the rounds
        tokio::time::sleep(Duration::from_millis(pause * 300)).await;
    }
    // Quiet again; the last sample's counters lie between a read before one
    // more round and one after the pipeline stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last_before = proc_net_bytes(pid);
    let rounds = pipeline.snapshot().collections_total;
    wait_until("one more round", Duration::from_secs(20), || async {
        (pipeline.snapshot().collections_total > rounds).then_some(())
    })
    .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let last_after = proc_net_bytes(pid);

    let minutes: Vec<(chrono::DateTime<chrono::Utc>, i64, i64, i32)> = sqlx::query_as(
        "SELECT minute, net_rx_bytes, net_tx_bytes, samples FROM container_minutes WHERE container_id = $1 ORDER BY minute",
    )
    .bind(&web)
    .fetch_all(db.pool())
    .await
    .unwrap();
    let rx: i64 = minutes.iter().map(|m| m.1).sum();
    let tx: i64 = minutes.iter().map(|m| m.2).sum();
    // (rx, tx) differences: the least and the most the samples can have seen.
    let least = (last_before.0 - first_after.0, last_before.1 - first_after.1);
    let most = (last_after.0 - first_before.0, last_after.1 - first_before.1);
    eprintln!(
        "{} minutes, {downloads} downloads: tx {tx} (counters {}..={}), rx {rx} (counters {}..={})",
        minutes.len(),
        least.1,
        most.1,
        least.0,
        most.0
    );
    assert!(minutes.len() >= 10, "{minutes:?}");
    for pair in minutes.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, chrono::Duration::minutes(1), "each minute once, none missing");
    }
    // 12 samples in a full minute (11 or 13 if a round falls right on a boundary).
    assert!(minutes[1..minutes.len() - 1].iter().all(|m| (11..=13).contains(&m.3)), "{minutes:?}");
    let samples: i64 = minutes.iter().map(|m| i64::from(m.3)).sum();
    assert_eq!(samples as u64, pipeline.snapshot().samples_total, "every sample in exactly one minute");
    // Exact when no stray packet came at either end; any overlap or gap of
    // a 5 s round under load would be far outside these bounds.
    assert!((least.1..=most.1).contains(&(tx as u64)), "sent bytes: no overlap, no gap");
    assert!((least.0..=most.0).contains(&(rx as u64)), "received bytes: no overlap, no gap");
    assert!(most.0 - least.0 < 4096 && most.1 - least.1 < 4096, "the ends were quiet: {least:?} {most:?}");
    assert!(tx as u64 >= downloads * BIG_FILE_BYTES);
    let stats = pipeline.writer().unwrap().stats();
    assert_eq!((stats.dropped_rows, stats.buffered_rows), (0, 0));
}
