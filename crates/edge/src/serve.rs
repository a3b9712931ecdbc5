//! `GET /traefik/dynamic`: the route table for Traefik's HTTP provider, and
//! `GET /traefik/applied`: each proxy telling which table it serves.
//!
//! **Long polling.** With `?wait=N` (seconds) a request from a proxy that
//! already has the current table is held until the table changes, or for N
//! seconds at most (then answered with the same table). Traefik's provider
//! asks again at once after an answer that took longer than its
//! `pollInterval`, so a change reaches it within milliseconds, and it asks
//! only when something changed or its wait ran out.
//!
//! **Which table each proxy serves.** Being sent a table is not serving it:
//! Traefik builds the new routers afterwards, which took up to 300 ms on a
//! loaded machine. So each table a proxy gets ends with its canary
//! ([`crate::render::Canary`]): a service Traefik health-checks here, at
//! the address the proxy reached, with the proxy's name and the table's
//! number in the path. Traefik starts those checks as it switches to the
//! table, so the first check naming a table tells that the proxy serves
//! it, and its snapshot is recorded for the proxy (`name@address`: the name
//! from the `Flotilla-Edge` header its configuration sends, the address it
//! connects from; a check counts only from that address). A proxy serving a
//! table also serves each newer snapshot whose table is the same. Agents
//! read these before they stop a container ([`crate::sync`]).
//!
//! Certificates (with their keys) are in the table only for callers with
//! the cluster's internal token.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use flotilla_store::Store;
use flotilla_store::routes::EdgeProxySighting;
use flotilla_telemetry::internal_token::bearer_matches;
use flotilla_types::DbSnapshot;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::EdgeStats;
use crate::render::{APPLIED_PATH, Canary};
use crate::table::{RouteTable, TableVersion};

pub const ROUTE_TABLE_PATH: &str = "/traefik/dynamic";

/// Tables remembered per proxy until it says it serves one of them.
const TABLES_KEPT: usize = 32;

/// Proxies tracked at most (an edge has a handful): a flood of invented
/// names is not remembered.
const PROXIES_KEPT: usize = 1024;

/// The header a proxy's configuration sends to name itself.
pub const PROXY_NAME_HEADER: &str = "flotilla-edge";

/// Shows which snapshot an answer was read in (for operators and tests).
pub const SNAPSHOT_HEADER: &str = "flotilla-table-snapshot";

/// Both ends of a connection: the proxy's address tells proxies apart;
/// ours is where its canary reports back (this very process, which knows
/// what it sent). Serve the router with
/// `into_make_service_with_connect_info::<Peer>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self { remote: *stream.remote_addr(), local: stream.io().local_addr().ok() }
    }
}

impl Connected<IncomingStream<'_, NoDelayListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, NoDelayListener>) -> Self {
        Self { remote: *stream.remote_addr(), local: stream.io().local_addr().ok() }
    }
}

/// A TCP listener whose connections send small answers at once
/// (TCP_NODELAY): a route table answer held back by Nagle's algorithm would
/// wait for the proxy's delayed ACK, some 40 ms.
#[derive(Debug)]
pub struct NoDelayListener(pub TcpListener);

impl Listener for NoDelayListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, address) = Listener::accept(&mut self.0).await;
        if let Err(error) = io.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        (io, address)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The route table's HTTP side, and what it knows of the proxies.
#[derive(Debug)]
pub struct EdgeServer {
    table: Arc<RouteTable>,
    internal_token: Arc<str>,
    max_wait: Duration,
    connections: Mutex<HashMap<SocketAddr, Connection>>,
    proxies: Mutex<HashMap<String, ProxyTables>>,
    /// Where this process's table numbers start (random), so a check of a
    /// table an earlier process at the same address sent cannot pass for
    /// one of this process's.
    epoch: u64,
    recorder: Arc<ProxyRecorder>,
    stats: Arc<EdgeStats>,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Connection {
    proxy: String,
    /// The hash of the table last sent on this connection.
    sent: Option<u64>,
    last_request: Instant,
}

/// The tables sent to one proxy, and the one it said it serves.
#[derive(Debug)]
struct ProxyTables {
    /// Oldest first, each numbered, with the newest snapshot whose table it
    /// is. A table sent again after another gets a new number, so a late
    /// check of its first sending cannot pass for the second.
    sent: VecDeque<SentTable>,
    next: u64,
    /// The number of the table it serves.
    serves: Option<u64>,
    last: Instant,
}

#[derive(Debug, Clone)]
struct SentTable {
    number: u64,
    hash: u64,
    snapshot: DbSnapshot,
}

impl ProxyTables {
    fn new(epoch: u64) -> Self {
        Self { sent: VecDeque::new(), next: epoch + 1, serves: None, last: Instant::now() }
    }

    /// A new connection: it may be a new Traefik process, or one that ran
    /// another orchestrator's table meanwhile, so it serves nothing of ours
    /// until its canary says so again.
    fn reconnected(&mut self) {
        self.serves = None;
    }

    /// Sends the table `hash` read in `snapshot`: its number, and the
    /// snapshot the proxy now serves if that is this very table.
    fn send(&mut self, hash: u64, snapshot: &DbSnapshot) -> (u64, Option<DbSnapshot>) {
        self.last = Instant::now();
        if let Some(last) = self.sent.back_mut().filter(|t| t.hash == hash) {
            last.snapshot = snapshot.clone();
            let serving = (self.serves == Some(last.number)).then(|| snapshot.clone());
            return (last.number, serving);
        }
        let number = self.next;
        self.next += 1;
        self.sent.push_back(SentTable { number, hash, snapshot: snapshot.clone() });
        while self.sent.len() > TABLES_KEPT {
            self.sent.pop_front();
        }
        (number, None)
    }

    /// The proxy says it serves table `number`: the snapshot it serves, if
    /// that is news.
    fn serves(&mut self, number: u64) -> Option<DbSnapshot> {
        if self.serves.is_some_and(|serves| serves >= number) {
            return None;
        }
        let table = self.sent.iter().find(|t| t.number == number)?.clone();
        self.serves = Some(number);
        self.sent.retain(|t| t.number >= number);
        Some(table.snapshot)
    }
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
            proxies: Mutex::new(HashMap::new()),
            // The high half random: 4 billion tables a process before two
            // processes' numbers could meet.
            epoch: (uuid::Uuid::new_v4().as_u128() as u64) & 0xffff_ffff_0000_0000,
            recorder,
            stats,
            cancel,
        })
    }

    pub fn table(&self) -> &Arc<RouteTable> {
        &self.table
    }

    /// `GET /traefik/dynamic` and `GET /traefik/applied`. Serve them with
    /// connection info ([`Peer`]): without it, requests are answered at
    /// once and no proxy is recorded.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(ROUTE_TABLE_PATH, axum::routing::get(route_table))
            .route(APPLIED_PATH, axum::routing::get(applied))
            .with_state(self.clone())
    }

    /// Takes the request's connection: the hash of what was sent on it
    /// before.
    fn arrive(&self, peer: SocketAddr, proxy: &str) -> Option<u64> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if connections.len() > 4096 {
            connections.retain(|_, c| c.last_request.elapsed() < Duration::from_secs(600));
        }
        let connection = connections.entry(peer).or_insert_with(|| Connection {
            proxy: proxy.to_owned(),
            sent: None,
            last_request: Instant::now(),
        });
        if connection.proxy != proxy {
            // Another proxy on a reused address: it holds nothing yet.
            *connection = Connection { proxy: proxy.to_owned(), sent: None, last_request: Instant::now() };
        }
        connection.last_request = Instant::now();
        connection.sent
    }

    fn remember(&self, peer: SocketAddr, hash: u64) {
        if let Some(connection) = self.connections.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&peer) {
            connection.sent = Some(hash);
        }
    }

    /// Notes that `proxy` is sent (or, held, already has) the table `hash`
    /// of `snapshot`: the table's number for its canary (0, which no check
    /// counts for, when too many proxies are tracked). `first` is the first
    /// request of a connection.
    fn send(&self, proxy: &Named, hash: u64, snapshot: &DbSnapshot, first: bool) -> u64 {
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        if !proxies.contains_key(&proxy.id) && proxies.len() >= PROXIES_KEPT {
            proxies.retain(|_, p| p.last.elapsed() < Duration::from_secs(600));
            if proxies.len() >= PROXIES_KEPT {
                tracing::debug!(proxy = %proxy.id, "too many edge proxies tracked; this one is not");
                return 0;
            }
        }
        let tables = proxies.entry(proxy.id.clone()).or_insert_with(|| ProxyTables::new(self.epoch));
        if first {
            tables.reconnected();
        }
        let (number, serving) = tables.send(hash, snapshot);
        // Recorded under the lock: a newer snapshot is never overtaken by
        // an older one on its way to the recorder.
        if let Some(snapshot) = serving {
            self.recorder.seen(&proxy.id, &proxy.name, proxy.address, Some(snapshot));
        }
        number
    }
}

/// A proxy that named itself.
#[derive(Debug, Clone)]
struct Named {
    id: String,
    name: String,
    address: IpAddr,
}

/// `name@address`; a name that is not a plain word is not used.
fn proxy_id(name: &str, address: IpAddr) -> String {
    format!("{}@{address}", plain_name(name))
}

fn plain_name(name: &str) -> &str {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain { name } else { "proxy" }
}

/// Where a proxy's canary reports back: the address it reached us at, or
/// else the host it asked for.
fn canary_origin(peer: Option<&Peer>, headers: &HeaderMap) -> String {
    if let Some(local) = peer.and_then(|p| p.local) {
        return format!("http://{local}");
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).filter(|h| {
        !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    });
    format!("http://{}", host.unwrap_or("localhost"))
}

fn proxy_name(headers: &HeaderMap) -> Option<&str> {
    headers.get(PROXY_NAME_HEADER).and_then(|v| v.to_str().ok())
}

/// Whether `Accept-Encoding` takes gzip (not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()) else { return false };
    value.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let refused = parts.any(|p| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()).is_some_and(|q| q <= 0.0));
        name.eq_ignore_ascii_case("gzip") && !refused
    })
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
    let gzip = accepts_gzip(headers);
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0);
    let wait = match peer {
        Some(_) => requested_wait(request.uri().query(), server.max_wait),
        None => Duration::ZERO,
    };
    let origin = canary_origin(peer.as_ref(), headers);
    // Only a proxy that names itself is recorded (and waited for): a person
    // reading the table with curl is not a proxy.
    let named = match (proxy_name(headers), peer) {
        (Some(name), Some(peer)) => Some(Named {
            id: proxy_id(name, peer.remote.ip()),
            name: plain_name(name).to_owned(),
            address: peer.remote.ip(),
        }),
        _ => None,
    };
    let mut sent = match peer {
        Some(peer) => {
            let id = named.as_ref().map_or_else(|| proxy_id("", peer.remote.ip()), |n| n.id.clone());
            server.arrive(peer.remote, &id)
        }
        None => None,
    };
    let first_on_connection = sent.is_none();
    if let Some(named) = &named {
        server.recorder.seen(&named.id, &named.name, named.address, None);
    }
    let variant = |version: &TableVersion| if internal { version.internal.clone() } else { version.public.clone() };

    let mut tables = server.table.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let mut held = false;
    let version = loop {
        let current = tables.borrow_and_update().clone();
        let has_it = match (&current, sent) {
            (Some(current), Some(sent)) => variant(current).hash == sent,
            // No table yet: wait for the first one if asked to.
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !has_it || wait.is_zero() {
            break current;
        }
        // The proxy has this very table: if it serves it, it serves this
        // snapshot too.
        if let (Some(current), Some(named)) = (&current, &named) {
            server.send(named, variant(current).hash, &current.snapshot, false);
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
    if let Some(peer) = peer {
        server.remember(peer.remote, body.hash);
        sent = Some(body.hash);
    }
    let number = match &named {
        Some(named) => server.send(named, body.hash, &version.snapshot, first_on_connection),
        // Nobody to record: the canary's reports are not taken.
        None => sent.unwrap_or(body.hash),
    };
    let proxy = named.as_ref().map_or("", |n| n.name.as_str());
    tracing::debug!(
        proxy = named.as_ref().map_or("-", |n| n.id.as_str()),
        table = number,
        snapshot = %version.snapshot,
        held,
        "route table sent"
    );
    let canary = Canary { origin: &origin, proxy, table: number };
    let mut response = body.for_proxy(&canary, gzip).into_response();
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

/// `GET /traefik/applied?proxy=NAME&table=N`: a proxy's health check of its
/// canary, which it starts as it switches to table N. Counted only from the
/// proxy's own address; always answered 200 (the check's result is of no
/// use to Traefik).
async fn applied(State(server): State<Arc<EdgeServer>>, request: Request) -> Response {
    EdgeStats::add(&server.stats.canary_checks, 1);
    // A check comes from the proxy itself, never through one (which could
    // make anyone's request look like it came from the proxy's address).
    let headers = request.headers();
    if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        return (StatusCode::BAD_REQUEST, "a canary check comes from the proxy itself, not through one")
            .into_response();
    }
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0);
    let (mut name, mut number) = (None, None);
    for pair in request.uri().query().unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("proxy", value)) if !value.is_empty() => name = Some(value),
            Some(("table", value)) => number = u64::from_str_radix(value, 16).ok(),
            _ => {}
        }
    }
    let (Some(peer), Some(name), Some(number)) = (peer, name, number) else {
        return (StatusCode::BAD_REQUEST, "expected ?proxy=NAME&table=N from a proxy").into_response();
    };
    let id = proxy_id(name, peer.remote.ip());
    let mut proxies = server.proxies.lock().unwrap_or_else(|e| e.into_inner());
    match proxies.get_mut(&id).map(|p| p.serves(number)) {
        Some(Some(snapshot)) => {
            tracing::debug!(proxy = %id, table = number, %snapshot, "an edge proxy serves a new table");
            // Under the lock, as in `send`: recorded in the order decided.
            server.recorder.seen(&id, plain_name(name), peer.remote.ip(), Some(snapshot));
        }
        Some(None) => {}
        // Sent by another orchestrator, or before this one started.
        None => EdgeStats::add(&server.stats.canary_unknown, 1),
    }
    drop(proxies);
    (StatusCode::OK, "ok").into_response()
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

    fn snapshot(xmin: u64) -> DbSnapshot {
        format!("{xmin}:{xmin}:").parse().unwrap()
    }

    #[test]
    fn a_proxy_serves_what_its_canary_names_and_never_goes_back() {
        let mut proxy = ProxyTables::new(0);
        let (a, b) = (0xa, 0xb);
        assert_eq!(proxy.send(a, &snapshot(10)), (1, None));
        // The same table read again: same number, newer snapshot.
        assert_eq!(proxy.send(a, &snapshot(11)), (1, None));
        assert_eq!(proxy.send(b, &snapshot(12)), (2, None));
        assert_eq!(proxy.serves(1), Some(snapshot(11)));
        assert_eq!(proxy.serves(1), None, "told once");
        assert_eq!(proxy.serves(9), None, "never sent");
        assert_eq!(proxy.serves(2), Some(snapshot(12)));
        assert_eq!(proxy.serves(1), None, "a late check of an older table changes nothing");
        // Served and read again unchanged: it serves the newer snapshot.
        assert_eq!(proxy.send(b, &snapshot(13)), (2, Some(snapshot(13))));
        // Table a again after b: a new number, so a late check from when
        // a was first served cannot pass for it.
        assert_eq!(proxy.send(a, &snapshot(14)), (3, None));
        assert_eq!(proxy.serves(1), None);
        assert_eq!(proxy.serves(3), Some(snapshot(14)));
    }

    #[test]
    fn a_proxy_that_reconnects_serves_nothing_until_its_canary_says_so() {
        let mut proxy = ProxyTables::new(0);
        let (number, _) = proxy.send(0xa, &snapshot(10));
        assert_eq!(proxy.serves(number), Some(snapshot(10)));
        // A new Traefik at the same address, sent the same table: not taken
        // as served on the strength of the old process's check.
        proxy.reconnected();
        assert_eq!(proxy.send(0xa, &snapshot(11)), (number, None));
        assert_eq!(proxy.serves(number), Some(snapshot(11)), "its own check counts");
    }

    #[test]
    fn numbers_start_where_the_process_says() {
        let epoch = 0xdead_beef_0000_0000;
        let mut proxy = ProxyTables::new(epoch);
        assert_eq!(proxy.send(0xa, &snapshot(10)).0, epoch + 1);
        assert_eq!(proxy.serves(1), None, "an earlier process's table 1 is not ours");
    }

    #[test]
    fn gzip_is_sent_only_to_who_takes_it() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
            accepts_gzip(&headers)
        };
        assert!(with("gzip") && with("deflate, gzip;q=0.5") && with("GZIP"));
        assert!(!with("gzip;q=0") && !with("br") && !with("x-gzip2") && !accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn a_proxy_keeps_only_its_latest_tables() {
        let mut proxy = ProxyTables::new(0);
        for n in 0..100 {
            proxy.send(n, &snapshot(n + 1));
        }
        assert_eq!(proxy.sent.len(), TABLES_KEPT);
        assert_eq!(proxy.serves(1), None, "long gone");
        assert_eq!(proxy.serves(100), Some(snapshot(100)));
    }

    #[test]
    fn the_canary_reports_where_the_proxy_reached_us() {
        let peer = Peer { remote: "10.0.0.7:50000".parse().unwrap(), local: Some("10.0.0.2:7800".parse().unwrap()) };
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("orchestrator:7800"));
        assert_eq!(canary_origin(Some(&peer), &headers), "http://10.0.0.2:7800");
        assert_eq!(canary_origin(None, &headers), "http://orchestrator:7800");
        headers.insert(header::HOST, HeaderValue::from_static("evil/path?x"));
        assert_eq!(canary_origin(None, &headers), "http://localhost");
        let v6 = Peer { local: Some("[fd00::2]:7800".parse().unwrap()), ..peer };
        assert_eq!(canary_origin(Some(&v6), &headers), "http://[fd00::2]:7800");
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
