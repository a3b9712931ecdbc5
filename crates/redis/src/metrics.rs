//! Metric names of the wake-up bus.

use flotilla_telemetry::{FnCollector, MetricSpec};

use crate::{LiveFeed, WakeBus};

pub const WAKEUPS_PUBLISHED_TOTAL: &str = "flotilla_redis_wakeups_published_total";
pub const WAKEUP_PUBLISH_FAILURES_TOTAL: &str = "flotilla_redis_wakeup_publish_failures_total";
pub const WAKEUPS_RECEIVED_TOTAL: &str = "flotilla_redis_wakeups_received_total";
pub const LISTENER_ERRORS_TOTAL: &str = "flotilla_redis_listener_errors_total";
pub const LIVE_PUBLISHED_TOTAL: &str = "flotilla_redis_live_samples_published_total";
pub const LIVE_PUBLISH_FAILURES_TOTAL: &str = "flotilla_redis_live_publish_failures_total";
pub const LIVE_RECEIVED_TOTAL: &str = "flotilla_redis_live_samples_received_total";
pub const LIVE_RECEIVER_ERRORS_TOTAL: &str = "flotilla_redis_live_receiver_errors_total";

/// A collector reading the bus's counters at scrape time.
pub fn collector(bus: &WakeBus) -> FnCollector {
    let read = |bus: &WakeBus, f: fn(crate::WakeStats) -> u64| {
        let bus = bus.clone();
        move || f(bus.stats()) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            WAKEUPS_PUBLISHED_TOTAL,
            "Wake-ups published to Redis Streams.",
            read(bus, |s| s.published),
        ),
        MetricSpec::counter(
            WAKEUP_PUBLISH_FAILURES_TOTAL,
            "Wake-ups that could not be published to Redis (the receivers' timers cover them).",
            read(bus, |s| s.publish_failures),
        ),
        MetricSpec::counter(WAKEUPS_RECEIVED_TOTAL, "Wake-ups received from Redis Streams.", read(bus, |s| s.received)),
        MetricSpec::counter(
            LISTENER_ERRORS_TOTAL,
            "Times the wake-up listener lost its Redis connection.",
            read(bus, |s| s.listener_errors),
        ),
    ])
}

/// A collector reading the live feed's counters at scrape time.
pub fn live_collector(feed: &LiveFeed) -> FnCollector {
    let read = |feed: &LiveFeed, f: fn(crate::LiveFeedStats) -> u64| {
        let feed = feed.clone();
        move || f(feed.stats()) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            LIVE_PUBLISHED_TOTAL,
            "Live sample messages (one per deployment and round) published to Redis.",
            read(feed, |s| s.published),
        ),
        MetricSpec::counter(
            LIVE_PUBLISH_FAILURES_TOTAL,
            "Live sample messages that could not be published to Redis.",
            read(feed, |s| s.publish_failures),
        ),
        MetricSpec::counter(
            LIVE_RECEIVED_TOTAL,
            "Live sample messages received from Redis.",
            read(feed, |s| s.received),
        ),
        MetricSpec::counter(
            LIVE_RECEIVER_ERRORS_TOTAL,
            "Times the live sample receiver lost its Redis connection.",
            read(feed, |s| s.receiver_errors),
        ),
    ])
}
