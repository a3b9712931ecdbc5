//! Metric names of the OIDC client.

use std::sync::Arc;

use flotilla_telemetry::{FnCollector, MetricSpec};

use crate::{Oidc, OidcStats};

pub const JWKS_FETCHES_TOTAL: &str = "flotilla_oidc_jwks_fetches_total";
pub const JWKS_REFRESHES_SUPPRESSED_TOTAL: &str = "flotilla_oidc_jwks_refreshes_suppressed_total";
pub const USERINFO_CALLS_TOTAL: &str = "flotilla_oidc_userinfo_calls_total";
pub const VERIFIED_CACHE_HITS_TOTAL: &str = "flotilla_oidc_verified_cache_hits_total";

/// A collector reading the client's counters at scrape time.
pub fn collector(oidc: &Arc<Oidc>) -> FnCollector {
    let read = |f: fn(OidcStats) -> u64| {
        let oidc = oidc.clone();
        move || f(oidc.stats()) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            JWKS_FETCHES_TOTAL,
            "Fetches of the identity provider's signing keys (at start and on an unknown key).",
            read(|s| s.jwks_fetches),
        ),
        MetricSpec::counter(
            JWKS_REFRESHES_SUPPRESSED_TOTAL,
            "Tokens with an unknown key refused without fetching the keys again (a fetch was too recent).",
            read(|s| s.jwks_refreshes_suppressed),
        ),
        MetricSpec::counter(
            USERINFO_CALLS_TOTAL,
            "Calls to the provider's userinfo endpoint for opaque tokens (cache misses).",
            read(|s| s.userinfo_calls),
        ),
        MetricSpec::counter(
            VERIFIED_CACHE_HITS_TOTAL,
            "JWTs accepted from the cache of already verified tokens.",
            read(|s| s.verified_cache_hits),
        ),
    ])
}
