//! OIDC authentication against a real provider (oidc-provider-mock from
//! PyPI): its signed ID tokens are verified locally, its opaque access
//! tokens through userinfo; every kind of bad token is `unauthenticated`;
//! a rotated key is picked up without a restart; users are created on first
//! sight with an organization of their own, and tenants stay apart.

use std::time::{Duration, Instant};

use base64::Engine as _;
use flotilla_e2e::TestFlotilla;
use flotilla_proto::v1 as pb;
use flotilla_test_utils::TestOidcProvider;
use flotilla_test_utils::oidc::TEST_AUDIENCE;
use serde_json::{Value, json};

const LIST: &str = "flotilla.v1.DeploymentService/ListDeployments";

async fn call(flotilla: &TestFlotilla, path: &str, token: &str, body: Value) -> (u16, Value) {
    flotilla.connect_with(path, &[("authorization", &format!("Bearer {token}"))], body).await
}

/// Asserts the call was refused as unauthenticated, with a message that
/// contains `reason`.
async fn assert_refused(flotilla: &TestFlotilla, what: &str, headers: &[(&str, &str)], reason: &str) {
    let (status, body) = flotilla.connect_with(LIST, headers, json!({})).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthenticated")), "{what}: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(reason), "{what}: the message {message:?} should say {reason:?}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

async fn metrics_text(flotilla: &TestFlotilla) -> String {
    flotilla
        .http
        .get(format!("{}/metrics", flotilla.base_url))
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("text")
}

fn b64(json: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_are_accepted_and_every_bad_one_is_unauthenticated() {
    let provider = TestOidcProvider::start(3600);
    // Keys are fetched again at most once a minute here: forged key ids
    // must not turn into requests to the provider.
    let flotilla =
        TestFlotilla::start_trusting(&provider, |oidc| oidc.jwks_min_refresh = Duration::from_secs(60)).await;
    let tokens = provider.sign_in("alice", "alice@example.com").await;

    // The signed ID token (verified here) and the opaque access token
    // (resolved through userinfo) both work, over Connect and gRPC.
    for (what, token) in [("ID token", &tokens.id_token), ("opaque access token", &tokens.access_token)] {
        let (status, body) = call(&flotilla, LIST, token, json!({})).await;
        assert_eq!(status, 200, "{what}: {body}");
    }
    let mut grpc = pb::deployment_service_client::DeploymentServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let mut request = tonic::Request::new(pb::ListDeploymentsRequest::default());
    request.metadata_mut().insert("authorization", format!("Bearer {}", tokens.id_token).parse().expect("metadata"));
    grpc.list_deployments(request).await.expect("gRPC with a valid token");
    let refused = grpc.list_deployments(pb::ListDeploymentsRequest::default()).await.expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let users_before = flotilla.count("SELECT count(*) FROM users").await;
    assert_eq!(users_before, 1, "alice was created once, whichever token she used");

    let now = chrono::Utc::now().timestamp();
    let claims = provider.claims("mallory");
    let with = |changes: Value| {
        let mut claims = claims.clone();
        for (key, value) in changes.as_object().expect("object") {
            claims[key] = value.clone();
        }
        claims
    };
    let expired = provider.sign(with(json!({"iat": now - 7200, "exp": now - 3600})), json!({})).await;
    let not_before = provider.sign(with(json!({"nbf": now + 3600})), json!({})).await;
    let issued_later = provider.sign(with(json!({"iat": now + 3600, "exp": now + 7200})), json!({})).await;
    let wrong_issuer = provider.sign(with(json!({"iss": "http://127.0.0.2:1"})), json!({})).await;
    let unknown_key = provider.sign(with(json!({})), json!({"kid": "no-such-key"})).await;
    let wrong_audience = provider.sign_in_for("mallory", "m@example.com", "another-client").await.id_token;
    let genuine = provider.sign(claims.clone(), json!({})).await;
    let (head, rest) = genuine.split_once('.').expect("a JWT");
    let (payload, signature) = rest.split_once('.').expect("a JWT");
    // Claims changed after signing: the signature no longer matches.
    let tampered = format!(
        "{head}.{}.{signature}",
        b64(&json!({"sub": "root", "aud": TEST_AUDIENCE, "iss": provider.issuer, "iat": now, "exp": now + 60}))
    );
    let unsigned = format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"})));
    let symmetric = format!("{}.{payload}.{signature}", b64(&json!({"alg": "HS256", "typ": "JWT"})));

    // (what, the Authorization header if any, what the refusal must say)
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("expired", Some(format!("Bearer {expired}")), "expired"),
        ("not before", Some(format!("Bearer {not_before}")), "not valid yet"),
        ("issued in the future", Some(format!("Bearer {issued_later}")), "not valid yet"),
        ("wrong issuer", Some(format!("Bearer {wrong_issuer}")), "another issuer"),
        ("wrong audience", Some(format!("Bearer {wrong_audience}")), "another audience"),
        ("bad signature", Some(format!("Bearer {tampered}")), "signature"),
        ("unknown key", Some(format!("Bearer {unknown_key}")), "key the provider does not publish"),
        ("alg none", Some(format!("Bearer {unsigned}")), "algorithm"),
        ("HS256 (key confusion)", Some(format!("Bearer {symmetric}")), "algorithm"),
        ("opaque token never issued", Some("Bearer not-a-token".to_owned()), "does not know"),
        ("no header", None, "no credentials"),
        ("basic scheme", Some("Basic YWxpY2U6cHc=".to_owned()), "Bearer"),
        ("empty bearer", Some("Bearer ".to_owned()), "Bearer"),
    ];
    for (what, authorization, reason) in &cases {
        let headers: Vec<(&str, &str)> = authorization.iter().map(|value| ("authorization", value.as_str())).collect();
        assert_refused(&flotilla, what, &headers, reason).await;
    }
    // The untampered token of the same claims is fine: what was refused was
    // each defect, not mallory.
    assert_eq!(call(&flotilla, LIST, &genuine, json!({})).await.0, 200);
    assert_eq!(flotilla.count("SELECT count(*) FROM users").await, 2, "no user was created by a refused token");

    // Several unknown key ids, one fetch at most: the rest were suppressed.
    for _ in 0..5 {
        assert_refused(&flotilla, "unknown key again", &[("authorization", &format!("Bearer {unknown_key}"))], "key")
            .await;
    }
    let metrics = metrics_text(&flotilla).await;
    assert!(metric(&metrics, "flotilla_oidc_jwks_fetches_total") <= 2.0, "{metrics}");
    assert!(metric(&metrics, "flotilla_oidc_jwks_refreshes_suppressed_total") >= 5.0);
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_signing_key_is_picked_up_without_a_restart() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |oidc| oidc.jwks_min_refresh = Duration::ZERO).await;
    let before = provider.sign_in("alice", "alice@example.com").await;
    assert_eq!(call(&flotilla, LIST, &before.id_token, json!({})).await.0, 200);
    let fetches = metric(&metrics_text(&flotilla).await, "flotilla_oidc_jwks_fetches_total");

    let new_kid = provider.rotate_key().await;
    // The provider's ID tokens carry no key id: the old key fails, the keys
    // are fetched again, the new one verifies.
    let after = provider.sign_in("bob", "bob@example.com").await;
    let (status, body) = call(&flotilla, LIST, &after.id_token, json!({})).await;
    assert_eq!(status, 200, "a token of the new key: {body}");
    // A token naming the new key id.
    let named = provider.sign(provider.claims("carol"), json!({ "kid": new_kid })).await;
    assert_eq!(call(&flotilla, LIST, &named, json!({})).await.0, 200);
    let metrics = metrics_text(&flotilla).await;
    assert_eq!(metric(&metrics, "flotilla_oidc_jwks_fetches_total"), fetches + 1.0, "one fetch for the rotation");
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_opaque_token_stops_working_within_the_cache_time() {
    let provider = TestOidcProvider::start(3600);
    let cache = Duration::from_secs(2);
    let flotilla = TestFlotilla::start_trusting(&provider, |oidc| oidc.userinfo_cache = cache).await;
    let tokens = provider.sign_in("alice", "alice@example.com").await;
    for _ in 0..3 {
        assert_eq!(call(&flotilla, LIST, &tokens.access_token, json!({})).await.0, 200);
    }
    let calls = metric(&metrics_text(&flotilla).await, "flotilla_oidc_userinfo_calls_total");
    assert_eq!(calls, 1.0, "three requests, one userinfo call: the answer is cached");

    provider.revoke("alice").await;
    let revoked = Instant::now();
    loop {
        let (status, body) = call(&flotilla, LIST, &tokens.access_token, json!({})).await;
        if status == 401 {
            assert!(body["message"].as_str().unwrap_or_default().contains("revoked"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            revoked.elapsed() < cache + Duration::from_secs(1),
            "still accepted {:?} after revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("revocation took effect after {:?} (cache {cache:?})", revoked.elapsed());
    // The JWT of the same sign-in is verified locally and unaffected:
    // revocation concerns tokens the provider has to be asked about.
    assert_eq!(call(&flotilla, LIST, &tokens.id_token, json!({})).await.0, 200);
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomers_get_an_organization_of_their_own_and_tenants_stay_apart() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let alice = provider.sign_in("alice", "alice@example.com").await.id_token;
    let bob = provider.sign_in("bob", "bob@example.com").await.id_token;
    let root = provider.sign_in("root", "root@example.com").await.id_token;

    // Ten first requests of one newcomer at once: one user, one organization.
    let requests = (0..10).map(|_| call(&flotilla, LIST, &alice, json!({})));
    for (status, body) in futures::future::join_all(requests).await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(flotilla.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        flotilla
            .count(
                "SELECT count(*) FROM organization_members m JOIN users u ON u.id = m.user_id \
                 WHERE u.subject = 'alice' AND m.role = 'owner'"
            )
            .await,
        1
    );
    let slug: String = sqlx::query_scalar(
        "SELECT o.slug FROM organizations o JOIN organization_members m ON m.organization_id = o.id \
         JOIN users u ON u.id = m.user_id WHERE u.subject = 'alice'",
    )
    .fetch_one(flotilla.db.pool())
    .await
    .expect("alice's organization");
    assert!(slug.starts_with("alice-"), "{slug}");

    let create = "flotilla.v1.DeploymentService/CreateDeployment";
    let (status, created) =
        call(&flotilla, create, &alice, json!({"name": "web", "image": "flotilla/demo-http:latest", "port": 8080}))
            .await;
    assert_eq!(status, 200, "{created}");
    let id = created["deployment"]["id"].as_str().expect("an id").to_owned();

    // Bob sees nothing of alice's: not found, never forbidden.
    for (method, body) in [
        ("GetDeployment", json!({"id": id})),
        ("DeleteDeployment", json!({"id": id})),
        ("UpdateDeployment", json!({"id": id, "image": "flotilla/demo-http:2"})),
        ("StopDeployment", json!({"id": id})),
    ] {
        let (status, answer) = call(&flotilla, &format!("flotilla.v1.DeploymentService/{method}"), &bob, body).await;
        assert_eq!((status, answer["code"].as_str()), (404, Some("not_found")), "{method}: {answer}");
    }
    let (_, listed) = call(&flotilla, LIST, &bob, json!({})).await;
    assert!(listed["deployments"].as_array().is_none_or(Vec::is_empty), "{listed}");
    // Naming alice's organization does not let bob in, nor tell him it exists.
    let (status, answer) = flotilla
        .connect_with(LIST, &[("authorization", &format!("Bearer {bob}")), ("flotilla-organization", &slug)], json!({}))
        .await;
    assert_eq!((status, answer["code"].as_str()), (404, Some("not_found")), "{answer}");
    let (status, answer) = flotilla
        .connect_with(
            LIST,
            &[("authorization", &format!("Bearer {alice}")), ("flotilla-organization", &slug)],
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "alice names her own organization: {answer}");
    assert_eq!(answer["deployments"].as_array().map(Vec::len), Some(1));

    // Nodes are for platform administrators (from configuration) only.
    let nodes = "flotilla.v1.NodeService/ListNodes";
    let (status, answer) = call(&flotilla, nodes, &alice, json!({})).await;
    assert_eq!((status, answer["code"].as_str()), (403, Some("permission_denied")), "{answer}");
    assert_eq!(call(&flotilla, nodes, &root, json!({})).await.0, 200);
    flotilla.stop().await;
}
