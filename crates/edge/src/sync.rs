//! What an agent waits for before it stops a container that served: every
//! edge proxy serving a route table without it.
//!
//! Whatever takes a replica out of the route table (a stop, a delete, a
//! scale-down, a drain, a new container taking over in a rolling update) is
//! committed before the agent acts on it, so a snapshot the agent takes then
//! holds that change. The agent waits until every proxy heard from lately
//! serves (its canary said so, [`crate::serve`]) a table read in a snapshot
//! that [includes](flotilla_types::DbSnapshot::includes) its own, then lets
//! `settle` pass (requests the proxy sent the container before it switched
//! get answered), and only then stops the container. A proxy that does not
//! catch up within `timeout` is named in the log and counted, and the
//! container is stopped anyway: a lost proxy must not keep the cluster from
//! changing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_store::routes::EdgeProxyRecord;
use flotilla_store::{Store, StoreError};
use flotilla_types::DbSnapshot;
use tokio::sync::Mutex;

use crate::metrics::EdgeStats;

/// How long to wait, and for whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSyncConfig {
    /// The longest wait for the proxies.
    pub timeout: Duration,
    /// After every proxy serves the change: time for requests it sent
    /// before to be answered.
    pub settle: Duration,
    /// A proxy not heard from for this long is taken for gone. Longer than
    /// the longest poll a proxy holds (`wait`) plus its poll interval.
    pub proxy_gone_after: Duration,
    /// How often the proxies' tables are read while waiting.
    pub poll: Duration,
}

impl Default for EdgeSyncConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            settle: Duration::from_millis(250),
            proxy_gone_after: Duration::from_secs(10),
            poll: Duration::from_millis(50),
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Every proxy heard from serves the change (this many of them).
    Synced { proxies: usize, waited: Duration },
    /// No proxy was heard from lately: nothing routes through one.
    NoProxies,
    /// These proxies did not catch up in time.
    TimedOut { behind: Vec<String>, waited: Duration },
}

/// Waits for the edge proxies; shared by every operation of an agent, so
/// many waits at once read the proxies' tables once per poll.
#[derive(Debug)]
pub struct EdgeSync {
    store: Store,
    config: EdgeSyncConfig,
    stats: Arc<EdgeStats>,
    /// The last read of the proxies, shared by concurrent waits.
    read: Mutex<Option<(Instant, Arc<Vec<EdgeProxyRecord>>)>>,
}

impl EdgeSync {
    pub fn new(store: Store, config: EdgeSyncConfig, stats: Arc<EdgeStats>) -> Arc<Self> {
        Arc::new(Self { store, config, stats, read: Mutex::new(None) })
    }

    pub fn config(&self) -> &EdgeSyncConfig {
        &self.config
    }

    /// Takes a snapshot now, waits until every proxy serves it (or the
    /// timeout), then lets `settle` pass when there was a proxy to wait for.
    /// Call it after seeing the change that takes a container out of the
    /// route table, and before stopping the container.
    #[tracing::instrument(name = "edge.wait_for_proxies", skip_all)]
    pub async fn unrouted(&self) -> Result<SyncOutcome, StoreError> {
        let snapshot = self.store.snapshot_for_edge().await?;
        let outcome = self.wait_for(&snapshot).await?;
        match &outcome {
            SyncOutcome::NoProxies => {}
            SyncOutcome::Synced { .. } => tokio::time::sleep(self.config.settle).await,
            SyncOutcome::TimedOut { behind, waited } => {
                tracing::warn!(
                    ?behind,
                    ?waited,
                    "edge proxies did not say they serve the change in time (can their canary health checks \
                     reach this cluster's orchestrators? see docs/edge.md); stopping the container anyway"
                );
            }
        }
        Ok(outcome)
    }

    /// Waits until every proxy heard from lately serves a table read in a
    /// snapshot that includes `snapshot`.
    pub async fn wait_for(&self, snapshot: &DbSnapshot) -> Result<SyncOutcome, StoreError> {
        let started = Instant::now();
        EdgeStats::add(&self.stats.sync_waits, 1);
        let outcome = loop {
            let proxies = self.proxies().await?;
            if proxies.is_empty() {
                break SyncOutcome::NoProxies;
            }
            let behind = behind(&proxies, snapshot);
            if behind.is_empty() {
                break SyncOutcome::Synced { proxies: proxies.len(), waited: started.elapsed() };
            }
            if started.elapsed() >= self.config.timeout {
                EdgeStats::add(&self.stats.sync_timeouts, 1);
                break SyncOutcome::TimedOut { behind, waited: started.elapsed() };
            }
            tokio::time::sleep(self.config.poll).await;
        };
        EdgeStats::add(&self.stats.sync_wait_micros, started.elapsed().as_micros() as u64);
        Ok(outcome)
    }

    /// The proxies heard from lately, read at most once per `poll` however
    /// many waits ask.
    async fn proxies(&self) -> Result<Arc<Vec<EdgeProxyRecord>>, StoreError> {
        let mut read = self.read.lock().await;
        if let Some((at, proxies)) = read.as_ref()
            && at.elapsed() < self.config.poll
        {
            return Ok(proxies.clone());
        }
        let proxies = Arc::new(self.store.live_edge_proxies(self.config.proxy_gone_after).await?);
        *read = Some((Instant::now(), proxies.clone()));
        Ok(proxies)
    }
}

/// The proxies that do not hold `snapshot` yet.
pub fn behind(proxies: &[EdgeProxyRecord], snapshot: &DbSnapshot) -> Vec<String> {
    proxies
        .iter()
        .filter(|p| !p.holds.as_ref().is_some_and(|holds| holds.includes(snapshot)))
        .map(|p| p.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str, holds: Option<&str>) -> EdgeProxyRecord {
        EdgeProxyRecord {
            id: id.into(),
            name: "edge".into(),
            address: "127.0.0.1".into(),
            holds: holds.map(|h| h.parse().unwrap()),
            applied_at: None,
            seen_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_proxy_is_behind_until_it_holds_a_later_snapshot() {
        let change: DbSnapshot = "12:20:12,15".parse().unwrap();
        let proxies = [
            proxy("a", Some("15:22:15,21")),
            proxy("b", Some("12:19:12,15")),
            proxy("c", None),
            proxy("d", Some("12:20:12,15")),
        ];
        assert_eq!(behind(&proxies, &change), ["b", "c"]);
    }
}
