use sqlx::error::DatabaseError;

/// Errors of the control database layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },

    #[error("{what} already exists")]
    AlreadyExists { what: String },

    /// An idempotency key sent again with a different request.
    #[error("idempotency key {key:?} was used for a different request")]
    IdempotencyKeyReused { key: String },

    /// The row is not in a state that allows the operation.
    #[error("{what}")]
    FailedPrecondition { what: String },

    /// The caller's role does not allow this change.
    #[error("{what}")]
    Forbidden { what: String },

    /// Optimistic concurrency: the row changed since it was read.
    #[error("{what}")]
    Conflict { what: String },

    /// The database could not be reached; the caller may retry.
    #[error("database unavailable during {operation}: {source}")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },

    #[error("database error during {operation}: {source}")]
    Database {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// A row holds something this version cannot read back.
    #[error("unreadable {table} row {id}: {detail}")]
    Corrupt { table: &'static str, id: String, detail: String },

    /// A write fenced by the orchestrator's lease found the lease gone:
    /// another replica leads now.
    #[error("not the leader: the orchestrator lease (term {term}) is held by another replica or expired")]
    NotLeader { term: i64 },

    #[error("migrating the control database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Maps a sqlx error for `operation`, telling an unreachable database
    /// apart from a failed statement.
    pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| match source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Self::Unavailable { operation, source },
            source if fails_over(&source) => Self::Unavailable { operation, source },
            source => Self::Database { operation, source },
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// What a server says while the cluster fails over (docs/data.md): a
/// standby still finishing its promotion refuses writes (25006), a member
/// shutting down or starting up refuses work (57P01-57P03). Retrying
/// moments later succeeds, so these are unavailability, not failures.
fn fails_over(error: &sqlx::Error) -> bool {
    const FAIL_OVER_STATES: [&str; 4] = ["25006", "57P01", "57P02", "57P03"];
    error.as_database_error().and_then(|db| db.code()).is_some_and(|code| FAIL_OVER_STATES.contains(&code.as_ref()))
}

/// The violated constraint's name, when `error` is a unique violation.
pub(crate) fn unique_violation(error: &sqlx::Error) -> Option<&str> {
    let db: &dyn DatabaseError = error.as_database_error()?;
    if db.is_unique_violation() { db.constraint() } else { None }
}
