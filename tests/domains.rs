//! Custom domains end to end: a domain outside the platform's is routed
//! only after its owner publishes the token as a DNS TXT record (looked up
//! through a real DNS server the test runs: pebble-challtestsrv), and then
//! Flotilla orders its certificate from a real ACME server (pebble), which
//! validates the HTTP-01 challenge by calling flotillad's
//! /.well-known/acme-challenge/; the chain is verified up to pebble's root,
//! renewed, and a challenge pebble cannot reach is reported on the
//! deployment with a retry time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_acme::{AcmeSettings, CertificateManager, Sealer};
use flotilla_e2e::{TestFlotilla, is_running};
use flotilla_edge::Tls;
use flotilla_test_utils::{DEMO_IMAGE, TestDnsServer, TestPebble, free_port, unique_suffix};
use serde_json::{Value, json};

fn custom_domain(name: &str) -> String {
    format!("{name}-{}.example.org", unique_suffix().to_ascii_lowercase())
}

async fn deploy(flotilla: &TestFlotilla, name: &str, domain: &str) -> String {
    let id = flotilla.create(json!({ "name": name, "image": DEMO_IMAGE, "port": 8080, "domain": domain })).await;
    flotilla.wait_for(&id, Duration::from_secs(30), is_running).await;
    id
}

async fn domain_call(flotilla: &TestFlotilla, method: &str, id: &str) -> Value {
    let (status, body) = flotilla.connect_json(method, json!({ "id": id })).await;
    assert_eq!(status, 200, "{method}: {body}");
    body
}

fn routes(table: &Value) -> String {
    table["http"]["routers"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_is_routed_only_once_its_txt_record_proves_it() {
    let dns = TestDnsServer::start();
    let flotilla = TestFlotilla::start_with(|s| s.domains.dns_servers = vec![dns.dns]).await;
    let shop = custom_domain("shop");
    let platform = format!("web-{}.flotilla.test", unique_suffix().to_ascii_lowercase());
    let shop_id = deploy(&flotilla, "shop", &shop).await;
    let web_id = deploy(&flotilla, "web", &platform).await;

    // The platform's domain is routed at once; the custom one is not.
    let table = flotilla.route_table_where("the platform domain", |t| routes(t).contains(&platform)).await;
    assert!(!routes(&table).contains(&shop), "an unproven domain is routed: {table}");
    let web = domain_call(&flotilla, "GetDomainStatus", &web_id).await;
    assert_eq!(
        (web["verification"].as_str(), web["routed"].as_bool()),
        (Some("DOMAIN_VERIFICATION_NOT_REQUIRED"), Some(true))
    );

    let status = domain_call(&flotilla, "GetDomainStatus", &shop_id).await;
    assert_eq!(status["verification"], "DOMAIN_VERIFICATION_NOT_REQUESTED", "{status}");
    assert_eq!(status["txtName"], format!("_flotilla-challenge.{shop}"));
    assert!(status["routed"].is_null() || status["routed"] == false, "{status}");

    // The first VerifyDomain gives the token; checks then look it up.
    let pending = domain_call(&flotilla, "VerifyDomain", &shop_id).await;
    assert_eq!(pending["verification"], "DOMAIN_VERIFICATION_PENDING", "{pending}");
    let (name, value) =
        (pending["txtName"].as_str().unwrap().to_owned(), pending["txtValue"].as_str().unwrap().to_owned());
    assert!(value.starts_with("flotilla-verification=") && value.len() > 40, "{value}");
    let expires: chrono::DateTime<chrono::Utc> = pending["tokenExpiresAt"].as_str().unwrap().parse().unwrap();
    assert!(expires > chrono::Utc::now() + chrono::Duration::days(6), "a week to publish it: {expires}");
    let again = domain_call(&flotilla, "VerifyDomain", &shop_id).await;
    assert_eq!(again["txtValue"], value.as_str(), "the token in force is kept");
    assert!(again["lastCheckError"].as_str().unwrap().contains("no TXT record"), "{again}");

    dns.set_txt(&name, "flotilla-verification=someone-elses-token").await;
    let wrong = domain_call(&flotilla, "VerifyDomain", &shop_id).await;
    assert_eq!(wrong["verification"], "DOMAIN_VERIFICATION_PENDING", "{wrong}");
    assert!(wrong["lastCheckError"].as_str().unwrap().contains("someone-elses-token"), "{wrong}");
    assert!(!routes(&flotilla.route_table().await).contains(&shop));

    dns.clear_txt(&name).await;
    dns.set_txt(&name, &value).await;
    let verified = domain_call(&flotilla, "VerifyDomain", &shop_id).await;
    assert_eq!(verified["verification"], "DOMAIN_VERIFICATION_VERIFIED", "{verified}");
    assert_eq!(verified["routed"], true);
    flotilla.route_table_where("the proven domain", |t| routes(t).contains(&format!("Host(`{shop}`)"))).await;

    // A token proves only its own deployment's domain.
    let copycat = deploy(&flotilla, "copycat", &format!("copy-{shop}")).await;
    let other = domain_call(&flotilla, "VerifyDomain", &copycat).await;
    assert_ne!(other["txtValue"], value.as_str(), "each deployment and domain has its own token");

    // No domain: nothing to prove.
    let plain = flotilla.create(json!({ "name": "plain", "image": DEMO_IMAGE, "port": 8080 })).await;
    let (status, body) = flotilla.connect_json("VerifyDomain", json!({ "id": plain })).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("failed_precondition")), "{body}");
    let (status, body) = flotilla.connect_json("VerifyDomain", json!({ "id": "" })).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_argument")), "{body}");
    flotilla.stop().await;
}

/// The public key of the first certificate in `chain_pem`.
fn leaf_public_key(chain_pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).unwrap();
    pem.parse_x509().unwrap().public_key().subject_public_key.data.to_vec()
}

fn pem_blocks(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| rustls::pki_types::CertificateDer::from(p.unwrap().contents))
        .collect()
}

/// Verifies `chain_pem` for `domain` up to `root_pem`, as a TLS client would.
fn verify_chain(chain_pem: &str, root_pem: &str, domain: &str) {
    use rustls::client::danger::ServerCertVerifier;
    let mut roots = rustls::RootCertStore::empty();
    for root in pem_blocks(root_pem) {
        roots.add(root).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let chain = pem_blocks(chain_pem);
    assert!(chain.len() >= 2, "leaf and intermediate: {}", chain.len());
    let name = rustls::pki_types::ServerName::try_from(domain.to_owned()).unwrap();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now())
        .unwrap_or_else(|e| panic!("the chain for {domain} does not verify: {e}"));
    let other = rustls::pki_types::ServerName::try_from("other.example.org").unwrap();
    assert!(
        verifier.verify_server_cert(&chain[0], &chain[1..], &other, &[], rustls::pki_types::UnixTime::now()).is_err()
    );
}

/// The public key of a PKCS#8 ECDSA P-256 key in PEM.
fn key_public_key(key_pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(key_pem.as_bytes()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &pem.contents,
        &rng,
    )
    .expect("an ECDSA P-256 key");
    ring::signature::KeyPair::public_key(&pair).as_ref().to_vec()
}

async fn wait_certificate(flotilla: &TestFlotilla, id: &str, state: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    loop {
        let status = domain_call(flotilla, "GetDomainStatus", id).await;
        if status["certificate"] == state {
            return status;
        }
        assert!(started.elapsed() < timeout, "no {state} after {timeout:?}: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn prove(flotilla: &TestFlotilla, dns: &TestDnsServer, id: &str) {
    let pending = domain_call(flotilla, "VerifyDomain", id).await;
    dns.set_txt(pending["txtName"].as_str().unwrap(), pending["txtValue"].as_str().unwrap()).await;
    let verified = domain_call(flotilla, "VerifyDomain", id).await;
    assert_eq!(verified["verification"], "DOMAIN_VERIFICATION_VERIFIED", "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_from_pebble_are_verified_renewed_and_failures_are_reported() {
    let dns = TestDnsServer::start();
    // pebble validates HTTP-01 on this port of whatever the DNS server says;
    // flotillad listens on it.
    let port = free_port();
    let pebble = TestPebble::start(port, &dns);
    let secret_dir = std::env::temp_dir().join(format!("flotilla-certkey-{}", unique_suffix()));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let key_file = secret_dir.join("certificate-key");
    std::fs::write(&key_file, format!("{}{}\n", unique_suffix(), unique_suffix())).unwrap();
    let mut acme = AcmeSettings::new(&pebble.directory_url);
    acme.ca_file = Some(pebble.tls_root.clone());
    acme.interval = Duration::from_secs(1);
    acme.retry_min = Duration::from_secs(30);
    let settings_acme = acme.clone();
    let flotilla = TestFlotilla::start_with(|s| {
        s.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        s.domains.dns_servers = vec![dns.dns];
        s.orchestrator.edge.tls = Tls::Stored;
        s.internal_token = Some("edge-token-for-the-test".to_owned());
        s.certificates = Some(flotilla_daemon::CertificateSettings { acme: settings_acme, key_file: key_file.clone() });
    })
    .await;

    let shop = custom_domain("shop");
    let shop_id = deploy(&flotilla, "shop", &shop).await;
    // Not proven: no certificate is ordered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = domain_call(&flotilla, "GetDomainStatus", &shop_id).await;
    assert_eq!(status["certificate"], "CERTIFICATE_STATE_NONE", "{status}");
    prove(&flotilla, &dns, &shop_id).await;

    let started = Instant::now();
    let issued = wait_certificate(&flotilla, &shop_id, "CERTIFICATE_STATE_ISSUED", Duration::from_secs(90)).await;
    eprintln!("issued in {:?}: {issued}", started.elapsed());
    let store = flotilla_store::Store::connect_lazy(&flotilla_store::StoreConfig::new(&flotilla.db.url)).unwrap();
    let stored = store.certificate(&shop).await.unwrap().expect("the stored certificate");
    let root = pebble.issuing_root_pem().await;
    verify_chain(&stored.chain_pem, &root, &shop);
    assert!(!String::from_utf8_lossy(&stored.key_sealed).contains("PRIVATE KEY"), "the key is sealed at rest");
    assert_eq!(flotilla.count("SELECT count(*) FROM acme_challenges").await, 0, "challenges are cleared");
    assert_eq!(flotilla.count("SELECT count(*) FROM acme_accounts").await, 1);

    // Traefik (with the cluster's token) gets the certificate and its key;
    // anyone else gets the routes without them.
    let table = flotilla.route_table().await;
    assert!(table.get("tls").is_none() && !table.to_string().contains("PRIVATE KEY"), "{table}");
    let with_token: Value = reqwest::Client::new()
        .get(format!("{}/traefik/dynamic", flotilla.base_url))
        .bearer_auth("edge-token-for-the-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let served = &with_token["tls"]["certificates"][0];
    assert_eq!(served["certFile"], stored.chain_pem.as_str());
    let key_pem = served["keyFile"].as_str().expect("the key for Traefik");
    assert_eq!(key_public_key(key_pem), leaf_public_key(&stored.chain_pem), "the key belongs to the certificate");
    let router = with_token["http"]["routers"]
        .as_object()
        .unwrap()
        .values()
        .find(|r| r["rule"].as_str().unwrap().contains(&shop))
        .unwrap();
    assert_eq!(router["tls"], json!({}), "served from tls.certificates: {router}");

    // A renewal (a manager that finds every certificate due), with the same
    // kept account, the same sealing key and the lock.
    let mut renewing = acme.clone();
    renewing.renew_before = Duration::from_secs(100 * 365 * 24 * 3600);
    let sealer = Arc::new(Sealer::from_file(&key_file).unwrap());
    let manager = CertificateManager::new(store.clone(), renewing, sealer);
    let report = loop {
        let report = manager.pass().await.expect("a renewal pass");
        if report.locked_elsewhere.is_empty() {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report.renewed, vec![shop.clone()], "{report:?}");
    let renewed = store.certificate(&shop).await.unwrap().unwrap();
    assert_ne!(renewed.chain_pem, stored.chain_pem, "a new certificate");
    assert!(renewed.not_after >= stored.not_after);
    verify_chain(&renewed.chain_pem, &root, &shop);
    assert_eq!(flotilla.count("SELECT count(*) FROM acme_accounts").await, 1, "the account is kept, not made again");

    // A domain pebble cannot reach: the failure is on the deployment, with
    // the next attempt backed off.
    let bad = custom_domain("unreachable");
    dns.set_a(&bad, &["127.0.0.2"]).await;
    let bad_id = deploy(&flotilla, "unreachable", &bad).await;
    prove(&flotilla, &dns, &bad_id).await;
    let failed = wait_certificate(&flotilla, &bad_id, "CERTIFICATE_STATE_FAILED", Duration::from_secs(90)).await;
    eprintln!("failed: {failed}");
    let error = failed["certificateError"].as_str().unwrap();
    assert!(
        error.contains("127.0.0.2") || error.contains("connection refused") || error.contains("Connection refused"),
        "{error}"
    );
    assert_eq!(failed["certificateFailures"], 1, "{failed}");
    let next: chrono::DateTime<chrono::Utc> = failed["certificateNextAttemptAt"].as_str().unwrap().parse().unwrap();
    assert!(next > chrono::Utc::now() + chrono::Duration::seconds(20), "backed off: {next}");
    // Held back by the backoff: still one failure a few passes later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = domain_call(&flotilla, "GetDomainStatus", &bad_id).await;
    assert_eq!(still["certificateFailures"], 1, "{still}");
    let health: Value = reqwest::get(format!("{}/health", flotilla.base_url)).await.unwrap().json().await.unwrap();
    let certificates = &health["components"]["certificates"];
    assert_eq!(certificates["health"], "degraded", "{certificates}");
    assert!(certificates["message"].as_str().unwrap_or_default().contains(&bad), "{certificates}");

    flotilla.stop().await;
    let _ = std::fs::remove_dir_all(&secret_dir);
}

/// Waits until an HTTPS GET through `traefik` for `domain`, trusting only
/// `root_pem`, answers 200; returns the chain it presented.
async fn https_through(
    traefik: &flotilla_test_utils::TestTraefik,
    domain: &str,
    root_pem: &str,
    timeout: Duration,
) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let started = Instant::now();
    loop {
        let answer = flotilla_test_utils::traefik::https_get(traefik.https, domain, root_pem, "/").await;
        if let Ok((200, chain)) = &answer {
            return chain.clone();
        }
        assert!(started.elapsed() < timeout, "https://{domain} through Traefik: {answer:?}\n{}", traefik.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_serves_flotilla_s_certificate_for_a_custom_domain_and_gets_its_own_for_a_platform_one() {
    let dns = TestDnsServer::start();
    // Two ACME servers: pebble validates HTTP-01 on one port of whatever
    // the DNS server says. Flotilla's orders are answered by flotillad,
    // Traefik's by Traefik's plain-HTTP entry point.
    let flotillad_port = free_port();
    let traefik_ports = [free_port(), free_port(), free_port()];
    let for_flotilla = TestPebble::start(flotillad_port, &dns);
    let for_traefik = TestPebble::start(traefik_ports[0], &dns);
    let secret_dir = std::env::temp_dir().join(format!("flotilla-certkey-{}", unique_suffix()));
    std::fs::create_dir_all(&secret_dir).unwrap();
    let key_file = secret_dir.join("certificate-key");
    std::fs::write(&key_file, format!("{}{}\n", unique_suffix(), unique_suffix())).unwrap();
    let mut acme = AcmeSettings::new(&for_flotilla.directory_url);
    acme.ca_file = Some(for_flotilla.tls_root.clone());
    acme.interval = Duration::from_secs(1);
    let token = "edge-token-for-https";
    let flotilla = TestFlotilla::start_with(|s| {
        s.listen = std::net::SocketAddr::from(([127, 0, 0, 1], flotillad_port));
        s.domains.dns_servers = vec![dns.dns];
        // Routes use TLS; a domain with a certificate Flotilla holds gets it
        // from the table, any other the platform resolver (Traefik's ACME).
        s.orchestrator.edge.tls = Tls::Resolver("platform".to_owned());
        s.internal_token = Some(token.to_owned());
        s.certificates = Some(flotilla_daemon::CertificateSettings { acme, key_file: key_file.clone() });
    })
    .await;
    let traefik = flotilla_test_utils::TestTraefik::start(
        &format!("{}/traefik/dynamic", flotilla.base_url),
        flotilla_test_utils::TraefikOptions {
            wait_seconds: Some(5.0),
            internal_token: Some(token.to_owned()),
            acme: Some((for_traefik.directory_url.clone(), for_traefik.tls_root.clone())),
            ports: Some(traefik_ports),
            ..Default::default()
        },
    );

    // A custom domain: proven, its certificate ordered by Flotilla, handed
    // to Traefik in the table, and presented for its name.
    let shop = custom_domain("shop");
    let shop_id = deploy(&flotilla, "shop", &shop).await;
    prove(&flotilla, &dns, &shop_id).await;
    wait_certificate(&flotilla, &shop_id, "CERTIFICATE_STATE_ISSUED", Duration::from_secs(90)).await;
    let flotilla_root = for_flotilla.issuing_root_pem().await;
    let started = Instant::now();
    let chain = https_through(&traefik, &shop, &flotilla_root, Duration::from_secs(60)).await;
    eprintln!("https://{shop} served with Flotilla's certificate {:?} after issue", started.elapsed());
    let store = flotilla_store::Store::connect_lazy(&flotilla_store::StoreConfig::new(&flotilla.db.url)).unwrap();
    let stored = store.certificate(&shop).await.unwrap().expect("the stored certificate");
    assert_eq!(chain[0], pem_blocks(&stored.chain_pem)[0], "Traefik presents the certificate Flotilla holds");

    // A platform domain: Traefik orders its own from the platform resolver.
    let platform = format!("web-{}.example.test", unique_suffix().to_ascii_lowercase());
    deploy(&flotilla, "web", &platform).await;
    let traefik_root = for_traefik.issuing_root_pem().await;
    let started = Instant::now();
    https_through(&traefik, &platform, &traefik_root, Duration::from_secs(90)).await;
    eprintln!("https://{platform} served with Traefik's own certificate after {:?}", started.elapsed());
    // Not with the other's roots: each name has the certificate meant for it.
    let wrong = flotilla_test_utils::traefik::https_get(traefik.https, &platform, &flotilla_root, "/").await;
    assert!(wrong.is_err(), "{wrong:?}");

    // Plain HTTP redirects to HTTPS for a TLS route.
    let (status, _) = traefik.get(&platform, "/").await.expect("an answer");
    assert_eq!(status, 301, "plain HTTP moves to HTTPS, permanently");
    assert!(traefik.configuration_errors().is_empty(), "{:?}", traefik.configuration_errors());
    flotilla.stop().await;
    let _ = std::fs::remove_dir_all(&secret_dir);
}
