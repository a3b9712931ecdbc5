//! `GET /traefik/dynamic`: the route table for Traefik's HTTP provider.
//!
//! **Long polling.** With `?wait=N` (seconds) a request from a proxy that
//! already has the current table is held until the table changes, or for N
//! seconds at most (then answered with the same table). Traefik's provider
//! asks again at once after an answer that took longer than its
//! `pollInterval`, so a change reaches it within milliseconds, and it asks
//! only when something changed or its wait ran out.
//!
//! **Which table each proxy holds.** Traefik asks again only once it has
//! taken in the previous answer, so a request on a connection says that the
//! table last sent on that connection is taken in. Its snapshot is recorded
//! for the proxy (`name@address`: the name from the `Flotilla-Edge` header
//! its configuration sends, the address it connects from); a held proxy is
//! also recorded as holding each newer snapshot whose table is the same as
//! the one it has. Agents read these before they stop a container
//! ([`crate::sync`]).
//!
//! Certificates (with their keys) are in the table only for callers with
//! the cluster's internal token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_store::Store;
use flotilla_store::routes::EdgeProxySighting;
use flotilla_telemetry::internal_token::bearer_matches;
use flotilla_types::DbSnapshot;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::EdgeStats;
use crate::table::{RouteTable, TableVersion};

pub const ROUTE_TABLE_PATH: &str = "/traefik/dynamic";

/// The header a proxy's configuration sends to name itself.
pub const PROXY_NAME_HEADER: &str = "flotilla-edge";

/// Shows which snapshot an answer was read in (for operators and tests).
pub const SNAPSHOT_HEADER: &str = "flotilla-table-snapshot";

/// The route table's HTTP side, and what it knows of the proxies.
#[derive(Debug)]
pub struct EdgeServer {
    table: Arc<RouteTable>,
    internal_token: Arc<str>,
    max_wait: Duration,
    connections: Mutex<HashMap<SocketAddr, Connection>>,
    recorder: Arc<ProxyRecorder>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Connection {
    proxy: String,
    /// The table last sent on this connection.
    sent: Option<Sent>,
    last_request: Instant,
}

#[derive(Debug, Clone)]
struct Sent {
    hash: u64,
    snapshot: DbSnapshot,
}

impl EdgeServer {
    /// `max_wait` caps the `wait` a proxy asks for; held requests are
    /// answered at once when `cancel` fires (shutdown).
    pub fn new(
        table: Arc<RouteTable>,
        store: Store,
        internal_token: Arc<str>,
        max_wait: Duration,
        stats: Arc<EdgeStats>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let recorder = ProxyRecorder::spawn(store, stats.clone(), tracker, cancel.clone());
        Arc::new(Self {
            table,
            internal_token,
            max_wait,
            connections: Mutex::new(HashMap::new()),
            recorder,
            stats,
            cancel,
        })
    }

    pub fn table(&self) -> &Arc<RouteTable> {
        &self.table
    }

    /// `GET /traefik/dynamic`. Serve it with connection info
    /// (`into_make_service_with_connect_info::<SocketAddr>`): without it,
    /// requests are answered at once and no proxy is recorded.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new().route(ROUTE_TABLE_PATH, axum::routing::get(route_table)).with_state(self.clone())
    }

    /// Takes the request's connection: what was sent on it before, now
    /// taken in. Returns the proxy's id and what it holds.
    fn arrive(&self, peer: SocketAddr, name: &str) -> (String, Option<Sent>) {
        let proxy = proxy_id(name, peer.ip());
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if connections.len() > 4096 {
            connections.retain(|_, c| c.last_request.elapsed() < Duration::from_secs(600));
        }
        let connection = connections.entry(peer).or_insert_with(|| Connection {
            proxy: proxy.clone(),
            sent: None,
            last_request: Instant::now(),
        });
        if connection.proxy != proxy {
            // Another proxy on a reused address: it holds nothing yet.
            *connection = Connection { proxy: proxy.clone(), sent: None, last_request: Instant::now() };
        }
        connection.last_request = Instant::now();
        (proxy, connection.sent.clone())
    }

    fn remember(&self, peer: SocketAddr, sent: Sent) {
        if let Some(connection) = self.connections.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&peer) {
            connection.sent = Some(sent);
        }
    }
}

/// `name@address`; a name that is not a plain word is not used.
fn proxy_id(name: &str, address: IpAddr) -> String {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    let name = if plain { name } else { "proxy" };
    format!("{name}@{address}")
}

fn proxy_name(headers: &HeaderMap) -> Option<&str> {
    headers.get(PROXY_NAME_HEADER).and_then(|v| v.to_str().ok())
}

/// `wait=N` in seconds (fractions allowed), capped.
fn requested_wait(query: Option<&str>, max: Duration) -> Duration {
    let Some(query) = query else { return Duration::ZERO };
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("wait="))
        .filter_map(|seconds| seconds.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0)
        .map(|seconds| Duration::from_secs_f64(seconds).min(max))
        .next_back()
        .unwrap_or(Duration::ZERO)
}

async fn route_table(State(server): State<Arc<EdgeServer>>, request: Request) -> Response {
    EdgeStats::add(&server.stats.polls, 1);
    let headers = request.headers();
    let internal = bearer_matches(headers, &server.internal_token);
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let wait = match peer {
        Some(_) => requested_wait(request.uri().query(), server.max_wait),
        None => Duration::ZERO,
    };
    let named = proxy_name(headers).map(str::to_owned);
    let (proxy, mut sent) = match peer {
        Some(peer) => {
            let name = named.clone().unwrap_or_default();
            let (proxy, sent) = server.arrive(peer, &name);
            if named.is_some() {
                server.recorder.seen(&proxy, &name, peer.ip(), sent.as_ref().map(|s| s.snapshot.clone()));
            }
            (Some((proxy, name, peer)), sent)
        }
        None => (None, None),
    };
    let variant = |version: &TableVersion| if internal { version.internal.clone() } else { version.public.clone() };

    let mut tables = server.table.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let mut held = false;
    let version = loop {
        let current = tables.borrow_and_update().clone();
        let has_it = match (&current, &sent) {
            (Some(current), Some(sent)) => variant(current).hash == sent.hash,
            // No table yet: wait for the first one if asked to.
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !has_it || wait.is_zero() {
            break current;
        }
        // The proxy has this very table: it holds its snapshot too.
        if let (Some(current), Some(sent), Some((proxy, name, peer))) = (&current, &mut sent, &proxy)
            && current.snapshot != sent.snapshot
        {
            sent.snapshot = current.snapshot.clone();
            server.remember(*peer, sent.clone());
            if named.is_some() {
                server.recorder.seen(proxy, name, peer.ip(), Some(sent.snapshot.clone()));
            }
        }
        if !held {
            held = true;
            EdgeStats::add(&server.stats.polls_held, 1);
        }
        tokio::select! {
            changed = tables.changed() => if changed.is_err() { break current },
            () = tokio::time::sleep_until(deadline) => {
                EdgeStats::add(&server.stats.polls_unchanged, 1);
                break current;
            }
            () = server.cancel.cancelled() => break current,
        }
    };
    let Some(version) = version else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the route table is not ready: the control database was not read yet",
        )
            .into_response();
    };
    let body = variant(&version);
    if let Some((_, _, peer)) = &proxy {
        server.remember(*peer, Sent { hash: body.hash, snapshot: version.snapshot.clone() });
    }
    let mut response = if gzip { body.gzip.into_response() } else { body.json.into_response() };
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if gzip {
        response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response_headers.insert(header::VARY, HeaderValue::from_static("accept-encoding, authorization"));
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(&version.snapshot.to_string()) {
        response_headers.insert(SNAPSHOT_HEADER, value);
    }
    response
}

/// Writes what was seen of the proxies to the database, in order, off the
/// request path: a slow or unreachable database never holds a poll up.
/// Only the newest sighting of each proxy is kept while writes lag, and a
/// failed write is tried again.
#[derive(Debug)]
struct ProxyRecorder {
    pending: Mutex<HashMap<String, Pending>>,
    wake: Notify,
}

#[derive(Debug, Clone)]
struct Pending {
    name: String,
    address: String,
    holds: Option<DbSnapshot>,
}

impl ProxyRecorder {
    fn spawn(store: Store, stats: Arc<EdgeStats>, tracker: &TaskTracker, cancel: CancellationToken) -> Arc<Self> {
        let recorder = Arc::new(Self { pending: Mutex::new(HashMap::new()), wake: Notify::new() });
        let writer = recorder.clone();
        tracker.spawn(async move { writer.write_until(store, stats, cancel).await });
        recorder
    }

    fn seen(&self, proxy: &str, name: &str, address: IpAddr, holds: Option<DbSnapshot>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let entry = pending.entry(proxy.to_owned()).or_insert_with(|| Pending {
            name: name.to_owned(),
            address: address.to_string(),
            holds: None,
        });
        if holds.is_some() {
            entry.holds = holds;
        }
        drop(pending);
        self.wake.notify_one();
    }

    async fn write_until(&self, store: Store, stats: Arc<EdgeStats>, cancel: CancellationToken) {
        let mut delays = flotilla_runtime::retry::delays(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
            }
            let batch: Vec<(String, Pending)> =
                self.pending.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
            let mut failed = Vec::new();
            for (proxy, seen) in batch {
                let sighting = EdgeProxySighting {
                    id: &proxy,
                    name: &seen.name,
                    address: &seen.address,
                    holds: seen.holds.as_ref(),
                };
                if let Err(error) = store.record_edge_proxy(&sighting).await {
                    EdgeStats::add(&stats.proxy_record_failures, 1);
                    tracing::warn!(%error, proxy = %proxy, "could not record which route table a proxy holds");
                    failed.push((proxy, seen));
                }
            }
            if failed.is_empty() {
                delays = flotilla_runtime::retry::delays(Duration::from_millis(100), Duration::from_secs(5));
                continue;
            }
            {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                for (proxy, seen) in failed {
                    // A newer sighting wins; an older table is kept if none came.
                    let entry = pending.entry(proxy).or_insert_with(|| Pending { holds: None, ..seen.clone() });
                    if entry.holds.is_none() {
                        entry.holds = seen.holds;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))) => self.wake.notify_one(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_capped_and_garbage_is_none() {
        let max = Duration::from_secs(5);
        assert_eq!(requested_wait(Some("wait=2"), max), Duration::from_secs(2));
        assert_eq!(requested_wait(Some("edge=a&wait=0.5"), max), Duration::from_millis(500));
        assert_eq!(requested_wait(Some("wait=60"), max), max);
        for none in [None, Some(""), Some("wait=-1"), Some("wait=x"), Some("wait=NaN"), Some("wait=inf")] {
            assert_eq!(requested_wait(none, max), Duration::ZERO, "{none:?}");
        }
    }

    #[test]
    fn proxy_ids_carry_only_plain_names() {
        let address: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(proxy_id("edge-1", address), "edge-1@10.0.0.7");
        assert_eq!(proxy_id("a b", address), "proxy@10.0.0.7");
        assert_eq!(proxy_id(&"x".repeat(65), address), "proxy@10.0.0.7");
        assert_eq!(proxy_id("", address), "proxy@10.0.0.7");
    }
}
