//! OrganizationService and ProjectService handlers. Everything but listing
//! and creating organizations and accepting an invitation acts on the
//! caller's current organization, through the store's tenant scope.

use axum::extract::State;
use base64::Engine as _;
use connectrpc_axum::{ConnectError, ConnectRequest, ConnectResponse};
use flotilla_proto::v1 as pb;
use flotilla_store::organizations::{InvitationRecord, MemberRecord, ProjectRecord};
use flotilla_store::users::Membership;
use flotilla_types::{FieldError, ProjectId, validate};
use sha2::{Digest as _, Sha256};

use crate::auth::{Caller, Role};
use crate::convert::{parse_id, timestamp};
use crate::{ApiError, ApiState};

type Reply<T> = Result<ConnectResponse<T>, ConnectError>;

/// How long an invitation may be accepted.
const INVITATION_VALID_DAYS: i64 = 7;

fn require(allowed: bool, what: &str) -> Result<(), ApiError> {
    if allowed { Ok(()) } else { Err(ApiError::PermissionDenied(format!("your role does not allow {what}"))) }
}

fn role_name(field: &str, role: i32) -> Result<&'static str, ApiError> {
    let role = match pb::Role::try_from(role) {
        Ok(pb::Role::Owner) => Role::Owner,
        Ok(pb::Role::Admin) => Role::Admin,
        Ok(pb::Role::Member) => Role::Member,
        Ok(pb::Role::Viewer) => Role::Viewer,
        Ok(pb::Role::Unspecified) => return Err(FieldError::required(field).into()),
        Err(_) => return Err(FieldError::new(field, format!("{role} is not a role")).into()),
    };
    Ok(role.as_str())
}

fn role_value(role: &str) -> i32 {
    (match Role::parse(role) {
        Some(Role::Owner) => pb::Role::Owner,
        Some(Role::Admin) => pb::Role::Admin,
        Some(Role::Member) => pb::Role::Member,
        Some(Role::Viewer) => pb::Role::Viewer,
        None => pb::Role::Unspecified,
    }) as i32
}

fn organization(membership: &Membership) -> pb::Organization {
    pb::Organization {
        id: membership.organization_id.to_string(),
        slug: membership.organization_slug.clone(),
        name: membership.organization_name.clone(),
        role: role_value(&membership.role),
        default_project_id: membership.default_project.to_string(),
    }
}

fn member(record: MemberRecord) -> pb::Member {
    pb::Member {
        subject: record.subject,
        email: record.email.unwrap_or_default(),
        role: role_value(&record.role),
        joined_at: Some(timestamp(record.joined_at)),
    }
}

fn invitation(record: InvitationRecord) -> pb::Invitation {
    pb::Invitation {
        id: record.id.to_string(),
        email: record.email,
        role: role_value(&record.role),
        invited_by: record.invited_by,
        expires_at: Some(timestamp(record.expires_at)),
    }
}

fn project(record: ProjectRecord) -> pb::Project {
    pb::Project {
        id: record.id.to_string(),
        name: record.name,
        is_default: record.is_default,
        deployment_count: record.deployment_count,
    }
}

fn subject(value: &str) -> Result<&str, ApiError> {
    match value {
        "" => Err(FieldError::required("subject").into()),
        v if v.len() > 255 || v.chars().any(char::is_control) => {
            Err(FieldError::new("subject", "not a subject: at most 255 characters, no control characters").into())
        }
        v => Ok(v),
    }
}

pub async fn list_organizations(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(_request): ConnectRequest<pb::ListOrganizationsRequest>,
) -> Reply<pb::ListOrganizationsResponse> {
    api.observe("ListOrganizations", async {
        let memberships = api.store.memberships(caller.user_id).await?;
        Ok(pb::ListOrganizationsResponse { organizations: memberships.iter().map(organization).collect() })
    })
    .await
}

pub async fn create_organization(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::CreateOrganizationRequest>,
) -> Reply<pb::CreateOrganizationResponse> {
    api.audited("CreateOrganization", &caller, &request.slug, async {
        validate::dns_label("slug", &request.slug)?;
        let name = if request.name.is_empty() { request.slug.clone() } else { request.name.clone() };
        if name.len() > 200 || name.chars().any(char::is_control) {
            return Err(FieldError::new("name", "at most 200 characters, no control characters").into());
        }
        let membership = api.store.create_organization(&request.slug, &name, caller.user_id).await?;
        tracing::info!(organization = %request.slug, subject = %caller.subject, "organization created");
        Ok(pb::CreateOrganizationResponse { organization: Some(organization(&membership)) })
    })
    .await
}

pub async fn list_members(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(_request): ConnectRequest<pb::ListMembersRequest>,
) -> Reply<pb::ListMembersResponse> {
    api.observe("ListMembers", async {
        let members = api.store.tenant(caller.organization_id).list_members().await?;
        Ok(pb::ListMembersResponse { members: members.into_iter().map(member).collect() })
    })
    .await
}

pub async fn invite_member(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::InviteMemberRequest>,
) -> Reply<pb::InviteMemberResponse> {
    api.audited("InviteMember", &caller, &request.email, async {
        require(caller.role.can_manage_members(), "inviting members")?;
        let email = validate::email("email", &request.email)?;
        let role = role_name("role", request.role)?;
        require(role != "owner" || caller.role == Role::Owner, "inviting owners (owners only)")?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let record = api
            .store
            .tenant(caller.organization_id)
            .invite(
                &email,
                role,
                &caller.subject,
                &Sha256::digest(token.as_bytes()),
                chrono::Duration::days(INVITATION_VALID_DAYS),
            )
            .await?;
        Ok(pb::InviteMemberResponse { invitation: Some(invitation(record)), token })
    })
    .await
}

pub async fn list_invitations(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(_request): ConnectRequest<pb::ListInvitationsRequest>,
) -> Reply<pb::ListInvitationsResponse> {
    api.observe("ListInvitations", async {
        require(caller.role.can_manage_members(), "seeing invitations")?;
        let invitations = api.store.tenant(caller.organization_id).list_invitations().await?;
        Ok(pb::ListInvitationsResponse { invitations: invitations.into_iter().map(invitation).collect() })
    })
    .await
}

pub async fn revoke_invitation(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::RevokeInvitationRequest>,
) -> Reply<pb::RevokeInvitationResponse> {
    api.audited("RevokeInvitation", &caller, &request.id, async {
        require(caller.role.can_manage_members(), "revoking invitations")?;
        let id = parse_id("id", &request.id)?;
        api.store.tenant(caller.organization_id).revoke_invitation(id).await?;
        Ok(pb::RevokeInvitationResponse {})
    })
    .await
}

pub async fn accept_invitation(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::AcceptInvitationRequest>,
) -> Reply<pb::AcceptInvitationResponse> {
    api.audited("AcceptInvitation", &caller, "invitation", async {
        if request.token.is_empty() {
            return Err(FieldError::required("token").into());
        }
        let hash = Sha256::digest(request.token.trim().as_bytes());
        let membership = api.store.accept_invitation(&hash, caller.user_id, caller.email.as_deref()).await?;
        tracing::info!(organization = %membership.organization_slug, subject = %caller.subject, "invitation accepted");
        Ok(pb::AcceptInvitationResponse { organization: Some(organization(&membership)) })
    })
    .await
}

pub async fn set_member_role(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::SetMemberRoleRequest>,
) -> Reply<pb::SetMemberRoleResponse> {
    api.audited("SetMemberRole", &caller, &request.subject, async {
        require(caller.role.can_manage_members(), "changing roles")?;
        let subject = subject(&request.subject)?;
        let role = role_name("role", request.role)?;
        let record =
            api.store.tenant(caller.organization_id).set_member_role(subject, role, caller.role == Role::Owner).await?;
        Ok(pb::SetMemberRoleResponse { member: Some(member(record)) })
    })
    .await
}

pub async fn remove_member(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::RemoveMemberRequest>,
) -> Reply<pb::RemoveMemberResponse> {
    api.audited("RemoveMember", &caller, &request.subject, async {
        let subject = subject(&request.subject)?;
        // Anyone may leave; removing others is for owners and admins.
        require(subject == caller.subject || caller.role.can_manage_members(), "removing members")?;
        let by_owner = caller.role == Role::Owner;
        api.store.tenant(caller.organization_id).remove_member(subject, by_owner).await?;
        Ok(pb::RemoveMemberResponse {})
    })
    .await
}

pub async fn list_projects(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(_request): ConnectRequest<pb::ListProjectsRequest>,
) -> Reply<pb::ListProjectsResponse> {
    api.observe("ListProjects", async {
        let projects = api.store.tenant(caller.organization_id).list_projects().await?;
        Ok(pb::ListProjectsResponse { projects: projects.into_iter().map(project).collect() })
    })
    .await
}

pub async fn create_project(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::CreateProjectRequest>,
) -> Reply<pb::CreateProjectResponse> {
    api.audited("CreateProject", &caller, &request.name, async {
        require(caller.role.can_mutate(), "creating projects")?;
        validate::dns_label("name", &request.name)?;
        let record = api.store.tenant(caller.organization_id).create_project(&request.name).await?;
        Ok(pb::CreateProjectResponse { project: Some(project(record)) })
    })
    .await
}

pub async fn delete_project(
    State(api): State<ApiState>,
    caller: Caller,
    ConnectRequest(request): ConnectRequest<pb::DeleteProjectRequest>,
) -> Reply<pb::DeleteProjectResponse> {
    api.audited("DeleteProject", &caller, &request.id, async {
        require(caller.role.can_manage_members(), "deleting projects")?;
        let id: ProjectId = parse_id("id", &request.id)?;
        api.store.tenant(caller.organization_id).delete_project(id).await?;
        Ok(pb::DeleteProjectResponse {})
    })
    .await
}
