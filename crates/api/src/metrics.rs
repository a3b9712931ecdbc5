//! Metric names of the API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_metrics::LiveView;
use flotilla_telemetry::{FnCollector, MetricKind, MetricSpec};

pub const REQUESTS_TOTAL: &str = "flotilla_api_requests_total";
pub const AUDIT_WRITE_FAILURES_TOTAL: &str = "flotilla_api_audit_write_failures_total";
pub const RATE_LIMITED_TOTAL: &str = "flotilla_api_rate_limited_total";
pub const RATE_LIMIT_LOCAL_FALLBACKS_TOTAL: &str = "flotilla_api_rate_limit_local_fallbacks_total";
pub const VIEW_CACHE_HITS_TOTAL: &str = "flotilla_api_view_cache_hits_total";
pub const VIEW_CACHE_MISSES_TOTAL: &str = "flotilla_api_view_cache_misses_total";
pub const VIEW_CACHE_INVALIDATIONS_TOTAL: &str = "flotilla_api_view_cache_invalidations_total";
pub const VIEW_CACHE_ENTRIES: &str = "flotilla_api_view_cache_entries";
pub const LIVE_SUBSCRIBERS: &str = "flotilla_api_live_subscribers";
pub const LIVE_SLOW_SUBSCRIBERS: &str = "flotilla_api_live_slow_subscribers";
pub const LIVE_DROPPED_TOTAL: &str = "flotilla_api_live_dropped_samples_total";
pub const LIVE_CACHE_SAMPLES: &str = "flotilla_api_live_cache_samples";
pub const LIVE_UNDECODABLE_TOTAL: &str = "flotilla_api_live_undecodable_messages_total";

/// Requests by RPC method and result code.
#[derive(Debug, Default)]
pub struct ApiStats {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    audit_failures: AtomicU64,
}

impl ApiStats {
    pub fn count(&self, method: &'static str, code: &'static str) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((method, code)).or_default() += 1;
    }

    /// A mutating call whose audit entry could not be written.
    pub fn audit_failed(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, method: &'static str, code: &'static str) -> u64 {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).get(&(method, code)).copied().unwrap_or(0)
    }
}

/// The API's collector; with a live view, its subscribers and cache too
/// (the live streams this process serves).
pub fn collector(stats: &Arc<ApiStats>, live: Option<Arc<LiveView>>) -> FnCollector {
    let stats_for_audit = stats.clone();
    let stats = stats.clone();
    let mut specs = live.map(live_specs).unwrap_or_default();
    specs.push(MetricSpec::labelled(
        REQUESTS_TOTAL,
        "API requests by RPC method and result code.",
        MetricKind::Counter,
        move || {
            stats
                .requests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|((method, code), n)| {
                    (
                        vec![("method".to_owned(), (*method).to_owned()), ("code".to_owned(), (*code).to_owned())],
                        *n as f64,
                    )
                })
                .collect()
        },
    ));
    let audit = stats_for_audit;
    specs.push(MetricSpec::counter(
        AUDIT_WRITE_FAILURES_TOTAL,
        "Mutating calls whose audit log entry could not be written.",
        move || audit.audit_failures.load(Ordering::Relaxed) as f64,
    ));
    FnCollector::new(specs)
}

/// The rate limiter's decisions.
pub fn rate_limit_collector(limits: &Arc<crate::RateLimits>) -> FnCollector {
    let (limited, fallbacks) = (limits.clone(), limits.clone());
    FnCollector::new(vec![
        MetricSpec::counter(RATE_LIMITED_TOTAL, "Requests refused by a rate limit (resource_exhausted).", move || {
            limited.limiter.stats().limited as f64
        }),
        MetricSpec::counter(
            RATE_LIMIT_LOCAL_FALLBACKS_TOTAL,
            "Rate limit decisions taken in this process because Redis could not be reached in time.",
            move || fallbacks.limiter.stats().local_fallbacks as f64,
        ),
    ])
}

/// The GetDeployment cache's counters.
pub fn view_cache_collector(views: &Arc<crate::cache::ViewCache>) -> FnCollector {
    let read = |f: fn(crate::cache::ViewCacheStats) -> u64| {
        let views = views.clone();
        move || f(views.stats()) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(VIEW_CACHE_HITS_TOTAL, "GetDeployment answers served from the cache.", read(|s| s.hits)),
        MetricSpec::counter(VIEW_CACHE_MISSES_TOTAL, "GetDeployment answers read from PostgreSQL.", read(|s| s.misses)),
        MetricSpec::counter(
            VIEW_CACHE_INVALIDATIONS_TOTAL,
            "Cached answers dropped because PostgreSQL announced a change (or listening restarted).",
            read(|s| s.invalidations),
        ),
        MetricSpec::gauge(VIEW_CACHE_ENTRIES, "GetDeployment answers cached now.", read(|s| s.entries)),
    ])
}

fn live_specs(live: Arc<LiveView>) -> Vec<MetricSpec> {
    let read = |f: fn(&LiveView) -> f64| {
        let live = live.clone();
        move || f(&live)
    };
    vec![
        MetricSpec::gauge(
            LIVE_SUBSCRIBERS,
            "Live metric streams this process serves.",
            read(|l| l.hub.stats().active as f64),
        ),
        MetricSpec::gauge(
            LIVE_SLOW_SUBSCRIBERS,
            "Live metric streams that lost samples at the last publish (slow readers).",
            read(|l| l.hub.stats().slow as f64),
        ),
        MetricSpec::counter(
            LIVE_DROPPED_TOTAL,
            "Samples slow live streams lost (their oldest, to keep up).",
            read(|l| l.hub.stats().dropped as f64),
        ),
        MetricSpec::gauge(LIVE_CACHE_SAMPLES, "Samples held in the live cache.", read(|l| l.cache.size().1 as f64)),
        MetricSpec::counter(
            LIVE_UNDECODABLE_TOTAL,
            "Live sample messages from Redis that could not be decoded.",
            read(|l| l.undecodable.load(Ordering::Relaxed) as f64),
        ),
    ]
}
