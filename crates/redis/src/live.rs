//! Live metrics between processes over Redis pub/sub: every agent publishes
//! each round's samples, one message per deployment; every API process
//! receives them all and hands them to its own local subscribers.
//!
//! Pub/sub is fire-and-forget, which suits a live view: a sample missed
//! while Redis is away is followed by the next one 5 s later, and history
//! comes from the metrics store, never from here. Failures are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::RedisError;

/// Longest a round's publish may take before it is given up (and counted).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// The feed's counters, for `/metrics` and `/metrics/observability`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveFeedStats {
    /// Messages published.
    pub published: u64,
    /// Messages that could not be published (Redis unreachable or slow).
    pub publish_failures: u64,
    /// Messages received by this process's receiver.
    pub received: u64,
    /// Times the receiver lost its connection.
    pub receiver_errors: u64,
    pub receiver_connected: bool,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    publish_failures: AtomicU64,
    received: AtomicU64,
    receiver_errors: AtomicU64,
    receiver_connected: AtomicBool,
}

/// Publishes and receives live samples; cheap to clone.
#[derive(Debug, Clone)]
pub struct LiveFeed {
    client: redis::Client,
    pool: deadpool_redis::Pool,
    prefix: String,
    counters: Arc<Counters>,
}

impl LiveFeed {
    /// A feed through Redis at `url`, on channels under `prefix`. Connects lazily.
    pub fn new(url: &str, prefix: &str) -> Result<Self, RedisError> {
        let client =
            redis::Client::open(url).map_err(|source| RedisError::InvalidUrl { url: url.to_owned(), source })?;
        let pool = deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        pool.resize(2);
        Ok(Self { client, pool, prefix: prefix.to_owned(), counters: Arc::default() })
    }

    /// The channel of one deployment's samples.
    pub fn channel(&self, deployment: &str) -> String {
        format!("{}metrics:{deployment}", self.prefix)
    }

    /// Publishes `(deployment, payload)` messages in one round trip. Never
    /// fails: what could not be sent is counted.
    pub async fn publish(&self, messages: &[(String, String)]) {
        if messages.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (deployment, payload) in messages {
            pipe.publish(self.channel(deployment), payload).ignore();
        }
        let send = async {
            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
            pipe.query_async::<()>(&mut conn).await.map_err(|e| e.to_string())
        };
        let count = messages.len() as u64;
        match tokio::time::timeout(PUBLISH_TIMEOUT, send).await {
            Ok(Ok(())) => {
                self.counters.published.fetch_add(count, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                self.counters.publish_failures.fetch_add(count, Ordering::Relaxed);
                tracing::debug!(%error, messages = count, "live samples not published to Redis");
            }
            Err(_) => {
                self.counters.publish_failures.fetch_add(count, Ordering::Relaxed);
                tracing::debug!(messages = count, "publishing live samples to Redis timed out");
            }
        }
    }

    pub fn stats(&self) -> LiveFeedStats {
        let c = &self.counters;
        LiveFeedStats {
            published: c.published.load(Ordering::Relaxed),
            publish_failures: c.publish_failures.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
            receiver_errors: c.receiver_errors.load(Ordering::Relaxed),
            receiver_connected: c.receiver_connected.load(Ordering::Relaxed),
        }
    }

    /// Receives every deployment's messages, calling `on_message(deployment,
    /// payload)` for each, until `cancel`; reconnects with backoff.
    pub fn spawn_receiver<F>(&self, on_message: F, cancel: CancellationToken) -> JoinHandle<()>
    where
        F: Fn(&str, &str) + Send + Sync + 'static,
    {
        let feed = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let result = tokio::select! {
                    () = cancel.cancelled() => return,
                    result = feed.receive(&on_message) => result,
                };
                feed.counters.receiver_connected.store(false, Ordering::Relaxed);
                if let Err(error) = result {
                    feed.counters.receiver_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "live metrics receiver lost Redis");
                } else {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn receive<F>(&self, on_message: &F) -> Result<(), redis::RedisError>
    where
        F: Fn(&str, &str),
    {
        let mut pubsub = self.client.get_async_pubsub().await?;
        let pattern = format!("{}*", glob_escape(&self.channel("")));
        pubsub.psubscribe(&pattern).await?;
        self.counters.receiver_connected.store(true, Ordering::Relaxed);
        let channel_prefix = self.channel("");
        let mut messages = pubsub.into_on_message();
        // The stream ends when the connection drops.
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else { continue };
            let channel = message.get_channel_name();
            let Some(deployment) = channel.strip_prefix(&channel_prefix) else { continue };
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            on_message(deployment, &payload);
        }
        Err(redis::RedisError::from((redis::ErrorKind::Io, "the pub/sub connection closed")))
    }
}

/// `text` with Redis glob characters escaped, for a literal prefix.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(glob_escape("test:a*b?[c]:metrics:"), "test:a\\*b\\?\\[c\\]:metrics:");
    }
}
