//! Fixtures that let integration tests run in parallel against real services:
//! each test gets its own PostgreSQL database, its own Redis key prefix and
//! its own Docker label, and everything is removed when the fixture drops.
//!
//! The services come from `scripts/dev-services.sh start`; their URLs can be
//! overridden with `FLOTILLA_TEST_DATABASE_URL` and `FLOTILLA_TEST_REDIS_URL`.

pub mod acme;
pub mod cluster;
pub mod connect;
mod database;
mod docker;
pub mod oidc;
pub mod postgres;
pub mod proxy;
mod redis_prefix;
pub mod traefik;

pub use acme::{TestDnsServer, TestPebble};
pub use cluster::TestCluster;
pub use database::TestDb;
pub use docker::{DEMO_IMAGE, TEST_LABEL, TestDocker};
pub use oidc::TestOidcProvider;
pub use redis_prefix::TestRedis;
pub use traefik::{LoopingClient, Sample, TestTraefik, TraefikOptions};

use std::sync::Once;

pub const DEFAULT_DATABASE_URL: &str = "postgres://flotilla:flotilla@127.0.0.1:55432/flotilla";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:56379";

/// A heartbeat of a small worker node (2 cores, 1 GiB, 10 deployment slots)
/// called `node`, as its agent would send it.
pub fn node_heartbeat(node: &str) -> flotilla_store::NodeHeartbeat {
    flotilla_store::NodeHeartbeat {
        node_id: flotilla_types::NodeId::parse(node).expect("a node id"),
        hostname: node.to_owned(),
        address: "10.0.0.1".to_owned(),
        role: "worker".to_owned(),
        labels: std::collections::BTreeMap::new(),
        total_cpu_millis: 2000,
        total_memory_bytes: 1 << 30,
        used_cpu_millis: 0,
        used_memory_bytes: 0,
        max_deployments: 10,
        agent_version: "test".to_owned(),
        fence_after: None,
    }
}

/// A valid spec of the demo image named `name`, routed at `domain`
/// (empty: none).
pub fn demo_spec(name: &str, domain: &str) -> flotilla_types::DeploymentSpec {
    flotilla_types::DeploymentSpec::validate(flotilla_types::DeploymentSpecInput {
        name: name.into(),
        image: DEMO_IMAGE.into(),
        port: 8080,
        domain: domain.into(),
        ..Default::default()
    })
    .expect("a valid spec")
}

/// A loopback port nothing listens on right now (another process may take
/// it before the caller binds it; tests accept that small race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A short unique suffix for names.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (default: warnings,
/// and info for Flotilla's own crates).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,flotilla=info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// Runs async cleanup from `Drop`, which cannot await: on a thread of its own
/// with its own runtime, so it works whether or not a runtime is running.
pub fn block_on_cleanup<F>(cleanup: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = std::thread::spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(cleanup),
        Err(e) => eprintln!("test cleanup: no runtime: {e}"),
    });
    let _ = handle.join();
}

/// Polls `check` every 200 ms until it gives `Some`, or panics after `limit`
/// saying what it waited for.
pub async fn wait_until<T, F, Fut>(what: &str, limit: std::time::Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until_every(what, limit, std::time::Duration::from_millis(200), check).await
}

/// [`wait_until`], polling every `every` (where the moment matters, as
/// for a client looping through the edge).
pub async fn wait_until_every<T, F, Fut>(
    what: &str,
    limit: std::time::Duration,
    every: std::time::Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(every).await;
    }
}
