//! Traefik rules. They are built only from a [`Hostname`] and a
//! [`PathPrefix`], both of which can only exist validated, so user input can
//! never add a matcher to a rule.

use flotilla_types::{DeploymentId, Hostname, PathPrefix};

/// One HTTP route to a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub deployment_id: DeploymentId,
    pub domain: Hostname,
    pub path_prefix: PathPrefix,
}

impl Route {
    /// Router and service name: derived from the deployment id (and the
    /// path prefix, which several routes of one deployment differ by), so it
    /// is unique, stable between renders and contains nothing a user chose.
    pub fn router_name(&self) -> String {
        let name = format!("flo-{}", self.deployment_id.as_uuid().simple());
        if self.path_prefix.is_root() { name } else { format!("{name}-{:08x}", fnv1a(self.path_prefix.as_str())) }
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
}

/// A stable 32-bit hash (router names must not change between renders).
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
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
        }
    }

    #[test]
    fn rules() {
        assert_eq!(route("app.example.com", "/").rule(), "Host(`app.example.com`)");
        assert_eq!(route("app.example.com", "/api/").rule(), "Host(`app.example.com`) && PathPrefix(`/api`)");
        assert_eq!(route("*.apps.example.com", "").rule(), "HostRegexp(`^[a-z0-9-]+\\.apps\\.example\\.com$`)");
    }

    #[test]
    fn names_come_from_the_id_and_differ_by_path() {
        assert_eq!(route("a.example.com", "/").router_name(), "flo-00000000000000000000000000000abc");
        let api = route("a.example.com", "/api").router_name();
        assert!(api.starts_with("flo-00000000000000000000000000000abc-") && api.len() == 4 + 32 + 9, "{api}");
        assert_ne!(api, route("a.example.com", "/web").router_name());
        assert_eq!(api, route("b.example.com", "/api").router_name(), "stable: the domain is not in it");
    }

    #[test]
    fn longer_prefixes_have_higher_priority() {
        assert!(route("a.example.com", "/api/v2").priority() > route("a.example.com", "/api").priority());
        assert!(route("a.example.com", "/api").priority() > route("a.example.com", "/").priority());
    }
}
