//! The API side of live metrics: samples from every node's pipeline arrive
//! over Redis and feed this process's own [`LiveView`], whose subscribers
//! get them through their bounded queues like local ones.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use flotilla_redis::LiveFeed;
use flotilla_types::metrics::Sample;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::LiveView;

/// Feeds `view` from `feed` until `cancel`. Messages that cannot be decoded
/// are counted (in the view) and skipped.
pub fn spawn_receiver(feed: &LiveFeed, view: Arc<LiveView>, cancel: CancellationToken) -> JoinHandle<()> {
    feed.spawn_receiver(
        move |deployment, payload| match serde_json::from_str::<Vec<Sample>>(payload) {
            Ok(samples) => {
                let now_ms = chrono::Utc::now().timestamp_millis();
                let samples: Vec<Arc<Sample>> = samples.into_iter().map(Arc::new).collect();
                view.publish(&samples, now_ms);
            }
            Err(error) => {
                view.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(deployment, %error, "undecodable live samples skipped");
            }
        },
        cancel,
    )
}
