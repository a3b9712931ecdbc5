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
    /// The container probed: a result is recorded only while the replica's
    /// row still names it, and a container that dies is dropped at once
    /// (its address may soon be another container's).
    pub container_id: String,
    pub address: SocketAddr,
    /// The health the row shows, so only changes are written.
    pub recorded: Health,
}

#[derive(Debug)]
struct Tracked {
    /// Tells this target apart from an earlier one of the same replica: a
    /// probe that was under way when its container stopped or was replaced
    /// says nothing of the next one.
    incarnation: u64,
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
    incarnations: std::sync::atomic::AtomicU64,
}

/// A change of a replica's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub replica: ReplicaId,
    pub container_id: String,
    pub health: Health,
    pub error: Option<String>,
}

impl HealthMonitor {
    /// Replaces the set of targets, keeping the state of those that stay.
    pub fn set_targets(&self, targets: HashMap<ReplicaId, ProbeTarget>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|id, t| {
            targets
                .get(id)
                .is_some_and(|new| new.address == t.target.address && new.container_id == t.target.container_id)
        });
        let now = Instant::now();
        for (id, target) in targets {
            match tracked.get_mut(&id) {
                Some(t) => {
                    t.target = target;
                }
                None => {
                    let health = target.recorded;
                    let incarnation = self.incarnations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracked.insert(id, Tracked { incarnation, target, due: now, failures: 0, health });
                }
            }
        }
    }

    /// Stops probing `container` (it died): until a pass sets it again, no
    /// probe goes to its address, which another container may take.
    pub fn forget_container(&self, container: &str) {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, t| t.target.container_id != container);
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
        let due: Vec<(ReplicaId, u64, ProbeTarget)> = {
            let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            tracked.iter().filter(|(_, t)| t.due <= now).map(|(id, t)| (*id, t.incarnation, t.target.clone())).collect()
        };
        let results = futures::future::join_all(due.iter().map(|(id, incarnation, target)| async move {
            (*id, *incarnation, probe(&target.check, target.address).await)
        }))
        .await;
        let mut changes = Vec::new();
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        for (id, incarnation, result) in results {
            let Some(t) = tracked.get_mut(&id).filter(|t| t.incarnation == incarnation) else { continue };
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
                changes.push(HealthChange {
                    replica: id,
                    container_id: t.target.container_id.clone(),
                    health: t.health,
                    error,
                });
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
        monitor.set_targets(HashMap::from([(replica, target(check.clone(), closed))]));
        assert!(monitor.probe_due().await.is_empty(), "one failure is below the threshold");
        tokio::time::sleep(Duration::from_millis(120)).await;
        let changes = monitor.probe_due().await;
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].health, Health::Unhealthy);
        assert!(changes[0].error.is_some());
        assert_eq!(changes[0].container_id, "c1");
    }

    fn target(check: HealthCheck, address: SocketAddr) -> ProbeTarget {
        ProbeTarget { check, container_id: "c1".into(), address, recorded: Health::Healthy }
    }

    #[tokio::test]
    async fn a_dead_container_is_never_probed_again_and_a_new_one_starts_over() {
        let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let monitor = HealthMonitor::default();
        let replica = ReplicaId::new();
        let check = HealthCheck { interval_ms: 10, ..HealthCheck::default() };
        let mut probed = target(check, ok);
        probed.recorded = Health::Starting;
        monitor.set_targets(HashMap::from([(replica, probed.clone())]));
        monitor.forget_container("c1");
        assert!(monitor.is_empty() && monitor.probe_due().await.is_empty(), "nothing probes a dead container");
        // The same address, another container: its own health, not the old one's.
        monitor.set_targets(HashMap::from([(replica, ProbeTarget { container_id: "c2".into(), ..probed.clone() })]));
        let changes = monitor.probe_due().await;
        assert_eq!((changes[0].container_id.as_str(), changes[0].health), ("c2", Health::Healthy));

        // A probe under way while its container stops and starts again (the
        // same id and address) is not taken for the new run's health.
        let slow = slow_server().await;
        let http = HealthCheck { interval_ms: 10, ..HealthCheck::of(HealthCheckKind::Http) };
        let restarted = ProbeTarget { container_id: "c3".into(), address: slow, check: http, ..probed };
        monitor.set_targets(HashMap::from([(replica, restarted.clone())]));
        let under_way = monitor.probe_due();
        let meanwhile = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            monitor.forget_container("c3");
            monitor.set_targets(HashMap::from([(replica, restarted.clone())]));
        };
        let (changes, ()) = tokio::join!(under_way, meanwhile);
        assert!(changes.is_empty(), "a stale probe's result was recorded: {changes:?}");
    }

    /// Answers 200, 100 ms after each request.
    async fn slow_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                });
            }
        });
        address
    }
}
