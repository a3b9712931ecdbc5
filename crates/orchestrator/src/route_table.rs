//! Renders the route table as Traefik v3 dynamic configuration, for
//! Traefik's HTTP provider. Pure: the rows come from
//! [`flotilla_store::Store::route_table`], one consistent snapshot.
//!
//! Every rule is rebuilt from a [`Hostname`] and a [`PathPrefix`] parsed
//! again here, so even a row that got into the database some other way
//! cannot add a matcher to a rule; such a row is left out and counted.

use std::collections::BTreeMap;
use std::net::IpAddr;

use flotilla_store::routes::RouteTableRow;
use flotilla_types::Hostname;
use flotilla_types::domains::is_platform_domain;
use flotilla_types::routing::{EdgeSettings, PathPrefix, Route};
use serde_json::{Value, json};

/// Middlewares the platform defines; a route may name only these.
pub fn platform_middleware(name: &str) -> Option<Value> {
    match name {
        "flo-redirect-https" => Some(json!({ "redirectScheme": { "scheme": "https", "permanent": true } })),
        "flo-compress" => Some(json!({ "compress": {} })),
        "flo-security-headers" => Some(json!({
            "headers": {
                "stsSeconds": 31_536_000,
                "contentTypeNosniff": true,
                "frameDeny": true,
                "referrerPolicy": "strict-origin-when-cross-origin"
            }
        })),
        _ => None,
    }
}

/// The rendered configuration and what was left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedTable {
    pub config: Value,
    pub routers: usize,
    pub servers: usize,
    /// Routes with no replica that serves right now (left out: Traefik
    /// answers 404 rather than routing to nothing).
    pub without_servers: usize,
    /// Rows that failed validation (left out, and logged by the caller).
    pub invalid: Vec<String>,
    /// Routes of custom domains not proven yet (left out).
    pub unverified: usize,
    /// Certificates served in `tls.certificates`.
    pub certificates: usize,
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

fn server_url(protocol: &str, address: &str, port: i32) -> Option<String> {
    let scheme = if protocol == "h2c" { "h2c" } else { "http" };
    let port = u16::try_from(port).ok().filter(|p| *p > 0)?;
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => Some(format!("{scheme}://[{v6}]:{port}")),
        Ok(IpAddr::V4(v4)) => Some(format!("{scheme}://{v4}:{port}")),
        Err(_) => Hostname::parse("address", address).ok().map(|h| format!("{scheme}://{h}:{port}")),
    }
}

/// Renders `rows` as `{"http": {"routers", "services", "middlewares"}}`,
/// with `certificates` (those of routed domains) in `tls.certificates`. A
/// route of a custom domain its deployment has not proven is left out.
pub fn render(rows: &[RouteTableRow], edge: &EdgeSettings, certificates: &[TlsCertificate]) -> RenderedTable {
    let mut routers = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut middlewares = BTreeMap::new();
    let mut table = RenderedTable {
        config: Value::Null,
        routers: 0,
        servers: 0,
        without_servers: 0,
        invalid: Vec::new(),
        unverified: 0,
        certificates: 0,
    };
    for row in rows {
        let parsed = Hostname::parse("domain", &row.domain).map_err(|e| e.to_string()).and_then(|domain| {
            PathPrefix::parse("path_prefix", &row.path_prefix).map(|p| (domain, p)).map_err(|e| e.to_string())
        });
        let (domain, path_prefix) = match parsed {
            Ok(parsed) => parsed,
            Err(why) => {
                table.invalid.push(format!("{}: {why}", row.router_name));
                continue;
            }
        };
        if !row.domain_verified && !is_platform_domain(&edge.platform_domains, domain.as_str()) {
            table.unverified += 1;
            continue;
        }
        let route = Route { deployment_id: row.deployment_id.into(), domain, path_prefix, target_port: 1 };
        // The name comes from the id, never from the row's text.
        let mut name = route.router_name();
        if !route.path_prefix.is_root() {
            // Several prefixes of one deployment need distinct routers.
            name = format!("{name}-{:08x}", fnv1a(route.path_prefix.as_str()));
        }
        let servers: Vec<Value> = row
            .servers
            .iter()
            .zip(&row.ports)
            .filter_map(|(address, port)| server_url(&row.protocol, address, *port))
            .map(|url| json!({ "url": url }))
            .collect();
        if servers.is_empty() {
            table.without_servers += 1;
            continue;
        }
        let mut router = json!({
            "rule": route.rule(),
            "service": name,
            "priority": route.priority(),
            "entryPoints": [if row.tls_enabled { &edge.https_entrypoint } else { &edge.http_entrypoint }],
        });
        if row.tls_enabled {
            // A certificate Flotilla holds is chosen by SNI from tls.certificates.
            let stored = certificates.iter().any(|c| c.domain == row.domain);
            router["tls"] = match row.cert_resolver.as_deref().filter(|r| is_plain_name(r) && !stored) {
                Some(resolver) => json!({ "certResolver": resolver }),
                None => json!({}),
            };
        }
        let known: Vec<&String> = row.middlewares.iter().filter(|m| platform_middleware(m).is_some()).collect();
        if !known.is_empty() {
            router["middlewares"] = json!(known);
            for m in known {
                middlewares.insert(m.clone(), platform_middleware(m).unwrap_or(Value::Null));
            }
        }
        table.routers += 1;
        table.servers += servers.len();
        routers.insert(name.clone(), router);
        services.insert(name, json!({ "loadBalancer": { "servers": servers, "passHostHeader": true } }));
    }
    let mut http = serde_json::Map::new();
    // Traefik's schema wants non-empty sections to be objects; empty ones are left out.
    if !routers.is_empty() {
        http.insert("routers".into(), json!(routers));
        http.insert("services".into(), json!(services));
    }
    if !middlewares.is_empty() {
        http.insert("middlewares".into(), json!(middlewares));
    }
    table.config = json!({ "http": http });
    let served: Vec<Value> = certificates
        .iter()
        .filter(|c| Hostname::parse("domain", &c.domain).is_ok())
        .map(|c| json!({ "certFile": c.chain_pem, "keyFile": c.key_pem }))
        .collect();
    if !served.is_empty() {
        table.certificates = served.len();
        table.config["tls"] = json!({ "certificates": served });
    }
    table
}

/// A certificate resolver's name: letters, digits, '-' and '_' only.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A stable 32-bit hash (router names must not change between renders).
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row(domain: &str, path: &str, servers: &[(&str, i32)]) -> RouteTableRow {
        RouteTableRow {
            deployment_id: Uuid::from_u128(0xabc),
            router_name: "flo-00000000000000000000000000000abc".into(),
            domain: domain.into(),
            path_prefix: path.into(),
            protocol: "http".into(),
            tls_enabled: false,
            cert_resolver: None,
            middlewares: Vec::new(),
            servers: servers.iter().map(|s| s.0.to_owned()).collect(),
            ports: servers.iter().map(|s| s.1).collect(),
            domain_verified: true,
        }
    }

    #[test]
    fn one_server_per_serving_replica() {
        let table = render(
            &[row("app.example.com", "/", &[("10.0.0.1", 30001), ("fd00::2", 30002)])],
            &EdgeSettings::default(),
            &[],
        );
        let r = "flo-00000000000000000000000000000abc";
        assert_eq!(table.config["http"]["routers"][r]["rule"], "Host(`app.example.com`)");
        assert_eq!(table.config["http"]["routers"][r]["entryPoints"][0], "web");
        let servers = &table.config["http"]["services"][r]["loadBalancer"]["servers"];
        assert_eq!(servers[0]["url"], "http://10.0.0.1:30001");
        assert_eq!(servers[1]["url"], "http://[fd00::2]:30002");
        assert_eq!((table.routers, table.servers), (1, 2));
    }

    #[test]
    fn a_route_with_no_serving_replica_is_left_out() {
        let table = render(&[row("app.example.com", "/", &[])], &EdgeSettings::default(), &[]);
        assert_eq!(table.config, json!({ "http": {} }));
        assert_eq!(table.without_servers, 1);
    }

    #[test]
    fn hostile_rows_never_reach_a_rule() {
        let mut bad_resolver = row("ok.example.com", "/", &[("10.0.0.1", 1)]);
        bad_resolver.tls_enabled = true;
        bad_resolver.cert_resolver = Some("le\"}".into());
        bad_resolver.middlewares = vec!["flo-compress".into(), "evil@file".into()];
        let rows = [
            row("a.example.com`) || Host(`evil.com", "/", &[("10.0.0.1", 1)]),
            row("a.example.com", "/x`) || PathPrefix(`/", &[("10.0.0.1", 1)]),
            row("a.example.com", "/", &[("10.0.0.1/evil", 1)]),
            bad_resolver,
        ];
        let table = render(&rows, &EdgeSettings::default(), &[]);
        assert_eq!(table.invalid.len(), 2, "{:?}", table.invalid);
        assert_eq!(table.without_servers, 1, "an address that is not one is no server");
        let text = table.config.to_string();
        assert!(!text.contains("evil"), "{text}");
        let r = "flo-00000000000000000000000000000abc";
        assert_eq!(table.config["http"]["routers"][r]["tls"], json!({}));
        assert_eq!(table.config["http"]["routers"][r]["middlewares"], json!(["flo-compress"]));
        assert_eq!(table.config["http"]["middlewares"]["flo-compress"], json!({ "compress": {} }));
    }

    #[test]
    fn custom_domains_are_routed_only_when_proven_and_certificates_are_served() {
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
        assert!(!table.config.to_string().contains("shop.example.org"));
        let proven_router = &table.config["http"]["routers"]["flo-00000000000000000000000000000123"];
        assert_eq!(proven_router["tls"], json!({}), "the stored certificate, not the resolver: {proven_router}");
        assert_eq!(table.config["tls"]["certificates"][0]["certFile"], "-----BEGIN CERTIFICATE-----");
        assert!(!format!("{certificate:?}").contains("PRIVATE"), "Debug never shows the key");
    }
}
