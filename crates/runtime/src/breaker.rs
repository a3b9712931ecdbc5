//! A circuit breaker: after `failures_to_open` consecutive failures it
//! opens and refuses calls for `cool_down`; then it lets calls through again
//! (half-open) and closes after `successes_to_close` successes in a row; a
//! failure while half-open opens it again. Time is passed in, so it is tested
//! without waiting.

use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures_to_open: u32,
    pub cool_down: Duration,
    pub successes_to_close: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failures_to_open: 5, cool_down: Duration::from_secs(60), successes_to_close: 3 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    half_open_successes: u32,
    opened_at: Option<Instant>,
    times_opened: u64,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            half_open_successes: 0,
            opened_at: None,
            times_opened: 0,
        }
    }

    /// Whether a call may go through at `now` (moves open to half-open once
    /// the cool-down is over).
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open => {
                if self.opened_at.is_some_and(|at| now.duration_since(at) >= self.config.cool_down) {
                    self.state = BreakerState::HalfOpen;
                    self.half_open_successes = 0;
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        if self.state == BreakerState::HalfOpen {
            self.half_open_successes += 1;
            if self.half_open_successes >= self.config.successes_to_close {
                self.state = BreakerState::Closed;
                self.opened_at = None;
            }
        }
    }

    pub fn record_failure(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        let open = match self.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => self.consecutive_failures >= self.config.failures_to_open,
            BreakerState::Open => false,
        };
        if open {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
            self.times_opened += 1;
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_half_opens_after_the_cool_down_and_closes_after_m_successes() {
        let config = BreakerConfig { failures_to_open: 5, cool_down: Duration::from_secs(60), successes_to_close: 3 };
        let mut breaker = CircuitBreaker::new(config);
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(breaker.allow(t0));
            breaker.record_failure(t0);
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "4 failures are not enough");
        breaker.record_failure(t0);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow(t0 + Duration::from_secs(59)), "refused during the cool-down");
        assert!(breaker.allow(t0 + Duration::from_secs(60)));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.record_success();
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.times_opened(), 1);
    }

    #[test]
    fn a_failure_while_half_open_opens_it_again_and_a_success_resets_the_count() {
        let mut breaker = CircuitBreaker::new(BreakerConfig {
            failures_to_open: 2,
            cool_down: Duration::from_secs(1),
            successes_to_close: 2,
        });
        let t0 = Instant::now();
        breaker.record_failure(t0);
        breaker.record_success();
        breaker.record_failure(t0);
        assert_eq!(breaker.state(), BreakerState::Closed, "not consecutive");
        breaker.record_failure(t0);
        assert_eq!(breaker.state(), BreakerState::Open);
        let later = t0 + Duration::from_secs(1);
        assert!(breaker.allow(later));
        breaker.record_failure(later);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow(later + Duration::from_millis(500)), "a new cool-down");
        assert_eq!(breaker.times_opened(), 2);
    }
}
