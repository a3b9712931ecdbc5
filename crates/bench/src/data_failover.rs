//! The control database's fail-over on scripts/cluster.sh's cluster with
//! the HA data plane: the PostgreSQL primary's node powered off (Patroni
//! promotes the synchronous standby; HAProxy on node 1 follows), timed from
//! the kill to the first write accepted through node 1's db-proxy, with the
//! writes refused meanwhile and any acknowledged write lost. The baseline,
//! interleaved run by run: one plain PostgreSQL (15, the same Debian build)
//! killed and started again at once, as the best supervisor would; it
//! cannot survive its machine, which the HA data plane does (cluster test
//! `the_primary_s_node_lost_twice_in_a_row_loses_no_acknowledged_write`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_test_utils::TestCluster;
use flotilla_test_utils::postgres::{LocalServer, give_to_postgres};
use sqlx::{Connection, PgConnection};

use crate::stats::Samples;

/// Ids of the rows written, unique across runs and databases.
static NEXT_ID: AtomicI64 = AtomicI64::new(1);

/// One fault: from it to the first acknowledged write, the writes refused
/// meanwhile, and acknowledged writes not found afterwards.
struct Fault {
    first_write: Duration,
    refused: usize,
    acked: usize,
    lost: usize,
}

/// What the writer saw: each attempt's time and whether it was
/// acknowledged (with its id).
#[derive(Default)]
struct Attempts(Vec<(Instant, Option<i64>)>);

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    Ok(tokio::time::timeout(Duration::from_secs(1), PgConnection::connect(url)).await??)
}

/// Connects, asking again for up to a minute (a fail-over just ended).
async fn connect_soon(url: &str) -> anyhow::Result<PgConnection> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect(url).await {
            Ok(connection) => return Ok(connection),
            Err(error) if Instant::now() > deadline => return Err(error.context("connecting after the fault")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Inserts one row at a time, each committed, reconnecting after any error,
/// until `stop`.
async fn write_loop(url: String, stop: Arc<AtomicBool>, attempts: Arc<Mutex<Attempts>>) {
    let mut connection: Option<PgConnection> = None;
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let written = async {
            if connection.is_none() {
                connection = Some(connect(&url).await?);
            }
            let insert = sqlx::query("INSERT INTO bench_failover (id) VALUES ($1)").bind(id);
            let conn = connection.as_mut().context("connected")?;
            tokio::time::timeout(Duration::from_secs(2), insert.execute(conn)).await??;
            anyhow::Ok(())
        }
        .await;
        let acked = written.is_ok().then_some(id);
        if acked.is_none() {
            connection = None;
        }
        attempts.lock().unwrap().0.push((at, acked));
        tokio::time::sleep(Duration::from_millis(if acked.is_some() { 10 } else { 50 })).await;
    }
}

/// Writes through `url`; after 2 s, `fault` (timed from its return: the
/// server is gone then), then `recovery` in the background; until a write
/// is acknowledged after the fault, then checks every acknowledged row.
async fn measure(
    url: &str,
    fault: impl FnOnce() + Send + 'static,
    recovery: impl FnOnce() + Send + 'static,
) -> anyhow::Result<Fault> {
    let (stop, attempts) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Attempts::default())));
    let writer = tokio::spawn(write_loop(url.to_owned(), stop.clone(), attempts.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::spawn_blocking(fault).await?;
    let fault_at = Instant::now();
    let recovery = tokio::task::spawn_blocking(recovery);
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_write = loop {
        let first =
            attempts.lock().unwrap().0.iter().find(|(at, acked)| *at >= fault_at && acked.is_some()).map(|a| a.0);
        if let Some(at) = first {
            break at - fault_at;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("no write accepted within 120 s of the fault");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    recovery.await?;
    let attempts = std::mem::take(&mut attempts.lock().unwrap().0);
    let refused = attempts.iter().filter(|(at, acked)| *at >= fault_at && acked.is_none()).count();
    let acked: Vec<i64> = attempts.iter().filter_map(|(_, acked)| *acked).collect();
    let mut check = connect_soon(url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_failover WHERE id = ANY($1)")
        .bind(&acked)
        .fetch_one(&mut check)
        .await?;
    Ok(Fault { first_write, refused, acked: acked.len(), lost: acked.len() - stored as usize })
}

async fn create_table(url: &str) -> anyhow::Result<()> {
    let mut connection = connect_soon(url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_failover (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        .execute(&mut connection)
        .await?;
    Ok(())
}

fn report(what: &str, faults: &[Fault]) {
    println!("\n{what} ({} runs):", faults.len());
    println!(
        "  {}",
        Samples::new(faults.iter().map(|f| f.first_write).collect()).line("fault to first write accepted")
    );
    let refused: Vec<usize> = faults.iter().map(|f| f.refused).collect();
    let (acked, lost) = faults.iter().fold((0, 0), |(a, l), f| (a + f.acked, l + f.lost));
    println!("  writes refused during it, per run: {refused:?}");
    println!("  acknowledged writes lost: {lost} of {acked}");
}

pub async fn failover(runs: usize, flotillad: &Path) -> anyhow::Result<()> {
    let cluster = TestCluster::ensure(flotillad).await;
    let env = cluster.script(&["env"]);
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("export FLOTILLA_CLUSTER_DATABASE_URL="))
        .context("cluster.sh env names the database")?
        .to_owned();
    if cluster.data_leader("pg").await.is_none() {
        bail!(
            "no Patroni primary: the cluster must run the HA data plane (scripts/cluster.sh down, then FLOTILLA_CLUSTER_DATA=ha)"
        );
    }
    create_table(&url).await?;

    let folder = std::env::temp_dir().join(format!("flotilla-bench-pg-{}", std::process::id()));
    std::fs::create_dir_all(&folder)?;
    give_to_postgres(&folder);
    let data = folder.join("data");
    // Durable like the members (fsync, synchronous commit), minus the
    // standby to wait for.
    LocalServer::init(&data, "");
    let plain = Arc::new(LocalServer::start(&data, crate::free_port()?, &folder.join("postgres.log")));
    plain.psql("postgres", "CREATE DATABASE bench");
    let plain_url = plain.url("postgres", "bench");
    create_table(&plain_url).await?;

    println!(
        "database-failover: {runs} runs, the HA primary's node lost and a plain PostgreSQL restarted, interleaved"
    );
    let (mut ha, mut baseline) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        // The data plane whole (an image update rolls its members too).
        let primary =
            flotilla_test_utils::wait_until("a primary and the data plane whole", Duration::from_secs(300), || async {
                if !cluster.settled().await {
                    return None;
                }
                cluster.data_leader("pg").await
            })
            .await;
        // Through another node's db-proxy (every node runs one).
        let proxy = if primary == 1 { 2 } else { 1 };
        let url = url.replacen(&cluster.addresses[0], &cluster.addresses[proxy - 1], 1);
        let script = cluster.script_path();
        // The primary's node powered off (its etcd member and Redis member
        // with it): killing only the container, Swarm starts it again
        // within the leader key's TTL and it stays primary (a restart, not
        // a fail-over).
        let kill = move || {
            let killed = std::process::Command::new(script).args(["kill-node", &primary.to_string()]).output();
            assert!(killed.is_ok_and(|o| o.status.success()), "scripts/cluster.sh kill-node {primary} failed");
        };
        let fault = measure(&url, kill, || {}).await?;
        cluster.restore().await;
        println!(
            "run {run}: HA, node {primary} (the primary's) lost: first write {:.2} s, {} refused, {} of {} acknowledged lost",
            fault.first_write.as_secs_f64(),
            fault.refused,
            fault.lost,
            fault.acked
        );
        ha.push(fault);
        let (killed, restarted) = (plain.clone(), plain.clone());
        let fault = measure(&plain_url, move || killed.kill(), move || restarted.start_again()).await?;
        println!(
            "run {run}: plain PostgreSQL restarted: first write {:.2} s, {} refused, {} of {} acknowledged lost",
            fault.first_write.as_secs_f64(),
            fault.refused,
            fault.lost,
            fault.acked
        );
        baseline.push(fault);
    }
    report("HA: the primary's node lost, Patroni fail-over", &ha);
    report("baseline: one PostgreSQL killed and started again at once", &baseline);
    let mut connection = connect_soon(&url).await?;
    sqlx::query("DROP TABLE bench_failover").execute(&mut connection).await?;
    drop(plain);
    let _ = std::fs::remove_dir_all(&folder);
    Ok(())
}
