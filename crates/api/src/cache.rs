//! Hot reads: GetDeployment's answers, kept in this process and dropped as
//! soon as PostgreSQL announces a change of the deployment (NOTIFY from the
//! writing transaction itself, so no writer can forget to invalidate; see
//! `Store::announce_changes`). When listening restarts, changes
//! may have been missed and everything is dropped. Entries also expire after
//! [`VIEW_TTL`], a bound on staleness should a notice ever be lost anyway.
//!
//! A read that raced with a change must not put the old state back: each
//! reader takes a stamp of its id's shard before reading, and its answer is
//! only kept if no change of that shard came in between.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::v1 as pb;
use flotilla_store::changes::Change;
use flotilla_types::{DeploymentId, OrganizationId};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub const VIEW_TTL: Duration = Duration::from_secs(30);
const SHARDS: usize = 256;
const CAPACITY: usize = 50_000;

#[derive(Debug)]
struct Entry {
    organization: OrganizationId,
    deployment: Arc<pb::Deployment>,
    at: Instant,
}

#[derive(Debug)]
pub struct ViewCache {
    entries: Mutex<HashMap<DeploymentId, Entry>>,
    /// Changes seen per shard of ids.
    stamps: Vec<AtomicU64>,
    hasher: std::collections::hash_map::RandomState,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViewCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub invalidations: u64,
    pub entries: u64,
}

impl ViewCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            stamps: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: DeploymentId) -> &AtomicU64 {
        &self.stamps[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached answer for `id`, if it is `organization`'s and fresh.
    pub fn get(&self, organization: OrganizationId, id: DeploymentId) -> Option<Arc<pb::Deployment>> {
        let found = self
            .lock()
            .get(&id)
            .filter(|e| e.organization == organization && e.at.elapsed() < self.ttl)
            .map(|e| e.deployment.clone());
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Taken before reading `id` from the store.
    pub fn stamp(&self, id: DeploymentId) -> u64 {
        self.shard(id).load(Ordering::Acquire)
    }

    /// Keeps an answer read after `stamp` was taken, unless `id` changed since.
    pub fn put(&self, organization: OrganizationId, id: DeploymentId, deployment: &pb::Deployment, stamp: u64) {
        let mut entries = self.lock();
        // Checked under the lock: an invalidation bumps the stamp before it
        // takes the lock to remove, so it either stops this insert or
        // removes what it inserted.
        if self.shard(id).load(Ordering::Acquire) != stamp {
            return;
        }
        if entries.len() >= CAPACITY {
            let ttl = self.ttl;
            entries.retain(|_, e| e.at.elapsed() < ttl);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(id, Entry { organization, deployment: Arc::new(deployment.clone()), at: Instant::now() });
    }

    pub fn invalidate(&self, id: DeploymentId) {
        self.shard(id).fetch_add(1, Ordering::AcqRel);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.lock().remove(&id);
    }

    /// Forgets everything (changes may have been missed).
    pub fn clear(&self) {
        for stamp in &self.stamps {
            stamp.fetch_add(1, Ordering::AcqRel);
        }
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.lock().clear();
    }

    pub fn stats(&self) -> ViewCacheStats {
        ViewCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            entries: self.lock().len() as u64,
        }
    }

    /// Drops entries as changes are announced, until `cancel`.
    pub async fn follow(self: Arc<Self>, mut changes: broadcast::Receiver<Change>, cancel: CancellationToken) {
        loop {
            let change = tokio::select! {
                () = cancel.cancelled() => return,
                change = changes.recv() => change,
            };
            match change {
                Ok(Change::Deployment(id)) => self.invalidate(id),
                Ok(Change::Routes) => {}
                Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => self.clear(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(name: &str) -> pb::Deployment {
        pb::Deployment { name: name.to_owned(), ..Default::default() }
    }

    #[test]
    fn an_answer_read_across_a_change_is_not_kept() {
        let cache = ViewCache::new(VIEW_TTL);
        let (org, id) = (OrganizationId::new(), DeploymentId::new());
        let stamp = cache.stamp(id);
        cache.invalidate(id); // the change lands while the read is under way
        cache.put(org, id, &deployment("old"), stamp);
        assert!(cache.get(org, id).is_none(), "the stale answer must not be cached");

        let stamp = cache.stamp(id);
        cache.put(org, id, &deployment("new"), stamp);
        assert_eq!(cache.get(org, id).map(|d| d.name.clone()).as_deref(), Some("new"));
        cache.invalidate(id);
        assert!(cache.get(org, id).is_none());
    }

    #[test]
    fn another_organization_never_gets_the_entry() {
        let cache = ViewCache::new(VIEW_TTL);
        let (org, other, id) = (OrganizationId::new(), OrganizationId::new(), DeploymentId::new());
        cache.put(org, id, &deployment("mine"), cache.stamp(id));
        assert!(cache.get(other, id).is_none());
        assert!(cache.get(org, id).is_some());
    }

    #[test]
    fn a_resync_forgets_everything_and_stale_entries_expire() {
        let cache = ViewCache::new(Duration::from_millis(50));
        let (org, id) = (OrganizationId::new(), DeploymentId::new());
        let stamp = cache.stamp(id);
        cache.clear();
        cache.put(org, id, &deployment("old"), stamp);
        assert!(cache.get(org, id).is_none(), "a read across a resync is not kept");
        cache.put(org, id, &deployment("x"), cache.stamp(id));
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.get(org, id).is_none(), "expired");
    }
}
