//! How a replica's health is checked, how its container is restarted, and
//! which network it joins.

use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

/// What kind of health check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthCheckKind {
    /// Running is healthy.
    None,
    /// A TCP connection to the port succeeds (the default: every app on
    /// Flotilla listens on a port).
    #[default]
    Tcp,
    /// An HTTP GET of `path` answers 2xx or 3xx.
    Http,
    /// A command run inside the container by Docker exits 0.
    Command,
}

/// A health check. TCP and HTTP checks are probed by the agent against the
/// container's address (images need no curl inside); command checks are
/// Docker's own HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// HTTP: the path requested.
    #[serde(default = "default_path")]
    pub path: String,
    /// The port checked; `None` means the deployment's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Command: the command and its arguments (exec form, no shell).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive failures before a healthy replica counts as unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// How long a new container has to become healthy before it is given up
    /// (and, in an update, rolled back).
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u32,
}

fn default_path() -> String {
    "/".to_owned()
}
fn default_interval_ms() -> u32 {
    2_000
}
fn default_timeout_ms() -> u32 {
    1_000
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_startup_timeout_ms() -> u32 {
    60_000
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self::of(HealthCheckKind::Tcp)
    }
}

impl HealthCheck {
    pub const MAX_STARTUP_TIMEOUT_MS: u32 = 30 * 60 * 1000;

    pub fn of(kind: HealthCheckKind) -> Self {
        Self {
            kind,
            path: default_path(),
            port: None,
            command: Vec::new(),
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            unhealthy_threshold: default_unhealthy_threshold(),
            startup_timeout_ms: default_startup_timeout_ms(),
        }
    }

    /// Validates the fields that matter for its kind; `field` is the
    /// request's name for the whole check (e.g. `health_check`).
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        let sub = |name: &str| format!("{field}.{name}");
        match self.kind {
            HealthCheckKind::None | HealthCheckKind::Tcp => {}
            HealthCheckKind::Http => {
                let path = &self.path;
                let ok = path.starts_with('/')
                    && path.len() <= 1024
                    && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
                if !ok {
                    return Err(FieldError::new(
                        sub("http_path"),
                        format!("{path:?} must start with '/' and contain no spaces, controls or '#'"),
                    ));
                }
            }
            HealthCheckKind::Command => {
                if self.command.is_empty() || self.command[0].is_empty() {
                    return Err(FieldError::new(sub("command"), "a command check needs a command"));
                }
                if self.command.iter().any(|a| a.contains('\0')) || self.command.len() > 64 {
                    return Err(FieldError::new(sub("command"), "at most 64 arguments, none with NUL"));
                }
            }
        }
        if self.port == Some(0) {
            return Err(FieldError::new(sub("port"), "0 is not a port"));
        }
        let range = |name: &str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(FieldError::new(sub(name), format!("{value} is out of range {min}-{max}")))
            }
        };
        range("interval_ms", self.interval_ms, 100, 3_600_000)?;
        range("timeout_ms", self.timeout_ms, 10, 600_000)?;
        range("unhealthy_threshold", self.unhealthy_threshold, 1, 100)?;
        range("startup_timeout_ms", self.startup_timeout_ms, 100, Self::MAX_STARTUP_TIMEOUT_MS)?;
        Ok(())
    }
}

/// Docker's restart policy for a replica's container. The agent also
/// restarts replicas that should run, whatever the policy; the policy covers
/// the time the agent is down and what Docker does on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    OnFailure {
        #[serde(default)]
        max_retries: u32,
    },
    Always,
    #[default]
    UnlessStopped,
}

/// Which network a deployment's containers join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// The node's shared `flotilla-apps` network.
    #[default]
    Shared,
    /// A network of the deployment's own; its replicas on one node reach each
    /// other, nothing else does.
    Isolated,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Isolated => "isolated",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "shared" => Some(Self::Shared),
            "isolated" => Some(Self::Isolated),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_tcp_check_and_unless_stopped() {
        assert_eq!(HealthCheck::default().kind, HealthCheckKind::Tcp);
        assert!(HealthCheck::default().validate("health_check").is_ok());
        assert_eq!(RestartPolicy::default(), RestartPolicy::UnlessStopped);
    }

    #[test]
    fn checks_are_validated_for_their_kind() {
        let mut http = HealthCheck::of(HealthCheckKind::Http);
        http.path = "/healthz".into();
        assert!(http.validate("health_check").is_ok());
        http.path = "no-slash".into();
        assert_eq!(http.validate("health_check").unwrap_err().field, "health_check.http_path");
        http.path = "/a b".into();
        assert!(http.validate("health_check").is_err());

        let command = HealthCheck::of(HealthCheckKind::Command);
        assert_eq!(command.validate("health_check").unwrap_err().field, "health_check.command");

        let fast = HealthCheck { interval_ms: 5, ..HealthCheck::default() };
        assert_eq!(fast.validate("health_check").unwrap_err().field, "health_check.interval_ms");
    }

    #[test]
    fn stored_json_round_trips_and_fills_defaults() {
        let check: HealthCheck = serde_json::from_str(r#"{"kind":"tcp"}"#).unwrap();
        assert_eq!(check, HealthCheck::default());
        let policy: RestartPolicy = serde_json::from_str(r#"{"kind":"on-failure","max_retries":3}"#).unwrap();
        assert_eq!(policy, RestartPolicy::OnFailure { max_retries: 3 });
        let back: RestartPolicy = serde_json::from_str(&serde_json::to_string(&policy).unwrap()).unwrap();
        assert_eq!(back, policy);
    }
}
