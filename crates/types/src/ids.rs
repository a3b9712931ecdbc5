//! Typed identifiers, so a project id can never be passed where a deployment id
//! is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An id string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {value:?} is not a valid UUID")]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7), so ids sort by creation time.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| InvalidId {
                    kind: $kind,
                    value: s.to_owned(),
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(value: Uuid) -> Self {
                Self(value)
            }
        }
    };
}

uuid_id!(
    /// An organization: the unit of tenancy.
    OrganizationId,
    "organization"
);
uuid_id!(
    /// A project inside an organization.
    ProjectId,
    "project"
);
uuid_id!(
    /// A deployment: the desired state of one app.
    DeploymentId,
    "deployment"
);
uuid_id!(
    /// One placed replica of a deployment (a `deployment_locations` row).
    ReplicaId,
    "replica"
);

/// A node's id: the Swarm node id when the engine is in a swarm, otherwise a
/// stable id the agent generated once and persisted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

/// A node id that could not be used in labels, names or URLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id {0:?} must be 1-64 characters of letters, digits, '-', '_' or '.'")]
pub struct InvalidNodeId(pub String);

impl NodeId {
    pub fn parse(value: &str) -> Result<Self, InvalidNodeId> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok { Ok(Self(value.to_owned())) } else { Err(InvalidNodeId(value.to_owned())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = DeploymentId::new();
        assert_eq!(id.to_string().parse::<DeploymentId>().unwrap(), id);
        let err = "nope".parse::<DeploymentId>().unwrap_err();
        assert_eq!(err.kind, "deployment");
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let a = ReplicaId::new();
        let b = ReplicaId::new();
        assert!(a < b);
    }

    #[test]
    fn node_ids_are_restricted_to_safe_characters() {
        assert!(NodeId::parse("cnl8ycdvj8gs5hu7fqruflg8j").is_ok());
        assert!(NodeId::parse("node-1.local_a").is_ok());
        for bad in ["", "a b", "a/b", "x`y", &"a".repeat(65)] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
