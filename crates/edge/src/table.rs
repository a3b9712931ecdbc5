//! The rendered route table, kept current. It is rendered when PostgreSQL
//! announces a change of anything it reads (and every `refresh` in case a
//! notice was lost, or a certificate expired), never per poll: a poll is
//! answered with bytes already made, compressed once per change.
//!
//! Each rendering carries the database snapshot it was read in; what a proxy
//! holds is known by that snapshot ([`crate::serve`]).

use std::hash::{DefaultHasher, Hasher};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use flotilla_acme::Sealer;
use flotilla_store::changes::Change;
use flotilla_store::{Store, StoreError};
use flotilla_telemetry::{Health, Telemetry};
use flotilla_types::DbSnapshot;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::EdgeSettings;
use crate::metrics::EdgeStats;
use crate::render::{self, TlsCertificate};

/// One variant of the table, open for each proxy's canary
/// ([`render::Canary`]): JSON, its gzip, and a hash to tell whether a proxy
/// already has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub json: Bytes,
    pub gzip: Bytes,
    pub hash: u64,
}

impl Body {
    fn make(json: Vec<u8>, reuse: Option<&Body>) -> Body {
        let hash = {
            let mut hasher = DefaultHasher::new();
            hasher.write(&json);
            hasher.finish()
        };
        if let Some(same) = reuse.filter(|b| b.hash == hash && b.json.as_ref() == json.as_slice()) {
            return same.clone();
        }
        let gzip = gzip_member(&json);
        Body { json: Bytes::from(json), gzip: Bytes::from(gzip), hash }
    }

    /// The whole table for one proxy: this body closed by its canary. The
    /// shared part is compressed once per change and the canary as a gzip
    /// member of its own (a gzip stream may hold several, read one after
    /// the other, as Go's and every other decoder do).
    pub fn for_proxy(&self, canary: &render::Canary<'_>, gzip: bool) -> Bytes {
        let close = canary.close();
        let (shared, close) = if gzip { (&self.gzip, gzip_member(&close)) } else { (&self.json, close) };
        let mut out = Vec::with_capacity(shared.len() + close.len());
        out.extend_from_slice(shared);
        out.extend_from_slice(&close);
        Bytes::from(out)
    }
}

fn gzip_member(bytes: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 8 + 64), flate2::Compression::fast());
    encoder.write_all(bytes).and_then(|()| encoder.finish()).expect("gzip into memory")
}

/// One rendering of the route table.
#[derive(Debug, Clone)]
pub struct TableVersion {
    /// The database snapshot it was read in.
    pub snapshot: DbSnapshot,
    /// Routes only, for anyone.
    pub public: Body,
    /// Routes and certificates, for callers with the internal token.
    pub internal: Body,
    pub rendered_at: DateTime<Utc>,
    pub routers: usize,
    pub servers: usize,
    pub without_servers: usize,
    pub unverified: usize,
    pub certificates: usize,
}

/// The route table of this process, and the task that keeps it current.
#[derive(Debug)]
pub struct RouteTable {
    store: Store,
    edge: EdgeSettings,
    /// Opens stored certificate keys; `None` when Flotilla orders none.
    sealer: Option<Arc<Sealer>>,
    refresh: Duration,
    current: watch::Sender<Option<Arc<TableVersion>>>,
    stats: Arc<EdgeStats>,
}

impl RouteTable {
    pub fn new(
        store: Store,
        edge: EdgeSettings,
        sealer: Option<Arc<Sealer>>,
        refresh: Duration,
        stats: Arc<EdgeStats>,
    ) -> Arc<Self> {
        Arc::new(Self { store, edge, sealer, refresh, current: watch::Sender::new(None), stats })
    }

    pub fn edge(&self) -> &EdgeSettings {
        &self.edge
    }

    /// The latest rendering (`None` before the first one).
    pub fn current(&self) -> Option<Arc<TableVersion>> {
        self.current.borrow().clone()
    }

    /// Told of every new rendering.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TableVersion>>> {
        self.current.subscribe()
    }

    /// Reads and renders the table now, and makes it current.
    #[tracing::instrument(name = "edge.render", skip_all, err)]
    pub async fn render_now(&self) -> Result<Arc<TableVersion>, StoreError> {
        let started = Instant::now();
        let read = self.store.read_route_table(self.sealer.is_some()).await?;
        let certificates = match &self.sealer {
            Some(sealer) => open_certificates(read.certificates, sealer),
            None => Vec::new(),
        };
        let previous = self.current();
        let edge = self.edge.clone();
        let rows = read.rows;
        // Large tables take a while to write: off the async threads.
        let (rendered, public, internal) = tokio::task::spawn_blocking(move || {
            let rendered = render::render(&rows, &edge, &certificates);
            let public = Body::make(rendered.public.clone(), previous.as_ref().map(|p| &p.public));
            let internal = if rendered.internal == rendered.public {
                public.clone()
            } else {
                Body::make(rendered.internal.clone(), previous.as_ref().map(|p| &p.internal))
            };
            (rendered, public, internal)
        })
        .await
        .expect("rendering does not panic");
        for invalid in &rendered.invalid {
            tracing::error!(route = %invalid, "a route row failed validation and was left out of the route table");
        }
        let version = Arc::new(TableVersion {
            snapshot: read.snapshot,
            public,
            internal,
            rendered_at: Utc::now(),
            routers: rendered.routers,
            servers: rendered.servers,
            without_servers: rendered.without_servers,
            unverified: rendered.unverified,
            certificates: rendered.certificates,
        });
        tracing::debug!(snapshot = %version.snapshot, routers = version.routers, took = ?started.elapsed(), "route table rendered");
        EdgeStats::add(&self.stats.renders, 1);
        EdgeStats::add(&self.stats.render_micros, started.elapsed().as_micros() as u64);
        self.stats.routes.store(version.routers as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.servers.store(version.servers as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.table_bytes.store(version.internal.json.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.invalid_routes.store(rendered.invalid.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.current.send_replace(Some(version.clone()));
        Ok(version)
    }

    /// Keeps the table current until `cancel`: renders at once, then on
    /// every change notice (those arriving during a render are taken
    /// together by the next one) and every `refresh`. A failed render keeps
    /// the last good table and is retried.
    pub async fn run(
        self: Arc<Self>,
        mut changes: broadcast::Receiver<Change>,
        telemetry: Telemetry,
        cancel: CancellationToken,
    ) {
        let retry_delays = || flotilla_runtime::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
        let mut delays = retry_delays();
        loop {
            let wait = match self.render_now().await {
                Ok(version) => {
                    delays = retry_delays();
                    telemetry.health.set(
                        "edge",
                        Health::Ok,
                        None,
                        serde_json::json!({
                            "routers": version.routers,
                            "servers": version.servers,
                            "without_servers": version.without_servers,
                            "unverified": version.unverified,
                            "certificates": version.certificates,
                            "bytes": version.internal.json.len(),
                            "rendered_at": version.rendered_at,
                        }),
                    );
                    self.refresh
                }
                Err(error) => {
                    EdgeStats::add(&self.stats.render_failures, 1);
                    let served = self.current().map(|v| v.rendered_at);
                    tracing::warn!(%error, "the route table could not be read; proxies keep the last table");
                    telemetry.health.set(
                        "edge",
                        Health::Degraded,
                        Some(format!("the route table could not be read: {error}")),
                        serde_json::json!({ "serving_table_rendered_at": served }),
                    );
                    delays.next().unwrap_or(self.refresh).min(self.refresh)
                }
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(deadline) => break,
                    change = changes.recv() => match change {
                        Ok(Change::Deployment(_)) => continue,
                        Ok(Change::Routes | Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            // No notices any more: the timer alone.
                            tokio::select! {
                                () = cancel.cancelled() => return,
                                () = tokio::time::sleep_until(deadline) => break,
                            }
                        }
                    },
                }
            }
            // Notices already queued are covered by the render about to run.
            while let Ok(change) = changes.try_recv() {
                let _ = change;
            }
        }
    }
}

/// The routed domains' certificates with their keys opened. A key that
/// cannot be opened (another sealing key) is left out and logged; the
/// domain then falls back to Traefik's default certificate.
fn open_certificates(stored: Vec<flotilla_store::domains::StoredCertificate>, sealer: &Sealer) -> Vec<TlsCertificate> {
    stored
        .into_iter()
        .filter_map(|c| match sealer.open(&c.key_sealed, &c.domain).map(String::from_utf8) {
            Ok(Ok(key_pem)) => Some(TlsCertificate { domain: c.domain, chain_pem: c.chain_pem, key_pem }),
            Ok(Err(_)) | Err(_) => {
                tracing::error!(domain = %c.domain, "a stored certificate key cannot be opened with this key; left out");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_body_is_not_compressed_again() {
        let first = Body::make(b"{\"http\":1}".to_vec(), None);
        let again = Body::make(b"{\"http\":1}".to_vec(), Some(&first));
        assert!(std::ptr::eq(first.gzip.as_ptr(), again.gzip.as_ptr()), "the same bytes are shared");
        let other = Body::make(b"{}".to_vec(), Some(&first));
        assert_ne!(other.hash, first.hash);
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(other.gzip.as_ref()), &mut plain).unwrap();
        assert_eq!(plain, b"{}");
    }

    #[test]
    fn each_proxy_gets_the_shared_table_closed_by_its_canary_in_one_gzip_stream() {
        let open = render::render(&[], &EdgeSettings::default(), &[]).public;
        let body = Body::make(open, None);
        let canary = render::Canary { origin: "http://127.0.0.1:7800", proxy: "edge", table: body.hash };
        let plain = body.for_proxy(&canary, false);
        let mut unzipped = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(body.for_proxy(&canary, true).as_ref()),
            &mut unzipped,
        )
        .unwrap();
        assert_eq!(unzipped, plain);
        let config: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert!(
            config["http"]["services"][render::CANARY]["loadBalancer"]["healthCheck"]["path"]
                .as_str()
                .unwrap()
                .ends_with(&format!("table={:016x}", body.hash))
        );
    }
}
