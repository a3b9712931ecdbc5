//! The deployment spec: what a user asks Flotilla to run.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::health::{HealthCheck, NetworkMode, RestartPolicy};
use crate::placement::{Constraints, NodeLoss, PlacementStrategy};
use crate::validate::PathPrefix;
use crate::validate::{self, FieldError, Hostname, ImageReference};

/// Docker refuses memory limits under 6 MiB.
pub const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;
/// Upper bound on replicas per deployment; a typo should not start 10,000 containers.
pub const MAX_REPLICAS: i32 = 100;
pub const MAX_ENV_VARS: usize = 200;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// Names starting with this are set by Flotilla itself.
pub const RESERVED_ENV_PREFIX: &str = "FLOTILLA_";

/// An environment variable. A secret's value never appears in `Debug` output
/// (so never in logs) and is masked when returned by the API.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub secret: bool,
}

impl EnvVar {
    pub const MASK: &'static str = "********";

    /// The value as it may be shown to a user: secrets are masked.
    pub fn display_value(&self) -> &str {
        if self.secret { Self::MASK } else { &self.value }
    }
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvVar")
            .field("name", &self.name)
            .field("value", &self.display_value())
            .field("secret", &self.secret)
            .finish()
    }
}

/// Resource limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    pub memory_bytes: i64,
    /// Thousandths of a CPU core.
    pub cpu_millis: i64,
}

impl ResourceLimits {
    /// Docker's `NanoCpus`.
    pub fn nano_cpus(&self) -> i64 {
        self.cpu_millis.saturating_mul(1_000_000)
    }
}

/// A deployment request as it arrives, before validation.
#[derive(Debug, Clone, Default)]
pub struct DeploymentSpecInput {
    pub name: String,
    pub image: String,
    pub port: i32,
    pub env: Vec<EnvVar>,
    pub domain: String,
    /// Only requests under this path are routed to the deployment (empty: all).
    pub path_prefix: String,
    pub limits: ResourceLimits,
    pub replicas: Option<i32>,
    pub health_check: Option<HealthCheck>,
    pub restart_policy: Option<RestartPolicy>,
    pub network_mode: Option<NetworkMode>,
    /// Empty: the cluster's default strategy.
    pub placement_strategy: String,
    pub placement_constraints: BTreeMap<String, String>,
    /// Empty: `fence`.
    pub placement_node_loss: String,
}

/// A validated deployment spec. Only [`DeploymentSpec::validate`] makes one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub name: String,
    pub image: ImageReference,
    pub port: u16,
    pub env: Vec<EnvVar>,
    pub domain: Option<Hostname>,
    /// `/` unless the deployment serves only part of its domain.
    #[serde(default = "PathPrefix::root")]
    pub path_prefix: PathPrefix,
    pub limits: ResourceLimits,
    pub replicas: u32,
    pub health_check: HealthCheck,
    pub restart_policy: RestartPolicy,
    pub network_mode: NetworkMode,
    pub placement: Placement,
}

/// Where a deployment's replicas may run and how their nodes are chosen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// `None`: the cluster's default.
    pub strategy: Option<PlacementStrategy>,
    pub constraints: Constraints,
    #[serde(default)]
    pub node_loss: NodeLoss,
}

impl DeploymentSpec {
    /// Checks every field and returns the first problem, named by its field
    /// path as the API's request spells it.
    pub fn validate(input: DeploymentSpecInput) -> Result<Self, FieldError> {
        validate::dns_label("name", &input.name)?;
        let image = ImageReference::parse("image", input.image.trim())?;
        let port = match input.port {
            0 => return Err(FieldError::required("port")),
            p if (1..=65535).contains(&p) => p as u16,
            p => return Err(FieldError::new("port", format!("{p} is out of range 1-65535"))),
        };
        if input.env.len() > MAX_ENV_VARS {
            return Err(FieldError::new("env", format!("at most {MAX_ENV_VARS} variables are allowed")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, var) in input.env.iter().enumerate() {
            let field = format!("env[{i}].name");
            validate::env_var_name(&field, &var.name)?;
            if var.name.starts_with(RESERVED_ENV_PREFIX) {
                return Err(FieldError::new(field, format!("names starting with {RESERVED_ENV_PREFIX} are reserved")));
            }
            if !seen.insert(var.name.as_str()) {
                return Err(FieldError::new(field, format!("{} is set twice", var.name)));
            }
            if var.value.len() > MAX_ENV_VALUE_BYTES || var.value.contains('\0') {
                return Err(FieldError::new(
                    format!("env[{i}].value"),
                    format!("must be at most {MAX_ENV_VALUE_BYTES} bytes and contain no NUL"),
                ));
            }
        }
        // Not trimmed: a domain with spaces or line breaks around it is a
        // mistake to report, never something to guess at.
        let domain = match input.domain.as_str() {
            "" => None,
            d => Some(Hostname::parse("domain", d)?),
        };
        let path_prefix = match input.path_prefix.as_str() {
            "" => PathPrefix::root(),
            p => PathPrefix::parse("path_prefix", p)?,
        };
        if domain.is_none() && !path_prefix.is_root() {
            return Err(FieldError::new("path_prefix", "a path prefix needs a domain"));
        }
        let limits = input.limits;
        if limits.memory_bytes < 0 {
            return Err(FieldError::new("limits.memory_bytes", "must not be negative"));
        }
        if limits.memory_bytes != 0 && limits.memory_bytes < MIN_MEMORY_BYTES {
            return Err(FieldError::new("limits.memory_bytes", "must be 0 (no limit) or at least 6 MiB (6291456)"));
        }
        if limits.cpu_millis < 0 {
            return Err(FieldError::new("limits.cpu_millis", "must not be negative"));
        }
        if limits.cpu_millis > 1_000_000 {
            return Err(FieldError::new("limits.cpu_millis", "must be at most 1000000 (1000 cores)"));
        }
        let replicas = match input.replicas {
            None => 1,
            // 0: the spec and the route are kept, nothing runs (the edge answers 503).
            Some(n) if (0..=MAX_REPLICAS).contains(&n) => n as u32,
            Some(n) => return Err(FieldError::new("replicas", format!("{n} is out of range 0-{MAX_REPLICAS}"))),
        };
        let health_check = input.health_check.unwrap_or_default();
        health_check.validate("health_check")?;
        let restart_policy = input.restart_policy.unwrap_or_default();
        if let RestartPolicy::OnFailure { max_retries } = restart_policy
            && max_retries > 1000
        {
            return Err(FieldError::new("restart_policy.max_retries", "must be at most 1000"));
        }
        let strategy = match input.placement_strategy.trim() {
            "" => None,
            s => Some(PlacementStrategy::parse("placement.strategy", s)?),
        };
        let constraints = Constraints::parse("placement.constraints", &input.placement_constraints)?;
        let node_loss = match input.placement_node_loss.trim() {
            "" => NodeLoss::default(),
            s => NodeLoss::parse("placement.node_loss", s)?,
        };
        Ok(Self {
            name: input.name,
            image,
            port,
            env: input.env,
            domain,
            path_prefix,
            limits,
            replicas,
            health_check,
            restart_policy,
            network_mode: input.network_mode.unwrap_or_default(),
            placement: Placement { strategy, constraints, node_loss },
        })
    }

    /// The spec as input again, to apply a change to it and validate the result.
    pub fn to_input(&self) -> DeploymentSpecInput {
        DeploymentSpecInput {
            name: self.name.clone(),
            image: self.image.to_string(),
            port: i32::from(self.port),
            env: self.env.clone(),
            domain: self.domain.as_ref().map(ToString::to_string).unwrap_or_default(),
            path_prefix: if self.path_prefix.is_root() { String::new() } else { self.path_prefix.to_string() },
            limits: self.limits,
            replicas: Some(self.replicas as i32),
            health_check: Some(self.health_check.clone()),
            restart_policy: Some(self.restart_policy),
            network_mode: Some(self.network_mode),
            placement_strategy: self.placement.strategy.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            placement_constraints: self.placement.constraints.as_map().clone(),
            placement_node_loss: self.placement.node_loss.as_str().to_owned(),
        }
    }

    /// Whether `other` needs new containers: anything but the replica count
    /// and the placement (which applies to replicas placed from then on).
    pub fn needs_new_containers(&self, other: &Self) -> bool {
        let mut same_count = other.clone();
        same_count.replicas = self.replicas;
        same_count.placement = self.placement.clone();
        *self != same_count
    }

    /// The port health checks use.
    pub fn health_port(&self) -> u16 {
        self.health_check.port.unwrap_or(self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> DeploymentSpecInput {
        DeploymentSpecInput {
            name: "demo".into(),
            image: "flotilla/demo-http:latest".into(),
            port: 8080,
            ..Default::default()
        }
    }

    fn field_of(input: DeploymentSpecInput) -> String {
        DeploymentSpec::validate(input).unwrap_err().field
    }

    #[test]
    fn placement_is_validated_and_does_not_need_new_containers() {
        let constraints = BTreeMap::from([("region".to_owned(), "eu".to_owned())]);
        let spec = DeploymentSpec::validate(DeploymentSpecInput {
            placement_strategy: "binpack".into(),
            placement_constraints: constraints.clone(),
            ..input()
        })
        .unwrap();
        assert_eq!(spec.placement.strategy, Some(PlacementStrategy::Binpack));
        assert_eq!(spec.placement.constraints.as_map(), &constraints);
        assert_eq!(DeploymentSpec::validate(spec.to_input()).unwrap(), spec);
        let plain = DeploymentSpec::validate(input()).unwrap();
        assert_eq!(plain.placement, Placement::default());
        assert!(!plain.needs_new_containers(&spec));
        assert_eq!(
            field_of(DeploymentSpecInput { placement_strategy: "fast".into(), ..input() }),
            "placement.strategy"
        );
        let hostile = BTreeMap::from([("region".to_owned(), "eu`) || Host(`x".to_owned())]);
        assert_eq!(
            field_of(DeploymentSpecInput { placement_constraints: hostile, ..input() }),
            "placement.constraints.region"
        );
    }

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let spec = DeploymentSpec::validate(input()).unwrap();
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.domain, None);
        assert_eq!(spec.port, 8080);
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(field_of(DeploymentSpecInput { name: "".into(), ..input() }), "name");
        assert_eq!(field_of(DeploymentSpecInput { name: "Bad_Name".into(), ..input() }), "name");
        assert_eq!(field_of(DeploymentSpecInput { image: "".into(), ..input() }), "image");
        assert_eq!(field_of(DeploymentSpecInput { image: "Not Valid".into(), ..input() }), "image");
        assert_eq!(field_of(DeploymentSpecInput { port: 0, ..input() }), "port");
        assert_eq!(field_of(DeploymentSpecInput { port: 65536, ..input() }), "port");
        assert_eq!(field_of(DeploymentSpecInput { port: -1, ..input() }), "port");
        assert_eq!(field_of(DeploymentSpecInput { domain: "a..b".into(), ..input() }), "domain");
        let limits = ResourceLimits { memory_bytes: -1, cpu_millis: 0 };
        assert_eq!(field_of(DeploymentSpecInput { limits, ..input() }), "limits.memory_bytes");
        let limits = ResourceLimits { memory_bytes: 1024, cpu_millis: 0 };
        assert_eq!(field_of(DeploymentSpecInput { limits, ..input() }), "limits.memory_bytes");
        let limits = ResourceLimits { memory_bytes: 0, cpu_millis: -5 };
        assert_eq!(field_of(DeploymentSpecInput { limits, ..input() }), "limits.cpu_millis");
        assert_eq!(field_of(DeploymentSpecInput { replicas: Some(-1), ..input() }), "replicas");
        assert_eq!(field_of(DeploymentSpecInput { replicas: Some(101), ..input() }), "replicas");
        assert_eq!(DeploymentSpec::validate(DeploymentSpecInput { replicas: Some(0), ..input() }).unwrap().replicas, 0);
        let env = vec![EnvVar { name: "FLOTILLA_X".into(), value: "1".into(), secret: false }];
        assert_eq!(field_of(DeploymentSpecInput { env, ..input() }), "env[0].name");
        let dup = EnvVar { name: "A".into(), value: "1".into(), secret: false };
        let env = vec![dup.clone(), dup];
        assert_eq!(field_of(DeploymentSpecInput { env, ..input() }), "env[1].name");
    }

    #[test]
    fn only_container_changes_need_new_containers() {
        let spec = DeploymentSpec::validate(input()).unwrap();
        let scaled = DeploymentSpec::validate(DeploymentSpecInput { replicas: Some(3), ..input() }).unwrap();
        assert!(!spec.needs_new_containers(&scaled));
        let new_image =
            DeploymentSpec::validate(DeploymentSpecInput { image: "flotilla/demo-http:2".into(), ..input() }).unwrap();
        assert!(spec.needs_new_containers(&new_image));
        assert_eq!(DeploymentSpec::validate(spec.to_input()).unwrap(), spec);
    }

    #[test]
    fn health_checks_and_restart_policies_are_validated() {
        let mut check = HealthCheck::of(crate::health::HealthCheckKind::Http);
        check.path = "nope".into();
        assert_eq!(field_of(DeploymentSpecInput { health_check: Some(check), ..input() }), "health_check.http_path");
        let policy = RestartPolicy::OnFailure { max_retries: 5000 };
        assert_eq!(
            field_of(DeploymentSpecInput { restart_policy: Some(policy), ..input() }),
            "restart_policy.max_retries"
        );
    }

    #[test]
    fn secret_values_never_appear_in_debug_output() {
        let var = EnvVar { name: "TOKEN".into(), value: "hunter2".into(), secret: true };
        let shown = format!("{var:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(EnvVar::MASK));
        let plain = EnvVar { secret: false, ..var };
        assert!(format!("{plain:?}").contains("hunter2"));
    }
}
