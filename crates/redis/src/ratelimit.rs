//! Rate limits shared by every API replica, kept in Redis with GCRA (the
//! generic cell rate algorithm: one key per limited subject holding its
//! "theoretical arrival time", updated atomically by a script that uses
//! Redis's own clock). When Redis cannot be reached within a few
//! milliseconds the same algorithm runs in this process instead: limits then
//! hold per replica rather than per cluster, requests keep being served, and
//! each fallback is counted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::RedisError;

/// At most `per_second` requests a second on average, and `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_second: f64,
    pub burst: u32,
}

impl Limit {
    /// Milliseconds between two requests at the average rate.
    fn interval_ms(self) -> f64 {
        1000.0 / self.per_second.max(1e-6)
    }

    /// How far ahead of now the arrival time may run (the burst).
    fn tolerance_ms(self) -> f64 {
        self.interval_ms() * f64::from(self.burst.max(1).saturating_sub(1))
    }
}

/// A limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit: try again after this long.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    pub allowed: u64,
    pub limited: u64,
    /// Decisions taken in this process because Redis could not be reached.
    pub local_fallbacks: u64,
}

/// GCRA in one atomic step. KEYS[1]: the subject's key; ARGV: interval and
/// tolerance in milliseconds. Returns 0 (allowed) or the milliseconds to wait.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return math.ceil(wait) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
return 0
";

/// How long a decision may wait for Redis before this process decides.
const REDIS_BUDGET: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct RateLimiter {
    prefix: String,
    redis: Option<(deadpool_redis::Pool, redis::Script)>,
    /// Theoretical arrival times of the local fallback, in ms since `epoch`.
    local: Mutex<HashMap<String, f64>>,
    epoch: Instant,
    allowed: AtomicU64,
    limited: AtomicU64,
    local_fallbacks: AtomicU64,
}

impl RateLimiter {
    /// Limits within this process only.
    pub fn local_only() -> Self {
        Self::build(String::new(), None)
    }

    /// Limits shared through Redis at `url` by every process with `prefix`.
    pub fn with_redis(url: &str, prefix: &str) -> Result<Self, RedisError> {
        let pool = deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        pool.resize(8);
        Ok(Self::build(prefix.to_owned(), Some((pool, redis::Script::new(SCRIPT)))))
    }

    fn build(prefix: String, redis: Option<(deadpool_redis::Pool, redis::Script)>) -> Self {
        Self {
            prefix,
            redis,
            local: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            allowed: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            local_fallbacks: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> RateLimitStats {
        RateLimitStats {
            allowed: self.allowed.load(Ordering::Relaxed),
            limited: self.limited.load(Ordering::Relaxed),
            local_fallbacks: self.local_fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Takes one request of `subject` against `limit`.
    pub async fn check(&self, subject: &str, limit: Limit) -> Decision {
        let decision = match self.check_redis(subject, limit).await {
            Some(decision) => decision,
            None => {
                self.local_fallbacks.fetch_add(1, Ordering::Relaxed);
                self.check_local(subject, limit)
            }
        };
        match decision {
            Decision::Allowed => self.allowed.fetch_add(1, Ordering::Relaxed),
            Decision::Limited { .. } => self.limited.fetch_add(1, Ordering::Relaxed),
        };
        decision
    }

    /// `None` when Redis is absent or did not answer in time.
    async fn check_redis(&self, subject: &str, limit: Limit) -> Option<Decision> {
        let (pool, script) = self.redis.as_ref()?;
        let key = format!("{}ratelimit:{subject}", self.prefix);
        let ask = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            script
                .key(&key)
                .arg(limit.interval_ms())
                .arg(limit.tolerance_ms())
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(REDIS_BUDGET, ask).await {
            Ok(Ok(0)) => Some(Decision::Allowed),
            Ok(Ok(wait_ms)) => Some(Decision::Limited { retry_after: Duration::from_millis(wait_ms.max(1) as u64) }),
            Ok(Err(error)) => {
                tracing::debug!(%error, "rate limit decided in this process: Redis failed");
                None
            }
            Err(_) => {
                tracing::debug!("rate limit decided in this process: Redis too slow");
                None
            }
        }
    }

    fn check_local(&self, subject: &str, limit: Limit) -> Decision {
        let now = self.epoch.elapsed().as_secs_f64() * 1000.0;
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        // Forget subjects that have been idle long enough to be full again.
        if local.len() > 100_000 {
            local.retain(|_, tat| *tat > now);
        }
        let tat = local.get(subject).copied().unwrap_or(now).max(now);
        // Allowed while the arrival time runs at most `tolerance` ahead.
        let wait = tat - limit.tolerance_ms() - now;
        if wait > 0.0 {
            return Decision::Limited { retry_after: Duration::from_secs_f64(wait / 1000.0) };
        }
        local.insert(subject.to_owned(), tat + limit.interval_ms());
        Decision::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_limiter_allows_the_burst_then_the_rate() {
        let limiter = RateLimiter::local_only();
        let limit = Limit { per_second: 10.0, burst: 5 };
        let allowed = (0..20).filter(|_| limiter.check_local("a", limit) == Decision::Allowed).count();
        assert_eq!(allowed, 5, "the burst, all at once");
        match limiter.check_local("a", limit) {
            Decision::Limited { retry_after } => {
                assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
            }
            Decision::Allowed => panic!("over the burst"),
        }
        assert_eq!(limiter.check_local("b", limit), Decision::Allowed, "subjects are limited apart");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(limiter.check_local("a", limit), Decision::Allowed, "one more after an interval");
    }
}
