//! `flotillad`'s settings. Every flag can also be given as an environment
//! variable (`FLOTILLA_*`); `docs/configuration.md` lists them all.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use flotilla_agent::AgentConfig;
use flotilla_edge::{EdgeSettings, EdgeSyncConfig, ServeConfig, Tls};
use flotilla_metrics::{BreakerConfig, MetricsConfig, SourceChoice};
use flotilla_orchestrator::OrchestratorConfig;
use flotilla_orchestrator::liveness::NodeWatchConfig;
use flotilla_store::metrics::Retention;
use flotilla_types::{NodeId, PlacementStrategy};

#[derive(Debug, Parser)]
#[command(name = "flotillad", version, about = "Flotilla's daemon: API, orchestrator and node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API, orchestrator and node agent in one process (a single machine).
    All(Box<DaemonConfig>),
    /// Only the public API.
    Api(Box<DaemonConfig>),
    /// Only the orchestrator.
    Orchestrator(Box<DaemonConfig>),
    /// Only the node agent (one per node).
    Agent(Box<DaemonConfig>),
    /// Exits 0 if a running flotillad answers its health check: the
    /// container health check of images that have no shell or curl.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:7800/health")]
        url: String,
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Prints Traefik's static configuration for one machine: the shipped
    /// traefik/traefik.toml on loopback, taking this machine's route table
    /// (as YAML; the quickstart runs Traefik with it).
    TraefikConfig(TraefikConfigArgs),
}

/// `flotillad traefik-config`.
#[derive(Debug, Clone, Args)]
pub struct TraefikConfigArgs {
    /// Plain HTTP (the `web` entry point).
    #[arg(long, default_value = "127.0.0.1:7880")]
    pub web: String,
    /// TLS (the `websecure` entry point).
    #[arg(long, default_value = "127.0.0.1:7843")]
    pub websecure: String,
    /// Ping and metrics (the `traefik` entry point).
    #[arg(long, default_value = "127.0.0.1:7882")]
    pub internal: String,
    /// The route table, long-polled.
    #[arg(long, default_value = "http://127.0.0.1:7800/traefik/dynamic?wait=5")]
    pub route_table: String,
    /// How this Traefik names itself to the route table.
    #[arg(long, default_value = "traefik")]
    pub name: String,
    /// Traefik's own log and its access log.
    #[arg(long)]
    pub log_file: Option<String>,
    #[arg(long)]
    pub access_log_file: Option<String>,
}

impl TraefikConfigArgs {
    pub fn render(&self) -> serde_json::Value {
        flotilla_edge::traefik_config::LocalTraefik {
            web: self.web.clone(),
            websecure: self.websecure.clone(),
            internal: self.internal.clone(),
            route_table: self.route_table.clone(),
            name: self.name.clone(),
            internal_token: None,
            poll_interval: None,
            acme: None,
            file_provider: None,
            api: false,
            log_file: self.log_file.clone(),
            access_log_file: self.access_log_file.clone(),
        }
        .render()
    }
}

/// A secret file named in the configuration could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the secret file {path} ({flag}): {source}")]
pub struct SecretFileError {
    pub flag: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl DaemonConfig {
    /// Reads the `*_file` settings into the values they stand for (the
    /// whole file, without its final newline), as Docker secrets are given.
    pub fn read_secret_files(&mut self) -> Result<(), SecretFileError> {
        fn read(flag: &'static str, path: &Option<PathBuf>, into: &mut Option<String>) -> Result<(), SecretFileError> {
            if let Some(path) = path {
                let text = std::fs::read_to_string(path).map_err(|source| SecretFileError {
                    flag,
                    path: path.clone(),
                    source,
                })?;
                *into = Some(text.trim_end_matches(['\n', '\r']).to_owned());
            }
            Ok(())
        }
        read("--database-url-file", &self.database_url_file, &mut self.database_url)?;
        read("--redis-url-file", &self.redis_url_file, &mut self.redis_url)?;
        read("--internal-token-file", &self.internal_token_file, &mut self.internal_token)?;
        Ok(())
    }
}

impl Command {
    /// The roles and settings of a daemon command; `None` for `health` and
    /// `traefik-config`.
    pub fn into_parts(self) -> Option<(Roles, DaemonConfig)> {
        Some(match self {
            Self::All(c) => (Roles::ALL, *c),
            Self::Api(c) => (Roles { api: true, orchestrator: false, agent: false }, *c),
            Self::Orchestrator(c) => (Roles { api: false, orchestrator: true, agent: false }, *c),
            Self::Agent(c) => (Roles { api: false, orchestrator: false, agent: true }, *c),
            Self::Health { .. } | Self::TraefikConfig(_) => return None,
        })
    }
}

/// Which parts run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub orchestrator: bool,
    pub agent: bool,
}

impl Roles {
    pub const ALL: Self = Self { api: true, orchestrator: true, agent: true };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DaemonConfig {
    /// PostgreSQL URL of the control database.
    #[arg(long, env = "FLOTILLA_DATABASE_URL", required_unless_present = "database_url_file", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A file holding the database URL (a Docker secret:
    /// `/run/secrets/...`); when given, it wins over --database-url.
    #[arg(long, env = "FLOTILLA_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// A file holding the Redis URL, instead of --redis-url.
    #[arg(long, env = "FLOTILLA_REDIS_URL_FILE")]
    pub redis_url_file: Option<PathBuf>,

    /// A file holding the internal token, instead of --internal-token.
    #[arg(long, env = "FLOTILLA_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,

    /// Redis URL for wake-ups between processes; without it, wake-ups stay
    /// inside this process and other processes rely on their timers.
    #[arg(long, env = "FLOTILLA_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key Flotilla uses.
    #[arg(long, env = "FLOTILLA_REDIS_PREFIX", default_value = "flotilla:")]
    pub redis_prefix: String,

    /// Address of the HTTP server (API, /health, /metrics).
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7800")]
    pub listen: SocketAddr,

    /// Development only: no authentication, every request acts as the owner
    /// of the default organization. Logs a loud warning.
    #[arg(long, env = "FLOTILLA_INSECURE_DEV_AUTH", conflicts_with = "oidc_issuer")]
    pub insecure_dev_auth: bool,

    /// The OIDC provider's issuer URL: callers send its tokens as
    /// `Authorization: Bearer`. Discovery reads
    /// `<issuer>/.well-known/openid-configuration`.
    #[arg(long, env = "FLOTILLA_OIDC_ISSUER", requires = "oidc_audience")]
    pub oidc_issuer: Option<String>,

    /// The audience tokens must be issued for (Flotilla's client id at the provider).
    #[arg(long, env = "FLOTILLA_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,

    /// Clock difference tolerated on a token's expiry, not-before and issue time.
    #[arg(long, env = "FLOTILLA_OIDC_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub oidc_leeway: Duration,

    /// An unknown signing key makes the provider's keys be fetched again at
    /// most this often.
    #[arg(long, env = "FLOTILLA_OIDC_JWKS_MIN_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub oidc_jwks_min_refresh: Duration,

    /// How long the provider's answer for an opaque token is trusted: a
    /// revoked token stops working within this time.
    #[arg(long, env = "FLOTILLA_OIDC_USERINFO_CACHE", default_value = "15s", value_parser = parse_duration)]
    pub oidc_userinfo_cache: Duration,

    /// A secret shared by every Flotilla process of the cluster for their
    /// internal endpoints (the API reading logs from agents). Random when
    /// unset, which only works when API and agent run in one process.
    #[arg(long, env = "FLOTILLA_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,

    /// Subjects (the provider's `sub`) that administer the platform (nodes);
    /// repeat the flag or separate with commas.
    #[arg(long = "platform-admin", env = "FLOTILLA_PLATFORM_ADMINS", value_delimiter = ',')]
    pub platform_admins: Vec<String>,

    /// Requests a second each user may make on average (0: unlimited);
    /// shared by every API replica through Redis.
    #[arg(long, env = "FLOTILLA_RATE_LIMIT_USER", default_value_t = 200.0)]
    pub rate_limit_user: f64,

    /// Requests a user may make at once, above the average.
    #[arg(long, env = "FLOTILLA_RATE_LIMIT_USER_BURST", default_value_t = 400)]
    pub rate_limit_user_burst: u32,

    /// Requests a second all users of one organization may make together (0: unlimited).
    #[arg(long, env = "FLOTILLA_RATE_LIMIT_ORGANIZATION", default_value_t = 2000.0)]
    pub rate_limit_organization: f64,

    /// Requests an organization may make at once, above the average.
    #[arg(long, env = "FLOTILLA_RATE_LIMIT_ORGANIZATION_BURST", default_value_t = 4000)]
    pub rate_limit_organization_burst: u32,

    /// Docker Engine socket (default: $DOCKER_HOST or /var/run/docker.sock).
    #[arg(long, env = "FLOTILLA_DOCKER_SOCKET")]
    pub docker_socket: Option<String>,

    /// How long shutdown waits for tasks to finish.
    #[arg(long, env = "FLOTILLA_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub agent: AgentArgs,

    #[command(flatten)]
    pub orchestrator: OrchestratorArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    #[command(flatten)]
    pub domains: DomainArgs,
}

/// Custom domains and the certificates Flotilla orders itself.
#[derive(Debug, Clone, Args)]
pub struct DomainArgs {
    /// The operator's own domains (comma-separated): a deployment domain
    /// equal to or under one is routed without proof. Any other domain is
    /// routed only after its owner proves it with a DNS TXT record.
    #[arg(long = "platform-domain", env = "FLOTILLA_PLATFORM_DOMAINS", value_delimiter = ',', value_parser = parse_hostname)]
    pub platform_domains: Vec<flotilla_types::Hostname>,

    /// The port users reach the edge's plain HTTP on (in the URLs the API
    /// shows; 80 is left out of them).
    #[arg(long, env = "FLOTILLA_EDGE_HTTP_PORT", default_value_t = 80)]
    pub edge_http_port: u16,

    /// The port users reach the edge's HTTPS on (443 is left out of URLs).
    #[arg(long, env = "FLOTILLA_EDGE_HTTPS_PORT", default_value_t = 443)]
    pub edge_https_port: u16,

    /// How long a domain verification token may wait to be published.
    #[arg(long, env = "FLOTILLA_DOMAIN_TOKEN_TTL", default_value = "7d", value_parser = parse_duration)]
    pub domain_token_ttl: Duration,

    /// DNS servers for verification lookups, as ip:port (comma-separated;
    /// default: the system's resolver configuration).
    #[arg(long = "dns-server", env = "FLOTILLA_DNS_SERVERS", value_delimiter = ',')]
    pub dns_servers: Vec<SocketAddr>,

    /// ACME directory URL: Flotilla then orders certificates for verified
    /// custom domains itself (e.g. https://acme-v02.api.letsencrypt.org/directory).
    #[arg(long, env = "FLOTILLA_ACME_DIRECTORY", requires = "certificate_key_file")]
    pub acme_directory: Option<String>,

    /// Contact address(es) for the ACME account (mailto: is added).
    #[arg(long, env = "FLOTILLA_ACME_CONTACT", value_delimiter = ',')]
    pub acme_contact: Vec<String>,

    /// A PEM root certificate to trust for the ACME server's own TLS.
    #[arg(long, env = "FLOTILLA_ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,

    /// A secret file (a Docker secret) whose contents key the sealing of
    /// certificate private keys at rest; at least 16 bytes.
    #[arg(long, env = "FLOTILLA_CERTIFICATE_KEY_FILE")]
    pub certificate_key_file: Option<PathBuf>,

    /// Renew a certificate when it ends within this long.
    #[arg(long, env = "FLOTILLA_ACME_RENEW_BEFORE", default_value = "30d", value_parser = parse_duration)]
    pub acme_renew_before: Duration,

    /// First wait after a failed order (doubled per failure, up to 6h).
    #[arg(long, env = "FLOTILLA_ACME_RETRY_MIN", default_value = "1m", value_parser = parse_duration)]
    pub acme_retry_min: Duration,

    /// How often the certificate reconciler runs.
    #[arg(long, env = "FLOTILLA_ACME_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub acme_interval: Duration,

    /// Also order the platform domains' certificates (instead of Traefik's resolver).
    #[arg(long, env = "FLOTILLA_ACME_FOR_PLATFORM_DOMAINS")]
    pub acme_for_platform_domains: bool,
}

fn parse_hostname(text: &str) -> Result<flotilla_types::Hostname, String> {
    flotilla_types::Hostname::parse("platform domain", text).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Do not measure this node's containers (the agent's metrics pipeline is off).
    #[arg(long, env = "FLOTILLA_NO_METRICS")]
    pub no_metrics: bool,

    /// PostgreSQL or TimescaleDB URL of the metrics store (default: the
    /// control database).
    #[arg(long, env = "FLOTILLA_METRICS_DATABASE_URL")]
    pub metrics_database_url: Option<String>,

    /// Time between collection rounds.
    #[arg(long, env = "FLOTILLA_METRICS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// The longest the interval stretches to while rounds overrun or Docker fails.
    #[arg(long, env = "FLOTILLA_METRICS_MAX_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub metrics_max_interval: Duration,

    /// On the cgroup path the engine is asked for the container list when a
    /// container starts (its events say so) and at least this often.
    #[arg(long, env = "FLOTILLA_METRICS_FULL_LIST_EVERY", default_value = "2m", value_parser = parse_duration)]
    pub metrics_full_list_every: Duration,

    /// Where counters are read: `auto` (cgroup files when visible, else
    /// Docker), `cgroup` or `docker`.
    #[arg(long, env = "FLOTILLA_METRICS_SOURCE", default_value = "auto")]
    pub metrics_source: SourceChoice,

    /// The host's cgroup filesystem.
    #[arg(long, env = "FLOTILLA_METRICS_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub metrics_cgroup_root: PathBuf,

    /// The host's /proc (network counters are read per container process).
    #[arg(long, env = "FLOTILLA_METRICS_PROC_ROOT", default_value = "/proc")]
    pub metrics_proc_root: PathBuf,

    /// Docker stats calls in flight at once on the fallback path.
    #[arg(long, env = "FLOTILLA_METRICS_DOCKER_PARALLELISM", default_value_t = 8)]
    pub metrics_docker_parallelism: usize,

    /// Consecutive Docker API failures that open the circuit breaker.
    #[arg(long, env = "FLOTILLA_METRICS_BREAKER_FAILURES", default_value_t = 5)]
    pub metrics_breaker_failures: u32,

    /// How long the open breaker refuses Docker calls before trying again.
    #[arg(long, env = "FLOTILLA_METRICS_BREAKER_COOL_DOWN", default_value = "60s", value_parser = parse_duration)]
    pub metrics_breaker_cool_down: Duration,

    /// Successful calls in a row that close a half-open breaker.
    #[arg(long, env = "FLOTILLA_METRICS_BREAKER_SUCCESSES", default_value_t = 3)]
    pub metrics_breaker_successes: u32,

    /// Rows the write buffer keeps while the metrics store is unreachable
    /// (beyond it, the oldest are dropped and counted).
    #[arg(long, env = "FLOTILLA_METRICS_WRITE_BUFFER_ROWS", default_value_t = 150_000)]
    pub metrics_write_buffer_rows: usize,

    /// Samples a live subscriber may have queued before it loses the oldest.
    #[arg(long, env = "FLOTILLA_METRICS_SUBSCRIBER_QUEUE", default_value_t = 256)]
    pub metrics_subscriber_queue: usize,

    /// Failed rounds in a row after which /health answers 503.
    #[arg(long, env = "FLOTILLA_METRICS_UNHEALTHY_AFTER", default_value_t = 3)]
    pub metrics_unhealthy_after: u32,

    /// Keep only minute aggregates, not the raw 5-second samples.
    #[arg(long, env = "FLOTILLA_METRICS_NO_RAW_SAMPLES")]
    pub metrics_no_raw_samples: bool,

    /// How long raw samples are kept.
    #[arg(long, env = "FLOTILLA_METRICS_RETAIN_SAMPLES", default_value = "7d", value_parser = parse_duration)]
    pub metrics_retain_samples: Duration,

    /// How long minute aggregates are kept.
    #[arg(long, env = "FLOTILLA_METRICS_RETAIN_MINUTES", default_value = "30d", value_parser = parse_duration)]
    pub metrics_retain_minutes: Duration,

    /// How long hourly usage (billing) is kept.
    #[arg(long, env = "FLOTILLA_METRICS_RETAIN_HOURLY", default_value = "400d", value_parser = parse_duration)]
    pub metrics_retain_hourly: Duration,

    /// How often the orchestrator rolls minutes up into hourly usage and
    /// drops expired partitions (PostgreSQL backend).
    #[arg(long, env = "FLOTILLA_METRICS_MAINTENANCE_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub metrics_maintenance_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// This node's id (default: the Swarm node id, else one generated and kept
    /// in --node-id-file).
    #[arg(long, env = "FLOTILLA_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<NodeId>,

    #[arg(long, env = "FLOTILLA_NODE_ID_FILE", default_value = "/var/lib/flotilla/node-id")]
    pub node_id_file: PathBuf,

    /// Address other nodes and the edge proxy reach this node's apps on
    /// (default: the node's Swarm address, else 127.0.0.1).
    #[arg(long, env = "FLOTILLA_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Host address apps' ports are published on.
    #[arg(long, env = "FLOTILLA_PUBLISH_IP", default_value = "0.0.0.0")]
    pub publish_ip: IpAddr,

    /// Host ports handed to apps, `first-last`.
    #[arg(long, env = "FLOTILLA_PORT_RANGE", default_value = "20000-29999", value_parser = parse_port_range)]
    pub port_range: RangeInclusive<u16>,

    /// How often this node reports to the control database. The
    /// orchestrator asks a node's agent directly once it misses about two,
    /// so a lost node is noticed within seconds.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Cut off from the control database this long and reaching no
    /// majority of the nodes, the agent stops its replicas of `fence`
    /// deployments (`0s`: never). The orchestrator moves them once the node
    /// has been silent this long plus 4 s.
    #[arg(long, env = "FLOTILLA_FENCE_AFTER", default_value = "3s", value_parser = parse_duration)]
    pub fence_after: Duration,

    #[arg(long, env = "FLOTILLA_RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Ignore Docker events: reconcile only on the timer and on wake-ups.
    #[arg(long, env = "FLOTILLA_NO_DOCKER_EVENTS")]
    pub no_docker_events: bool,

    /// A managed container without a row and a live deployment is removed
    /// after this long.
    #[arg(long, env = "FLOTILLA_ORPHAN_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub orphan_grace: Duration,

    /// Before stopping a container that served (stop, delete, scale-down,
    /// drain, a rolling update's old container), wait at most this long for
    /// every edge proxy to take in a route table without it.
    #[arg(long, env = "FLOTILLA_EDGE_SYNC_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub edge_sync_timeout: Duration,

    /// Once every edge proxy holds that table: time for it to switch over
    /// and for requests it already sent to be answered, before SIGTERM.
    #[arg(long, env = "FLOTILLA_EDGE_SETTLE", default_value = "250ms", value_parser = parse_duration)]
    pub edge_settle: Duration,

    /// An edge proxy not heard from for this long is taken for gone (it
    /// holds up no stop). Longer than the proxies' poll wait.
    #[arg(long, env = "FLOTILLA_EDGE_PROXY_GONE_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub edge_proxy_gone_after: Duration,

    /// A replica that failed to start is tried again after this long.
    #[arg(long, env = "FLOTILLA_FAILED_RETRY_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub failed_retry_after: Duration,

    /// How long pulling a missing image may take.
    #[arg(long, env = "FLOTILLA_PULL_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub pull_timeout: Duration,

    /// Containers created at the same time at most.
    #[arg(long, env = "FLOTILLA_MAX_PARALLEL_STARTS", default_value_t = 4)]
    pub max_parallel_starts: usize,

    /// Time between SIGTERM and SIGKILL when stopping an app.
    #[arg(long, env = "FLOTILLA_STOP_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,

    /// Replicas this node takes at most.
    #[arg(long, env = "FLOTILLA_MAX_DEPLOYMENTS", default_value_t = 100)]
    pub max_deployments: i32,

    /// A node label for placement constraints, `key=value`; repeatable.
    #[arg(long = "node-label", env = "FLOTILLA_NODE_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,

    /// A label put on every container and network this agent creates,
    /// `key=value`; repeatable (keys starting with `flotilla.` or `traefik.`
    /// are reserved).
    #[arg(long = "container-label", env = "FLOTILLA_CONTAINER_LABELS", value_delimiter = ',', value_parser = parse_container_label)]
    pub container_labels: Vec<(String, String)>,
}

#[derive(Debug, Clone, Args)]
pub struct OrchestratorArgs {
    /// A node silent for this long is `down`: no new replicas, and its
    /// replicas are placed on other nodes. Sooner when its agent does not
    /// answer (see --suspect-after).
    #[arg(long, env = "FLOTILLA_HEARTBEAT_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// A node silent for this long is suspect: its agent is asked whether it
    /// and its Docker Engine are alive, and the node is down at once if not.
    #[arg(long, env = "FLOTILLA_SUSPECT_AFTER", default_value = "2s", value_parser = parse_duration)]
    pub suspect_after: Duration,

    /// How long a suspect node's agent has to answer.
    #[arg(long, env = "FLOTILLA_NODE_PROBE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub node_probe_timeout: Duration,

    /// While a silent node's agent restarts (it said so as it stopped), the
    /// node itself is asked instead: a connection to this port of its
    /// address. In a swarm, 7946 (Swarm's gossip port, served by every
    /// node's engine): a node lost mid-restart is then down in seconds, not
    /// at the heartbeat timeout. Unset, a restarting node is not asked.
    #[arg(long, env = "FLOTILLA_ENGINE_PROBE_PORT")]
    pub engine_probe_port: Option<u16>,

    /// How often the leader looks for silent nodes.
    #[arg(long, env = "FLOTILLA_NODE_WATCH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub node_watch_interval: Duration,

    /// How replicas of deployments that name no strategy are placed:
    /// least-loaded, round-robin, binpack or spread (resource-based).
    #[arg(long, env = "FLOTILLA_PLACEMENT_STRATEGY", default_value = "least-loaded", value_parser = parse_strategy)]
    pub placement_strategy: PlacementStrategy,

    /// A leader that has not renewed its lease for this long is replaced by
    /// another orchestrator replica.
    #[arg(long, env = "FLOTILLA_LEADER_LEASE", default_value = "3s", value_parser = parse_duration)]
    pub leader_lease: Duration,

    /// The longest a route table poll is held waiting for a change (the
    /// proxy asks with `?wait=N`; see traefik/traefik.toml).
    #[arg(long, env = "FLOTILLA_ROUTE_TABLE_MAX_WAIT", default_value = "5s", value_parser = parse_duration)]
    pub route_table_max_wait: Duration,

    /// The route table is rendered again at least this often, changes or not.
    #[arg(long, env = "FLOTILLA_ROUTE_TABLE_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub route_table_refresh: Duration,

    /// A placement round runs at least this often.
    #[arg(long, env = "FLOTILLA_PLACEMENT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub placement_interval: Duration,

    /// Traefik entry point for plain HTTP routes.
    #[arg(long, env = "FLOTILLA_EDGE_HTTP_ENTRYPOINT", default_value = "web")]
    pub edge_http_entrypoint: String,

    /// Traefik entry point for TLS routes.
    #[arg(long, env = "FLOTILLA_EDGE_HTTPS_ENTRYPOINT", default_value = "websecure")]
    pub edge_https_entrypoint: String,

    /// TLS for routes: `off`, `stored`, or `resolver:<name>` (an ACME resolver).
    #[arg(long, env = "FLOTILLA_EDGE_TLS", default_value = "off", value_parser = parse_tls)]
    pub edge_tls: Tls,
}

impl DaemonConfig {
    pub fn domain_settings(&self) -> crate::DomainSettings {
        crate::DomainSettings {
            token_ttl: self.domains.domain_token_ttl,
            dns_servers: self.domains.dns_servers.clone(),
            edge_ports: (self.domains.edge_http_port, self.domains.edge_https_port),
        }
    }

    pub fn certificate_settings(&self) -> Option<crate::CertificateSettings> {
        let d = &self.domains;
        let (directory, key_file) = (d.acme_directory.clone()?, d.certificate_key_file.clone()?);
        let mut acme = flotilla_acme::AcmeSettings::new(directory);
        acme.contact = d
            .acme_contact
            .iter()
            .map(|c| if c.starts_with("mailto:") { c.clone() } else { format!("mailto:{c}") })
            .collect();
        acme.ca_file = d.acme_ca_file.clone();
        acme.renew_before = d.acme_renew_before;
        acme.retry_min = d.acme_retry_min;
        acme.interval = d.acme_interval;
        acme.platform_domains = d.platform_domains.clone();
        acme.platform_too = d.acme_for_platform_domains;
        Some(crate::CertificateSettings { acme, key_file })
    }

    pub fn auth_settings(&self) -> crate::AuthSettings {
        match (&self.oidc_issuer, &self.oidc_audience) {
            (Some(issuer), Some(audience)) => {
                let mut settings = flotilla_oidc::OidcSettings::new(issuer, audience);
                settings.leeway = self.oidc_leeway;
                settings.jwks_min_refresh = self.oidc_jwks_min_refresh;
                settings.userinfo_cache = self.oidc_userinfo_cache;
                crate::AuthSettings::Oidc { settings, platform_admins: self.platform_admins.clone() }
            }
            _ if self.insecure_dev_auth => crate::AuthSettings::InsecureDevelopment,
            _ => crate::AuthSettings::None,
        }
    }

    pub fn agent_config(&self) -> AgentConfig {
        let a = &self.agent;
        AgentConfig {
            node_id: a.node_id.clone(),
            node_id_file: a.node_id_file.clone(),
            advertise_address: a.advertise_address.clone(),
            publish_ip: a.publish_ip,
            port_range: a.port_range.clone(),
            heartbeat_interval: a.heartbeat_interval,
            reconcile_interval: a.reconcile_interval,
            events: !a.no_docker_events,
            orphan_grace: a.orphan_grace,
            fence_after: Some(a.fence_after).filter(|d| !d.is_zero()),
            edge: EdgeSyncConfig {
                timeout: a.edge_sync_timeout,
                settle: a.edge_settle,
                proxy_gone_after: a.edge_proxy_gone_after,
                ..EdgeSyncConfig::default()
            },
            failed_retry_after: a.failed_retry_after,
            pull_timeout: a.pull_timeout,
            max_parallel_starts: a.max_parallel_starts,
            stop_grace: a.stop_grace,
            max_deployments: a.max_deployments,
            node_labels: a.node_labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            extra_container_labels: a.container_labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            ..AgentConfig::default()
        }
    }

    /// The pipeline's settings; `None` when metrics are off.
    pub fn metrics_config(&self) -> Option<MetricsConfig> {
        let m = &self.metrics;
        (!m.no_metrics).then(|| MetricsConfig {
            interval: m.metrics_interval,
            max_interval: m.metrics_max_interval,
            full_list_every: m.metrics_full_list_every,
            source: m.metrics_source,
            cgroup_root: m.metrics_cgroup_root.clone(),
            proc_root: m.metrics_proc_root.clone(),
            docker_parallelism: m.metrics_docker_parallelism,
            breaker: BreakerConfig {
                failures_to_open: m.metrics_breaker_failures,
                cool_down: m.metrics_breaker_cool_down,
                successes_to_close: m.metrics_breaker_successes,
            },
            subscriber_queue: m.metrics_subscriber_queue,
            write_buffer_rows: m.metrics_write_buffer_rows,
            failures_for_unhealthy: m.metrics_unhealthy_after,
            store_samples: !m.metrics_no_raw_samples,
            ..MetricsConfig::default()
        })
    }

    pub fn retention(&self) -> Retention {
        let m = &self.metrics;
        Retention {
            samples: m.metrics_retain_samples,
            minutes: m.metrics_retain_minutes,
            hourly: m.metrics_retain_hourly,
        }
    }

    pub fn orchestrator_config(&self) -> OrchestratorConfig {
        let o = &self.orchestrator;
        OrchestratorConfig {
            heartbeat_timeout: o.heartbeat_timeout,
            interval: o.placement_interval,
            default_strategy: o.placement_strategy,
            lease_ttl: o.leader_lease,
            node_watch: NodeWatchConfig {
                every: o.node_watch_interval,
                suspect_after: o.suspect_after,
                probe_timeout: o.node_probe_timeout,
                engine_port: o.engine_probe_port,
                ..NodeWatchConfig::default()
            },
            edge: self.edge_settings(),
            ..OrchestratorConfig::default()
        }
    }

    pub fn edge_settings(&self) -> EdgeSettings {
        let o = &self.orchestrator;
        EdgeSettings {
            http_entrypoint: o.edge_http_entrypoint.clone(),
            https_entrypoint: o.edge_https_entrypoint.clone(),
            tls: o.edge_tls.clone(),
            platform_domains: self.domains.platform_domains.clone(),
            // Set from the certificate settings when the daemon starts.
            flotilla_orders_certificates: false,
        }
    }

    pub fn route_table_serving(&self) -> ServeConfig {
        ServeConfig { max_wait: self.orchestrator.route_table_max_wait, refresh: self.orchestrator.route_table_refresh }
    }
}

/// `500ms`, `5s`, `2m`, `1h`, `7d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 5s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

pub fn parse_port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = text.split_once('-').ok_or_else(|| format!("{text:?} is not a range like 20000-29999"))?;
    let first: u16 = a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?;
    let last: u16 = b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?;
    if first == 0 || first > last {
        return Err(format!("{text:?}: need 1 <= first <= last"));
    }
    Ok(first..=last)
}

fn parse_node_id(text: &str) -> Result<NodeId, String> {
    NodeId::parse(text).map_err(|e| e.to_string())
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("{text:?} is not key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn parse_container_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = parse_label(text)?;
    if key.is_empty() || key.starts_with("flotilla.") || key.starts_with("traefik.") {
        return Err(format!("{key:?}: container label keys must not be empty or start with flotilla. or traefik."));
    }
    Ok((key, value))
}

fn parse_strategy(text: &str) -> Result<PlacementStrategy, String> {
    PlacementStrategy::parse("placement-strategy", text).map_err(|e| e.reason)
}

fn parse_tls(text: &str) -> Result<Tls, String> {
    match text {
        "off" => Ok(Tls::Off),
        "stored" => Ok(Tls::Stored),
        _ => match text.strip_prefix("resolver:") {
            Some(name)
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                Ok(Tls::Resolver(name.to_owned()))
            }
            _ => Err(format!("{text:?}: use off, stored or resolver:<name>")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn port_ranges_and_tls() {
        assert_eq!(parse_port_range("20000-20010"), Ok(20000..=20010));
        assert!(parse_port_range("20010-20000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert_eq!(parse_tls("resolver:le"), Ok(Tls::Resolver("le".into())));
        assert_eq!(parse_container_label("team=a"), Ok(("team".into(), "a".into())));
        assert!(parse_container_label("flotilla.managed=false").is_err());
        assert!(parse_container_label("traefik.enable=true").is_err());
        assert!(parse_tls("resolver:`x`").is_err());
    }

    #[test]
    fn every_flag_has_a_default_or_an_env_var() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["flotillad", "all", "--database-url", "postgres://x"]).unwrap();
        let (roles, config) = cli.command.into_parts().unwrap();
        assert_eq!(roles, Roles::ALL);
        assert_eq!(config.agent.port_range, 20000..=29999);
        assert_eq!(config.orchestrator.heartbeat_timeout, Duration::from_secs(15));
        let metrics = config.metrics_config().expect("metrics on by default");
        assert_eq!(metrics.interval, Duration::from_secs(5));
        assert_eq!(metrics.breaker, BreakerConfig::default());
        assert_eq!(config.retention(), Retention::default());
        let off =
            Cli::try_parse_from(["flotillad", "agent", "--database-url", "postgres://x", "--no-metrics"]).unwrap();
        assert!(off.command.into_parts().unwrap().1.metrics_config().is_none());
        assert!(
            Cli::try_parse_from(["flotillad", "all", "--database-url", "x", "--metrics-source", "magic"]).is_err(),
            "unknown sources are refused"
        );
    }

    #[test]
    fn secrets_are_read_from_files_as_docker_gives_them() {
        let dir = std::env::temp_dir().join(format!("flotillad-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("db"), "postgres://u:p@db/flotilla\n").unwrap();
        std::fs::write(dir.join("token"), "s3cret").unwrap();
        let (db, token) = (dir.join("db"), dir.join("token"));
        let args = ["flotillad", "api", "--database-url-file", db.to_str().unwrap()];
        let cli = Cli::try_parse_from(args.iter().copied().chain(["--internal-token-file", token.to_str().unwrap()]))
            .unwrap();
        let (_, mut config) = cli.command.into_parts().unwrap();
        config.read_secret_files().unwrap();
        assert_eq!(config.database_url.as_deref(), Some("postgres://u:p@db/flotilla"), "without the newline");
        assert_eq!(config.internal_token.as_deref(), Some("s3cret"));

        let missing = dir.join("missing");
        let cli = Cli::try_parse_from(["flotillad", "api", "--database-url-file", missing.to_str().unwrap()]).unwrap();
        let (_, mut config) = cli.command.into_parts().unwrap();
        let error = config.read_secret_files().unwrap_err().to_string();
        assert!(error.contains("--database-url-file") && error.contains("missing"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
