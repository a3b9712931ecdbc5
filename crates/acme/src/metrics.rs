//! Metric names of the certificate manager.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_telemetry::{FnCollector, MetricSpec};

use crate::CertificateStats;

pub const ISSUED_TOTAL: &str = "flotilla_certificates_issued_total";
pub const RENEWED_TOTAL: &str = "flotilla_certificates_renewed_total";
pub const FAILED_TOTAL: &str = "flotilla_certificates_failed_total";
pub const LOCKED_ELSEWHERE_TOTAL: &str = "flotilla_certificates_locked_elsewhere_total";

pub fn collector(stats: &Arc<CertificateStats>) -> FnCollector {
    let read = |f: fn(&CertificateStats) -> &AtomicU64| {
        let stats = stats.clone();
        move || f(&stats).load(Ordering::Relaxed) as f64
    };
    FnCollector::new(vec![
        MetricSpec::counter(
            ISSUED_TOTAL,
            "Certificates ordered and stored for a domain that had none.",
            read(|s| &s.issued),
        ),
        MetricSpec::counter(RENEWED_TOTAL, "Certificates renewed before they ended.", read(|s| &s.renewed)),
        MetricSpec::counter(
            FAILED_TOTAL,
            "Certificate orders that failed (recorded on the certificate, retried with backoff).",
            read(|s| &s.failed),
        ),
        MetricSpec::counter(
            LOCKED_ELSEWHERE_TOTAL,
            "Due certificates left to another replica that held their ordering lock.",
            read(|s| &s.locked_elsewhere),
        ),
    ])
}
