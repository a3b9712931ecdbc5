//! A real ACME server for tests: pebble (Debian's `pebble` package), with
//! `pebble-challtestsrv` as the DNS server pebble asks, both on ports of
//! their own, so tests run in parallel. The DNS server also serves the TXT
//! records domain verification looks up.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::free_port;

fn wait_listening(what: &str, addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before listening on {addr}");
        }
        assert!(Instant::now() < deadline, "{what} is not listening on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .env("PEBBLE_VA_NOSLEEP", "1")
        // No random nonce rejections or authz reuse: each test sees the
        // protocol's main path (the client handles both anyway).
        .env("PEBBLE_WFE_NONCEREJECT", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}\nInstall it with: scripts/dev-services.sh install"))
}

/// `pebble-challtestsrv` as a DNS server: every name resolves to 127.0.0.1
/// (IPv4 only) unless a test says otherwise; TXT records are set by tests.
pub struct TestDnsServer {
    child: Child,
    pub dns: SocketAddr,
    management: String,
    http: reqwest::Client,
}

impl TestDnsServer {
    pub fn start() -> Self {
        let (dns, management) = (free_port(), free_port());
        let dns_addr = format!("127.0.0.1:{dns}");
        let management_addr = format!("127.0.0.1:{management}");
        let mut child = spawn(
            "pebble-challtestsrv",
            &[
                "-dns01",
                &dns_addr,
                "-management",
                &management_addr,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
        );
        wait_listening("pebble-challtestsrv", management_addr.parse().expect("an address"), &mut child);
        Self {
            child,
            dns: dns_addr.parse().expect("an address"),
            management: format!("http://{management_addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: serde_json::Value) {
        let response = self.http.post(format!("{}{path}", self.management)).json(&body).send().await.expect(path);
        assert!(response.status().is_success(), "{path}: {}", response.status());
    }

    /// Publishes a TXT record at `name`.
    pub async fn set_txt(&self, name: &str, value: &str) {
        self.post("/set-txt", json!({ "host": format!("{name}."), "value": value })).await;
    }

    pub async fn clear_txt(&self, name: &str) {
        self.post("/clear-txt", json!({ "host": format!("{name}.") })).await;
    }

    /// Makes `name` resolve to `addresses` instead of 127.0.0.1.
    pub async fn set_a(&self, name: &str, addresses: &[&str]) {
        self.post("/add-a", json!({ "host": format!("{name}."), "addresses": addresses })).await;
    }
}

impl Drop for TestDnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pebble ACME server that validates HTTP-01 challenges on `http_port`
/// of whatever the test DNS server resolves a domain to.
pub struct TestPebble {
    child: Child,
    pub directory_url: String,
    /// The root pebble's own HTTPS is signed with (trust it to talk to pebble).
    pub tls_root: PathBuf,
    management: String,
    dir: PathBuf,
    http: HttpsClient,
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTPS client trusting only `root`.
fn https_client(root: rustls::pki_types::CertificateDer<'static>) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("a root certificate");
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

impl TestPebble {
    pub fn start(http_port: u16, dns: &TestDnsServer) -> Self {
        let dir = std::env::temp_dir().join(format!("flotilla-pebble-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).expect("pebble's directory");
        let tls = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("a TLS certificate for pebble");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, tls.cert.pem()).expect("pebble's certificate");
        std::fs::write(&key, tls.signing_key.serialize_pem()).expect("pebble's key");
        let (listen, management) = (free_port(), free_port());
        let config = json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_file = dir.join("pebble.json");
        std::fs::write(&config_file, config.to_string()).expect("pebble's configuration");
        let config_arg = config_file.to_string_lossy().into_owned();
        let dns_arg = dns.dns.to_string();
        let mut child = spawn("pebble", &["-config", &config_arg, "-dnsserver", &dns_arg]);
        wait_listening("pebble", SocketAddr::from(([127, 0, 0, 1], listen)), &mut child);
        let http = https_client(tls.cert.der().clone());
        Self {
            child,
            directory_url: format!("https://127.0.0.1:{listen}/dir"),
            tls_root: cert,
            management: format!("https://127.0.0.1:{management}"),
            dir,
            http,
        }
    }

    /// The root pebble issues certificates under (made at its start).
    pub async fn issuing_root_pem(&self) -> String {
        use http_body_util::BodyExt;
        let url = format!("{}/roots/0", self.management);
        let response = self.http.get(url.parse().expect("a URL")).await.expect("pebble's root");
        assert!(response.status().is_success(), "{url}: {}", response.status());
        let body = response.into_body().collect().await.expect("pebble's root").to_bytes();
        String::from_utf8(body.to_vec()).expect("PEM")
    }
}

impl Drop for TestPebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
