use flotilla_store::Store;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{DEFAULT_DATABASE_URL, block_on_cleanup, unique_suffix};

/// A PostgreSQL database made for one test and dropped after it.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub store: Store,
    admin_url: String,
}

impl TestDb {
    /// A fresh database with every migration applied.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        db.store.migrate().await.expect("migrating the test database");
        db
    }

    /// A fresh database with nothing in it.
    pub async fn empty() -> Self {
        let admin_url = std::env::var("FLOTILLA_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let name = format!("flotilla_test_{}", unique_suffix());
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot reach the test PostgreSQL at {admin_url}: {e}\nStart it with: scripts/dev-services.sh start")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let options: PgConnectOptions =
            admin_url.parse::<PgConnectOptions>().expect("test database URL").database(&name);
        let url = replace_database(&admin_url, &name);
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .expect("connecting to the test database");
        Self { name, url, store: Store::from_pool(pool), admin_url }
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let without_query = url.split('?').next().unwrap_or(url);
    match without_query.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{database}", &without_query[..i]),
        _ => format!("{without_query}/{database}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // The pool's connections belong to the test's runtime, which is blocked
        // in this drop: closing them here would deadlock. FORCE ends them.
        block_on_cleanup(async move {
            match PgConnection::connect(&admin_url).await {
                Ok(mut admin) => {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await {
                        eprintln!("test cleanup: dropping {name}: {e}");
                    }
                }
                Err(e) => eprintln!("test cleanup: dropping {name}: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(replace_database("postgres://u:p@h:1/flotilla", "t1"), "postgres://u:p@h:1/t1");
        assert_eq!(replace_database("postgres://u:p@h:1/flotilla?sslmode=disable", "t1"), "postgres://u:p@h:1/t1");
        assert_eq!(replace_database("postgres://u:p@h:1", "t1"), "postgres://u:p@h:1/t1");
    }
}
