//! The live cache: each container's samples of the last few minutes, in
//! memory, bounded both by age and by count.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use flotilla_types::DeploymentId;
use flotilla_types::metrics::Sample;

#[derive(Debug)]
pub struct LiveCache {
    window_ms: i64,
    max_per_container: usize,
    containers: Mutex<HashMap<String, VecDeque<Arc<Sample>>>>,
}

impl LiveCache {
    /// Keeps `window_ms` of samples per container, at most `max_per_container`.
    pub fn new(window_ms: i64, max_per_container: usize) -> Self {
        Self { window_ms, max_per_container: max_per_container.max(1), containers: Mutex::new(HashMap::new()) }
    }

    /// Adds a round's samples and forgets what is older than the window
    /// (containers with nothing recent go entirely).
    pub fn push(&self, samples: &[Arc<Sample>], now_ms: i64) {
        let mut containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        for sample in samples {
            let queue = containers.entry(sample.key.container_id.clone()).or_default();
            queue.push_back(sample.clone());
            while queue.len() > self.max_per_container {
                queue.pop_front();
            }
        }
        let oldest = now_ms - self.window_ms;
        containers.retain(|_, queue| {
            while queue.front().is_some_and(|s| s.time_ms < oldest) {
                queue.pop_front();
            }
            !queue.is_empty()
        });
    }

    /// A deployment's cached samples, oldest first.
    pub fn recent(&self, deployment: DeploymentId) -> Vec<Arc<Sample>> {
        let containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        let mut samples: Vec<Arc<Sample>> =
            containers.values().flatten().filter(|s| s.key.deployment_id == deployment).cloned().collect();
        samples.sort_by_key(|s| (s.time_ms, s.key.replica_index));
        samples
    }

    /// (containers, samples) held.
    pub fn size(&self) -> (usize, usize) {
        let containers = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        (containers.len(), containers.values().map(VecDeque::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample;

    #[test]
    fn the_cache_keeps_the_window_and_the_bound() {
        let cache = LiveCache::new(300_000, 3);
        let d = DeploymentId::new();
        for t in 0..5 {
            cache.push(&[Arc::new(test_sample("a", d, t * 5_000))], t * 5_000);
        }
        assert_eq!(cache.size(), (1, 3), "at most 3 per container");
        assert_eq!(cache.recent(d).first().map(|s| s.time_ms), Some(10_000));
        // Ten minutes later with nothing new, the container is forgotten.
        cache.push(&[Arc::new(test_sample("b", DeploymentId::new(), 620_000))], 620_000);
        assert_eq!(cache.size(), (1, 1));
        assert!(cache.recent(d).is_empty());
    }
}
