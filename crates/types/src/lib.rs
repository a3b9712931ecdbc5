//! Flotilla's domain vocabulary: identifiers, the validated deployment spec,
//! replica and deployment states, what "serving" means, container labels and
//! database snapshots.
//!
//! Nothing here does I/O, so every rule can be unit-tested directly and shared
//! by the API, the orchestrator and the node agent.

pub mod deployment;
pub mod domains;
pub mod health;
pub mod ids;
pub mod labels;
pub mod metrics;
pub mod placement;
pub mod serving;
pub mod snapshot;
pub mod status;
pub mod validate;

pub use deployment::{DeploymentSpec, DeploymentSpecInput, EnvVar, Placement, ResourceLimits};
pub use health::{HealthCheck, HealthCheckKind, NetworkMode, RestartPolicy};
pub use ids::{DeploymentId, NodeId, OrganizationId, ProjectId, ReplicaId};
pub use placement::{Constraints, NodeLoss, PlacementStrategy};
pub use snapshot::DbSnapshot;
pub use status::{DeploymentStatus, DesiredState, ReplicaState};
pub use validate::{FieldError, Hostname, ImageReference, PathPrefix};
