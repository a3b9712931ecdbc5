//! Client deadlines: `connect-timeout-ms` (Connect) and `grpc-timeout`
//! (gRPC) end a call that runs past them with `deadline_exceeded`, unary
//! calls and streams alike, well before the server's own limits.

use std::time::{Duration, Instant};

use flotilla_e2e::{DEMO_IMAGE, Protocol, TestFlotilla};
use serde_json::{Value, json};

const STATUS_STREAM: &str = "flotilla.v1.DeploymentService/StreamDeploymentStatus";
const UPDATE: &str = "flotilla.v1.DeploymentService/UpdateDeployment";

fn deadline_header(protocol: Protocol, millis: u64) -> (&'static str, String) {
    match protocol {
        Protocol::Grpc => ("grpc-timeout", format!("{millis}m")),
        Protocol::ConnectJson | Protocol::ConnectProto => ("connect-timeout-ms", millis.to_string()),
    }
}

fn end_code(end: &Option<Value>) -> Option<&str> {
    let end = end.as_ref()?;
    end["error"]["code"].as_str().or_else(|| end["code"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_with_deadline_exceeded_at_the_clients_deadline_in_every_protocol() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.create(json!({"name": "deadline", "image": DEMO_IMAGE, "port": 8080})).await;
    for protocol in Protocol::ALL {
        let (name, value) = deadline_header(protocol, 400);
        let started = Instant::now();
        // The stream would run 60 s on its own terms.
        let (messages, end) = flotilla
            .stream(
                protocol,
                STATUS_STREAM,
                &[(name, value.as_str())],
                json!({"id": id, "max_duration_seconds": 60}),
                1000,
                Duration::from_secs(20),
            )
            .await;
        let took = started.elapsed();
        eprintln!("{protocol:?}: {} messages, ended after {took:?} with {end:?}", messages.len());
        assert!(!messages.is_empty(), "{protocol:?}: the current status came first");
        assert_eq!(end_code(&end), Some("deadline_exceeded"), "{protocol:?}: {end:?}");
        assert!(took >= Duration::from_millis(390), "{protocol:?}: not before the deadline ({took:?})");
        assert!(took < Duration::from_secs(5), "{protocol:?}: at the deadline, not the stream's end ({took:?})");
    }
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_held_up_past_the_clients_deadline_answers_deadline_exceeded() {
    let flotilla = TestFlotilla::start().await;
    let id = flotilla.create(json!({"name": "held", "image": DEMO_IMAGE, "port": 8080})).await;
    // Hold the deployment's row so an update waits for it.
    let mut holder = flotilla.db.pool().begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM deployments WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *holder)
        .await
        .expect("lock the row");
    // Connect only: tonic's own client enforces grpc-timeout on a unary call
    // at the same instant, so the answer would not tell whether the server
    // honoured it. The stream test above shows the server does (a client-side
    // timeout would end the stream `canceled`, not with the server's status).
    for protocol in [Protocol::ConnectJson, Protocol::ConnectProto] {
        let (name, value) = deadline_header(protocol, 300);
        let started = Instant::now();
        let (status, answer) =
            flotilla.call(protocol, UPDATE, &[(name, value.as_str())], json!({"id": id, "replicas": 2})).await;
        let took = started.elapsed();
        eprintln!("{protocol:?}: {status} {answer} after {took:?}");
        assert_eq!(answer["code"], "deadline_exceeded", "{protocol:?}: {answer}");
        assert!(took >= Duration::from_millis(290), "{protocol:?}: {took:?}");
        assert!(took < Duration::from_secs(5), "{protocol:?}: at the deadline, not the server's 30 s ({took:?})");
    }
    holder.rollback().await.expect("release");
    // Without a deadline the same call goes through once the row is free.
    let (status, answer) = flotilla.call(Protocol::Grpc, UPDATE, &[], json!({"id": id, "replicas": 2})).await;
    assert_eq!(status, 200, "{answer}");
    // The second replica runs before the test ends: a container still being
    // created at shutdown could appear after the cleanup and be left behind.
    let two_running = |status: u16, body: &Value| {
        let replicas = body["deployment"]["replicas"].as_array().cloned().unwrap_or_default();
        status == 200 && replicas.len() == 2 && replicas.iter().all(|r| r["status"] == "REPLICA_STATUS_RUNNING")
    };
    flotilla.wait_for(&id, Duration::from_secs(30), two_running).await;
    flotilla.stop().await;
}
