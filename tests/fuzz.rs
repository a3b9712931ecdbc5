//! Bad input on every RPC: random request bodies (garbage bytes, broken
//! JSON, wrong types, hostile values in every known field name, random
//! protobuf bytes) from a seeded generator. Each answer must be a clear
//! client error or a success, never an internal error, a dropped
//! connection or a hang; and a refused call changes nothing.

use std::time::Duration;

use flotilla_e2e::{TestFlotilla, every_rpc, is_streaming};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

const CASES_PER_RPC: usize = 40;

const FIELDS: &[&str] = &[
    "id",
    "name",
    "image",
    "port",
    "domain",
    "env",
    "vars",
    "replicas",
    "deployment_id",
    "project_id",
    "email",
    "role",
    "subject",
    "token",
    "slug",
    "path_prefix",
    "page_size",
    "page_token",
    "max_duration_seconds",
    "expected_generation",
    "limits",
    "health_check",
    "placement",
    "idempotency_key",
    "status",
    "node_id",
    "now",
    "start",
    "end",
    "step_seconds",
    "backfill",
    "restart_policy",
    "network_mode",
];

fn hostile_string(rng: &mut StdRng) -> String {
    let pool = [
        String::new(),
        "x".repeat(rng.random_range(1..5000)),
        "\u{0}\u{1}\u{7f}".to_owned(),
        "../../etc/passwd".to_owned(),
        "Host(`evil`) || PathPrefix(`/`)".to_owned(),
        "'; DROP TABLE deployments; --".to_owned(),
        "\u{202e}gnp.exe".to_owned(),
        "00000000-0000-0000-0000-000000000000".to_owned(),
        uuid::Uuid::new_v4().to_string(),
        "ROLE_OWNER".to_owned(),
        "-1".to_owned(),
        "1e309".to_owned(),
        "é".repeat(300),
        "a@b".to_owned(),
        "/".to_owned(),
        "*.example.com".to_owned(),
    ];
    pool[rng.random_range(0..pool.len())].clone()
}

fn hostile_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..11) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!([i64::MIN, -1, 0, 65536, u32::MAX as i64 + 1, i64::MAX][rng.random_range(0..6)]),
        4 => json!(rng.random::<f64>() * 1e300),
        5 if depth < 4 => Value::Array((0..rng.random_range(0..4)).map(|_| hostile_value(rng, depth + 1)).collect()),
        6 if depth < 4 => hostile_object(rng, depth + 1),
        _ => json!(hostile_string(rng)),
    }
}

fn hostile_object(rng: &mut StdRng, depth: u32) -> Value {
    let mut object = Map::new();
    for _ in 0..rng.random_range(0..6) {
        let key = if rng.random_range(0..8) == 0 {
            hostile_string(rng)
        } else {
            FIELDS[rng.random_range(0..FIELDS.len())].to_owned()
        };
        object.insert(key, hostile_value(rng, depth));
    }
    Value::Object(object)
}

/// A request body and its content type.
fn hostile_body(rng: &mut StdRng) -> (Vec<u8>, &'static str) {
    match rng.random_range(0..10) {
        0 => ((0..rng.random_range(0..512)).map(|_| rng.random::<u8>()).collect(), "application/json"),
        1 => ((0..rng.random_range(0..512)).map(|_| rng.random::<u8>()).collect(), "application/proto"),
        2 => {
            // Cut anywhere, even inside a UTF-8 sequence.
            let mut bytes = hostile_object(rng, 0).to_string().into_bytes();
            bytes.truncate(rng.random_range(0..bytes.len().max(1)));
            (bytes, "application/json")
        }
        3 => (format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)).into_bytes(), "application/json"),
        4 => (hostile_value(rng, 0).to_string().into_bytes(), "application/json"),
        _ => (hostile_object(rng, 0).to_string().into_bytes(), "application/json"),
    }
}

async fn snapshot(flotilla: &TestFlotilla) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object( \
           'deployments', (SELECT jsonb_agg(to_jsonb(d) - 'updated_at' ORDER BY d.id) FROM deployments d), \
           'organizations', (SELECT count(*) FROM organizations), \
           'members', (SELECT jsonb_agg(to_jsonb(m) ORDER BY m.organization_id, m.user_id) FROM organization_members m), \
           'invitations', (SELECT count(*) FROM organization_invitations), \
           'projects', (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.id) FROM projects p), \
           'nodes', (SELECT jsonb_agg(availability ORDER BY node_id) FROM node_metadata))",
    )
    .fetch_one(flotilla.db.pool())
    .await
    .expect("snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_on_every_rpc_get_clear_errors_and_change_nothing() {
    let flotilla =
        TestFlotilla::start_with(|s| s.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false })
            .await;
    // Something to aim at: a deployment whose id is in the pool of values.
    let id = flotilla.create(json!({"name": "target", "image": flotilla_e2e::DEMO_IMAGE, "port": 8080})).await;
    let seed = std::env::var("FLOTILLA_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_121u64);
    eprintln!("fuzz seed {seed} (set FLOTILLA_FUZZ_SEED to replay another)");
    let mut rng = StdRng::seed_from_u64(seed);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
    let (mut calls, mut accepted) = (0, 0);
    for rpc in every_rpc() {
        for case in 0..CASES_PER_RPC {
            let (mut body, content_type) = hostile_body(&mut rng);
            if case == 0 {
                // And once with the real target's id in a plausible shape.
                body = json!({"id": id, "deployment_id": id, "replicas": -5, "name": "UPPER"}).to_string().into_bytes();
            }
            let before = snapshot(&flotilla).await;
            let streaming = is_streaming(&rpc);
            let mut request =
                client.post(format!("{}/{rpc}", flotilla.base_url)).header("connect-protocol-version", "1");
            if streaming {
                // Enveloped, as a streaming client sends it.
                let mut envelope = vec![0u8];
                envelope.extend_from_slice(&(body.len() as u32).to_be_bytes());
                envelope.extend_from_slice(&body);
                let kind = if content_type == "application/proto" {
                    "application/connect+proto"
                } else {
                    "application/connect+json"
                };
                request = request.header("content-type", kind).body(envelope);
            } else {
                request = request.header("content-type", content_type).body(body.clone());
            }
            let response = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{rpc}: no answer ({e}) to {}", String::from_utf8_lossy(&body)));
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap_or_else(|e| panic!("{rpc}: the answer broke off ({e})"));
            let text = String::from_utf8_lossy(&bytes);
            calls += 1;
            let input = String::from_utf8_lossy(&body).chars().take(300).collect::<String>();
            assert!(
                status < 500 || (status == 503 && text.contains("metrics")),
                "{rpc} answered {status} {text} to {input}"
            );
            for forbidden in ["\"internal\"", "\"unknown\"", "panicked"] {
                assert!(!text.contains(forbidden), "{rpc}: {text} to {input}");
            }
            let succeeded = status == 200 && !text.contains("\"error\"");
            if succeeded {
                accepted += 1;
            } else {
                assert_eq!(snapshot(&flotilla).await, before, "{rpc} refused {input} but changed something: {text}");
            }
        }
    }
    eprintln!("{calls} hostile calls, {accepted} accepted as valid, every other one refused cleanly");
    let health = client.get(format!("{}/health", flotilla.base_url)).send().await.expect("health");
    assert_eq!(health.status().as_u16(), 200, "still healthy");
    flotilla.stop().await;
}
