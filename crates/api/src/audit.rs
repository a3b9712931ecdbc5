//! What the audit log names as the target of a mutating call's response.

use flotilla_proto::v1 as pb;

/// A response that names the resource it acted on.
pub trait Audited {
    fn audit_target(&self) -> Option<String>;
}

impl Audited for pb::CreateDeploymentResponse {
    fn audit_target(&self) -> Option<String> {
        self.deployment.as_ref().map(|d| d.id.clone())
    }
}

impl Audited for pb::UpdateDeploymentResponse {
    fn audit_target(&self) -> Option<String> {
        self.deployment.as_ref().map(|d| d.id.clone())
    }
}

impl Audited for pb::DeleteDeploymentResponse {
    fn audit_target(&self) -> Option<String> {
        self.deployment.as_ref().map(|d| d.id.clone())
    }
}

impl Audited for pb::DrainNodeResponse {
    fn audit_target(&self) -> Option<String> {
        self.node.as_ref().map(|n| n.id.clone())
    }
}

impl Audited for pb::ActivateNodeResponse {
    fn audit_target(&self) -> Option<String> {
        self.node.as_ref().map(|n| n.id.clone())
    }
}
