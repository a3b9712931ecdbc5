//! A point-in-time restore of the control database, by the data plane's own
//! backup and restore code (images/data/flotilla-data `backup` and
//! `restore`, the ones the stack runs) on a real PostgreSQL: back up, make
//! changes, lose the server, restore to a moment between the changes, and
//! the platform's data is exactly that moment's.
//!
//! The server is one this test makes (initdb, WAL archived to a folder like
//! the members' archive_command does), from the same Debian PostgreSQL 15
//! as the data image; Patroni's part of a restore (its custom bootstrap
//! runs the same `restore`) is in docs/data.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_store::tenant::ensure_organization;
use flotilla_store::{Store, StoreConfig};
use flotilla_test_utils::{free_port, unique_suffix, wait_until};
use flotilla_types::{DeploymentSpec, DeploymentSpecInput, DesiredState, OrganizationId};

/// The PostgreSQL server binaries: FLOTILLA_PG_BIN, else Debian's newest.
fn pg_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("FLOTILLA_PG_BIN") {
        return bin.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries in /usr/lib/postgresql (scripts/dev-services.sh installs them)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

/// Runs `program args` as the `postgres` user when root (the server refuses
/// to run as root), with `env`; panics with its output if it fails.
fn run_as_postgres(program: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    try_as_postgres(program, args, env).unwrap_or_else(|e| panic!("{e}"))
}

fn try_as_postgres(program: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let output = command.args(args).envs(env.iter().map(|(k, v)| (k, v))).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(format!("{} {args:?} failed: {text}", program.display())) }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn give_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("chown");
        assert!(status.success());
    }
}

/// The data plane's script, as the image runs it, copied into `folder`
/// (the `postgres` user, which runs it as Patroni does, may not read the
/// source tree).
fn flotilla_data(folder: &Path) -> PathBuf {
    let copy = folder.join("flotilla-data");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/data/flotilla-data"), &copy).unwrap();
    copy
}

/// A PostgreSQL server of this test's own, stopped and removed on drop.
struct Server {
    data: PathBuf,
    port: u16,
}

impl Server {
    fn start(data: &Path, port: u16, log: &Path) -> Self {
        let server = Self { data: data.to_owned(), port };
        let options = format!("-p {port} -k /tmp -c listen_addresses=127.0.0.1");
        let started = try_as_postgres(
            &pg_bin().join("pg_ctl"),
            &["-D", path(data), "-l", path(log), "-o", &options, "-w", "-t", "120", "start"],
            &[],
        );
        if let Err(error) = started {
            panic!("{error}\nits log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        server
    }

    fn url(&self, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/flotilla", self.port)
    }

    /// Stops it at once, as a lost node does.
    fn kill(&self) {
        let _ =
            try_as_postgres(&pg_bin().join("pg_ctl"), &["-D", path(&self.data), "-m", "immediate", "-w", "stop"], &[]);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

async fn deployment(store: &Store, org: OrganizationId, name: &str) -> flotilla_types::DeploymentId {
    let spec = DeploymentSpec::validate(DeploymentSpecInput {
        name: name.into(),
        image: "flotilla/demo-http:latest".into(),
        port: 8080,
        ..Default::default()
    })
    .unwrap();
    store.tenant(org).create_deployment(None, &spec).await.unwrap().id
}

async fn connect(url: &str) -> Store {
    let config = StoreConfig { max_connections: 2, ..StoreConfig::new(url) };
    wait_until("the database answering", Duration::from_secs(60), || async {
        let store = Store::connect_lazy(&config).ok()?;
        store.ping().await.ok().map(|_| store)
    })
    .await
}

/// Removes the test's folder however the test ends.
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_restore_to_a_moment_brings_back_the_platform_as_it_was_then() {
    let root = Folder(std::env::temp_dir().join(format!("flotilla-restore-{}", unique_suffix())));
    let (data, restored, backups, secrets, log) = (
        root.0.join("data"),
        root.0.join("restored"),
        root.0.join("backups"),
        root.0.join("secrets"),
        root.0.join("postgres.log"),
    );
    let archive = backups.join("wal");
    for dir in [&root.0, &data, &restored, &archive, &secrets] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(secrets.join("flotilla_replication_password"), "unused").unwrap();
    std::fs::write(secrets.join("flotilla_db_password"), "unused").unwrap();
    let flotilla_data = flotilla_data(&root.0);
    give_to_postgres(&root.0);

    // A server archiving its WAL as the data plane's members do.
    run_as_postgres(&pg_bin().join("initdb"), &["-D", path(&data), "-A", "trust", "-U", "postgres"], &[]);
    let archive_command = format!(
        "archive_mode = on\narchive_command = 'test ! -f {0}/%f && cp %p {0}/%f.part && mv {0}/%f.part {0}/%f'\n",
        path(&archive)
    );
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str(&archive_command);
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    let port = free_port();
    let server = Server::start(&data, port, &log);
    let psql = |sql: &str| {
        run_as_postgres(
            Path::new("/usr/bin/psql"),
            &[
                "-X",
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-c",
                sql,
            ],
            &[],
        )
        .trim()
        .to_owned()
    };
    psql("CREATE ROLE flotilla LOGIN");
    psql("CREATE ROLE replicator LOGIN REPLICATION");
    psql("CREATE DATABASE flotilla OWNER flotilla");

    let store = connect(&server.url("flotilla")).await;
    store.migrate().await.unwrap();
    let (org, _) = ensure_organization(store.pool(), "restore", "Restore").await.unwrap();
    let kept = deployment(&store, org, "made-before-the-backup").await;

    // The backup task, once, as the stack runs it (through db-proxy there).
    let backup_env = [
        ("FLOTILLA_SECRETS_DIR", path(&secrets).to_owned()),
        ("FLOTILLA_BACKUP_DIR", path(&backups).to_owned()),
        ("FLOTILLA_BACKUP_PG_HOST", "127.0.0.1".to_owned()),
        ("FLOTILLA_BACKUP_PG_PORT", port.to_string()),
        ("FLOTILLA_BACKUP_ONCE", "1".to_owned()),
    ];
    run_as_postgres(Path::new("/bin/sh"), &[path(&flotilla_data), "backup"], &backup_env);
    let recorded = store.database_backups(10).await.unwrap();
    let backup = recorded.last_good.expect("the backup recorded as good");
    assert!(backup.wal_start.is_some() && backup.size_bytes.unwrap_or(0) > 0, "{backup:?}");

    // Changes after the backup; the moment to go back to; then changes
    // that must not come back.
    let made_after_backup = deployment(&store, org, "made-after-the-backup").await;
    let moment = psql(r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#);
    let made_too_late = deployment(&store, org, "made-after-the-moment").await;
    store.tenant(org).set_desired_state(kept, DesiredState::Deleted).await.unwrap();
    // Everything written so far reaches the archive, then the server is lost.
    let segment = psql("SELECT pg_walfile_name(pg_switch_wal())");
    wait_until("the last WAL segment archived", Duration::from_secs(60), || async {
        archive.join(&segment).exists().then_some(())
    })
    .await;
    drop(store);
    server.kill();

    // Restore into an empty data directory, as Patroni's bootstrap would
    // (it passes --datadir), and start the server on it: it replays the
    // archive up to the moment and opens for writes.
    let restore_env = [
        ("FLOTILLA_BACKUP_DIR", path(&backups).to_owned()),
        ("FLOTILLA_RESTORE_TO", moment.clone()),
        ("FLOTILLA_RESTORE_INTO", path(&restored).to_owned()),
    ];
    let said = run_as_postgres(Path::new("/bin/sh"), &[path(&flotilla_data), "restore"], &restore_env);
    assert!(said.contains(&backup.label), "the backup restored is the one recorded: {said}");
    let restored_server = Server::start(&restored, free_port(), &root.0.join("restored.log"));
    let store = connect(&restored_server.url("flotilla")).await;
    wait_until("recovery finished and the server promoted", Duration::from_secs(60), || async {
        let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(store.pool()).await.ok()?;
        (!in_recovery).then_some(())
    })
    .await;

    // Exactly the moment: what was made before it, not what came after,
    // and the deletion after it undone.
    let tenant = store.tenant(org);
    assert_eq!(tenant.get_deployment(kept).await.unwrap().deployment.desired_state, DesiredState::Running);
    assert!(tenant.get_deployment(made_after_backup).await.is_ok(), "a change between backup and moment replayed");
    assert!(tenant.get_deployment(made_too_late).await.is_err(), "a change after the moment came back");
    // The platform carries on from there: migrations are current, writes
    // are accepted, the backup history is the one it had.
    store.migrate().await.unwrap();
    deployment(&store, org, "made-after-the-restore").await;
    assert_eq!(store.database_backups(10).await.unwrap().last_good.map(|b| b.label), Some(backup.label));
}
