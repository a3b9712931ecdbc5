//! Traefik routing derived from a deployment. Rules are built only from a
//! [`Hostname`] and a [`PathPrefix`], both of which can only exist validated,
//! so user input can never add a matcher to a rule.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::DeploymentId;
use crate::labels;
use crate::validate::{FieldError, Hostname};

/// A URL path prefix: starts with `/`, then segments of unreserved URL
/// characters; no empty, `.` or `..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathPrefix(String);

impl PathPrefix {
    pub const MAX_LEN: usize = 256;

    pub fn root() -> Self {
        Self("/".to_owned())
    }

    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| FieldError::new(field, format!("{value:?} is not a valid path prefix: {why}"));
        if value.is_empty() || value == "/" {
            return Ok(Self::root());
        }
        if !value.starts_with('/') {
            return Err(bad("must start with '/'"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(bad("longer than 256 characters"));
        }
        let trimmed = value.strip_suffix('/').unwrap_or(value);
        for segment in trimmed[1..].split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(bad("empty, '.' and '..' segments are not allowed"));
            }
            if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
                return Err(bad("only letters, digits, '-', '.', '_' and '~' are allowed in a segment"));
            }
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }
}

impl fmt::Display for PathPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for PathPrefix {
    type Error = FieldError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("path_prefix", &value)
    }
}

impl From<PathPrefix> for String {
    fn from(value: PathPrefix) -> Self {
        value.0
    }
}

/// How a route terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tls {
    /// Plain HTTP.
    Off,
    /// TLS with a certificate from this Traefik certificate resolver (ACME).
    Resolver(String),
    /// TLS with a certificate Traefik already has (default or stored).
    Stored,
}

/// Platform-wide routing settings, from the orchestrator's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSettings {
    pub http_entrypoint: String,
    pub https_entrypoint: String,
    pub tls: Tls,
    /// Docker network Traefik reaches containers on, when it uses labels.
    pub network: Option<String>,
    /// The operator's domains (and everything under them): routed without
    /// proof. Any other domain must be verified by its deployment first.
    pub platform_domains: Vec<Hostname>,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        Self {
            http_entrypoint: "web".to_owned(),
            https_entrypoint: "websecure".to_owned(),
            tls: Tls::Off,
            network: None,
            platform_domains: Vec::new(),
        }
    }
}

/// One HTTP route to a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub deployment_id: DeploymentId,
    pub domain: Hostname,
    pub path_prefix: PathPrefix,
    pub target_port: u16,
}

impl Route {
    /// Router and service name: derived from the deployment id only, so it is
    /// unique and contains nothing a user chose.
    pub fn router_name(&self) -> String {
        format!("flo-{}", self.deployment_id.as_uuid().simple())
    }

    /// The Traefik v3 rule.
    pub fn rule(&self) -> String {
        let host = match self.domain.as_str().strip_prefix("*.") {
            // Exactly one extra label in front of the base domain.
            Some(base) => format!("HostRegexp(`^[a-z0-9-]+\\.{}$`)", base.replace('.', "\\.")),
            None => format!("Host(`{}`)", self.domain),
        };
        if self.path_prefix.is_root() { host } else { format!("{host} && PathPrefix(`{}`)", self.path_prefix) }
    }

    /// Traefik's default priority is the rule's length; we set it explicitly
    /// so a longer path prefix always wins over a shorter one.
    pub fn priority(&self) -> usize {
        self.rule().len()
    }

    /// Docker labels for Traefik's Docker/Swarm provider.
    pub fn traefik_labels(&self, edge: &EdgeSettings) -> BTreeMap<String, String> {
        let r = self.router_name();
        let router = |key: &str| format!("traefik.http.routers.{r}.{key}");
        let mut labels = BTreeMap::new();
        labels.insert("traefik.enable".to_owned(), "true".to_owned());
        labels.insert(labels::ROUTED.to_owned(), "true".to_owned());
        labels.insert(router("rule"), self.rule());
        labels.insert(router("service"), r.clone());
        labels.insert(router("priority"), self.priority().to_string());
        let entrypoint = match edge.tls {
            Tls::Off => &edge.http_entrypoint,
            _ => &edge.https_entrypoint,
        };
        labels.insert(router("entrypoints"), entrypoint.clone());
        match &edge.tls {
            Tls::Off => {}
            Tls::Resolver(resolver) => {
                labels.insert(router("tls.certresolver"), resolver.clone());
            }
            Tls::Stored => {
                labels.insert(router("tls"), "true".to_owned());
            }
        }
        labels.insert(format!("traefik.http.services.{r}.loadbalancer.server.port"), self.target_port.to_string());
        if let Some(network) = &edge.network {
            labels.insert("traefik.docker.network".to_owned(), network.clone());
            labels.insert("traefik.swarm.network".to_owned(), network.clone());
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn route(domain: &str, path: &str) -> Route {
        Route {
            deployment_id: DeploymentId(Uuid::from_u128(0xabc)),
            domain: Hostname::parse("domain", domain).unwrap(),
            path_prefix: PathPrefix::parse("path_prefix", path).unwrap(),
            target_port: 8080,
        }
    }

    #[test]
    fn rules() {
        assert_eq!(route("app.example.com", "/").rule(), "Host(`app.example.com`)");
        assert_eq!(route("app.example.com", "/api/").rule(), "Host(`app.example.com`) && PathPrefix(`/api`)");
        assert_eq!(route("*.apps.example.com", "").rule(), "HostRegexp(`^[a-z0-9-]+\\.apps\\.example\\.com$`)");
    }

    #[test]
    fn labels_for_plain_http() {
        let labels = route("app.example.com", "/").traefik_labels(&EdgeSettings::default());
        let r = "flo-00000000000000000000000000000abc";
        assert_eq!(labels["traefik.enable"], "true");
        assert_eq!(labels[&format!("traefik.http.routers.{r}.rule")], "Host(`app.example.com`)");
        assert_eq!(labels[&format!("traefik.http.routers.{r}.entrypoints")], "web");
        assert_eq!(labels[&format!("traefik.http.routers.{r}.service")], r);
        assert_eq!(labels[&format!("traefik.http.services.{r}.loadbalancer.server.port")], "8080");
        assert!(!labels.keys().any(|k| k.contains(".tls")));
    }

    #[test]
    fn labels_with_tls_and_network() {
        let edge = EdgeSettings {
            tls: Tls::Resolver("letsencrypt".into()),
            network: Some("flotilla-edge".into()),
            ..EdgeSettings::default()
        };
        let labels = route("app.example.com", "/").traefik_labels(&edge);
        let r = "flo-00000000000000000000000000000abc";
        assert_eq!(labels[&format!("traefik.http.routers.{r}.entrypoints")], "websecure");
        assert_eq!(labels[&format!("traefik.http.routers.{r}.tls.certresolver")], "letsencrypt");
        assert_eq!(labels["traefik.docker.network"], "flotilla-edge");
    }

    #[test]
    fn longer_prefixes_have_higher_priority() {
        assert!(route("a.example.com", "/api/v2").priority() > route("a.example.com", "/api").priority());
        assert!(route("a.example.com", "/api").priority() > route("a.example.com", "/").priority());
    }

    #[test]
    fn hostile_path_prefixes_are_refused() {
        for bad in
            ["api", "/a b", "/a`)", "/a||b", "/a&&b", "/(a)", "/a//b", "/../x", "/a\n", "/a?x=1", "/a#f", "/%2e%2e"]
        {
            assert!(PathPrefix::parse("path_prefix", bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(PathPrefix::parse("p", "").unwrap().as_str(), "/");
        assert_eq!(PathPrefix::parse("p", "/a/b/").unwrap().as_str(), "/a/b");
    }
}
