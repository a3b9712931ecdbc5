//! The Docker events feed. Events only say "look again": a reconciliation
//! pass compares everything, so an event that is lost, repeated or out of
//! order costs nothing but latency. What matters is that they come fast and
//! that none are lost between subscriptions:
//! - the feed starts with `since` set before the first container list;
//! - it reads the stream promptly into a bounded buffer of its own (the
//!   engine drops events for slow listeners), dropping the oldest when full
//!   (counted; the pass that follows covers them);
//! - after a break it resubscribes with `since` = the last event it saw.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_docker::{ContainerEvent, DockerClient};
use flotilla_types::NodeId;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::probe::HealthMonitor;

/// Events kept between passes at most.
pub const EVENT_BUFFER: usize = 4096;

#[derive(Debug)]
pub struct EventFeed {
    received: AtomicU64,
    reconnects: AtomicU64,
    dropped: AtomicU64,
    connected: AtomicBool,
    /// Nanoseconds since the epoch of the last event seen (or of the start).
    since_nanos: AtomicI64,
    buffer: Mutex<VecDeque<ContainerEvent>>,
}

/// The feed's counters, for `/health` and the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EventStats {
    pub received: u64,
    pub reconnects: u64,
    pub dropped: u64,
    pub connected: bool,
    pub since_nanos: i64,
}

impl EventFeed {
    /// A feed that will start from `since_nanos` (take it before the first
    /// container list).
    pub fn new(since_nanos: i64) -> Self {
        Self {
            received: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            since_nanos: AtomicI64::new(since_nanos),
            buffer: Mutex::new(VecDeque::new()),
        }
    }

    pub fn stats(&self) -> EventStats {
        EventStats {
            received: self.received.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
            since_nanos: self.since_nanos.load(Ordering::Relaxed),
        }
    }

    /// Takes the buffered events.
    pub fn take(&self) -> Vec<ContainerEvent> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }

    fn push(&self, event: ContainerEvent) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.since_nanos.fetch_max(event.time_nanos, Ordering::Relaxed);
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buffer.len() >= EVENT_BUFFER {
            buffer.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        buffer.push_back(event);
    }

    /// Follows `node`'s container events until `cancel`, waking `wake` on
    /// each one. A container that dies is no longer probed from this moment
    /// (`monitor`): its address may be handed to another container before
    /// the pass that follows.
    pub async fn run(
        self: Arc<Self>,
        docker: DockerClient,
        node: NodeId,
        wake: Arc<Notify>,
        monitor: Arc<HealthMonitor>,
        cancel: CancellationToken,
    ) {
        let mut delays = flotilla_runtime::retry::delays(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let since = self.since_nanos.load(Ordering::Relaxed);
            let mut stream = docker.container_events(&node, Some(since));
            self.connected.store(true, Ordering::Relaxed);
            let ended = loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    item = stream.next() => match item {
                        Some(Ok(event)) => {
                            delays = flotilla_runtime::retry::delays(Duration::from_millis(100), Duration::from_secs(5));
                            tracing::debug!(action = %event.action, container.id = %event.container_id, "container event");
                            if event.action == "die" {
                                monitor.forget_container(&event.container_id);
                            }
                            self.push(event);
                            wake.notify_one();
                        }
                        Some(Err(error)) => break error.to_string(),
                        None => break "the engine closed the stream".to_owned(),
                    }
                }
            };
            self.connected.store(false, Ordering::Relaxed);
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            // Something may have changed while we were not listening.
            wake.notify_one();
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tracing::warn!(error = %ended, retry_in = ?delay, "Docker events stream broke; resubscribing");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn event(n: i64) -> ContainerEvent {
        ContainerEvent { action: "die".into(), container_id: format!("c{n}"), time_nanos: n, labels: HashMap::new() }
    }

    #[test]
    fn the_buffer_is_bounded_and_counts_what_it_drops() {
        let feed = EventFeed::new(0);
        for n in 0..(EVENT_BUFFER as i64 + 10) {
            feed.push(event(n));
        }
        let stats = feed.stats();
        assert_eq!(stats.received, EVENT_BUFFER as u64 + 10);
        assert_eq!(stats.dropped, 10);
        assert_eq!(stats.since_nanos, EVENT_BUFFER as i64 + 9, "resubscribing starts at the last event");
        let taken = feed.take();
        assert_eq!(taken.len(), EVENT_BUFFER);
        assert_eq!(taken[0].container_id, "c10", "the oldest went first");
        assert!(feed.take().is_empty());
    }
}
