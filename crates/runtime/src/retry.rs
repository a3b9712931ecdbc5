//! The retry schedule every background loop uses after a failure.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays between retries: from `min` doubling up to `max`, with jitter, forever.
pub fn delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The default schedule of reconcilers: 0.5 s doubling up to 30 s.
pub fn reconciler_delays() -> impl Iterator<Item = Duration> {
    delays(Duration::from_millis(500), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let d: Vec<Duration> = delays(Duration::from_millis(100), Duration::from_secs(1)).take(10).collect();
        assert_eq!(d.len(), 10);
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)), "{d:?}");
        assert!(d[6] >= Duration::from_secs(1), "{d:?}");
    }
}
