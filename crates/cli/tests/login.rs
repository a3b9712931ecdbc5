//! `flo login` against a real API and a real OIDC provider: a good token is
//! checked and saved (owner-only file), later commands use it (`env`,
//! `domains`), a bad token is refused and not saved, `flo logout` forgets it.
//! Without a token, the device flow (the provider's device endpoint is the
//! test script's addition to oidc-provider-mock, which lacks one).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output, Stdio};

use flotilla_e2e::{TempDir, TestFlotilla};
use flotilla_test_utils::TestOidcProvider;

fn flo(api: &str, config: &TempDir, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flo"))
        .arg("--api")
        .arg(api)
        .args(args)
        .env("FLOTILLA_CONFIG_DIR", &config.0)
        .env_remove("FLOTILLA_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flo runs");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("flo ends")
}

fn said(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_saves_a_checked_token_that_later_commands_use() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let token = provider.sign_in("dana", "dana@example.com").await.id_token;
    let config = TempDir::new();
    let api = flotilla.base_url.clone();
    let (api, token_line) = (api.as_str(), format!("{token}\n"));

    let refused = tokio::task::block_in_place(|| flo(api, &config, &["ls"], ""));
    assert_eq!(refused.status.code(), Some(5), "{}", said(&refused));
    assert!(said(&refused).contains("not logged in"), "{}", said(&refused));

    let bad = tokio::task::block_in_place(|| flo(api, &config, &["login", "--with-token"], "not-a-token\n"));
    assert_eq!(bad.status.code(), Some(5), "{}", said(&bad));
    assert!(!config.0.join("credentials.json").exists(), "a refused token is not saved");

    let login = tokio::task::block_in_place(|| flo(api, &config, &["login", "--with-token"], &token_line));
    assert_eq!(login.status.code(), Some(0), "{}", said(&login));
    let file = config.0.join("credentials.json");
    let mode = std::fs::metadata(&file).expect("credentials saved").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only its owner may read the token");
    assert!(!said(&login).contains(&token), "the token is never printed");

    let listed = tokio::task::block_in_place(|| flo(api, &config, &["ls", "--output", "json"], ""));
    assert_eq!(listed.status.code(), Some(0), "{}", said(&listed));

    // env and domains, with the saved token.
    let bearer = format!("Bearer {token}");
    let (status, created) = flotilla
        .connect_with(
            "flotilla.v1.DeploymentService/CreateDeployment",
            &[("authorization", &bearer)],
            serde_json::json!({"name": "web", "image": "flotilla/demo-http:latest", "port": 8080}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let env = tokio::task::block_in_place(|| {
        flo(api, &config, &["env", "web", "--set", "MODE=b", "--secret", "TOKEN=s3cret"], "")
    });
    assert_eq!(env.status.code(), Some(0), "{}", said(&env));
    let shown = String::from_utf8_lossy(&env.stdout);
    assert!(shown.contains("MODE=b") && shown.contains("TOKEN=********") && !shown.contains("s3cret"), "{shown}");
    let unset = tokio::task::block_in_place(|| flo(api, &config, &["env", "web", "--unset", "MODE"], ""));
    assert!(!String::from_utf8_lossy(&unset.stdout).contains("MODE"), "{}", said(&unset));
    let bad = tokio::task::block_in_place(|| flo(api, &config, &["env", "web", "--set", "1X=y"], ""));
    assert_eq!(bad.status.code(), Some(5), "{}", said(&bad));
    let domains = tokio::task::block_in_place(|| {
        flo(api, &config, &["domains", "web", "--set", "web.example.com", "--path-prefix", "/app"], "")
    });
    assert_eq!(domains.status.code(), Some(0), "{}", said(&domains));
    assert!(String::from_utf8_lossy(&domains.stdout).contains("web.example.com/app (asked for)"), "{}", said(&domains));

    let logout = tokio::task::block_in_place(|| flo(api, &config, &["logout"], ""));
    assert_eq!(logout.status.code(), Some(0), "{}", said(&logout));
    let after = tokio::task::block_in_place(|| flo(api, &config, &["ls"], ""));
    assert_eq!(after.status.code(), Some(5), "{}", said(&after));
    flotilla.stop().await;
}

/// `flo login` (device flow) running, the code it showed, and what it
/// says on standard error from then on (read to its end by a thread).
struct DeviceLogin {
    child: std::process::Child,
    code: String,
    rest: std::thread::JoinHandle<Vec<String>>,
}

impl DeviceLogin {
    fn start(api: &str, config: &TempDir, issuer: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flo"))
            .args(["--api", api, "login"])
            .env("FLOTILLA_CONFIG_DIR", &config.0)
            .env_remove("FLOTILLA_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("flo runs");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut said = Vec::new();
        let code = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).expect("reading flo") > 0, "flo ended first: {said:?}");
            said.push(line.trim().to_owned());
            if let Some(code) = line.trim().strip_prefix("and enter the code: ") {
                break code.to_owned();
            }
        };
        assert!(said[0].starts_with(&format!("To sign in, open {issuer}/")), "the provider's page: {said:?}");
        assert!(said[0].contains(&code), "the link carries the code: {said:?}");
        let rest = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect());
        Self { child, code, rest }
    }

    /// How it ended, and what it said after the code.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().expect("flo ends");
        (status.code(), self.rest.join().expect("reader").join("\n"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_without_a_token_signs_in_through_the_device_flow() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let config = TempDir::new();
    let api = flotilla.base_url.clone();

    // Approved in the browser: the token is saved and works.
    let login = tokio::task::block_in_place(|| DeviceLogin::start(&api, &config, &provider.issuer));
    provider.decide_device_code(&login.code, "frank", "frank@example.com", true).await;
    let (code, said_after) = tokio::task::block_in_place(|| login.finish());
    assert_eq!(code, Some(0), "{said_after}");
    assert!(said_after.contains("Logged in"), "{said_after}");
    assert!(config.0.join("credentials.json").exists(), "the token is saved");
    let listed = tokio::task::block_in_place(|| flo(&api, &config, &["ls", "--output", "json"], ""));
    assert_eq!(listed.status.code(), Some(0), "{}", said(&listed));
    let frank =
        flotilla.count("SELECT count(*) FROM users WHERE subject = 'frank' AND email = 'frank@example.com'").await;
    assert_eq!(frank, 1, "signed in as the user who approved");

    // Denied in the browser: a clear refusal, nothing saved.
    let other = TempDir::new();
    let login = tokio::task::block_in_place(|| DeviceLogin::start(&api, &other, &provider.issuer));
    provider.decide_device_code(&login.code, "mallory", "m@example.com", false).await;
    let (code, said_after) = tokio::task::block_in_place(|| login.finish());
    assert_eq!(code, Some(5), "{said_after}");
    assert!(said_after.contains("denied"), "{said_after}");
    assert!(!other.0.join("credentials.json").exists(), "nothing saved");

    // An API in development mode announces no provider: flo says what to do.
    let dev = TestFlotilla::start_with(|s| {
        s.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false };
    })
    .await;
    let none = tokio::task::block_in_place(|| flo(&dev.base_url, &other, &["login"], ""));
    assert_ne!(none.status.code(), Some(0), "{}", said(&none));
    assert!(said(&none).contains("--with-token"), "{}", said(&none));
    dev.stop().await;
    flotilla.stop().await;
}
