//! Renders the route table as Traefik v3 dynamic configuration. Pure: the
//! rows come from one read of the database ([`flotilla_store::routes`]).
//!
//! Every rule is rebuilt from a [`Hostname`] and a [`PathPrefix`] parsed
//! again here, so even a row that got into the database some other way
//! cannot add a matcher to a rule; such a row is left out and counted.
//!
//! What Traefik does with the output shaped these choices (each checked
//! against a real Traefik 3.7 in `tests/edge.rs`):
//! - a deployment that is down (a replica it wants crashed or exited, or it
//!   is scaled to zero) keeps its router with an empty server list: Traefik
//!   answers 503, an app that is down;
//! - one with no replica serving yet (being deployed or started), a stopped
//!   or a deleted one has no router: 404, an app that is not there;
//! - the table always holds the canary of [`Canary`]: a router no request
//!   can match, whose service Traefik health-checks at the orchestrator
//!   that sent the table, with the proxy's number for the table in the
//!   path. Traefik starts a table's health checks while it builds the
//!   table's handlers, moments before it switches its entry points to them,
//!   and the first check runs one interval later; so a check naming a table
//!   says the proxy serves it. Being sent a table is not enough: Traefik
//!   applies it afterwards, which took up to 300 ms on a loaded machine.
//!   The canary also keeps a table with no route from being `{"http":{}}`,
//!   which Traefik refuses;
//! - every router retries, on another server, a request whose connection
//!   failed before it was sent, and an idempotent one (GET, HEAD, PUT,
//!   DELETE...) that Traefik answered 502 because its server vanished
//!   mid-request; Traefik never resends a POST or PATCH it wrote. So a
//!   replica that crashes costs no request while another replica serves;
//! - a route with TLS has a twin on the plain-HTTP entry point that
//!   redirects to HTTPS; the entry point itself redirects nothing, so a
//!   host nobody routes is a 404 on both.

use std::net::IpAddr;

use flotilla_store::routes::RouteTableRow;
use flotilla_types::domains::is_platform_domain;
use flotilla_types::{Hostname, PathPrefix};
use serde::Serialize;

use crate::EdgeSettings;
use crate::rules::Route;

/// The middleware every router uses: retries on another server connections
/// that failed before the request was written, and idempotent requests
/// that got a 502 (their server went away mid-request).
pub const RETRY_MIDDLEWARE: &str = "flo-retry";

/// The middleware of the plain-HTTP twin of a TLS route: a permanent
/// redirect to HTTPS.
pub const REDIRECT_MIDDLEWARE: &str = "flo-redirect-https";

/// The router and service of the canary.
pub const CANARY: &str = "flo-edge-applied";

/// Where the canary's health checks go, on the orchestrator that sent the
/// table.
pub const APPLIED_PATH: &str = "/traefik/applied";

/// How often Traefik checks the canary: the most an agent waits beyond the
/// moment a proxy switched to a table, and the checks each proxy sends.
pub const CANARY_INTERVAL: &str = "100ms";

/// A rule no request matches: no TCP client has the broadcast address.
const NEVER: &str = "ClientIP(`255.255.255.255/32`)";

/// What closes a rendered table for one proxy: its canary service, checked
/// at `origin` (`http://host:port`) with `proxy`'s name and the number the
/// sender gave this table for this proxy in the query.
#[derive(Debug, Clone, Copy)]
pub struct Canary<'a> {
    pub origin: &'a str,
    pub proxy: &'a str,
    pub table: u64,
}

impl Canary<'_> {
    /// The query that names the proxy and the table (`proxy=..&table=..`).
    pub fn query(&self) -> String {
        let proxy: String = url_safe(self.proxy);
        format!("proxy={proxy}&table={:016x}", self.table)
    }

    /// The end of the document [`render`] leaves open: the canary service,
    /// then the services, `http` and the document closed.
    pub fn close(&self) -> Vec<u8> {
        let service = serde_json::json!({
            "loadBalancer": {
                "servers": [{ "url": self.origin }],
                "healthCheck": {
                    "path": format!("{APPLIED_PATH}?{}", self.query()),
                    "interval": CANARY_INTERVAL,
                    "timeout": "2s",
                },
            }
        });
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"\"");
        out.extend_from_slice(CANARY.as_bytes());
        out.extend_from_slice(b"\":");
        serde_json::to_writer(&mut out, &service).expect("the canary serializes");
        out.extend_from_slice(b"}}}");
        out
    }

    /// `open` (from [`render`]) closed by this canary: the whole document.
    pub fn complete(&self, open: &[u8]) -> Vec<u8> {
        let mut out = open.to_vec();
        out.extend_from_slice(&self.close());
        out
    }
}

/// Letters, digits, '-', '_' and '.' kept; anything else becomes '_'.
fn url_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
}

/// A certificate and its key, in PEM, for `tls.certificates`.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsCertificate {
    pub domain: String,
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsCertificate").field("domain", &self.domain).finish_non_exhaustive()
    }
}

/// The rendered configuration and what was left out of it. Both variants
/// are left open for each proxy's [`Canary::close`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderedTable {
    /// For anyone: routes only.
    pub public: Vec<u8>,
    /// For callers with the internal token: routes and certificates.
    pub internal: Vec<u8>,
    pub routers: usize,
    pub servers: usize,
    /// Routes of running deployments with no replica serving right now:
    /// kept with no server when the app is down (Traefik answers 503),
    /// left out while it is being deployed or started (404).
    pub without_servers: usize,
    /// Rows that failed validation (left out, and logged by the caller).
    pub invalid: Vec<String>,
    /// Routes of custom domains not proven yet (left out).
    pub unverified: usize,
    /// Certificates served in `tls.certificates`.
    pub certificates: usize,
}

#[derive(Serialize)]
struct Router<'a> {
    rule: String,
    service: String,
    priority: usize,
    #[serde(rename = "entryPoints")]
    entry_points: [&'a str; 1],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    middlewares: &'static [&'static str],
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<RouterTls<'a>>,
}

#[derive(Serialize)]
struct RouterTls<'a> {
    #[serde(rename = "certResolver", skip_serializing_if = "Option::is_none")]
    cert_resolver: Option<&'a str>,
}

#[derive(Serialize)]
struct Service {
    #[serde(rename = "loadBalancer")]
    load_balancer: LoadBalancer,
}

#[derive(Serialize)]
struct LoadBalancer {
    servers: Vec<Server>,
    #[serde(rename = "passHostHeader")]
    pass_host_header: bool,
}

#[derive(Serialize)]
struct Server {
    url: String,
}

struct Entry<'a> {
    name: String,
    router: Router<'a>,
    /// The plain-HTTP twin of a TLS route, redirecting to HTTPS.
    redirect: Option<Router<'a>>,
    service: Service,
}

/// `"http":{"middlewares":{..},"routers":{..},"services":{..,` written
/// straight from the entries (the table can hold 100,000 routes), left
/// open after the last service for the proxy's canary.
fn open_http(entries: &[Entry<'_>], edge: &EdgeSettings) -> Vec<u8> {
    let middlewares = serde_json::json!({
        RETRY_MIDDLEWARE: { "retry": { "attempts": 3, "initialInterval": "10ms", "status": ["502"] } },
        REDIRECT_MIDDLEWARE: { "redirectScheme": { "scheme": "https", "permanent": true } },
    });
    let canary = Router {
        rule: NEVER.to_owned(),
        service: CANARY.to_owned(),
        priority: 1,
        entry_points: [edge.http_entrypoint.as_str()],
        middlewares: &[],
        tls: None,
    };
    let mut out = Vec::with_capacity(entries.len() * 400 + 512);
    out.extend_from_slice(b"\"http\":{\"middlewares\":");
    serde_json::to_writer(&mut out, &middlewares).expect("the middlewares serialize");
    out.extend_from_slice(b",\"routers\":{");
    for e in entries {
        write_entry(&mut out, &e.name, &e.router);
        if let Some(redirect) = &e.redirect {
            write_entry(&mut out, &format!("{}-http", e.name), redirect);
        }
    }
    write_entry(&mut out, CANARY, &canary);
    out.pop();
    out.extend_from_slice(b"},\"services\":{");
    for e in entries {
        write_entry(&mut out, &e.name, &e.service);
    }
    out
}

/// `"name":value,` (the caller takes the last comma back).
fn write_entry(out: &mut Vec<u8>, name: &str, value: &impl Serialize) {
    serde_json::to_writer(&mut *out, name).expect("a name serializes");
    out.push(b':');
    serde_json::to_writer(&mut *out, value).expect("a route table entry serializes");
    out.push(b',');
}

fn server_url(address: &str, port: i32) -> Option<String> {
    let port = u16::try_from(port).ok().filter(|p| *p > 0)?;
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Some(format!("http://[{v6}]:{port}")),
        Ok(IpAddr::V4(v4)) => Some(format!("http://{v4}:{port}")),
        Err(_) => Hostname::parse("address", address).ok().map(|h| format!("http://{h}:{port}")),
    }
}

/// A certificate resolver's name: letters, digits, '-' and '_' only.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Renders `rows`, and `certificates` (those of routed domains) for the
/// internal variant. A route of a custom domain its deployment has not
/// proven is left out.
pub fn render(rows: &[RouteTableRow], edge: &EdgeSettings, certificates: &[TlsCertificate]) -> RenderedTable {
    let mut table = RenderedTable::default();
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        let parsed = Hostname::parse("domain", &row.domain).map_err(|e| e.to_string()).and_then(|domain| {
            PathPrefix::parse("path_prefix", &row.path_prefix).map(|p| (domain, p)).map_err(|e| e.to_string())
        });
        let (domain, path_prefix) = match parsed {
            Ok(parsed) => parsed,
            Err(why) => {
                table.invalid.push(format!("route of deployment {}: {why}", row.deployment_id));
                continue;
            }
        };
        let platform = is_platform_domain(&edge.platform_domains, domain.as_str());
        if !row.domain_verified && !platform {
            table.unverified += 1;
            continue;
        }
        let route = Route { deployment_id: row.deployment_id.into(), domain, path_prefix };
        let servers: Vec<Server> = row
            .servers
            .iter()
            .zip(&row.ports)
            .filter_map(|(address, port)| server_url(address, *port))
            .map(|url| Server { url })
            .collect();
        if servers.is_empty() {
            table.without_servers += 1;
            if !row.down {
                continue;
            }
        }
        let tls = row.tls_enabled.then(|| {
            // A certificate Flotilla holds is chosen by SNI from
            // tls.certificates; a custom domain waits for Flotilla's (with
            // Traefik's default certificate meanwhile).
            let stored = certificates.iter().any(|c| c.domain == row.domain);
            let resolver_allowed = !stored && (platform || !edge.flotilla_orders_certificates);
            RouterTls { cert_resolver: row.cert_resolver.as_deref().filter(|r| is_plain_name(r) && resolver_allowed) }
        });
        let entry_point = if row.tls_enabled { edge.https_entrypoint.as_str() } else { edge.http_entrypoint.as_str() };
        table.routers += 1;
        table.servers += servers.len();
        let name = route.router_name();
        let redirect = row.tls_enabled.then(|| Router {
            rule: route.rule(),
            service: name.clone(),
            priority: route.priority(),
            entry_points: [edge.http_entrypoint.as_str()],
            middlewares: &[REDIRECT_MIDDLEWARE],
            tls: None,
        });
        entries.push(Entry {
            router: Router {
                rule: route.rule(),
                service: name.clone(),
                priority: route.priority(),
                entry_points: [entry_point],
                middlewares: &[RETRY_MIDDLEWARE],
                tls,
            },
            redirect,
            service: Service { load_balancer: LoadBalancer { servers, pass_host_header: true } },
            name,
        });
    }
    let http = open_http(&entries, edge);
    let served: Vec<serde_json::Value> = certificates
        .iter()
        .filter(|c| Hostname::parse("domain", &c.domain).is_ok())
        .map(|c| serde_json::json!({ "certFile": c.chain_pem, "keyFile": c.key_pem }))
        .collect();
    table.certificates = served.len();
    let tls = (!served.is_empty())
        .then(|| serde_json::to_vec(&serde_json::json!({ "certificates": served })).expect("certificates serialize"));
    table.public = open_document(&http, None);
    table.internal = open_document(&http, tls.as_deref());
    table
}

/// `{"tls":..,"http":..` with the `tls` section only when it has something,
/// first so that the open end is the services'.
fn open_document(http: &[u8], tls: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(http.len() + tls.map_or(0, <[u8]>::len) + 16);
    out.push(b'{');
    if let Some(tls) = tls {
        out.extend_from_slice(b"\"tls\":");
        out.extend_from_slice(tls);
        out.push(b',');
    }
    out.extend_from_slice(http);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use uuid::Uuid;

    fn row(domain: &str, path: &str, servers: &[(&str, i32)]) -> RouteTableRow {
        RouteTableRow {
            deployment_id: Uuid::from_u128(0xabc),
            domain: domain.into(),
            path_prefix: path.into(),
            tls_enabled: false,
            cert_resolver: None,
            servers: servers.iter().map(|s| s.0.to_owned()).collect(),
            ports: servers.iter().map(|s| s.1).collect(),
            domain_verified: true,
            down: false,
        }
    }

    const CANARY_OF_EDGE_1: Canary<'static> = Canary { origin: "http://10.0.9.4:7800", proxy: "edge-1", table: 0xab };

    /// A rendered variant as one proxy gets it.
    fn json(open: &[u8]) -> Value {
        serde_json::from_slice(&CANARY_OF_EDGE_1.complete(open)).unwrap()
    }

    /// The routers besides the canary's.
    fn routers(config: &Value) -> Vec<&String> {
        config["http"]["routers"].as_object().unwrap().keys().filter(|k| *k != CANARY).collect()
    }

    const R: &str = "flo-00000000000000000000000000000abc";

    #[test]
    fn one_server_per_serving_replica() {
        let table = render(
            &[row("app.example.com", "/", &[("10.0.0.1", 30001), ("fd00::2", 30002)])],
            &EdgeSettings::default(),
            &[],
        );
        let config = json(&table.public);
        assert_eq!(config["http"]["routers"][R]["rule"], "Host(`app.example.com`)");
        assert_eq!(config["http"]["routers"][R]["service"], R);
        assert_eq!(config["http"]["routers"][R]["entryPoints"][0], "web");
        assert_eq!(config["http"]["routers"][R]["middlewares"], json!([RETRY_MIDDLEWARE]));
        assert_eq!(config["http"]["middlewares"][RETRY_MIDDLEWARE]["retry"]["attempts"], 3);
        let servers = &config["http"]["services"][R]["loadBalancer"]["servers"];
        assert_eq!(servers[0]["url"], "http://10.0.0.1:30001");
        assert_eq!(servers[1]["url"], "http://[fd00::2]:30002");
        assert_eq!((table.routers, table.servers), (1, 2));
        assert_eq!(table.public, table.internal, "no certificates: one body");
        assert_eq!(routers(&config), [R]);
    }

    #[test]
    fn an_app_that_is_down_keeps_its_router_with_no_server_and_one_not_up_yet_has_none() {
        let mut down = row("app.example.com", "/", &[]);
        down.down = true;
        let table = render(&[down], &EdgeSettings::default(), &[]);
        let config = json(&table.public);
        assert_eq!(config["http"]["services"][R]["loadBalancer"]["servers"], json!([]));
        assert_eq!((table.routers, table.without_servers), (1, 1));
        let table = render(&[row("app.example.com", "/", &[])], &EdgeSettings::default(), &[]);
        assert_eq!((routers(&json(&table.public)), table.without_servers), (vec![], 1));
    }

    #[test]
    fn every_table_holds_the_canary_checked_where_the_proxy_got_it() {
        for rows in [vec![], vec![row("app.example.com", "/", &[("10.0.0.1", 30001)])]] {
            let table = render(&rows, &EdgeSettings::default(), &[]);
            let config = json(&table.internal);
            assert_eq!(routers(&config).len(), rows.len());
            let router = &config["http"]["routers"][CANARY];
            assert_eq!(
                (router["rule"].as_str(), router["service"].as_str(), &router["entryPoints"]),
                (Some(NEVER), Some(CANARY), &json!(["web"]))
            );
            let service = &config["http"]["services"][CANARY]["loadBalancer"];
            assert_eq!(service["servers"], json!([{ "url": "http://10.0.9.4:7800" }]));
            assert_eq!(
                service["healthCheck"],
                json!({
                    "path": "/traefik/applied?proxy=edge-1&table=00000000000000ab",
                    "interval": CANARY_INTERVAL,
                    "timeout": "2s"
                })
            );
        }
        let odd = Canary { origin: "http://[fd00::1]:7800", proxy: "a b&c=d", table: u64::MAX };
        assert_eq!(odd.query(), "proxy=a_b_c_d&table=ffffffffffffffff");
        let config: Value = serde_json::from_slice(&odd.complete(&render(&[], &EdgeSettings::default(), &[]).public))
            .expect("a whole document");
        assert_eq!(config["http"]["services"][CANARY]["loadBalancer"]["servers"][0]["url"], "http://[fd00::1]:7800");
    }

    #[test]
    fn hostile_rows_never_reach_a_rule() {
        let mut bad_resolver = row("ok.example.com", "/", &[("10.0.0.1", 1)]);
        bad_resolver.tls_enabled = true;
        bad_resolver.cert_resolver = Some("le\"}".into());
        let rows = [
            row("a.example.com`) || Host(`evil.com", "/", &[("10.0.0.1", 1)]),
            row("a.example.com", "/x`) || PathPrefix(`/", &[("10.0.0.1", 1)]),
            row("b.example.com", "/b", &[("10.0.0.1/evil", 1)]),
            bad_resolver,
        ];
        let table = render(&rows, &EdgeSettings::default(), &[]);
        assert_eq!(table.invalid.len(), 2, "{:?}", table.invalid);
        assert_eq!(table.without_servers, 1, "an address that is not one is no server");
        let text = String::from_utf8(table.public.clone()).unwrap();
        assert!(!text.contains("evil"), "{text}");
        assert_eq!(json(&table.public)["http"]["routers"][R]["tls"], json!({}));
    }

    #[test]
    fn custom_domains_are_routed_only_when_proven_and_certificates_only_to_insiders() {
        let edge = EdgeSettings {
            platform_domains: vec![Hostname::parse("domain", "apps.example.com").unwrap()],
            ..EdgeSettings::default()
        };
        let mut platform = row("web.apps.example.com", "/", &[("10.0.0.1", 1)]);
        platform.domain_verified = false;
        let mut unproven = row("shop.example.org", "/", &[("10.0.0.1", 1)]);
        unproven.domain_verified = false;
        unproven.deployment_id = Uuid::from_u128(0xdef);
        let mut proven = row("blog.example.org", "/", &[("10.0.0.1", 1)]);
        proven.deployment_id = Uuid::from_u128(0x123);
        proven.tls_enabled = true;
        proven.cert_resolver = Some("platform".into());
        let certificate = TlsCertificate {
            domain: "blog.example.org".into(),
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----".into(),
        };
        let table = render(&[platform, unproven, proven], &edge, std::slice::from_ref(&certificate));
        assert_eq!((table.routers, table.unverified, table.certificates), (2, 1, 1));
        let internal = json(&table.internal);
        assert!(!internal.to_string().contains("shop.example.org"));
        let proven_router = &internal["http"]["routers"]["flo-00000000000000000000000000000123"];
        assert_eq!(proven_router["tls"], json!({}), "the stored certificate, not the resolver: {proven_router}");
        assert_eq!(proven_router["entryPoints"][0], "websecure");
        let twin = &internal["http"]["routers"]["flo-00000000000000000000000000000123-http"];
        assert_eq!((&twin["entryPoints"][0], &twin["rule"]), (&json!("web"), &proven_router["rule"]));
        assert_eq!(twin["middlewares"], json!([REDIRECT_MIDDLEWARE]));
        assert_eq!(internal["http"]["middlewares"][REDIRECT_MIDDLEWARE]["redirectScheme"]["scheme"], "https");
        assert_eq!(internal["tls"]["certificates"][0]["certFile"], "-----BEGIN CERTIFICATE-----");
        let public = String::from_utf8(CANARY_OF_EDGE_1.complete(&table.public)).unwrap();
        assert!(!public.contains("PRIVATE KEY") && !public.contains("\"tls\":{\"certificates"), "{public}");
        assert!(!format!("{certificate:?}").contains("PRIVATE"), "Debug never shows the key");
    }

    #[test]
    fn a_custom_domain_never_asks_traefik_for_a_certificate_when_flotilla_orders_them() {
        let edge = |ordering| EdgeSettings {
            platform_domains: vec![Hostname::parse("domain", "apps.example.com").unwrap()],
            flotilla_orders_certificates: ordering,
            ..EdgeSettings::default()
        };
        let tls_row = |domain: &str, id: u128| {
            let mut r = row(domain, "/", &[("10.0.0.1", 1)]);
            (r.tls_enabled, r.cert_resolver, r.deployment_id) = (true, Some("platform".into()), Uuid::from_u128(id));
            r
        };
        let rows = [tls_row("shop.example.org", 1), tls_row("web.apps.example.com", 2)];
        let router = |table: &RenderedTable, id: &str| json(&table.public)["http"]["routers"][id]["tls"].clone();
        let (custom, platform) = ("flo-00000000000000000000000000000001", "flo-00000000000000000000000000000002");
        let ordering = render(&rows, &edge(true), &[]);
        assert_eq!(router(&ordering, custom), json!({}), "Traefik's default certificate until Flotilla's");
        assert_eq!(router(&ordering, platform), json!({ "certResolver": "platform" }));
        let not_ordering = render(&rows, &edge(false), &[]);
        assert_eq!(router(&not_ordering, custom), json!({ "certResolver": "platform" }));
    }
}
