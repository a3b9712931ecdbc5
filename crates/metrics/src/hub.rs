//! Live subscribers (the API's StreamDeploymentMetrics, the CLI's `top`).
//! Each has a bounded queue of its own: a slow subscriber loses its oldest
//! samples (counted), and nothing it does blocks collection or any other
//! subscriber. A subscription that is dropped is removed at the next publish.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_types::DeploymentId;
use flotilla_types::metrics::Sample;
use tokio::sync::Notify;

/// Which samples a subscriber wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    Deployment(DeploymentId),
}

impl Filter {
    fn wants(self, sample: &Sample) -> bool {
        match self {
            Self::All => true,
            Self::Deployment(d) => sample.key.deployment_id == d,
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    filter: Filter,
    capacity: usize,
    queue: Mutex<VecDeque<Arc<Sample>>>,
    notify: Notify,
    dropped: AtomicU64,
    /// Lost samples at the last publish.
    slow: AtomicBool,
    closed: AtomicBool,
}

/// One subscriber's end: read samples with [`Subscription::recv`].
#[derive(Debug)]
pub struct Subscription {
    subscriber: Arc<Subscriber>,
}

impl Subscription {
    /// The next sample, oldest first; waits for one.
    pub async fn recv(&mut self) -> Arc<Sample> {
        loop {
            if let Some(sample) = self.subscriber.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() {
                return sample;
            }
            self.subscriber.notify.notified().await;
        }
    }

    /// Whatever is queued now, without waiting.
    pub fn drain(&mut self) -> Vec<Arc<Sample>> {
        self.subscriber.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }

    /// Samples this subscriber lost by being slow.
    pub fn dropped(&self) -> u64 {
        self.subscriber.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscriber.closed.store(true, Ordering::Relaxed);
    }
}

/// Subscribers' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HubStats {
    pub active: usize,
    pub slow: usize,
    /// Samples lost by slow subscribers, ever.
    pub dropped: u64,
    pub removed: u64,
}

#[derive(Debug, Default)]
pub struct Hub {
    subscribers: Mutex<Vec<Arc<Subscriber>>>,
    dropped_by_removed: AtomicU64,
    removed: AtomicU64,
}

impl Hub {
    pub fn subscribe(&self, filter: Filter, capacity: usize) -> Subscription {
        let subscriber = Arc::new(Subscriber {
            filter,
            capacity: capacity.max(1),
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            dropped: AtomicU64::new(0),
            slow: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(subscriber.clone());
        Subscription { subscriber }
    }

    /// Hands a round's samples to every subscriber that wants them.
    pub fn publish(&self, samples: &[Arc<Sample>]) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|s| {
            let open = !s.closed.load(Ordering::Relaxed);
            if !open {
                self.removed.fetch_add(1, Ordering::Relaxed);
                self.dropped_by_removed.fetch_add(s.dropped.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            open
        });
        for subscriber in subscribers.iter() {
            let mut lost = 0u64;
            let mut delivered = false;
            {
                let mut queue = subscriber.queue.lock().unwrap_or_else(|e| e.into_inner());
                for sample in samples.iter().filter(|s| subscriber.filter.wants(s)) {
                    if queue.len() >= subscriber.capacity {
                        queue.pop_front();
                        lost += 1;
                    }
                    queue.push_back(sample.clone());
                    delivered = true;
                }
            }
            subscriber.slow.store(lost > 0, Ordering::Relaxed);
            if lost > 0 {
                subscriber.dropped.fetch_add(lost, Ordering::Relaxed);
            }
            if delivered {
                subscriber.notify.notify_one();
            }
        }
    }

    pub fn stats(&self) -> HubStats {
        let subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<&Arc<Subscriber>> = subscribers.iter().filter(|s| !s.closed.load(Ordering::Relaxed)).collect();
        HubStats {
            active: open.len(),
            slow: open.iter().filter(|s| s.slow.load(Ordering::Relaxed)).count(),
            dropped: self.dropped_by_removed.load(Ordering::Relaxed)
                + subscribers.iter().map(|s| s.dropped.load(Ordering::Relaxed)).sum::<u64>(),
            removed: self.removed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample;

    #[tokio::test]
    async fn a_slow_subscriber_loses_its_oldest_samples_and_others_get_everything() {
        let hub = Hub::default();
        let d = DeploymentId::new();
        let mut slow = hub.subscribe(Filter::All, 2);
        let mut fast = hub.subscribe(Filter::Deployment(d), 100);
        let mut other = hub.subscribe(Filter::Deployment(DeploymentId::new()), 100);
        for t in 0..5 {
            hub.publish(&[Arc::new(test_sample("a", d, t))]);
            assert_eq!(fast.recv().await.time_ms, t, "the fast one reads each as it comes");
        }
        assert_eq!(slow.dropped(), 3);
        let kept: Vec<i64> = slow.drain().iter().map(|s| s.time_ms).collect();
        assert_eq!(kept, vec![3, 4], "the newest are kept");
        assert!(other.drain().is_empty(), "filtered out");
        let stats = hub.stats();
        assert_eq!((stats.active, stats.slow, stats.dropped), (3, 1, 3));
    }

    #[tokio::test]
    async fn a_dropped_subscription_is_removed_and_its_losses_still_counted() {
        let hub = Hub::default();
        let d = DeploymentId::new();
        let never_reads = hub.subscribe(Filter::All, 1);
        hub.publish(&[Arc::new(test_sample("a", d, 1)), Arc::new(test_sample("a", d, 2))]);
        drop(never_reads);
        hub.publish(&[Arc::new(test_sample("a", d, 3))]);
        let stats = hub.stats();
        assert_eq!((stats.active, stats.removed, stats.dropped), (0, 1, 1));
    }
}
