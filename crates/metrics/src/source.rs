//! Where counters come from, behind one trait: the cgroup files (fast, no
//! engine call) or the Docker stats API in one-shot mode (the fallback, with
//! bounded parallelism).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use flotilla_docker::{ContainerRuntime, DockerClient, DockerError};
use flotilla_types::metrics::RawCounters;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::cgroup::{self, CgroupReader, ContainerFiles};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Cgroup,
    Docker,
}

/// A container to read, as the collector knows it.
#[derive(Debug, Clone)]
pub struct Target {
    pub container_id: String,
    pub runtime: ContainerRuntime,
    /// Its cgroup files (cgroup path only).
    pub files: Option<Arc<ContainerFiles>>,
    /// When its init process started (cgroup path: detects pid reuse).
    pub process_start: u64,
}

/// One container's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub counters: RawCounters,
    /// Set when the source learned the container's runtime afresh (the
    /// Docker path inspects each round): a new `started_at` is a restart.
    pub runtime: Option<ContainerRuntime>,
    /// When the counters were read, in ms since the Unix epoch, when the
    /// source knows better than the round's time (the engine's `read`
    /// time: it may answer a call up to a second late).
    pub read_at_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The container (or its init process) is not what we knew: it stopped,
    /// restarted or went away. Inspect it again.
    #[error("container {container_id} is gone or restarted")]
    Gone { container_id: String },
    #[error(transparent)]
    Engine(#[from] DockerError),
    #[error("reading the cgroup files of {container_id}: {source}")]
    Files {
        container_id: String,
        #[source]
        source: io::Error,
    },
    #[error("the Docker call for {container_id} took longer than {timeout:?}")]
    Timeout { container_id: String, timeout: Duration },
}

impl ReadError {
    /// Whether this says the engine is unreachable (counts for the breaker).
    pub fn is_engine_failure(&self) -> bool {
        match self {
            Self::Engine(e) => e.is_unreachable() || matches!(e, DockerError::Engine { status: 500.., .. }),
            Self::Timeout { .. } => true,
            Self::Gone { .. } | Self::Files { .. } => false,
        }
    }
}

/// Reads containers' counters.
pub trait StatsSource: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> SourceKind;

    /// One result per target, in the same order.
    fn read<'a>(&'a self, targets: &'a [Target]) -> BoxFuture<'a, Vec<Result<Reading, ReadError>>>;
}

/// The fast path: the cgroup files, read on a blocking thread in one go.
#[derive(Debug, Clone)]
pub struct CgroupSource {
    pub reader: CgroupReader,
}

impl CgroupSource {
    fn read_one(target: &Target) -> Result<Reading, ReadError> {
        let gone = || ReadError::Gone { container_id: target.container_id.clone() };
        let Some(files) = &target.files else { return Err(gone()) };
        // A different start time means the pid now belongs to another process.
        match files.process_start() {
            Ok(start) if start == target.process_start => {}
            Ok(_) => return Err(gone()),
            Err(e) if cgroup::is_gone(&e) => return Err(gone()),
            Err(source) => return Err(ReadError::Files { container_id: target.container_id.clone(), source }),
        }
        match files.read() {
            Ok(counters) => Ok(Reading { counters, runtime: None, read_at_ms: None }),
            Err(e) if cgroup::is_gone(&e) => Err(gone()),
            Err(source) => Err(ReadError::Files { container_id: target.container_id.clone(), source }),
        }
    }
}

impl StatsSource for CgroupSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Cgroup
    }

    fn read<'a>(&'a self, targets: &'a [Target]) -> BoxFuture<'a, Vec<Result<Reading, ReadError>>> {
        Box::pin(async move {
            let owned = targets.to_vec();
            let read = tokio::task::spawn_blocking(move || owned.iter().map(Self::read_one).collect::<Vec<_>>());
            match read.await {
                Ok(results) => results,
                // Only a panic in the reader gets here; report every target failed.
                Err(join) => targets
                    .iter()
                    .map(|t| {
                        Err(ReadError::Files {
                            container_id: t.container_id.clone(),
                            source: io::Error::other(join.to_string()),
                        })
                    })
                    .collect(),
            }
        })
    }
}

/// The fallback: `GET /containers/{id}/stats?stream=false&one-shot=true`
/// plus an inspect (to tell a restart, which resets the counters), at most
/// `parallelism` containers at a time.
#[derive(Debug, Clone)]
pub struct DockerSource {
    pub docker: DockerClient,
    pub parallelism: usize,
    pub timeout: Duration,
}

impl DockerSource {
    async fn read_one(&self, target: &Target) -> Result<Reading, ReadError> {
        let id = target.container_id.as_str();
        let both = futures::future::join(self.docker.container_runtime(id), self.docker.one_shot_stats(id));
        let (runtime, stats) = tokio::time::timeout(self.timeout, both)
            .await
            .map_err(|_| ReadError::Timeout { container_id: id.to_owned(), timeout: self.timeout })?;
        let Some(runtime) = runtime? else { return Err(ReadError::Gone { container_id: id.to_owned() }) };
        let stats = stats.map_err(|e| match e {
            DockerError::NotFound { .. } => ReadError::Gone { container_id: id.to_owned() },
            other => ReadError::Engine(other),
        })?;
        let read_at_ms = stats
            .read
            .as_deref()
            .and_then(|read| chrono::DateTime::parse_from_rfc3339(read).ok())
            .map(|read| read.timestamp_millis());
        Ok(Reading { counters: stats.counters, runtime: Some(runtime), read_at_ms })
    }
}

impl StatsSource for DockerSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Docker
    }

    fn read<'a>(&'a self, targets: &'a [Target]) -> BoxFuture<'a, Vec<Result<Reading, ReadError>>> {
        Box::pin(
            futures::stream::iter(targets)
                .map(|target| self.read_one(target))
                .buffered(self.parallelism.max(1))
                .collect::<Vec<_>>(),
        )
    }
}
