//! Container statistics through the Engine API (the metrics fallback path)
//! and the facts the cgroup path needs about a container.

use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::StatsOptionsBuilder;
use flotilla_types::metrics::RawCounters;
use futures::StreamExt;

use crate::{DockerClient, DockerError};

/// What the metrics pipeline needs to know about a running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRuntime {
    pub id: String,
    /// Its init process on the host (network counters are read through it).
    pub pid: u32,
    /// When it last started: a new value means its counters restarted at zero.
    pub started_at: String,
    /// CPU limit in nano-CPUs; 0 when unlimited.
    pub nano_cpus: i64,
    /// Memory limit; 0 when unlimited.
    pub memory_limit_bytes: i64,
}

impl DockerClient {
    /// Facts about a container, or `None` when it does not run.
    pub async fn container_runtime(&self, id: &str) -> Result<Option<ContainerRuntime>, DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let pid = state.pid.unwrap_or(0);
                if state.running != Some(true) || pid <= 0 {
                    return Ok(None);
                }
                let host = inspect.host_config.unwrap_or_default();
                Ok(Some(ContainerRuntime {
                    id: inspect.id.unwrap_or_else(|| id.to_owned()),
                    pid: pid as u32,
                    started_at: state.started_at.unwrap_or_default(),
                    nano_cpus: host.nano_cpus.unwrap_or(0),
                    memory_limit_bytes: host.memory.unwrap_or(0),
                }))
            }
            Err(e) => match DockerError::from_bollard("inspecting a container", id)(e) {
                DockerError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// One reading of a container's counters through the stats API
    /// (`stream=false`, `one-shot=true`: no waiting for a second reading).
    pub async fn one_shot_stats(&self, id: &str) -> Result<StatsReading, DockerError> {
        let options = StatsOptionsBuilder::default().stream(false).one_shot(true).build();
        let mut stream = self.docker.stats(id, Some(options));
        match stream.next().await {
            Some(Ok(stats)) => Ok(StatsReading { counters: counters(&stats), read: stats.read.clone() }),
            Some(Err(e)) => Err(DockerError::from_bollard("reading container stats", id)(e)),
            None => Err(DockerError::NotFound {
                operation: "reading container stats",
                subject: id.to_owned(),
                message: "no stats returned".to_owned(),
            }),
        }
    }
}

/// One answer of the stats API.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsReading {
    pub counters: RawCounters,
    /// When the engine read the counters (RFC 3339). The engine may hold a
    /// call back for up to a second, so this, not the time of the call, is
    /// when the counters were true.
    pub read: Option<String>,
}

/// The engine's statistics as cumulative counters, the way the cgroup path
/// reads them: memory is usage minus inactive file cache (cgroup v1 calls it
/// `total_inactive_file`, v2 `inactive_file`), network sums every interface.
pub fn counters(stats: &ContainerStatsResponse) -> RawCounters {
    let memory = stats.memory_stats.as_ref();
    let usage = memory.and_then(|m| m.usage).unwrap_or(0);
    let inactive = memory
        .and_then(|m| m.stats.as_ref())
        .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied())
        .unwrap_or(0);
    let (rx, tx) = stats.networks.as_ref().map_or((0, 0), |networks| {
        networks.values().fold((0u64, 0u64), |(rx, tx), n| (rx + n.rx_bytes.unwrap_or(0), tx + n.tx_bytes.unwrap_or(0)))
    });
    let (read, write) =
        stats.blkio_stats.as_ref().and_then(|b| b.io_service_bytes_recursive.as_ref()).map_or((0, 0), |entries| {
            entries.iter().fold((0u64, 0u64), |(r, w), e| {
                match e.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    Some("read") => (r + e.value.unwrap_or(0), w),
                    Some("write") => (r, w + e.value.unwrap_or(0)),
                    _ => (r, w),
                }
            })
        });
    RawCounters {
        cpu_usage_ns: stats
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage)
            .unwrap_or(0),
        memory_bytes: usage.saturating_sub(inactive),
        net_rx_bytes: rx,
        net_tx_bytes: tx,
        blk_read_bytes: read,
        blk_write_bytes: write,
        pids: stats.pids_stats.as_ref().and_then(|p| p.current).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_stats_become_counters() {
        let json = r#"{
            "cpu_stats": {"cpu_usage": {"total_usage": 25147954}},
            "memory_stats": {"usage": 2727936, "stats": {"total_inactive_file": 360448}},
            "networks": {"eth0": {"rx_bytes": 486, "tx_bytes": 10}, "eth1": {"rx_bytes": 14, "tx_bytes": 5}},
            "blkio_stats": {"io_service_bytes_recursive": [
                {"major": 8, "minor": 0, "op": "Read", "value": 4096},
                {"major": 8, "minor": 0, "op": "Write", "value": 8192},
                {"major": 8, "minor": 0, "op": "Total", "value": 12288}
            ]},
            "pids_stats": {"current": 2}
        }"#;
        let stats: ContainerStatsResponse = serde_json::from_str(json).unwrap();
        let c = counters(&stats);
        assert_eq!(c.cpu_usage_ns, 25_147_954);
        assert_eq!(c.memory_bytes, 2_727_936 - 360_448);
        assert_eq!((c.net_rx_bytes, c.net_tx_bytes), (500, 15));
        assert_eq!((c.blk_read_bytes, c.blk_write_bytes), (4096, 8192));
        assert_eq!(c.pids, 2);
    }
}
