//! Flotilla's Redis layer: wake-ups between processes over Redis Streams
//! ([`WakeBus`]) and live metrics over pub/sub ([`live::LiveFeed`]).
//!
//! A wake-up only says "look again": the orchestrator and the agents are
//! level-triggered and also run on a timer, so a lost wake-up costs latency,
//! never correctness, and Redis holds nothing that PostgreSQL does not.
//! Waiters in the same process are woken directly, without Redis.

pub mod live;
pub mod metrics;
pub mod ratelimit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamMaxlen, StreamReadOptions, StreamReadReply};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use live::{LiveFeed, LiveFeedStats};

/// The topic the orchestrator waits on.
pub const ORCHESTRATOR_TOPIC: &str = "orchestrator";

/// The topic the agent of `node_id` waits on.
pub fn agent_topic(node_id: &str) -> String {
    format!("agent:{node_id}")
}

/// How long one blocking XREAD waits before it is re-issued.
const READ_BLOCK: Duration = Duration::from_secs(5);
/// Stream entries kept per topic; readers only need the newest.
const STREAM_MAXLEN: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid Redis URL {url:?}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("creating the Redis pool: {0}")]
    Pool(#[from] deadpool_redis::CreatePoolError),
}

/// Counters of the wake-up bus, for `/metrics` and `/health`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WakeStats {
    pub published: u64,
    pub publish_failures: u64,
    pub received: u64,
    pub listener_errors: u64,
}

#[derive(Debug)]
struct Inner {
    prefix: String,
    local: Mutex<HashMap<String, Arc<Notify>>>,
    redis: Option<(redis::Client, deadpool_redis::Pool)>,
    published: AtomicU64,
    publish_failures: AtomicU64,
    received: AtomicU64,
    listener_errors: AtomicU64,
}

/// Sends and receives wake-ups; cheap to clone.
#[derive(Debug, Clone)]
pub struct WakeBus {
    inner: Arc<Inner>,
}

impl WakeBus {
    /// Wakes waiters in this process only.
    pub fn local_only() -> Self {
        Self::build(String::new(), None)
    }

    /// Wakes waiters in this process and, through Redis at `url`, in every
    /// process listening with the same `prefix`. Connects lazily.
    pub fn with_redis(url: &str, prefix: &str) -> Result<Self, RedisError> {
        let client =
            redis::Client::open(url).map_err(|source| RedisError::InvalidUrl { url: url.to_owned(), source })?;
        let pool = deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        pool.resize(4);
        Ok(Self::build(prefix.to_owned(), Some((client, pool))))
    }

    fn build(prefix: String, redis: Option<(redis::Client, deadpool_redis::Pool)>) -> Self {
        Self {
            inner: Arc::new(Inner {
                prefix,
                local: Mutex::new(HashMap::new()),
                redis,
                published: AtomicU64::new(0),
                publish_failures: AtomicU64::new(0),
                received: AtomicU64::new(0),
                listener_errors: AtomicU64::new(0),
            }),
        }
    }

    /// The handle a loop awaits for `topic`.
    pub fn waiter(&self, topic: &str) -> Arc<Notify> {
        let mut local = self.inner.local.lock().unwrap_or_else(|e| e.into_inner());
        local.entry(topic.to_owned()).or_default().clone()
    }

    /// Wakes `topic` in this process only.
    pub fn notify_local(&self, topic: &str) {
        self.waiter(topic).notify_one();
    }

    fn stream_key(&self, topic: &str) -> String {
        format!("{}wake:{topic}", self.inner.prefix)
    }

    /// Wakes `topic` here and everywhere. Never fails: when Redis is down the
    /// failure is counted and the other side's timer takes over.
    pub async fn wake(&self, topic: &str) {
        self.notify_local(topic);
        let Some((_, pool)) = &self.inner.redis else { return };
        let key = self.stream_key(topic);
        let result: Result<(), String> = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let _: String = conn
                .xadd_maxlen(&key, StreamMaxlen::Approx(STREAM_MAXLEN), "*", &[("w", "1")])
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                self.inner.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.inner.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic, %error, "wake-up not published to Redis");
            }
        }
    }

    /// Asks Redis for a PONG: `None` without Redis, `Some(Err)` when it
    /// cannot be reached (the `redis` health component).
    pub async fn ping(&self) -> Option<Result<(), String>> {
        let (_, pool) = self.inner.redis.as_ref()?;
        let answer = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let pong: String = redis::cmd("PING").query_async(&mut *conn).await.map_err(|e| e.to_string())?;
            if pong == "PONG" { Ok(()) } else { Err(format!("Redis answered {pong:?} to PING")) }
        };
        Some(match tokio::time::timeout(Duration::from_secs(2), answer).await {
            Ok(answer) => answer,
            Err(_) => Err("no answer to PING within 2 s".to_owned()),
        })
    }

    pub fn stats(&self) -> WakeStats {
        WakeStats {
            published: self.inner.published.load(Ordering::Relaxed),
            publish_failures: self.inner.publish_failures.load(Ordering::Relaxed),
            received: self.inner.received.load(Ordering::Relaxed),
            listener_errors: self.inner.listener_errors.load(Ordering::Relaxed),
        }
    }

    /// Relays wake-ups of `topics` from Redis to this process's waiters until
    /// `cancel` fires. Without Redis it does nothing.
    pub fn spawn_listener(&self, topics: Vec<String>, cancel: CancellationToken) -> JoinHandle<()> {
        let bus = self.clone();
        tokio::spawn(async move {
            let Some((client, _)) = bus.inner.redis.clone() else { return };
            let mut backoff = Duration::from_millis(100);
            loop {
                let result = tokio::select! {
                    () = cancel.cancelled() => return,
                    result = bus.listen(&client, &topics, &cancel) => result,
                };
                if cancel.is_cancelled() {
                    return;
                }
                if let Err(error) = result {
                    bus.inner.listener_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "wake-up listener lost Redis");
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn listen(
        &self,
        client: &redis::Client,
        topics: &[String],
        cancel: &CancellationToken,
    ) -> Result<(), redis::RedisError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(READ_BLOCK + Duration::from_secs(5)));
        let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
        let keys: Vec<String> = topics.iter().map(|t| self.stream_key(t)).collect();
        let mut last_ids: Vec<String> = vec!["$".to_owned(); keys.len()];
        // Wake-ups sent while we were not listening are lost: look again now.
        for topic in topics {
            self.notify_local(topic);
        }
        let options = StreamReadOptions::default().block(READ_BLOCK.as_millis() as usize).count(100);
        while !cancel.is_cancelled() {
            let reply: Option<StreamReadReply> = conn.xread_options(&keys, &last_ids, &options).await?;
            let Some(reply) = reply else { continue };
            for stream in reply.keys {
                let Some(i) = keys.iter().position(|k| *k == stream.key) else { continue };
                if let Some(last) = stream.ids.last() {
                    last_ids[i] = last.id.clone();
                    self.inner.received.fetch_add(stream.ids.len() as u64, Ordering::Relaxed);
                    self.notify_local(&topics[i]);
                }
            }
        }
        Ok(())
    }
}
