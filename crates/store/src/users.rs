//! Users and their memberships. A user is created the first time the API
//! sees a valid token of theirs, with a personal organization they own, so a
//! newcomer can deploy at once; other organizations invite them.

use flotilla_types::{OrganizationId, ProjectId};
use uuid::Uuid;

use crate::organizations::{MEMBERSHIP_QUERY, insert_organization};
use crate::{Store, StoreError};

/// A user's place in one organization.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Membership {
    #[sqlx(try_from = "Uuid")]
    pub organization_id: OrganizationId,
    pub organization_slug: String,
    pub organization_name: String,
    #[sqlx(try_from = "Uuid")]
    pub default_project: ProjectId,
    /// owner, admin, member or viewer.
    pub role: String,
}

/// A user as the API knows them after a token was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    pub user_id: Uuid,
    /// Whether this sign-in created the user (and its personal organization).
    pub created: bool,
    /// Oldest first: the personal organization leads.
    pub memberships: Vec<Membership>,
}

impl Store {
    /// The user with this subject and their memberships; on first sight the
    /// user is created with a personal organization they own. Concurrent
    /// first requests of one user create one user and one organization: the
    /// upsert locks the user's row until the transaction ends.
    pub async fn sign_in(&self, subject: &str, email: Option<&str>) -> Result<SignedIn, StoreError> {
        let failed = StoreError::db("signing a user in");
        let mut tx = self.pool.begin().await.map_err(failed)?;
        let (user_id, created): (Uuid, bool) = sqlx::query_as(
            "INSERT INTO users (id, subject, email) VALUES ($1, $2, $3) \
             ON CONFLICT (subject) DO UPDATE SET email = COALESCE(EXCLUDED.email, users.email), \
             last_seen_at = now() \
             RETURNING id, (xmax = 0)",
        )
        .bind(Uuid::now_v7())
        .bind(subject)
        .bind(email)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("signing a user in"))?;
        if created {
            let slug = personal_slug(email.unwrap_or(subject), Uuid::new_v4());
            let organization = OrganizationId::new();
            insert_organization(&mut tx, organization, &slug, email.unwrap_or(subject), user_id).await?;
        }
        let memberships =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("{MEMBERSHIP_QUERY} ORDER BY m.created_at, o.slug")))
                .bind(user_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::db("reading a user's memberships"))?;
        tx.commit().await.map_err(StoreError::db("signing a user in"))?;
        Ok(SignedIn { user_id, created, memberships })
    }
}

impl Store {
    /// Makes `subject` (created if new, without a personal organization) a
    /// member of `organization` with `role`; returns the user's id. For the
    /// development mode's single user.
    pub async fn ensure_member(
        &self,
        organization: OrganizationId,
        subject: &str,
        role: &str,
    ) -> Result<Uuid, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("adding a member"))?;
        let user: Uuid = sqlx::query_scalar(
            "INSERT INTO users (id, subject) VALUES ($1, $2)              ON CONFLICT (subject) DO UPDATE SET last_seen_at = now() RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(subject)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db("adding a member"))?;
        sqlx::query(
            "INSERT INTO organization_members (organization_id, user_id, role) VALUES ($1, $2, $3)              ON CONFLICT (organization_id, user_id) DO UPDATE SET role = EXCLUDED.role",
        )
        .bind(organization.as_uuid())
        .bind(user)
        .bind(role)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("adding a member"))?;
        tx.commit().await.map_err(StoreError::db("adding a member"))?;
        Ok(user)
    }
}

/// An organization slug for a newcomer: their email's local part or subject,
/// reduced to what a slug allows, and a random suffix that keeps it unique.
fn personal_slug(name: &str, random: Uuid) -> String {
    let local = name.split('@').next().unwrap_or(name);
    let mut base: String = local
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    base.truncate(40);
    let base = base.trim_end_matches('-');
    let suffix = &random.simple().to_string()[..8];
    if base.is_empty() { format!("user-{suffix}") } else { format!("{base}-{suffix}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_slugs_fit_the_slug_rule() {
        let rule = |s: &str| {
            s.len() <= 63
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        let random = Uuid::new_v4();
        for name in ["alice@example.com", "Bob.Smith+x@corp", "--", "", "ünïcødé", &"a".repeat(200), "a-----b"] {
            let slug = personal_slug(name, random);
            assert!(rule(&slug), "{name:?} gave {slug:?}");
        }
        assert!(personal_slug("alice@example.com", random).starts_with("alice-"));
        assert!(personal_slug("Bob.Smith+x@corp", random).starts_with("bob-smith-x-"));
    }
}
