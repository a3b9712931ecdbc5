//! Queries run on behalf of users. Every statement here filters on the
//! organization the [`Tenant`] was made for: another organization's rows are
//! simply not found.

use std::collections::HashMap;

use flotilla_types::{DeploymentId, DeploymentSpec, DesiredState, NodeId, OrganizationId, ProjectId};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use crate::audit::AuditRecord;
use crate::error::unique_violation;
use crate::models::{DEPLOYMENT_COLUMNS, DeploymentRow, REPLICA_COLUMNS, ReplicaRow, collect};
use crate::{DeploymentRecord, DeploymentView, ReplicaRecord, StoreError};

/// The largest page [`Tenant::list_deployments`] returns.
pub const MAX_PAGE_SIZE: i64 = 500;

/// One organization's view of the control database.
#[derive(Debug, Clone, Copy)]
pub struct Tenant<'a> {
    pub(crate) pool: &'a PgPool,
    pub(crate) organization_id: OrganizationId,
}

/// What [`Tenant::create_deployment_once`] did.
#[derive(Debug)]
pub enum CreatedOnce {
    /// The key was new: the deployment was created now.
    Created(DeploymentRecord),
    /// The key was known: the deployment the first request created, as it is now.
    Replayed(DeploymentView),
}

/// A page of deployments and where the next one starts.
#[derive(Debug, Clone)]
pub struct DeploymentPage {
    pub deployments: Vec<DeploymentView>,
    pub next_after: Option<DeploymentId>,
}

impl<'a> Tenant<'a> {
    pub(crate) fn new(pool: &'a PgPool, organization_id: OrganizationId) -> Self {
        Self { pool, organization_id }
    }

    pub fn organization_id(&self) -> OrganizationId {
        self.organization_id
    }

    /// The organization's latest audit entries, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query_as(
            "SELECT at, subject, method, target, code, message FROM audit_log \
             WHERE organization_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
        )
        .bind(self.organization_id.as_uuid())
        .bind(limit)
        .fetch_all(self.pool)
        .await
        .map_err(StoreError::db("reading the audit log"))
    }

    /// The project a request names, or the organization's default project.
    pub async fn resolve_project(&self, project: Option<ProjectId>) -> Result<ProjectId, StoreError> {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM projects WHERE organization_id = $1 \
             AND CASE WHEN $2::uuid IS NULL THEN is_default ELSE id = $2 END",
        )
        .bind(self.organization_id.as_uuid())
        .bind(project.map(|p| p.as_uuid()))
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("resolving a project"))?;
        id.map(ProjectId::from).ok_or_else(|| StoreError::NotFound {
            entity: "project",
            id: project.map_or_else(|| "(default)".to_owned(), |p| p.to_string()),
        })
    }

    /// Persists a new deployment's desired state.
    pub async fn create_deployment(
        &self,
        project: Option<ProjectId>,
        spec: &DeploymentSpec,
    ) -> Result<DeploymentRecord, StoreError> {
        let project_id = self.resolve_project(project).await?;
        self.insert_deployment(self.pool, DeploymentId::new(), project_id, spec).await
    }

    /// Creates a deployment once per idempotency key of `subject`: a retry
    /// with the same key and request gets the deployment the first one
    /// created, as it is now; the same key with another request is refused.
    /// A retry racing the first waits for it on the key's row.
    pub async fn create_deployment_once(
        &self,
        project: Option<ProjectId>,
        spec: &DeploymentSpec,
        subject: &str,
        key: &str,
    ) -> Result<CreatedOnce, StoreError> {
        let op = "creating a deployment";
        let project_id = self.resolve_project(project).await?;
        // The request as validated, with everything that makes it this request.
        let request = serde_json::to_string(&(project_id, spec)).map_err(|e| StoreError::Corrupt {
            table: "idempotency_keys",
            id: key.to_owned(),
            detail: e.to_string(),
        })?;
        let id = DeploymentId::new();
        let mut tx = self.pool.begin().await.map_err(StoreError::db(op))?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (organization_id, subject, key, request_digest, deployment_id) \
             VALUES ($1, $2, $3, sha256(convert_to($4, 'UTF8')), $5) ON CONFLICT DO NOTHING",
        )
        .bind(self.organization_id.as_uuid())
        .bind(subject)
        .bind(key)
        .bind(&request)
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db(op))?
        .rows_affected()
            == 1;
        if claimed {
            let record = self.insert_deployment(&mut *tx, id, project_id, spec).await?;
            tx.commit().await.map_err(StoreError::db(op))?;
            return Ok(CreatedOnce::Created(record));
        }
        let (same, first): (bool, Uuid) = sqlx::query_as(
            "SELECT request_digest = sha256(convert_to($4, 'UTF8')), deployment_id FROM idempotency_keys \
             WHERE organization_id = $1 AND subject = $2 AND key = $3",
        )
        .bind(self.organization_id.as_uuid())
        .bind(subject)
        .bind(key)
        .bind(&request)
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::db(op))?;
        tx.rollback().await.map_err(StoreError::db(op))?;
        if !same {
            return Err(StoreError::IdempotencyKeyReused { key: key.to_owned() });
        }
        Ok(CreatedOnce::Replayed(self.get_deployment(first.into()).await?))
    }

    async fn insert_deployment(
        &self,
        executor: impl sqlx::PgExecutor<'_>,
        id: DeploymentId,
        project_id: ProjectId,
        spec: &DeploymentSpec,
    ) -> Result<DeploymentRecord, StoreError> {
        let sql = format!(
            "INSERT INTO deployments (id, organization_id, project_id, name, image, container_port, env, domain, \
             memory_limit_bytes, cpu_limit_millis, replicas, restart_policy, health_check, network_mode, \
             placement_strategy, placement_constraints, path_prefix, node_loss) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
             RETURNING {DEPLOYMENT_COLUMNS}"
        );
        let row: DeploymentRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.as_uuid())
            .bind(self.organization_id.as_uuid())
            .bind(project_id.as_uuid())
            .bind(&spec.name)
            .bind(spec.image.as_str())
            .bind(i32::from(spec.port))
            .bind(Json(&spec.env))
            .bind(spec.domain.as_ref().map(|d| d.as_str()))
            .bind(spec.limits.memory_bytes)
            .bind(spec.limits.cpu_millis)
            .bind(spec.replicas as i32)
            .bind(Json(&spec.restart_policy))
            .bind(Json(&spec.health_check))
            .bind(spec.network_mode.as_str())
            .bind(spec.placement.strategy.map(|s| s.as_str()))
            .bind(Json(spec.placement.constraints.as_map()))
            .bind(spec.path_prefix.as_str())
            .bind(spec.placement.node_loss.as_str())
            .fetch_one(executor)
            .await
            .map_err(|e| claim_error(e, spec, "creating a deployment"))?;
        row.try_into()
    }

    /// Replaces a deployment's spec, provided it is still at `generation`
    /// (another change in between is `Conflict`). The generation goes up when
    /// the change needs new containers, so agents roll replicas over to it;
    /// a replica count alone does not. Returns the new record.
    pub async fn update_deployment(
        &self,
        id: DeploymentId,
        generation: i64,
        spec: &DeploymentSpec,
        new_generation: bool,
    ) -> Result<DeploymentRecord, StoreError> {
        let sql = format!(
            "UPDATE deployments SET image = $4, container_port = $5, env = $6, domain = $7, memory_limit_bytes = $8, \
             cpu_limit_millis = $9, replicas = $10, restart_policy = $11, health_check = $12, network_mode = $13, \
             generation = generation + CASE WHEN $14 THEN 1 ELSE 0 END, placement_strategy = $15, \
             placement_constraints = $16, path_prefix = $17, node_loss = $18, updated_at = now() \
             WHERE organization_id = $1 AND id = $2 AND generation = $3 AND desired_state <> 'deleted' \
             RETURNING {DEPLOYMENT_COLUMNS}"
        );
        let row: Option<DeploymentRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(self.organization_id.as_uuid())
            .bind(id.as_uuid())
            .bind(generation)
            .bind(spec.image.as_str())
            .bind(i32::from(spec.port))
            .bind(Json(&spec.env))
            .bind(spec.domain.as_ref().map(|d| d.as_str()))
            .bind(spec.limits.memory_bytes)
            .bind(spec.limits.cpu_millis)
            .bind(spec.replicas as i32)
            .bind(Json(&spec.restart_policy))
            .bind(Json(&spec.health_check))
            .bind(spec.network_mode.as_str())
            .bind(new_generation)
            .bind(spec.placement.strategy.map(|s| s.as_str()))
            .bind(Json(spec.placement.constraints.as_map()))
            .bind(spec.path_prefix.as_str())
            .bind(spec.placement.node_loss.as_str())
            .fetch_optional(self.pool)
            .await
            .map_err(|e| claim_error(e, spec, "updating a deployment"))?;
        match row {
            Some(row) => row.try_into(),
            None => {
                // Gone, deleted, or changed by someone else meanwhile.
                let current = self.get_deployment(id).await?;
                if current.deployment.desired_state == DesiredState::Deleted {
                    Err(StoreError::NotFound { entity: "deployment", id: id.to_string() })
                } else {
                    Err(StoreError::Conflict {
                        what: format!(
                            "deployment {id} changed meanwhile (now generation {})",
                            current.deployment.generation
                        ),
                    })
                }
            }
        }
    }

    /// Starts a new generation of a running deployment without changing its
    /// spec: every replica is replaced start-first. `Conflict` when it is
    /// not running.
    pub async fn restart_deployment(&self, id: DeploymentId) -> Result<DeploymentView, StoreError> {
        let state: Option<String> = sqlx::query_scalar(
            "WITH found AS (SELECT desired_state FROM deployments \
             WHERE organization_id = $1 AND id = $2 AND desired_state <> 'deleted'), \
             bumped AS (UPDATE deployments SET generation = generation + 1, updated_at = now() \
             WHERE organization_id = $1 AND id = $2 AND desired_state = 'running' RETURNING id) \
             SELECT desired_state FROM found",
        )
        .bind(self.organization_id.as_uuid())
        .bind(id.as_uuid())
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("restarting a deployment"))?;
        match state.as_deref() {
            None => Err(StoreError::NotFound { entity: "deployment", id: id.to_string() }),
            Some("running") => self.get_deployment(id).await,
            Some(other) => {
                Err(StoreError::FailedPrecondition { what: format!("deployment {id} is {other}; start it instead") })
            }
        }
    }

    /// Starts or stops a deployment without changing its spec.
    pub async fn set_desired_state(
        &self,
        id: DeploymentId,
        desired: DesiredState,
    ) -> Result<DeploymentView, StoreError> {
        if desired == DesiredState::Deleted {
            return self.delete_deployment(id).await;
        }
        let updated = sqlx::query(
            "UPDATE deployments SET desired_state = $3, updated_at = now() \
             WHERE organization_id = $1 AND id = $2 AND desired_state <> 'deleted'",
        )
        .bind(self.organization_id.as_uuid())
        .bind(id.as_uuid())
        .bind(desired.as_str())
        .execute(self.pool)
        .await
        .map_err(StoreError::db("starting or stopping a deployment"))?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound { entity: "deployment", id: id.to_string() });
        }
        self.get_deployment(id).await
    }

    /// The id of the deployment called `name` in `project` (default: the
    /// organization's default project).
    pub async fn deployment_named(&self, project: Option<ProjectId>, name: &str) -> Result<DeploymentId, StoreError> {
        let project_id = self.resolve_project(project).await?;
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM deployments WHERE organization_id = $1 AND project_id = $2 AND name = $3",
        )
        .bind(self.organization_id.as_uuid())
        .bind(project_id.as_uuid())
        .bind(name)
        .fetch_optional(self.pool)
        .await
        .map_err(StoreError::db("finding a deployment by name"))?;
        id.map(DeploymentId::from).ok_or_else(|| StoreError::NotFound { entity: "deployment", id: name.to_owned() })
    }

    pub async fn get_deployment(&self, id: DeploymentId) -> Result<DeploymentView, StoreError> {
        let sql = format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE organization_id = $1 AND id = $2");
        let row: Option<DeploymentRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(self.organization_id.as_uuid())
            .bind(id.as_uuid())
            .fetch_optional(self.pool)
            .await
            .map_err(StoreError::db("reading a deployment"))?;
        let deployment: DeploymentRecord =
            row.ok_or_else(|| StoreError::NotFound { entity: "deployment", id: id.to_string() })?.try_into()?;
        let mut replicas = self.replicas_of(&[id]).await?;
        Ok(DeploymentView { deployment, replicas: replicas.remove(&id).unwrap_or_default() })
    }

    /// Deployments in id order (ids are time-ordered), `limit` at a time,
    /// starting after `after`.
    pub async fn list_deployments(
        &self,
        project: Option<ProjectId>,
        node: Option<&NodeId>,
        after: Option<DeploymentId>,
        limit: i64,
    ) -> Result<DeploymentPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE_SIZE);
        let sql = format!(
            "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d WHERE organization_id = $1 \
             AND ($2::uuid IS NULL OR project_id = $2) AND ($3::uuid IS NULL OR id > $3) \
             AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM deployment_locations l \
             WHERE l.deployment_id = d.id AND l.node_id = $5)) \
             ORDER BY id LIMIT $4"
        );
        let rows: Vec<DeploymentRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(self.organization_id.as_uuid())
            .bind(project.map(|p| p.as_uuid()))
            .bind(after.map(|a| a.as_uuid()))
            .bind(limit + 1)
            .bind(node.map(NodeId::as_str))
            .fetch_all(self.pool)
            .await
            .map_err(StoreError::db("listing deployments"))?;
        let mut records: Vec<DeploymentRecord> = collect(rows)?;
        let next_after = if records.len() as i64 > limit {
            records.truncate(limit as usize);
            records.last().map(|d| d.id)
        } else {
            None
        };
        let ids: Vec<DeploymentId> = records.iter().map(|d| d.id).collect();
        let mut replicas = self.replicas_of(&ids).await?;
        let deployments = records
            .into_iter()
            .map(|deployment| DeploymentView {
                replicas: replicas.remove(&deployment.id).unwrap_or_default(),
                deployment,
            })
            .collect();
        Ok(DeploymentPage { deployments, next_after })
    }

    /// Marks a deployment deleted. Its routes go at once, in the same
    /// transaction, so no new traffic is sent to it and its domain is free;
    /// its agents then remove the containers and placement rows, and the
    /// orchestrator removes the deployment row last. Deleting twice is fine.
    pub async fn delete_deployment(&self, id: DeploymentId) -> Result<DeploymentView, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::db("deleting a deployment"))?;
        let updated = sqlx::query(
            "UPDATE deployments SET desired_state = 'deleted', \
             generation = generation + CASE WHEN desired_state = 'deleted' THEN 0 ELSE 1 END, updated_at = now() \
             WHERE organization_id = $1 AND id = $2",
        )
        .bind(self.organization_id.as_uuid())
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(StoreError::db("deleting a deployment"))?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound { entity: "deployment", id: id.to_string() });
        }
        sqlx::query("DELETE FROM deployment_routing WHERE deployment_id = $1")
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db("deleting a deployment's routes"))?;
        tx.commit().await.map_err(StoreError::db("deleting a deployment"))?;
        self.get_deployment(id).await
    }

    /// Replicas of the given deployments, which must belong to this tenant
    /// (the join re-checks it).
    async fn replicas_of(&self, ids: &[DeploymentId]) -> Result<HashMap<DeploymentId, Vec<ReplicaRecord>>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let uuids: Vec<Uuid> = ids.iter().map(|d| d.as_uuid()).collect();
        let sql = format!(
            "SELECT {REPLICA_COLUMNS} FROM deployment_locations l JOIN deployments d ON d.id = l.deployment_id \
             WHERE d.organization_id = $1 AND l.deployment_id = ANY($2) ORDER BY l.deployment_id, l.replica_index"
        );
        let rows: Vec<ReplicaRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(self.organization_id.as_uuid())
            .bind(&uuids)
            .fetch_all(self.pool)
            .await
            .map_err(StoreError::db("reading replicas"))?;
        let mut by_deployment: HashMap<DeploymentId, Vec<ReplicaRecord>> = HashMap::new();
        for replica in collect::<_, ReplicaRecord>(rows)? {
            by_deployment.entry(replica.deployment_id).or_default().push(replica);
        }
        Ok(by_deployment)
    }
}

/// Maps a unique violation of a deployment's name or domain.
fn claim_error(error: sqlx::Error, spec: &DeploymentSpec, operation: &'static str) -> StoreError {
    match unique_violation(&error) {
        Some("deployments_project_id_name_key") => {
            StoreError::AlreadyExists { what: format!("a deployment named {:?} in this project", spec.name) }
        }
        Some("deployments_domain_claim") => StoreError::AlreadyExists {
            what: format!(
                "a deployment with domain {:?} and path prefix {:?}",
                spec.domain.as_ref().map(|d| d.as_str()).unwrap_or_default(),
                spec.path_prefix.as_str()
            ),
        },
        _ => StoreError::db(operation)(error),
    }
}

/// Creates an organization and its default project unless they exist, and
/// returns their ids. Used for the single-tenant development setup.
pub async fn ensure_organization(
    pool: &PgPool,
    slug: &str,
    name: &str,
) -> Result<(OrganizationId, ProjectId), StoreError> {
    let mut tx = pool.begin().await.map_err(StoreError::db("creating an organization"))?;
    let org: Uuid = sqlx::query_scalar(
        "INSERT INTO organizations (id, slug, name) VALUES ($1, $2, $3) \
         ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug RETURNING id",
    )
    .bind(OrganizationId::new().as_uuid())
    .bind(slug)
    .bind(name)
    .fetch_one(&mut *tx)
    .await
    .map_err(StoreError::db("creating an organization"))?;
    let project: Uuid = sqlx::query_scalar(
        "INSERT INTO projects (id, organization_id, name, is_default) VALUES ($1, $2, 'default', true) \
         ON CONFLICT (organization_id, name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .bind(ProjectId::new().as_uuid())
    .bind(org)
    .fetch_one(&mut *tx)
    .await
    .map_err(StoreError::db("creating a default project"))?;
    tx.commit().await.map_err(StoreError::db("creating an organization"))?;
    Ok((org.into(), project.into()))
}
