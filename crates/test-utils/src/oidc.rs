//! A real OIDC provider for one test: oidc-provider-mock from PyPI, started
//! through `scripts/oidc-provider.py` on a free loopback port and stopped
//! when the fixture drops. Users sign in through its authorization form,
//! driven over plain HTTP the way a browser would submit it.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

/// The client id tests register Flotilla as (the provider accepts any).
pub const TEST_AUDIENCE: &str = "flotilla-test";
const REDIRECT_URI: &str = "http://127.0.0.1/callback";

/// Tokens the provider issued after a sign-in.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Opaque: resolved through userinfo.
    pub access_token: String,
    /// A JWT signed with the provider's key, for `TEST_AUDIENCE`.
    pub id_token: String,
}

#[derive(Debug)]
pub struct TestOidcProvider {
    /// `http://<host>:<port>`: also the issuer.
    pub issuer: String,
    child: Child,
    http: reqwest::Client,
}

impl TestOidcProvider {
    /// Starts a provider on loopback whose tokens live `token_max_age` seconds.
    pub fn start(token_max_age: u64) -> Self {
        Self::start_on("127.0.0.1", token_max_age)
    }

    /// [`Self::start`] listening on `host` (the issuer is then
    /// `http://<host>:<port>`, for containers that cannot reach loopback).
    pub fn start_on(host: &str, token_max_age: u64) -> Self {
        let python = std::env::var("FLOTILLA_TEST_PYTHON").unwrap_or_else(|_| {
            format!("{}/.cache/flotilla/venv/bin/python", std::env::var("HOME").unwrap_or_default())
        });
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/oidc-provider.py");
        let mut child = Command::new(&python)
            .args([script, "--host", host, "--port", "0", "--token-max-age", &token_max_age.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the OIDC provider with {python}: {e}\nInstall it with: scripts/dev-services.sh start"
                )
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("the provider's first line");
        let Some(issuer) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            panic!(
                "the OIDC provider did not start (is oidc-provider-mock installed? scripts/dev-services.sh start); it said {line:?}"
            );
        };
        Self { issuer: issuer.to_owned(), child, http: reqwest::Client::new() }
    }

    /// Signs `subject` in through the authorization form (code flow) and
    /// returns the provider's tokens. The user is created with `email`.
    pub async fn sign_in(&self, subject: &str, email: &str) -> Tokens {
        self.sign_in_for(subject, email, TEST_AUDIENCE).await
    }

    /// [`Self::sign_in`] as another client: the ID token's audience is `client_id`.
    pub async fn sign_in_for(&self, subject: &str, email: &str, client_id: &str) -> Tokens {
        let base = &self.issuer;
        let status = self
            .http
            .put(format!("{}/users/{subject}", self.issuer))
            .json(&json!({ "email": email }))
            .send()
            .await
            .expect("setting the user's claims")
            .status();
        assert!(status.is_success(), "PUT /users answered {status}");
        let no_redirects =
            reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        let form = no_redirects
            .post(format!("{base}/oauth2/authorize"))
            .query(&[
                ("client_id", client_id),
                ("redirect_uri", REDIRECT_URI),
                ("response_type", "code"),
                ("scope", "openid email"),
                ("state", "test"),
            ])
            .form(&[("sub", subject)])
            .send()
            .await
            .expect("submitting the authorization form");
        let location = form
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .unwrap_or_else(|| panic!("the authorization form answered {} without a redirect", form.status()))
            .to_owned();
        let code = location
            .split(['?', '&'])
            .find_map(|pair| pair.strip_prefix("code="))
            .unwrap_or_else(|| panic!("no code in {location}"))
            .to_owned();
        let tokens: Value = self
            .http
            .post(format!("{base}/oauth2/token"))
            .basic_auth(client_id, Some("secret"))
            .form(&[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT_URI)])
            .send()
            .await
            .expect("exchanging the code")
            .json()
            .await
            .expect("token response");
        let field = |name: &str| {
            tokens[name].as_str().unwrap_or_else(|| panic!("no {name} in the token response: {tokens}")).to_owned()
        };
        Tokens { access_token: field("access_token"), id_token: field("id_token") }
    }

    /// A JWT with these claims (and header fields), signed with the
    /// provider's current key.
    pub async fn sign(&self, claims: Value, header: Value) -> String {
        let answer: Value = self
            .http
            .post(format!("{}/_test/sign", self.issuer))
            .json(&json!({ "claims": claims, "header": header }))
            .send()
            .await
            .expect("signing")
            .json()
            .await
            .expect("signed token");
        answer["token"].as_str().expect("token").to_owned()
    }

    /// Standard claims for `subject`, valid now for an hour.
    pub fn claims(&self, subject: &str) -> Value {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        json!({
            "iss": self.issuer, "aud": TEST_AUDIENCE, "sub": subject, "email": format!("{subject}@example.com"),
            "iat": now, "exp": now + 3600,
        })
    }

    /// Replaces the provider's signing key; returns the new key id.
    pub async fn rotate_key(&self) -> String {
        let answer: Value = self
            .http
            .post(format!("{}/_test/rotate-key", self.issuer))
            .send()
            .await
            .expect("rotating the key")
            .json()
            .await
            .expect("rotation answer");
        answer["kid"].as_str().expect("kid").to_owned()
    }

    /// Answers a device-flow sign-in (the code `flo login` showed) as the
    /// user would in the browser: approve it as `subject`, or deny it.
    pub async fn decide_device_code(&self, user_code: &str, subject: &str, email: &str, approve: bool) {
        let action = if approve { "allow" } else { "deny" };
        let status = self
            .http
            .post(format!("{}/_test/device", self.issuer))
            .form(&[("user_code", user_code), ("sub", subject), ("email", email), ("action", action)])
            .send()
            .await
            .expect("the verification page")
            .status();
        assert!(status.is_success(), "the verification page answered {status}");
    }

    /// Revokes every token of `subject`.
    pub async fn revoke(&self, subject: &str) {
        let status = self
            .http
            .post(format!("{}/users/{subject}/revoke-tokens", self.issuer))
            .send()
            .await
            .expect("revoking")
            .status();
        assert!(status.is_success(), "revoke-tokens answered {status}");
    }
}

impl Drop for TestOidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
