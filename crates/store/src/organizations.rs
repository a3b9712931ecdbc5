//! Organizations, members, invitations and projects. What concerns one
//! organization is on [`Tenant`] (scoped in its SQL); creating an
//! organization and accepting an invitation act for a user across
//! organizations and are on [`Store`].
//!
//! Role rules that must hold under concurrency are checked inside the
//! transaction that changes the roles, with the organization's member rows
//! locked: only owners make or unmake owners, and the last owner stays.

use chrono::{DateTime, Utc};
use flotilla_types::{OrganizationId, ProjectId};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::error::unique_violation;
use crate::users::Membership;
use crate::{Store, StoreError, Tenant};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MemberRecord {
    pub subject: String,
    pub email: Option<String>,
    pub role: String,
    pub joined_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InvitationRecord {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub invited_by: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ProjectRecord {
    #[sqlx(try_from = "Uuid")]
    pub id: ProjectId,
    pub name: String,
    pub is_default: bool,
    pub deployment_count: i64,
}

const MEMBER_COLUMNS: &str = "u.subject, u.email, m.role, m.created_at AS joined_at";
const INVITATION_COLUMNS: &str = "id, email, role, invited_by, expires_at";

pub(crate) const MEMBERSHIP_QUERY: &str = "SELECT m.organization_id, o.slug AS organization_slug, \
     o.name AS organization_name, p.id AS default_project, m.role \
     FROM organization_members m \
     JOIN organizations o ON o.id = m.organization_id \
     JOIN projects p ON p.organization_id = m.organization_id AND p.is_default \
     WHERE m.user_id = $1";

impl Tenant<'_> {
    pub async fn list_members(&self) -> Result<Vec<MemberRecord>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MEMBER_COLUMNS} FROM organization_members m JOIN users u ON u.id = m.user_id \
             WHERE m.organization_id = $1 ORDER BY m.created_at, u.subject"
        )))
        .bind(self.organization_id.as_uuid())
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("listing members"))
    }

    /// A pending invitation of `email` with `role`, valid for `valid_for`.
    pub async fn invite(
        &self,
        email: &str,
        role: &str,
        invited_by: &str,
        token_sha256: &[u8],
        valid_for: chrono::Duration,
    ) -> Result<InvitationRecord, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO organization_invitations \
             (id, organization_id, email, role, token_sha256, invited_by, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, now() + $7) RETURNING {INVITATION_COLUMNS}"
        )))
        .bind(Uuid::now_v7())
        .bind(self.organization_id.as_uuid())
        .bind(email)
        .bind(role)
        .bind(token_sha256)
        .bind(invited_by)
        .bind(valid_for)
        .fetch_one(self.pool)
        .await
        .map_err(StoreError::db("inviting a member"))
    }

    /// Invitations neither accepted nor expired.
    pub async fn list_invitations(&self) -> Result<Vec<InvitationRecord>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {INVITATION_COLUMNS} FROM organization_invitations \
             WHERE organization_id = $1 AND accepted_at IS NULL AND expires_at > now() ORDER BY created_at"
        )))
        .bind(self.organization_id.as_uuid())
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("listing invitations"))
    }

    pub async fn revoke_invitation(&self, id: Uuid) -> Result<(), StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM organization_invitations WHERE id = $1 AND organization_id = $2 AND accepted_at IS NULL",
        )
        .bind(id)
        .bind(self.organization_id.as_uuid())
        .execute(self.pool)
        .await
        .map_err(StoreError::db("revoking an invitation"))?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound { entity: "invitation", id: id.to_string() });
        }
        Ok(())
    }

    /// Gives `subject` the role `role`. `by_owner`: whether the caller is an
    /// owner (only owners make or unmake owners).
    pub async fn set_member_role(&self, subject: &str, role: &str, by_owner: bool) -> Result<MemberRecord, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("changing a role"))?;
        let current = self.lock_member(&mut tx, subject).await?;
        check_owner_change(&mut tx, self.organization_id, &current, Some(role), by_owner).await?;
        let member = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE organization_members m SET role = $3 FROM users u \
             WHERE u.id = m.user_id AND m.organization_id = $1 AND u.subject = $2 RETURNING {MEMBER_COLUMNS}"
        )))
        .bind(self.organization_id.as_uuid())
        .bind(subject)
        .bind(role)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("changing a role"))?;
        tx.commit().await.map_err(StoreError::db("changing a role"))?;
        Ok(member)
    }

    /// Removes `subject` from the organization (same owner rules).
    pub async fn remove_member(&self, subject: &str, by_owner: bool) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("removing a member"))?;
        let current = self.lock_member(&mut tx, subject).await?;
        check_owner_change(&mut tx, self.organization_id, &current, None, by_owner).await?;
        sqlx::query(
            "DELETE FROM organization_members m USING users u \
             WHERE u.id = m.user_id AND m.organization_id = $1 AND u.subject = $2",
        )
        .bind(self.organization_id.as_uuid())
        .bind(subject)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("removing a member"))?;
        tx.commit().await.map_err(StoreError::db("removing a member"))
    }

    /// Locks every member row of the organization (role changes serialize
    /// on it) and returns `subject`'s.
    async fn lock_member(&self, tx: &mut Transaction<'_, Postgres>, subject: &str) -> Result<MemberRecord, StoreError> {
        let members: Vec<MemberRecord> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MEMBER_COLUMNS} FROM organization_members m JOIN users u ON u.id = m.user_id \
             WHERE m.organization_id = $1 ORDER BY m.user_id FOR UPDATE OF m"
        )))
        .bind(self.organization_id.as_uuid())
        .fetch_all(&mut **tx)
        .await
        .map_err(StoreError::db("reading members"))?;
        members
            .into_iter()
            .find(|m| m.subject == subject)
            .ok_or_else(|| StoreError::NotFound { entity: "member", id: subject.to_owned() })
    }

    pub async fn list_projects(&self) -> Result<Vec<ProjectRecord>, StoreError> {
        sqlx::query_as(
            "SELECT p.id, p.name, p.is_default, \
             (SELECT count(*) FROM deployments d WHERE d.project_id = p.id) AS deployment_count \
             FROM projects p WHERE p.organization_id = $1 ORDER BY p.is_default DESC, p.name",
        )
        .bind(self.organization_id.as_uuid())
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("listing projects"))
    }

    pub async fn create_project(&self, name: &str) -> Result<ProjectRecord, StoreError> {
        sqlx::query_as(
            "INSERT INTO projects (id, organization_id, name) VALUES ($1, $2, $3) \
             RETURNING id, name, is_default, 0::bigint AS deployment_count",
        )
        .bind(ProjectId::new().as_uuid())
        .bind(self.organization_id.as_uuid())
        .bind(name)
        .fetch_one(self.pool)
        .await
        .map_err(|error| match unique_violation(&error) {
            Some(_) => StoreError::AlreadyExists { what: format!("project {name:?}") },
            None => StoreError::db("creating a project")(error),
        })
    }

    /// Deletes an empty project that is not the default one.
    pub async fn delete_project(&self, id: ProjectId) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("deleting a project"))?;
        let found: Option<(bool,)> =
            sqlx::query_as("SELECT is_default FROM projects WHERE id = $1 AND organization_id = $2 FOR UPDATE")
                .bind(id.as_uuid())
                .bind(self.organization_id.as_uuid())
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db("deleting a project"))?;
        let Some((is_default,)) = found else {
            return Err(StoreError::NotFound { entity: "project", id: id.to_string() });
        };
        if is_default {
            return Err(StoreError::FailedPrecondition { what: "the default project cannot be deleted".to_owned() });
        }
        // Deployments reference the project: a deployment created meanwhile
        // makes this fail on the foreign key rather than vanish.
        let deployments: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments WHERE project_id = $1")
            .bind(id.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db("deleting a project"))?;
        if deployments > 0 {
            return Err(StoreError::FailedPrecondition {
                what: format!("the project still has {deployments} deployment(s); delete them first"),
            });
        }
        sqlx::query("DELETE FROM projects WHERE id = $1 AND organization_id = $2")
            .bind(id.as_uuid())
            .bind(self.organization_id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("deleting a project"))?;
        tx.commit().await.map_err(StoreError::db("deleting a project"))
    }
}

/// Refuses a change of `current` to `new_role` (`None`: removal) that only
/// an owner may make, or that would leave the organization without an owner.
async fn check_owner_change(
    tx: &mut Transaction<'_, Postgres>,
    organization: OrganizationId,
    current: &MemberRecord,
    new_role: Option<&str>,
    by_owner: bool,
) -> Result<(), StoreError> {
    let touches_owner = current.role == "owner" || new_role == Some("owner");
    if touches_owner && !by_owner {
        return Err(StoreError::Forbidden { what: "only owners can make or change owners".to_owned() });
    }
    if current.role == "owner" && new_role != Some("owner") {
        let owners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM organization_members WHERE organization_id = $1 AND role = 'owner'",
        )
        .bind(organization.as_uuid())
        .fetch_one(&mut **tx)
        .await
        .map_err(StoreError::db("counting owners"))?;
        if owners <= 1 {
            return Err(StoreError::FailedPrecondition {
                what: "an organization keeps at least one owner: make someone else owner first".to_owned(),
            });
        }
    }
    Ok(())
}

impl Store {
    /// Every organization `user` belongs to, oldest membership first.
    pub async fn memberships(&self, user: Uuid) -> Result<Vec<Membership>, StoreError> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{MEMBERSHIP_QUERY} ORDER BY m.created_at, o.slug")))
            .bind(user)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::db("reading memberships"))
    }

    /// A new organization with a default project, owned by `owner`.
    pub async fn create_organization(&self, slug: &str, name: &str, owner: Uuid) -> Result<Membership, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("creating an organization"))?;
        let organization = OrganizationId::new();
        insert_organization(&mut tx, organization, slug, name, owner).await?;
        let membership = sqlx::query_as(sqlx::AssertSqlSafe(format!("{MEMBERSHIP_QUERY} AND m.organization_id = $2")))
            .bind(owner)
            .bind(organization.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db("creating an organization"))?;
        tx.commit().await.map_err(StoreError::db("creating an organization"))?;
        Ok(membership)
    }

    /// Joins `user` (whose verified email is `email`) to the organization of
    /// the pending invitation whose token hashes to `token_sha256`. An
    /// unknown, used or expired token, or another person's, is not found.
    pub async fn accept_invitation(
        &self,
        token_sha256: &[u8],
        user: Uuid,
        email: Option<&str>,
    ) -> Result<Membership, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("accepting an invitation"))?;
        let invitation: Option<(Uuid, Uuid, String, String)> = sqlx::query_as(
            "SELECT id, organization_id, email, role FROM organization_invitations \
             WHERE token_sha256 = $1 AND accepted_at IS NULL AND expires_at > now() FOR UPDATE",
        )
        .bind(token_sha256)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::db("accepting an invitation"))?;
        let not_found = || StoreError::NotFound { entity: "invitation", id: "with this token".to_owned() };
        let (id, organization, invited, role) = invitation.ok_or_else(not_found)?;
        if !email.is_some_and(|email| email.eq_ignore_ascii_case(&invited)) {
            return Err(not_found());
        }
        let inserted = sqlx::query(
            "INSERT INTO organization_members (organization_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(organization)
        .bind(user)
        .bind(&role)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("accepting an invitation"))?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists { what: "membership of this organization".to_owned() });
        }
        sqlx::query("UPDATE organization_invitations SET accepted_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("accepting an invitation"))?;
        let membership = sqlx::query_as(sqlx::AssertSqlSafe(format!("{MEMBERSHIP_QUERY} AND m.organization_id = $2")))
            .bind(user)
            .bind(organization)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::db("accepting an invitation"))?;
        tx.commit().await.map_err(StoreError::db("accepting an invitation"))?;
        Ok(membership)
    }
}

/// Inserts an organization, its default project and its owner.
pub(crate) async fn insert_organization(
    tx: &mut Transaction<'_, Postgres>,
    organization: OrganizationId,
    slug: &str,
    name: &str,
    owner: Uuid,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO organizations (id, slug, name) VALUES ($1, $2, $3)")
        .bind(organization.as_uuid())
        .bind(slug)
        .bind(name)
        .execute(&mut **tx)
        .await
        .map_err(|error| match unique_violation(&error) {
            Some(_) => StoreError::AlreadyExists { what: format!("organization {slug:?}") },
            None => StoreError::db("creating an organization")(error),
        })?;
    sqlx::query("INSERT INTO projects (id, organization_id, name, is_default) VALUES ($1, $2, 'default', true)")
        .bind(ProjectId::new().as_uuid())
        .bind(organization.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db("creating a default project"))?;
    sqlx::query("INSERT INTO organization_members (organization_id, user_id, role) VALUES ($1, $2, 'owner')")
        .bind(organization.as_uuid())
        .bind(owner)
        .execute(&mut **tx)
        .await
        .map_err(StoreError::db("making the creator owner"))?;
    Ok(())
}
