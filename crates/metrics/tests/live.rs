//! Live samples: subscribers with bounded queues (a stuck one holds nothing
//! up and its losses are counted exactly), and fan-out to other processes
//! through Redis pub/sub.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use flotilla_metrics::{Filter, LiveView, MetricsConfig, SourceChoice};
use flotilla_redis::LiveFeed;
use flotilla_test_utils::TestRedis;
use flotilla_test_utils::wait_until;
use flotilla_types::DeploymentId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CONTAINERS: usize = 6;
const ROUNDS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_holds_nothing_up() {
    let f = Fixture::new().await;
    let deployment = DeploymentId::new();
    for i in 0..CONTAINERS {
        f.start(deployment, i as i32, SLEEPER, 0, 0).await;
    }
    let config = MetricsConfig { subscriber_queue: 4, ..config(SourceChoice::Cgroup) };
    let (pipeline, _telemetry) = f.pipeline(config, None).await;
    let live = pipeline.live().clone();
    let stuck = live.subscribe(Filter::All);
    let mut goes_away = Some(live.subscribe(Filter::Deployment(deployment)));
    // Room for a round's samples: it never falls behind.
    let mut reader = live.hub.subscribe(Filter::Deployment(deployment), 64);
    // A reader that keeps up, on its own task.
    let reading = tokio::spawn(async move {
        let mut times = Vec::new();
        while times.len() < CONTAINERS * ROUNDS {
            times.push(reader.recv().await.time_ms);
        }
        (times, reader.dropped())
    });

    pipeline.collect_once().await; // baselines
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            goes_away = None;
        }
        let report = pipeline.collect_once().await;
        assert_eq!(report.samples, CONTAINERS, "round {round}: {report:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(goes_away.is_none());
    let (times, reader_dropped) = tokio::time::timeout(Duration::from_secs(10), reading).await.unwrap().unwrap();
    assert_eq!(times.len(), CONTAINERS * ROUNDS, "the reader got every sample");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "in order");
    assert_eq!(reader_dropped, 0);

    // The stuck one kept only the newest 4, lost the rest, and said so.
    assert_eq!(stuck.dropped(), (CONTAINERS * ROUNDS - 4) as u64);
    let mut stuck = stuck;
    let kept = stuck.drain();
    assert_eq!(kept.len(), 4);
    let newest = times.last().copied().unwrap();
    assert!(kept.iter().all(|s| s.time_ms == newest), "the newest samples are kept");
    let stats = live.hub.stats();
    // Open: only the stuck one (the reader's task is over, its
    // subscription closed); the one dropped half-way was removed.
    assert_eq!((stats.active, stats.removed, stats.slow), (1, 1, 1), "{stats:?}");
    // Lost, all told: the stuck one's, and those of the one that went away
    // (it saw 5 rounds and kept 4).
    let went_away_lost = (CONTAINERS * ROUNDS / 2 - 4) as u64;
    assert_eq!(stats.dropped, (CONTAINERS * ROUNDS - 4) as u64 + went_away_lost, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_reach_other_processes_through_redis() {
    let f = Fixture::new().await;
    let redis = TestRedis::new().await;
    let deployment = DeploymentId::new();
    let other = DeploymentId::new();
    f.start(deployment, 0, SLEEPER, 0, 0).await;
    f.start(deployment, 1, SLEEPER, 0, 0).await;
    f.start(other, 0, SLEEPER, 0, 0).await;

    // The API process's side: a live view fed from Redis.
    let api_feed = LiveFeed::new(&redis.url, &redis.prefix).unwrap();
    let api_view = Arc::new(LiveView::new(Duration::from_secs(300), Duration::from_secs(5), 64));
    let cancel = CancellationToken::new();
    let receiver = flotilla_metrics::remote::spawn_receiver(&api_feed, api_view.clone(), cancel.clone());
    wait_until("the receiver to subscribe", Duration::from_secs(10), || async {
        api_feed.stats().receiver_connected.then_some(())
    })
    .await;
    let mut watching = api_view.subscribe(Filter::Deployment(deployment));

    // The agent's side: a pipeline publishing to Redis.
    let agent_feed = LiveFeed::new(&redis.url, &redis.prefix).unwrap();
    let config = MetricsConfig { interval: Duration::from_secs(1), ..config(SourceChoice::Cgroup) };
    let (pipeline, _telemetry) = f.pipeline_full(f.client.clone(), config, None, Some(agent_feed.clone())).await;
    let tracker = TaskTracker::new();
    pipeline.spawn(&tracker, cancel.clone());

    let mut got = Vec::new();
    while got.len() < 4 {
        let sample = tokio::time::timeout(Duration::from_secs(15), watching.recv()).await.expect("a sample from Redis");
        got.push(sample);
    }
    assert!(got.iter().all(|s| s.key.deployment_id == deployment), "only the watched deployment");
    assert!(got.iter().all(|s| s.key.organization_id == Some(f.organization)));
    let local: Vec<_> = pipeline.live().cache.recent(deployment);
    for sample in &got {
        assert!(local.iter().any(|l| **l == **sample), "what arrived is what was measured: {sample:?}");
    }
    assert!(!api_view.cache.recent(other).is_empty(), "every deployment's samples reach the cache");
    assert!(agent_feed.stats().published >= 2);
    assert_eq!(agent_feed.stats().publish_failures, 0);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let _ = receiver.await;
}
