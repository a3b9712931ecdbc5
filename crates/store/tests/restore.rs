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
use std::time::Duration;

use flotilla_store::tenant::ensure_organization;
use flotilla_store::{Store, StoreConfig};
use flotilla_test_utils::postgres::{LocalServer, give_to_postgres, path_str as path, run_as_postgres};
use flotilla_test_utils::{free_port, unique_suffix, wait_until};
use flotilla_types::{DeploymentSpec, DeploymentSpecInput, DesiredState, OrganizationId};

/// The data plane's script, as the image runs it, copied into `folder`
/// (the `postgres` user, which runs it as Patroni does, may not read the
/// source tree).
fn flotilla_data(folder: &Path) -> PathBuf {
    let copy = folder.join("flotilla-data");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/data/flotilla-data"), &copy).unwrap();
    copy
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
    let archive_command = format!(
        "archive_mode = on\narchive_command = 'FLOTILLA_WAL_ARCHIVE={} /bin/sh {} archive %p %f'\n",
        path(&archive),
        path(&flotilla_data)
    );
    LocalServer::init(&data, &archive_command);
    let server = LocalServer::start(&data, free_port(), &log);
    let psql = |sql: &str| server.psql("postgres", sql);
    psql("CREATE ROLE flotilla LOGIN");
    psql("CREATE ROLE replicator LOGIN REPLICATION");
    psql("CREATE DATABASE flotilla OWNER flotilla");

    let store = connect(&server.url("flotilla", "flotilla")).await;
    store.migrate().await.unwrap();
    let (org, _) = ensure_organization(store.pool(), "restore", "Restore").await.unwrap();
    let kept = deployment(&store, org, "made-before-the-backup").await;

    // The backup task, once, as the stack runs it (through db-proxy there).
    let backup_env = [
        ("FLOTILLA_SECRETS_DIR", path(&secrets).to_owned()),
        ("FLOTILLA_BACKUP_DIR", path(&backups).to_owned()),
        ("FLOTILLA_BACKUP_PG_HOST", "127.0.0.1".to_owned()),
        ("FLOTILLA_BACKUP_PG_PORT", server.port.to_string()),
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
    let restored_server = LocalServer::start(&restored, free_port(), &root.0.join("restored.log"));
    let store = connect(&restored_server.url("flotilla", "flotilla")).await;
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

#[test]
fn a_segment_archived_again_is_done_and_other_contents_under_its_name_are_refused() {
    let root = Folder(std::env::temp_dir().join(format!("flotilla-archive-{}", unique_suffix())));
    let archive = root.0.join("wal");
    std::fs::create_dir_all(&archive).unwrap();
    let flotilla_data = flotilla_data(&root.0);
    let segment = root.0.join("000000010000000000000003");
    std::fs::write(&segment, b"the segment").unwrap();
    let archive_it = || {
        std::process::Command::new("/bin/sh")
            .current_dir(&root.0)
            .arg(&flotilla_data)
            .args(["archive", path(&segment), "000000010000000000000003"])
            .env("FLOTILLA_WAL_ARCHIVE", &archive)
            .output()
            .unwrap()
    };
    assert!(archive_it().status.success());
    let archived = archive.join("000000010000000000000003");
    assert_eq!(std::fs::read(&archived).unwrap(), b"the segment");
    // A promoted standby archiving it again: done.
    assert!(archive_it().status.success(), "the same segment again");
    // Other bytes under that name: refused, the archive untouched.
    std::fs::write(&segment, b"something else").unwrap();
    let refused = archive_it();
    assert!(!refused.status.success(), "other contents accepted");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("other contents"), "{refused:?}");
    assert_eq!(std::fs::read(&archived).unwrap(), b"the segment");
    assert_eq!(std::fs::read_dir(&archive).unwrap().count(), 1, "no partial copy left");
    // The server on a later timeline (a member rewound after a fail-over):
    // the earlier timeline's archived copy stands, and archiving goes on.
    std::fs::create_dir_all(root.0.join("pg_wal")).unwrap();
    std::fs::write(root.0.join("pg_wal/00000002.history"), b"1\t0/3000000\tno recovery target specified\n").unwrap();
    assert!(archive_it().status.success(), "an earlier timeline's segment held the archiver");
    assert_eq!(std::fs::read(&archived).unwrap(), b"the segment");
}
