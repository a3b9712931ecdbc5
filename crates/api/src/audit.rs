//! What the audit log names as the target of a mutating call's response.

use flotilla_proto::v1 as pb;

/// A response that names the resource it acted on.
pub trait Audited {
    fn audit_target(&self) -> Option<String>;
}

/// Responses carrying the resource in `$field`, named by its `id`.
macro_rules! audited_by_id {
    ($($response:ty => $field:ident),* $(,)?) => {
        $(impl Audited for $response {
            fn audit_target(&self) -> Option<String> {
                self.$field.as_ref().map(|resource| resource.id.clone())
            }
        })*
    };
}

audited_by_id! {
    pb::CreateDeploymentResponse => deployment,
    pb::UpdateDeploymentResponse => deployment,
    pb::DeleteDeploymentResponse => deployment,
    pb::StartDeploymentResponse => deployment,
    pb::StopDeploymentResponse => deployment,
    pb::RestartDeploymentResponse => deployment,
    pb::ScaleDeploymentResponse => deployment,
    pb::DrainNodeResponse => node,
    pb::ActivateNodeResponse => node,
    pb::CreateOrganizationResponse => organization,
    pb::AcceptInvitationResponse => organization,
    pb::InviteMemberResponse => invitation,
    pb::CreateProjectResponse => project,
    pb::UpdateRoutingsResponse => deployment,
}

impl Audited for pb::SetMemberRoleResponse {
    fn audit_target(&self) -> Option<String> {
        self.member.as_ref().map(|member| member.subject.clone())
    }
}

/// Responses that name nothing: the request's target stands.
macro_rules! audited_by_request {
    ($($response:ty),* $(,)?) => {
        $(impl Audited for $response {
            fn audit_target(&self) -> Option<String> {
                None
            }
        })*
    };
}

audited_by_request!(
    pb::RevokeInvitationResponse,
    pb::RemoveMemberResponse,
    pb::DeleteProjectResponse,
    pb::UpdateEnvVarsResponse,
    pb::GetDomainStatusResponse,
);
