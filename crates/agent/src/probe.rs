//! Health probes the agent makes itself: TCP connects and HTTP GETs against
//! the container's own address (not the published port: docker-proxy accepts
//! connections there even when the app does not listen).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_types::status::Health;
use flotilla_types::{HealthCheck, HealthCheckKind, ReplicaId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Probes `address` once as `check` says. `Err` says what failed.
pub async fn probe(check: &HealthCheck, address: SocketAddr) -> Result<(), String> {
    let timeout = Duration::from_millis(u64::from(check.timeout_ms));
    let attempt = async {
        match check.kind {
            HealthCheckKind::Tcp => {
                TcpStream::connect(address).await.map_err(|e| format!("TCP {address}: {e}"))?;
                Ok(())
            }
            HealthCheckKind::Http => http_get(address, &check.path).await,
            HealthCheckKind::None | HealthCheckKind::Command => Ok(()),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("{address}: no answer within {timeout:?}")))
}

/// `GET path` over HTTP/1.1; 2xx and 3xx are healthy.
async fn http_get(address: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(address).await.map_err(|e| format!("HTTP {address}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: flotilla-agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("HTTP {address}: {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..]).await.map_err(|e| format!("HTTP {address}: {e}"))?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("HTTP {address}{path}: not an HTTP answer"))?;
    if (200..400).contains(&code) { Ok(()) } else { Err(format!("HTTP {address}{path}: status {code}")) }
}

/// What the steady-state prober checks for one running replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub check: HealthCheck,
    pub address: SocketAddr,
    /// The health the row shows, so only changes are written.
    pub recorded: Health,
}

#[derive(Debug)]
struct Tracked {
    target: ProbeTarget,
    due: Instant,
    failures: u32,
    health: Health,
}

/// Health of the running replicas whose checks the agent probes. Passes set
/// the targets; the prober probes those that are due and reports changes.
#[derive(Debug, Default)]
pub struct HealthMonitor {
    tracked: Mutex<HashMap<ReplicaId, Tracked>>,
}

/// A change of a replica's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub replica: ReplicaId,
    pub health: Health,
    pub error: Option<String>,
}

impl HealthMonitor {
    /// Replaces the set of targets, keeping the state of those that stay.
    pub fn set_targets(&self, targets: HashMap<ReplicaId, ProbeTarget>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|id, t| targets.get(id).is_some_and(|new| new.address == t.target.address));
        let now = Instant::now();
        for (id, target) in targets {
            match tracked.get_mut(&id) {
                Some(t) => {
                    t.target = target;
                }
                None => {
                    let health = target.recorded;
                    tracked.insert(id, Tracked { target, due: now, failures: 0, health });
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Probes every due target once and returns the health changes.
    pub async fn probe_due(&self) -> Vec<HealthChange> {
        let now = Instant::now();
        let due: Vec<(ReplicaId, ProbeTarget)> = {
            let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            tracked.iter().filter(|(_, t)| t.due <= now).map(|(id, t)| (*id, t.target.clone())).collect()
        };
        let results = futures::future::join_all(
            due.iter().map(|(id, target)| async move { (*id, probe(&target.check, target.address).await) }),
        )
        .await;
        let mut changes = Vec::new();
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        for (id, result) in results {
            let Some(t) = tracked.get_mut(&id) else { continue };
            t.due = Instant::now() + Duration::from_millis(u64::from(t.target.check.interval_ms));
            let before = t.health;
            let error = match result {
                Ok(()) => {
                    t.failures = 0;
                    t.health = Health::Healthy;
                    None
                }
                Err(error) => {
                    t.failures += 1;
                    if t.failures >= t.target.check.unhealthy_threshold {
                        t.health = Health::Unhealthy;
                    }
                    Some(error)
                }
            };
            if t.health != before || t.health != t.target.recorded {
                t.target.recorded = t.health;
                changes.push(HealthChange { replica: id, health: t.health, error });
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn http_server(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let broken = http_server("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let http = HealthCheck { path: "/healthz".into(), ..HealthCheck::of(HealthCheckKind::Http) };
        assert!(probe(&http, ok).await.is_ok());
        let error = probe(&http, broken).await.unwrap_err();
        assert!(error.contains("503"), "{error}");
        assert!(probe(&HealthCheck::default(), ok).await.is_ok());
        // Nothing listens on a freshly closed port.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(probe(&HealthCheck::default(), closed).await.is_err());
    }

    #[tokio::test]
    async fn the_monitor_reports_a_replica_unhealthy_after_the_threshold() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let monitor = HealthMonitor::default();
        let replica = ReplicaId::new();
        let check = HealthCheck { interval_ms: 100, unhealthy_threshold: 2, ..HealthCheck::default() };
        monitor
            .set_targets(HashMap::from([(replica, ProbeTarget { check, address: closed, recorded: Health::Healthy })]));
        assert!(monitor.probe_due().await.is_empty(), "one failure is below the threshold");
        tokio::time::sleep(Duration::from_millis(120)).await;
        let changes = monitor.probe_due().await;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].health, Health::Unhealthy);
        assert!(changes[0].error.is_some());
    }
}
