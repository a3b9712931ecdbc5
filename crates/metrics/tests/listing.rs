//! On the cgroup path a round asks the engine for the container list only
//! when the events stream says a container started: the steady state costs
//! the engine nothing, and nothing is missed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flotilla_metrics::{RoundReport, SourceChoice};
use flotilla_types::DeploymentId;
use tokio_util::sync::CancellationToken;

async fn round_until(
    pipeline: &flotilla_metrics::MetricsPipeline,
    what: &str,
    done: impl Fn(&RoundReport) -> bool,
) -> RoundReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = pipeline.collect_once().await;
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "{what}: last round {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_list_containers_only_after_one_started() {
    let f = Fixture::new().await;
    let deployment = DeploymentId::new();
    let first = f.start(deployment, 0, SLEEPER, 0, 0).await;
    f.start(deployment, 1, SLEEPER, 0, 0).await;
    let (pipeline, _telemetry) = f.pipeline(config(SourceChoice::Cgroup), None).await;
    let cancel = CancellationToken::new();
    let follower = tokio::spawn(pipeline.clone().follow_events(cancel.clone()));

    let report = pipeline.collect_once().await;
    assert!(report.listed && !report.list_skipped, "the first round lists: {report:?}");
    assert_eq!(report.containers, 2);
    for _ in 0..3 {
        // Rounds in the same millisecond make no sample.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = pipeline.collect_once().await;
        assert!(report.list_skipped && !report.listed, "nothing started, so no list: {report:?}");
        assert_eq!((report.containers, report.failures, report.samples), (2, 0, 2));
    }

    // A new container: its start event makes the next round list and read it.
    f.start(deployment, 2, SLEEPER, 0, 0).await;
    let report = round_until(&pipeline, "the new container is read", |r| r.containers == 3).await;
    assert!(report.listed, "it was found by a list: {report:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = pipeline.collect_once().await;
    assert!(report.list_skipped, "and then no more lists: {report:?}");
    assert_eq!(report.samples, 3, "the new container has a sample from its second reading");

    // A container that goes away is noticed by the read itself, without a list.
    f.docker.docker.kill_container(&first, None).await.expect("kill");
    let report = round_until(&pipeline, "the killed container is forgotten", |r| r.containers == 2).await;
    assert_eq!(report.failures, 0, "a stopped container is not a failure: {report:?}");
    let snapshot = pipeline.snapshot();
    assert_eq!(snapshot.containers, 2);
    assert!(snapshot.following_events);
    assert!(snapshot.container_lists_skipped_total >= 4, "{snapshot:?}");

    cancel.cancel();
    follower.await.expect("the follower stops on cancel");
}
