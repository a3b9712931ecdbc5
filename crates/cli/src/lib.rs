//! `flo`, Flotilla's command-line client. It talks to the API over Connect
//! like any other client.
//!
//! Exit codes: 0 success; 1 the operation failed (a deployment failed or
//! timed out); 2 usage error; 3 not found; 4 the API cannot be reached or is
//! unavailable; 5 the server refused the request (invalid, already exists,
//! not allowed).

mod apply;
mod backups;
mod credentials;
pub mod units;

use std::io::Write;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use connectrpc_axum_client::{ClientError, Code};
use flotilla_proto::v1 as pb;
use flotilla_proto::v1::deployment_service_connect_client::DeploymentServiceClient;
use flotilla_proto::v1::node_service_connect_client::NodeServiceClient;
use flotilla_proto::v1::project_service_connect_client::ProjectServiceClient;

#[derive(Debug, Parser)]
#[command(name = "flo", version, about = "Deploy and manage apps on Flotilla")]
pub struct Cli {
    /// The Flotilla API.
    #[arg(long, global = true, env = "FLOTILLA_API", default_value = "http://127.0.0.1:7800")]
    pub api: String,

    /// A bearer token from the identity provider; otherwise the one `flo
    /// login` saved for this API.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Act in this organization (slug or id) instead of your first one.
    #[arg(long, global = true, env = "FLOTILLA_ORGANIZATION")]
    pub organization: Option<String>,

    /// Output for people (default) or for scripts.
    #[arg(long, short, global = true, value_enum, default_value = "human")]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Save a token for this API: read from standard input (`--with-token`)
    /// or given with --token. It is checked before it is saved.
    ///
    /// Without a token: signs in with the identity provider's device flow
    /// (open the link shown, enter the code, approve), where the provider
    /// offers it.
    Login {
        /// Read the token from standard input.
        #[arg(long)]
        with_token: bool,
        /// The identity provider (issuer URL), when the API does not say.
        #[arg(long, requires = "client_id")]
        issuer: Option<String>,
        /// The client id to sign in as, when the API does not say.
        #[arg(long, requires = "issuer")]
        client_id: Option<String>,
        /// Scopes asked for in the device flow.
        #[arg(long, default_value = "openid email profile")]
        scope: String,
    },
    /// Forget the token saved for this API.
    Logout,
    /// Deploy an image and wait until it runs.
    Deploy(Box<DeployArgs>),
    /// List deployments.
    Ls {
        /// Only those with this status: pending, deploying, running,
        /// degraded, failed, stopped or deleting.
        #[arg(long, value_parser = parse_status)]
        status: Option<i32>,
        /// Only those with a replica on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Show a deployment and where its replicas run.
    Status {
        /// Name or id.
        deployment: String,
    },
    /// Stop every replica of a deployment (its spec and placement stay).
    Stop {
        /// Name or id.
        deployment: String,
    },
    /// Run a stopped deployment again and wait until it runs.
    Start {
        /// Name or id.
        deployment: String,
    },
    /// Replace every replica with a fresh container, start-first (no downtime).
    Restart {
        /// Name or id.
        deployment: String,
    },
    /// Set the number of replicas and wait until exactly that many run (0
    /// keeps the deployment and its route, running nothing).
    Scale {
        /// Name or id.
        deployment: String,
        /// 0 to 100.
        #[arg(value_parser = clap::value_parser!(i32).range(0..=100))]
        replicas: i32,
    },
    /// Delete a deployment and wait until it is gone.
    Rm {
        /// Name or id.
        deployment: String,
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Watch a deployment's replicas live: CPU, memory, network, PIDs every
    /// collection interval (Ctrl-C to stop).
    Top {
        /// Name or id.
        deployment: String,
        /// Start with the samples of the last minutes.
        #[arg(long)]
        backfill: bool,
        /// Stop after this many samples.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds (default 1 hour).
        #[arg(long, value_parser = parse_seconds)]
        duration: Option<Duration>,
    },
    /// A deployment's recorded metrics: raw samples for the last hour,
    /// minutes up to two days, hours beyond.
    Metrics {
        /// Name or id.
        deployment: String,
        /// How far back, in seconds (default 3600).
        #[arg(long, value_parser = parse_seconds, default_value = "3600")]
        since: Duration,
        /// Bucket width in seconds (default: the resolution's own).
        #[arg(long, value_parser = parse_seconds)]
        step: Option<Duration>,
    },
    /// Apply a project file (flotilla.toml): create what is missing, update
    /// only what differs; see `flo apply --help`.
    Apply {
        /// The project file.
        #[arg(long, short, default_value = "flotilla.toml")]
        file: String,
        /// Also delete the project's deployments the file does not declare.
        #[arg(long)]
        prune: bool,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a deployment's log lines (every replica's, prefixed with its
    /// number); with -f, keep printing new ones.
    Logs {
        /// Name or id.
        deployment: String,
        /// Keep following new lines until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
        /// Lines of each replica to start with.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Only this replica.
        #[arg(long)]
        replica: Option<i32>,
    },
    /// Show a deployment's environment, or change it (new containers roll
    /// out). Secrets are shown masked.
    Env {
        /// Name or id.
        deployment: String,
        /// Set NAME=VALUE (repeatable).
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Set NAME=VALUE as a secret: never shown again, never logged.
        #[arg(long = "secret", value_name = "NAME=VALUE")]
        secret: Vec<String>,
        /// Remove NAME (repeatable).
        #[arg(long = "unset", value_name = "NAME")]
        unset: Vec<String>,
    },
    /// Show where a deployment is reachable, or change its domain.
    Domains {
        /// Name or id.
        deployment: String,
        /// Route this domain to it.
        #[arg(long, conflicts_with = "remove")]
        set: Option<String>,
        /// Only paths under this prefix (with --set, or alone).
        #[arg(long)]
        path_prefix: Option<String>,
        /// Stop routing a domain to it.
        #[arg(long)]
        remove: bool,
        /// Prove a custom domain: the first time, prints the DNS TXT record
        /// to publish; then checks it (exit 1 while it is not found).
        #[arg(long, conflicts_with = "remove")]
        verify: bool,
    },
    /// The cluster's nodes: list, drain, activate (platform administrators).
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// The control database's base backups and the last good one (platform
    /// administrators).
    Backups {
        /// How many of the latest to list (at most 200).
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Hourly usage (the basis of billing): of one deployment, or of the
    /// whole organization.
    Usage {
        /// Name or id; the whole organization when left out.
        deployment: Option<String>,
        /// How far back, in seconds (default 86400).
        #[arg(long, value_parser = parse_seconds, default_value = "86400")]
        since: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List nodes with their state and load.
    Ls,
    /// Move every replica off a node; it takes no new work until activated.
    Drain {
        node: String,
        /// Stop its replicas at once instead of waiting for healthy
        /// replacements elsewhere.
        #[arg(long)]
        now: bool,
    },
    /// Let a node take new work again.
    Activate { node: String },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The deployment's name: lowercase letters, digits and '-'.
    pub name: String,
    /// Image reference, e.g. flotilla/demo-http:latest.
    #[arg(long)]
    pub image: String,
    /// The port the app listens on inside its container.
    #[arg(long)]
    pub port: i32,
    /// Environment variable NAME=value; repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Secret variable NAME=value (never shown again); repeatable.
    #[arg(long = "secret", value_parser = parse_env)]
    pub secrets: Vec<(String, String)>,
    /// Hostname to route to the app.
    #[arg(long)]
    pub domain: Option<String>,
    /// Route only this path of the domain to the app, e.g. /api.
    #[arg(long, requires = "domain")]
    pub path_prefix: Option<String>,
    /// Memory limit, e.g. 64Mi or 1G.
    #[arg(long, value_parser = units::parse_memory)]
    pub memory: Option<i64>,
    /// CPU limit in cores, e.g. 0.5 or 250m.
    #[arg(long, value_parser = units::parse_cpus)]
    pub cpus: Option<i64>,
    #[arg(long)]
    pub replicas: Option<i32>,
    /// How nodes are chosen: least-loaded, round-robin, binpack or spread
    /// (default: the cluster's).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Only nodes with this label, NAME=value; repeatable.
    #[arg(long = "constraint", value_parser = parse_env)]
    pub constraints: Vec<(String, String)>,
    /// When a node is lost: `fence` (default; at most one copy runs, the
    /// replacement starts a few seconds later) or `replace` (at once; a
    /// cut-off node's copy may run on until it returns).
    #[arg(long, value_parser = ["fence", "replace"])]
    pub node_loss: Option<String>,
    /// Project id (default: your default project).
    #[arg(long)]
    pub project: Option<String>,
    /// Return once accepted instead of waiting until it runs.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait until it runs.
    #[arg(long, default_value = "120", value_parser = parse_seconds)]
    pub timeout: Duration,
}

/// The placement `flo deploy` asks for; none leaves the cluster's default
/// (the server checks the strategy's name).
fn placement(
    strategy: Option<String>,
    constraints: Vec<(String, String)>,
    node_loss: Option<String>,
) -> Option<pb::Placement> {
    (strategy.is_some() || !constraints.is_empty() || node_loss.is_some()).then(|| pb::Placement {
        strategy: strategy.unwrap_or_default(),
        constraints: constraints.into_iter().collect(),
        node_loss: node_loss.unwrap_or_default(),
    })
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{text:?} is not NAME=value"))
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: u64 =
        text.trim_end_matches('s').parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Ok(Duration::from_secs(seconds))
}

/// A failed command and the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("cannot reach the Flotilla API at {api}: {message}\n  Is flotillad running? Set --api or FLOTILLA_API.")]
    Unreachable { api: String, message: String },
    /// The API answered, but cannot serve now (its database or a service
    /// behind it is away).
    #[error(
        "the Flotilla API at {api} answered but cannot serve now: {message}\n  Try again shortly; `curl {api}/health` says which part is away."
    )]
    Unavailable { api: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Failed(_) | Self::Output(_) => 1,
            Self::NotFound(_) => 3,
            Self::Unreachable { .. } | Self::Unavailable { .. } => 4,
            Self::Refused(_) => 5,
        }
    }

    fn from_client(api: &str, error: &ClientError) -> Self {
        let message = error.message().unwrap_or("no message").to_owned();
        match error.code() {
            Code::NotFound => Self::NotFound(message),
            // It answered: it is running, something behind it is not.
            Code::Unavailable | Code::DeadlineExceeded if matches!(error, ClientError::Rpc(_)) => {
                Self::Unavailable { api: api.to_owned(), message }
            }
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded => {
                Self::Unreachable { api: api.to_owned(), message: error.to_string() }
            }
            Code::InvalidArgument => Self::Refused(format!("invalid request: {message}")),
            Code::AlreadyExists => Self::Refused(format!("already exists: {message}")),
            Code::PermissionDenied => Self::Refused(format!("not allowed: {message}")),
            Code::Unauthenticated => Self::Refused(format!("not logged in: {message}")),
            _ => Self::Failed(format!("{}: {message}", error.code().as_str())),
        }
    }
}

/// Signs in with the provider's device flow and returns the token to keep.
async fn device_login(api: &str, given: Option<(&str, &str)>, scope: &str) -> Result<String, CliError> {
    use flotilla_oidc::device::{DeviceFlow, DeviceFlowError, login_config};
    let failed = |e: DeviceFlowError| match e {
        DeviceFlowError::NotSupported { .. } => CliError::Failed(format!(
            "{e}: get a token from it and run `flo login --with-token < token.txt` (or --token / FLOTILLA_TOKEN)"
        )),
        DeviceFlowError::Unreachable { .. } => CliError::Unreachable { api: api.to_owned(), message: e.to_string() },
        other => CliError::Refused(other.to_string()),
    };
    let (issuer, client_id) = match given {
        Some((issuer, client_id)) => (issuer.to_owned(), client_id.to_owned()),
        None => match login_config(api).await.map_err(failed)? {
            Some(config) => (config.issuer, config.client_id),
            None => {
                return Err(CliError::Failed(format!(
                    "{api} does not say where to sign in (is it in development mode?): pass --issuer and \
                     --client-id, or use `flo login --with-token`"
                )));
            }
        },
    };
    let flow = DeviceFlow::discover(&issuer, &client_id).await.map_err(failed)?;
    let authorization = flow.start(scope).await.map_err(failed)?;
    let link = authorization.verification_uri_complete.as_deref().unwrap_or(&authorization.verification_uri);
    eprintln!("To sign in, open {link}");
    eprintln!("and enter the code: {}", authorization.user_code);
    eprintln!("Waiting for approval (the code expires in {} min)...", authorization.expires_in.div_ceil(60));
    let tokens = flow.wait(&authorization).await.map_err(failed)?;
    Ok(tokens.bearer().to_owned())
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut token = cli.token.clone();
    match cli.command {
        Command::Login { with_token, ref issuer, ref client_id, ref scope } => {
            if with_token {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                token = Some(line.trim().to_owned());
            }
            let token = match token.filter(|t| !t.is_empty()) {
                Some(token) => token,
                None if with_token => return Err(CliError::Failed("no token on standard input".to_owned())),
                None => device_login(&cli.api, issuer.as_deref().zip(client_id.as_deref()), scope).await?,
            };
            // Checked with a harmless read before it is kept.
            let flo = Flo::connect(&cli, Some(&token))?;
            let request = pb::ListDeploymentsRequest { page_size: 1, ..Default::default() };
            flo.client.list_deployments(&request).await.map_err(|e| flo.err(e))?;
            let path = credentials::save(&cli.api, &token)?;
            eprintln!("Logged in to {} (token saved in {})", cli.api, path.display());
            return Ok(());
        }
        Command::Logout => {
            let had = credentials::remove(&cli.api)?;
            eprintln!(
                "{}",
                if had { format!("Logged out of {}", cli.api) } else { format!("No token was saved for {}", cli.api) }
            );
            return Ok(());
        }
        _ => {}
    }
    if token.is_none() {
        token = credentials::load(&cli.api);
    }
    let flo = Flo::connect(&cli, token.as_deref())?;
    match cli.command {
        Command::Login { .. } | Command::Logout => unreachable!("handled above"),
        Command::Deploy(args) => flo.deploy(*args).await,
        Command::Ls { status, node } => flo.list(status.unwrap_or(0), node.unwrap_or_default()).await,
        Command::Status { deployment } => {
            let d = flo.find(&deployment).await?;
            flo.show(&d)
        }
        Command::Rm { deployment, no_wait } => flo.remove(&deployment, no_wait).await,
        Command::Stop { deployment } => flo.change(&deployment, Change::Stop).await,
        Command::Start { deployment } => flo.change(&deployment, Change::Start).await,
        Command::Restart { deployment } => flo.change(&deployment, Change::Restart).await,
        Command::Scale { deployment, replicas } => flo.change(&deployment, Change::Scale(replicas)).await,
        Command::Top { deployment, backfill, count, duration } => flo.top(&deployment, backfill, count, duration).await,
        Command::Metrics { deployment, since, step } => flo.metrics(&deployment, since, step).await,
        Command::Usage { deployment, since } => flo.usage(deployment.as_deref(), since).await,
        Command::Apply { file, prune, dry_run } => flo.apply(&file, prune, dry_run).await,
        Command::Logs { deployment, follow, tail, replica } => flo.logs(&deployment, follow, tail, replica).await,
        Command::Env { deployment, set, secret, unset } => flo.env(&deployment, &set, &secret, &unset).await,
        Command::Domains { deployment, set, path_prefix, remove, verify } => {
            let domain = if remove { Some(String::new()) } else { set };
            flo.domains(&deployment, domain, path_prefix, verify).await
        }
        Command::Nodes(NodesCommand::Ls) => flo.list_nodes().await,
        Command::Nodes(NodesCommand::Drain { node, now }) => {
            let request = pb::DrainNodeRequest { id: node, now };
            let reply = flo.nodes.drain_node(&request).await.map_err(|e| flo.err(e))?.into_inner();
            let what =
                if now { "its replicas are stopped now" } else { "its replicas move once replacements are healthy" };
            flo.node_changed(reply.node, &format!("drained: no new work; {what}"))
        }
        Command::Nodes(NodesCommand::Activate { node }) => {
            let request = pb::ActivateNodeRequest { id: node };
            let reply = flo.nodes.activate_node(&request).await.map_err(|e| flo.err(e))?.into_inner();
            flo.node_changed(reply.node, "active: takes new work")
        }
        Command::Backups { limit } => flo.list_backups(limit).await,
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0}{}", UNITS[unit]) } else { format!("{value:.1}{}", UNITS[unit]) }
}

fn time_text(t: Option<&pbjson_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map_or_else(|| "-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

struct Flo {
    client: DeploymentServiceClient,
    /// For streams (logs -f, top): the same headers, no request timeout.
    streams: DeploymentServiceClient,
    nodes: NodeServiceClient,
    projects: ProjectServiceClient,
    api: String,
    format: OutputFormat,
}

impl Flo {
    /// Clients of the API that send `token` and the chosen organization.
    fn connect(cli: &Cli, token: Option<&str>) -> Result<Self, CliError> {
        let unreachable = |e: connectrpc_axum_client::ClientBuildError| CliError::Unreachable {
            api: cli.api.clone(),
            message: e.to_string(),
        };
        let mut headers = connectrpc_axum_client::HeaderMap::new();
        let values = [
            ("authorization", token.map(|t| format!("Bearer {t}"))),
            ("flotilla-organization", cli.organization.clone()),
        ];
        for (name, value) in values {
            let Some(value) = value else { continue };
            let value = value.parse().map_err(|_| {
                CliError::Refused(format!("the {name} cannot be sent in a header (only visible ASCII is allowed)"))
            })?;
            headers.insert(name, value);
        }
        let client = DeploymentServiceClient::builder(cli.api.clone())
            .timeout(Duration::from_secs(30))
            .default_headers(headers.clone())
            .build()
            .map_err(unreachable)?;
        let nodes = NodeServiceClient::builder(cli.api.clone())
            .timeout(Duration::from_secs(30))
            .default_headers(headers.clone())
            .build()
            .map_err(unreachable)?;
        let projects = ProjectServiceClient::builder(cli.api.clone())
            .timeout(Duration::from_secs(30))
            .default_headers(headers.clone())
            .build()
            .map_err(unreachable)?;
        // No 30 s request timeout: a stream lasts. The same credentials.
        let streams =
            DeploymentServiceClient::builder(cli.api.clone()).default_headers(headers).build().map_err(unreachable)?;
        Ok(Self { client, streams, nodes, projects, api: cli.api.clone(), format: cli.output })
    }
}

/// A status as `flo ls --status` takes it.
fn parse_status(name: &str) -> Result<i32, String> {
    let all = [
        pb::DeploymentStatus::Pending,
        pb::DeploymentStatus::Deploying,
        pb::DeploymentStatus::Running,
        pb::DeploymentStatus::Degraded,
        pb::DeploymentStatus::Failed,
        pb::DeploymentStatus::Stopped,
        pb::DeploymentStatus::Deleting,
    ];
    all.into_iter().map(|s| s as i32).find(|s| status_name(*s) == name.to_ascii_lowercase()).ok_or_else(|| {
        let names: Vec<&str> = all.into_iter().map(|s| status_name(s as i32)).collect();
        format!("{name:?} is not a status; one of {}", names.join(", "))
    })
}

fn status_name(status: i32) -> &'static str {
    match pb::DeploymentStatus::try_from(status).unwrap_or(pb::DeploymentStatus::Unspecified) {
        pb::DeploymentStatus::Unspecified => "unknown",
        pb::DeploymentStatus::Pending => "pending",
        pb::DeploymentStatus::Deploying => "deploying",
        pb::DeploymentStatus::Running => "running",
        pb::DeploymentStatus::Degraded => "degraded",
        pb::DeploymentStatus::Failed => "failed",
        pb::DeploymentStatus::Stopped => "stopped",
        pb::DeploymentStatus::Deleting => "deleting",
    }
}

fn replica_status_name(status: i32) -> &'static str {
    match pb::ReplicaStatus::try_from(status).unwrap_or(pb::ReplicaStatus::Unspecified) {
        pb::ReplicaStatus::Unspecified => "unknown",
        pb::ReplicaStatus::Pending => "pending",
        pb::ReplicaStatus::Creating => "creating",
        pb::ReplicaStatus::Running => "running",
        pb::ReplicaStatus::Stopped => "stopped",
        pb::ReplicaStatus::Failed => "failed",
        pb::ReplicaStatus::Removing => "removing",
    }
}

impl Flo {
    fn err(&self, error: ClientError) -> CliError {
        CliError::from_client(&self.api, &error)
    }

    fn say(&self, line: &str) -> Result<(), CliError> {
        if self.format == OutputFormat::Human {
            writeln!(std::io::stdout().lock(), "{line}")?;
        }
        Ok(())
    }

    fn json(&self, value: &impl serde::Serialize) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Failed(e.to_string()))?;
        writeln!(std::io::stdout().lock(), "{text}")?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<pb::Deployment, CliError> {
        self.get_by(pb::GetDeploymentRequest { id: id.to_owned(), ..Default::default() }).await
    }

    async fn get_by(&self, request: pb::GetDeploymentRequest) -> Result<pb::Deployment, CliError> {
        let response = self.client.get_deployment(&request).await.map_err(|e| self.err(e))?;
        response.into_inner().deployment.ok_or_else(|| CliError::Failed("the server sent no deployment".to_owned()))
    }

    async fn all(&self) -> Result<Vec<pb::Deployment>, CliError> {
        self.all_matching(0, String::new()).await
    }

    /// Every deployment with `status` (0: any) on `node` (empty: any), page by page.
    async fn all_matching(&self, status: i32, node: String) -> Result<Vec<pb::Deployment>, CliError> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .client
                .list_deployments(&pb::ListDeploymentsRequest {
                    page_size: 500,
                    page_token: page_token.clone(),
                    status,
                    node_id: node.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| self.err(e))?
                .into_inner();
            all.extend(page.deployments);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// A deployment by id, or by name among the caller's deployments.
    async fn find(&self, name_or_id: &str) -> Result<pb::Deployment, CliError> {
        if uuid::Uuid::parse_str(name_or_id).is_ok() {
            return self.get(name_or_id).await;
        }
        // In the default project, by the server; else among all of them.
        match self.get_by(pb::GetDeploymentRequest { name: name_or_id.to_owned(), ..Default::default() }).await {
            Err(CliError::NotFound(_)) => {}
            found => return found,
        }
        self.all()
            .await?
            .into_iter()
            .find(|d| d.name == name_or_id)
            .ok_or_else(|| CliError::NotFound(format!("no deployment named {name_or_id:?}; see `flo ls`")))
    }

    async fn deploy(&self, args: DeployArgs) -> Result<(), CliError> {
        let env = args
            .env
            .iter()
            .map(|(name, value)| (name, value, false))
            .chain(args.secrets.iter().map(|(name, value)| (name, value, true)))
            .map(|(name, value, secret)| pb::EnvVar { name: name.clone(), value: value.clone(), secret })
            .collect();
        let request = pb::CreateDeploymentRequest {
            project_id: args.project.unwrap_or_default(),
            name: args.name,
            image: args.image,
            port: args.port,
            env,
            domain: args.domain.unwrap_or_default(),
            path_prefix: args.path_prefix.unwrap_or_default(),
            limits: Some(pb::ResourceLimits {
                memory_bytes: args.memory.unwrap_or(0),
                cpu_millis: args.cpus.unwrap_or(0),
            }),
            replicas: args.replicas,
            placement: placement(args.strategy, args.constraints, args.node_loss),
            ..Default::default()
        };
        let created = self
            .client
            .create_deployment(&request)
            .await
            .map_err(|e| self.err(e))?
            .into_inner()
            .deployment
            .ok_or_else(|| CliError::Failed("the server sent no deployment".to_owned()))?;
        self.say(&format!("Deployment {} accepted (id {})", created.name, created.id))?;
        if args.no_wait {
            return if self.format == OutputFormat::Json { self.json(&created) } else { Ok(()) };
        }
        let deployment = self.wait_until_running(&created, args.timeout).await?;
        if self.format == OutputFormat::Json {
            return self.json(&deployment);
        }
        for replica in &deployment.replicas {
            self.say(&format!("  replica {} on node {}: {}", replica.index, replica.node_id, replica.endpoint))?;
        }
        if !deployment.domain.is_empty() {
            self.say_routes(&deployment.id).await?;
        }
        Ok(())
    }

    /// Where the edge serves the deployment, only when it does; why not
    /// otherwise.
    async fn say_routes(&self, id: &str) -> Result<(), CliError> {
        let reply = self
            .client
            .get_routings(&pb::GetRoutingsRequest { id: id.to_owned() })
            .await
            .map_err(|e| self.err(e))?
            .into_inner();
        if reply.routings.is_empty() {
            return self.say("  not routed yet: its route is written once a replica is placed");
        }
        for r in &reply.routings {
            self.say(&route_line(r))?;
        }
        Ok(())
    }

    /// Polls until the deployment runs or fails, printing each change.
    async fn wait_until_running(
        &self,
        created: &pb::Deployment,
        timeout: Duration,
    ) -> Result<pb::Deployment, CliError> {
        self.follow(
            &created.id,
            timeout,
            |d| {
                let status = status_name(d.status);
                Some(if d.status_message.is_empty() {
                    status.to_owned()
                } else {
                    format!("{status}: {}", d.status_message)
                })
            },
            |d| match pb::DeploymentStatus::try_from(d.status) {
                Ok(pb::DeploymentStatus::Running) => Poll::Done,
                Ok(pb::DeploymentStatus::Failed) => Poll::Failed(format!(
                    "deployment {} failed: {}\n  See `flo status {}`.",
                    d.name, d.status_message, d.name
                )),
                _ => Poll::Waiting,
            },
            |d, seconds| {
                format!(
                    "deployment {} is not running after {seconds}s (status: {}); it may still start: `flo status {}`",
                    d.name,
                    status_name(d.status),
                    d.name
                )
            },
        )
        .await
    }

    /// Polls deployment `id` every 250 ms until `check` says it is done or
    /// failed, or `timeout` passes (`late` says so then), printing `line` of
    /// each answer whenever it changes.
    async fn follow(
        &self,
        id: &str,
        timeout: Duration,
        line: impl Fn(&pb::Deployment) -> Option<String>,
        check: impl Fn(&pb::Deployment) -> Poll,
        late: impl Fn(&pb::Deployment, u64) -> String,
    ) -> Result<pb::Deployment, CliError> {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            let d = self.get(id).await?;
            if let Some(line) = line(&d).filter(|l| *l != last) {
                self.say(&format!("  [{:>5.1}s] {line}", started.elapsed().as_secs_f64()))?;
                last = line;
            }
            match check(&d) {
                Poll::Done => return Ok(d),
                Poll::Failed(why) => return Err(CliError::Failed(why)),
                Poll::Waiting => {}
            }
            if started.elapsed() > timeout {
                return Err(CliError::Failed(late(&d, timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn list(&self, status: i32, node: String) -> Result<(), CliError> {
        let all = self.all_matching(status, node).await?;
        if self.format == OutputFormat::Json {
            return self.json(&all);
        }
        if all.is_empty() {
            return self.say("No deployments. Create one with `flo deploy`.");
        }
        self.say(&format!("{:<24} {:<10} {:>8}  {:<32} {}", "NAME", "STATUS", "REPLICAS", "IMAGE", "DOMAIN"))?;
        for d in &all {
            let running = d.replicas.iter().filter(|r| r.status == pb::ReplicaStatus::Running as i32).count();
            self.say(&format!(
                "{:<24} {:<10} {:>8}  {:<32} {}",
                d.name,
                status_name(d.status),
                format!("{running}/{}", d.replica_count),
                d.image,
                d.domain
            ))?;
        }
        Ok(())
    }

    async fn logs(&self, deployment: &str, follow: bool, tail: u32, replica: Option<i32>) -> Result<(), CliError> {
        let id = self.find(deployment).await?.id;
        let request = pb::StreamDeploymentLogsRequest { deployment_id: id, follow, tail, replica_index: replica };
        let client = if follow { &self.streams } else { &self.client };
        let mut stream = client.stream_deployment_logs(&request).await.map_err(|e| self.err(e))?.into_inner();
        while let Some(line) = futures::StreamExt::next(&mut stream).await {
            let line = line.map_err(|e| self.err(e))?;
            if self.format == OutputFormat::Json {
                writeln!(std::io::stdout().lock(), "{}", serde_json::to_string(&line).unwrap_or_default())?;
            } else {
                self.say(&format!("[#{}] {}", line.replica_index, line.text))?;
            }
        }
        Ok(())
    }

    async fn env(&self, deployment: &str, set: &[String], secret: &[String], unset: &[String]) -> Result<(), CliError> {
        let id = self.find(deployment).await?.id;
        let current = self
            .client
            .get_env_vars(&pb::GetEnvVarsRequest { id: id.clone() })
            .await
            .map_err(|e| self.err(e))?
            .into_inner();
        let mut vars = current.vars.clone();
        let changes = set.iter().map(|s| (s, false)).chain(secret.iter().map(|s| (s, true)));
        for (assignment, is_secret) in changes {
            let Some((name, value)) = assignment.split_once('=') else {
                return Err(CliError::Refused(format!("{assignment:?}: expected NAME=VALUE")));
            };
            vars.retain(|v| v.name != name);
            vars.push(pb::EnvVar { name: name.to_owned(), value: value.to_owned(), secret: is_secret });
        }
        vars.retain(|v| !unset.contains(&v.name));
        let vars = if set.is_empty() && secret.is_empty() && unset.is_empty() {
            current.vars
        } else {
            let request = pb::UpdateEnvVarsRequest { id, expected_generation: current.generation, vars };
            let reply = self.client.update_env_vars(&request).await.map_err(|e| self.err(e))?.into_inner();
            eprintln!("environment updated (generation {}): new containers roll out", reply.generation);
            reply.vars
        };
        if self.format == OutputFormat::Json {
            return self.json(&pb::GetEnvVarsResponse { vars, generation: 0 });
        }
        for var in &vars {
            self.say(&format!("{}={}", var.name, var.value))?;
        }
        Ok(())
    }

    async fn domains(
        &self,
        deployment: &str,
        domain: Option<String>,
        path_prefix: Option<String>,
        verify: bool,
    ) -> Result<(), CliError> {
        let id = self.find(deployment).await?.id;
        if domain.is_some() || path_prefix.is_some() {
            let request = pb::UpdateRoutingsRequest { id: id.clone(), expected_generation: 0, domain, path_prefix };
            self.client.update_routings(&request).await.map_err(|e| self.err(e))?;
            eprintln!("routing updated: the edge follows once the orchestrator commits it");
        }
        if verify {
            let status = self
                .client
                .verify_domain(&pb::VerifyDomainRequest { id: id.clone() })
                .await
                .map_err(|e| self.err(e))?
                .into_inner();
            return self.domain_verification(&status);
        }
        let reply = self
            .client
            .get_routings(&pb::GetRoutingsRequest { id: id.clone() })
            .await
            .map_err(|e| self.err(e))?
            .into_inner();
        if self.format == OutputFormat::Json {
            return self.json(&reply);
        }
        if reply.domain.is_empty() {
            return self.say("no domain");
        }
        let status = self
            .client
            .get_domain_status(&pb::GetDomainStatusRequest { id })
            .await
            .map_err(|e| self.err(e))?
            .into_inner();
        self.say(&domain_summary(&status))?;
        self.say(&format!("{}{} (asked for)", reply.domain, reply.path_prefix))?;
        for r in &reply.routings {
            self.say(&route_line(r))?;
            self.say(&format!(
                "    -> port {} of {} replica(s) ({}, router {})",
                r.target_port, r.serving_replicas, r.protocol, r.router_name
            ))?;
        }
        if reply.routings.is_empty() {
            self.say("  not served yet (no replica placed, or stopped)")?;
        }
        Ok(())
    }

    /// VerifyDomain's answer: what to publish, or that it is proven.
    fn domain_verification(&self, status: &pb::GetDomainStatusResponse) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            self.json(status)?;
        } else {
            self.say(&domain_summary(status))?;
        }
        match status.verification() {
            pb::DomainVerification::Verified | pb::DomainVerification::NotRequired => Ok(()),
            _ => {
                if self.format != OutputFormat::Json {
                    self.say(&format!(
                        "publish this DNS record, then run this command again:\n  {} TXT \"{}\"",
                        status.txt_name, status.txt_value
                    ))?;
                }
                let found = match status.last_check_error.as_str() {
                    "" => String::new(),
                    error => format!(": {error}"),
                };
                Err(CliError::Failed(format!("{} is not verified yet{found}", status.domain)))
            }
        }
    }

    async fn list_nodes(&self) -> Result<(), CliError> {
        let reply = self.nodes.list_nodes(&pb::ListNodesRequest {}).await.map_err(|e| self.err(e))?.into_inner();
        if self.format == OutputFormat::Json {
            return self.json(&reply);
        }
        self.say(&format!(
            "{:<28} {:<8} {:<7} {:<10} {:>11} {:>9} {:>7}  {}",
            "NODE", "STATUS", "AVAIL", "ROLE", "DEPLOYMENTS", "CPU USED", "MEMORY", "LABELS"
        ))?;
        for n in &reply.nodes {
            let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let moving = if n.replicas_moving > 0 { format!(" ({} moving)", n.replicas_moving) } else { String::new() };
            self.say(&format!(
                "{:<28} {:<8} {:<7} {:<10} {:>11} {:>8}m {:>7}  {}{moving}",
                n.id,
                n.status,
                n.availability,
                n.role,
                format!("{}/{}", n.deployment_count, n.max_deployments),
                n.used_cpu_millis,
                bytes(n.used_memory_bytes as f64),
                labels.join(",")
            ))?;
        }
        let leader = if reply.leader.is_empty() { "none" } else { reply.leader.as_str() };
        self.say(&format!("orchestrator leader: {leader}"))
    }

    fn node_changed(&self, node: Option<pb::Node>, what: &str) -> Result<(), CliError> {
        let node = node.unwrap_or_default();
        if self.format == OutputFormat::Json {
            return self.json(&node);
        }
        self.say(&format!("{}: {what}", node.id))
    }

    fn show(&self, d: &pb::Deployment) -> Result<(), CliError> {
        if self.format == OutputFormat::Json {
            return self.json(d);
        }
        self.say(&format!("{} ({})", d.name, d.id))?;
        let message = if d.status_message.is_empty() { String::new() } else { format!(" — {}", d.status_message) };
        self.say(&format!("  status:   {}{message}", status_name(d.status)))?;
        self.say(&format!("  image:    {}", d.image))?;
        self.say(&format!("  port:     {}", d.port))?;
        if !d.domain.is_empty() {
            self.say(&format!("  domain:   {}{}", d.domain, if d.path_prefix == "/" { "" } else { &d.path_prefix }))?;
        }
        for v in &d.env {
            self.say(&format!("  env:      {}={}", v.name, v.value))?;
        }
        self.say(&format!("  replicas: {}", d.replica_count))?;
        for r in &d.replicas {
            let container = r.container_id.get(..12).unwrap_or(&r.container_id);
            let why = if r.message.is_empty() { String::new() } else { format!(" — {}", r.message) };
            self.say(&format!(
                "    #{} {:<9} node {} container {} {}{why}",
                r.index,
                replica_status_name(r.status),
                r.node_id,
                if container.is_empty() { "-" } else { container },
                r.endpoint
            ))?;
            if !r.placement_reason.is_empty() {
                let drain = if r.drain_state.is_empty() { String::new() } else { format!(" [{}]", r.drain_state) };
                self.say(&format!("       placed: {}{drain}", r.placement_reason))?;
            }
        }
        if !d.placement_message.is_empty() {
            self.say(&format!("  waiting for a node: {}", d.placement_message))?;
        }
        Ok(())
    }

    async fn top(
        &self,
        name_or_id: &str,
        backfill: bool,
        count: Option<usize>,
        duration: Option<Duration>,
    ) -> Result<(), CliError> {
        let d = self.find(name_or_id).await?;
        let request = pb::StreamDeploymentMetricsRequest {
            deployment_id: d.id.clone(),
            backfill,
            max_duration_seconds: duration.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        };
        let mut stream = self.streams.stream_deployment_metrics(&request).await.map_err(|e| self.err(e))?.into_inner();
        self.say(&format!("{} ({}): live, every collection interval; Ctrl-C to stop", d.name, d.id))?;
        self.say(&format!(
            "{:<19} {:>3} {:>8} {:>7} {:>21} {:>11} {:>11} {:>5}",
            "TIME", "#", "CPU", "CPU%", "MEMORY / LIMIT", "NET IN/s", "NET OUT/s", "PIDS"
        ))?;
        let mut seen = 0;
        while count.is_none_or(|c| seen < c) {
            let Some(next) = futures::StreamExt::next(&mut stream).await else { break };
            let s = next.map_err(|e| self.err(e))?;
            seen += 1;
            if self.format == OutputFormat::Json {
                writeln!(std::io::stdout().lock(), "{}", serde_json::to_string(&s).unwrap_or_default())?;
                continue;
            }
            let per_second = |n: u64| bytes(n as f64 * 1000.0 / s.interval_ms.max(1) as f64);
            let limit = if s.memory_limit_bytes == 0 { "-".to_owned() } else { bytes(s.memory_limit_bytes as f64) };
            self.say(&format!(
                "{:<19} {:>3} {:>8.3} {:>6.1}% {:>21} {:>11} {:>11} {:>5}",
                time_text(s.time.as_ref()),
                s.replica_index,
                s.cpu_cores,
                s.cpu_percent,
                format!("{} / {limit}", bytes(s.memory_bytes as f64)),
                per_second(s.net_rx_bytes),
                per_second(s.net_tx_bytes),
                s.pids
            ))?;
        }
        Ok(())
    }

    async fn metrics(&self, name_or_id: &str, since: Duration, step: Option<Duration>) -> Result<(), CliError> {
        let d = self.find(name_or_id).await?;
        let now = chrono::Utc::now();
        let request = pb::GetDeploymentMetricsRequest {
            deployment_id: d.id.clone(),
            start: Some(timestamp(now - chrono::Duration::from_std(since).unwrap_or_default())),
            end: Some(timestamp(now)),
            step_seconds: step.map_or(0, |s| u32::try_from(s.as_secs()).unwrap_or(u32::MAX)),
        };
        let series = self.client.get_deployment_metrics(&request).await.map_err(|e| self.err(e))?.into_inner();
        if self.format == OutputFormat::Json {
            return self.json(&series);
        }
        let resolution = match pb::MetricsResolution::try_from(series.resolution) {
            Ok(pb::MetricsResolution::Raw) => "raw samples",
            Ok(pb::MetricsResolution::Minute) => "minutes",
            Ok(pb::MetricsResolution::Hour) => "hours",
            _ => "unknown",
        };
        self.say(&format!("{} ({}): {resolution}, {}s buckets", d.name, d.id, series.step_seconds))?;
        if series.points.is_empty() {
            return self.say("  no data in this range yet");
        }
        self.say(&format!(
            "{:<19} {:>3} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "TIME", "#", "CPU", "CPU MAX", "MEMORY", "MEM MAX", "NET IN", "NET OUT"
        ))?;
        for p in &series.points {
            let replica = if p.container_id.is_empty() { "all".to_owned() } else { p.replica_index.to_string() };
            self.say(&format!(
                "{:<19} {:>3} {:>8.3} {:>8.3} {:>10} {:>10} {:>10} {:>10}",
                time_text(p.time.as_ref()),
                replica,
                p.cpu_cores,
                p.cpu_max_cores,
                bytes(p.memory_bytes as f64),
                bytes(p.memory_max_bytes as f64),
                bytes(p.net_rx_bytes as f64),
                bytes(p.net_tx_bytes as f64)
            ))?;
        }
        Ok(())
    }

    async fn usage(&self, name_or_id: Option<&str>, since: Duration) -> Result<(), CliError> {
        let deployment = match name_or_id {
            Some(n) => Some(self.find(n).await?),
            None => None,
        };
        let now = chrono::Utc::now();
        let request = pb::GetUsageRequest {
            deployment_id: deployment.as_ref().map(|d| d.id.clone()).unwrap_or_default(),
            start: Some(timestamp(now - chrono::Duration::from_std(since).unwrap_or_default())),
            end: Some(timestamp(now)),
        };
        let usage = self.client.get_usage(&request).await.map_err(|e| self.err(e))?.into_inner();
        if self.format == OutputFormat::Json {
            return self.json(&usage);
        }
        let whose = deployment.as_ref().map_or_else(|| "the organization".to_owned(), |d| d.name.clone());
        self.say(&format!("Hourly usage of {whose}"))?;
        if usage.hours.is_empty() {
            return self.say("  none recorded in this range yet (hours are rolled up every few minutes)");
        }
        self.say(&format!(
            "{:<19} {:>12} {:>14} {:>10} {:>10}",
            "HOUR", "CPU core-s", "MEMORY GiB-h", "NET IN", "NET OUT"
        ))?;
        for h in &usage.hours {
            self.say(&format!(
                "{:<19} {:>12.1} {:>14.4} {:>10} {:>10}",
                time_text(h.hour.as_ref()),
                h.cpu_core_seconds,
                h.memory_byte_seconds / 3600.0 / f64::from(1u32 << 30),
                bytes(h.net_rx_bytes as f64),
                bytes(h.net_tx_bytes as f64)
            ))?;
        }
        Ok(())
    }

    /// Stops, starts, restarts or scales a deployment, then follows it until
    /// it is where the change leads.
    async fn change(&self, name_or_id: &str, change: Change) -> Result<(), CliError> {
        let d = self.find(name_or_id).await?;
        let id = d.id.clone();
        let changed = match change {
            Change::Stop => {
                self.client.stop_deployment(&pb::StopDeploymentRequest { id }).await.map(|r| r.into_inner().deployment)
            }
            Change::Start => self
                .client
                .start_deployment(&pb::StartDeploymentRequest { id })
                .await
                .map(|r| r.into_inner().deployment),
            Change::Restart => self
                .client
                .restart_deployment(&pb::RestartDeploymentRequest { id })
                .await
                .map(|r| r.into_inner().deployment),
            Change::Scale(replicas) => self
                .client
                .scale_deployment(&pb::ScaleDeploymentRequest { id, replicas })
                .await
                .map(|r| r.into_inner().deployment),
        }
        .map_err(|e| self.err(e))?
        .ok_or_else(|| CliError::Failed("the server answered without the deployment".to_owned()))?;
        self.say(&format!("{change} {} ({})", changed.name, changed.id))?;
        let done = match change {
            Change::Stop => self.wait_until_stopped(&changed, Duration::from_secs(120)).await?,
            Change::Restart => self.wait_until_rolled_out(&changed, Duration::from_secs(300)).await?,
            Change::Scale(replicas) => self.wait_until_scaled(&changed, replicas, Duration::from_secs(300)).await?,
            _ => self.wait_until_running(&changed, Duration::from_secs(300)).await?,
        };
        if self.format == OutputFormat::Json {
            return self.json(&done);
        }
        self.say(&format!("{} is {}", done.name, status_name(done.status)))
    }

    /// Until exactly `replicas` replicas exist and serve: the ones scaled
    /// away are stopped and gone, the new ones run.
    async fn wait_until_scaled(
        &self,
        changed: &pb::Deployment,
        replicas: i32,
        timeout: Duration,
    ) -> Result<pb::Deployment, CliError> {
        let wanted = usize::try_from(replicas).unwrap_or_default();
        self.follow(
            &changed.id,
            timeout,
            |d| {
                let serving = d.replicas.iter().filter(|r| r.serving).count();
                Some(format!("{serving} of {wanted} serving, {} in all", d.replicas.len()))
            },
            |d| {
                let serving = d.replicas.iter().filter(|r| r.serving).count();
                match pb::DeploymentStatus::try_from(d.status) {
                    Ok(pb::DeploymentStatus::Failed) => Poll::Failed(format!(
                        "deployment {} failed: {}\n  See `flo status {}`.",
                        d.name, d.status_message, d.name
                    )),
                    _ if d.replicas.len() == wanted && serving == wanted => Poll::Done,
                    _ => Poll::Waiting,
                }
            },
            |d, seconds| format!("{} is not at {wanted} replicas after {seconds}s: `flo status {}`", d.name, d.name),
        )
        .await
    }

    /// Until every replica runs `changed`'s generation (or it was rolled back).
    async fn wait_until_rolled_out(
        &self,
        changed: &pb::Deployment,
        timeout: Duration,
    ) -> Result<pb::Deployment, CliError> {
        self.follow(
            &changed.id,
            timeout,
            |d| {
                let updated = d.rollout.as_ref().map_or(0, |r| r.updated_replicas);
                Some(format!("{updated} of {} replicas replaced", d.replica_count))
            },
            |d| {
                let rollout = d.rollout.clone().unwrap_or_default();
                let current = rollout.generation >= changed.generation;
                match pb::RolloutState::try_from(rollout.state) {
                    Ok(pb::RolloutState::Complete) if current => Poll::Done,
                    Ok(pb::RolloutState::RolledBack) if current => {
                        Poll::Failed(format!("restart of {} rolled back: {}", d.name, rollout.message))
                    }
                    _ => Poll::Waiting,
                }
            },
            |d, seconds| format!("{} is still restarting after {seconds}s: `flo status {}`", d.name, d.name),
        )
        .await
    }

    async fn wait_until_stopped(
        &self,
        changed: &pb::Deployment,
        timeout: Duration,
    ) -> Result<pb::Deployment, CliError> {
        self.follow(
            &changed.id,
            timeout,
            |_| None,
            |d| if d.status == pb::DeploymentStatus::Stopped as i32 { Poll::Done } else { Poll::Waiting },
            |d, seconds| {
                format!(
                    "{} is not stopped after {seconds}s (status: {}): `flo status {}`",
                    d.name,
                    status_name(d.status),
                    d.name
                )
            },
        )
        .await
    }

    async fn remove(&self, name_or_id: &str, no_wait: bool) -> Result<(), CliError> {
        let d = self.find(name_or_id).await?;
        self.client
            .delete_deployment(&pb::DeleteDeploymentRequest { id: d.id.clone() })
            .await
            .map_err(|e| self.err(e))?;
        self.say(&format!("Deleting {} ({})", d.name, d.id))?;
        if no_wait {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            match self.get(&d.id).await {
                Err(CliError::NotFound(_)) => {
                    return self.say(&format!("Deleted {} in {:.1}s", d.name, started.elapsed().as_secs_f64()));
                }
                Err(other) => return Err(other),
                Ok(_) if started.elapsed() > Duration::from_secs(120) => {
                    return Err(CliError::Failed(format!("{} is still being deleted after 120s", d.name)));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// What one look at a deployment that `flo` follows found.
enum Poll {
    Done,
    Failed(String),
    Waiting,
}

/// A change `flo` makes to a deployment's state.
#[derive(Debug, Clone, Copy)]
enum Change {
    Stop,
    Start,
    Restart,
    Scale(i32),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stop => f.write_str("Stopping"),
            Self::Start => f.write_str("Starting"),
            Self::Restart => f.write_str("Restarting"),
            Self::Scale(n) => write!(f, "Scaling to {n}:"),
        }
    }
}

/// One route as users read it: served at its URL, or why not.
fn route_line(r: &pb::Routing) -> String {
    let url = &r.url;
    if r.served {
        let proxies =
            if r.edge_proxies == 1 { "1 edge proxy".to_owned() } else { format!("{} edge proxies", r.edge_proxies) };
        format!("  routed at {url} (through {proxies})")
    } else {
        format!("  not routed at {url}: {}", r.not_served_reason)
    }
}

/// One line on a domain: its proof and its certificate.
fn domain_summary(status: &pb::GetDomainStatusResponse) -> String {
    let proof = match status.verification() {
        pb::DomainVerification::NotRequired => "platform domain".to_owned(),
        pb::DomainVerification::Verified => "verified".to_owned(),
        pb::DomainVerification::Pending => "waiting for its TXT record (not routed)".to_owned(),
        pb::DomainVerification::Expired => "token expired: run `flo domains --verify` for a new one".to_owned(),
        _ => "not verified: run `flo domains --verify` (not routed)".to_owned(),
    };
    let certificate = match status.certificate() {
        pb::CertificateState::Issued => match &status.certificate_not_after {
            Some(end) => format!(
                ", certificate until {}",
                chrono::DateTime::from_timestamp(end.seconds, 0).unwrap_or_default().date_naive()
            ),
            None => ", certificate issued".to_owned(),
        },
        pb::CertificateState::Failed => format!(", certificate failed: {}", status.certificate_error),
        pb::CertificateState::Pending => ", certificate being ordered".to_owned(),
        _ => String::new(),
    };
    format!("{}: {proof}{certificate}", status.domain)
}

#[cfg(test)]
mod tests {
    #[test]
    fn deploy_takes_a_strategy_and_constraints() {
        let cli = Cli::try_parse_from([
            "flo",
            "deploy",
            "web",
            "--image",
            "demo",
            "--port",
            "8080",
            "--strategy",
            "spread",
            "--constraint",
            "region=eu",
            "--constraint",
            "disk=ssd",
            "--node-loss",
            "replace",
        ])
        .expect("parses");
        let Command::Deploy(args) = cli.command else { panic!("a deploy") };
        let asked = placement(args.strategy, args.constraints, args.node_loss).expect("a placement");
        assert_eq!(asked.strategy, "spread");
        assert_eq!(asked.node_loss, "replace");
        assert_eq!(asked.constraints.get("region").map(String::as_str), Some("eu"));
        assert_eq!(asked.constraints.len(), 2);
        assert_eq!(placement(None, Vec::new(), None), None, "the cluster's default");
        assert!(
            Cli::try_parse_from(["flo", "deploy", "web", "--image", "d", "--port", "1", "--node-loss", "x"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["flo", "deploy", "web", "--image", "d", "--port", "1", "--constraint", "x"]).is_err()
        );
    }

    use super::*;

    #[test]
    fn statuses_are_named_as_flo_ls_shows_them() {
        assert_eq!(parse_status("stopped"), Ok(pb::DeploymentStatus::Stopped as i32));
        assert_eq!(parse_status("Running"), Ok(pb::DeploymentStatus::Running as i32));
        let error = parse_status("sleeping").unwrap_err();
        assert!(error.contains("pending, deploying, running, degraded, failed, stopped, deleting"), "{error}");
    }

    #[test]
    fn an_api_that_answers_unavailable_is_not_called_unreachable() {
        let api = "http://127.0.0.1:7800";
        let answered = ClientError::Rpc(connectrpc_axum_client::Status::unavailable("the control database is away"));
        let error = CliError::from_client(api, &answered);
        assert!(matches!(error, CliError::Unavailable { .. }), "{error:?}");
        assert!(error.to_string().contains("answered but cannot serve now: the control database is away"), "{error}");
        let refused = ClientError::Transport("connection refused".to_owned());
        let error = CliError::from_client(api, &refused);
        assert!(matches!(error, CliError::Unreachable { .. }) && error.to_string().contains("Is flotillad running?"));
        assert_eq!(error.exit_code(), 4);
    }
}
