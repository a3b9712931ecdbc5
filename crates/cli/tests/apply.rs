//! `flo apply` against a real API: the first apply creates, the second
//! changes nothing (same generations), an edit updates only what differs,
//! `--prune` deletes what the file no longer declares, and `--dry-run`
//! changes nothing.

use std::process::{Command, Output};

use flotilla_e2e::{TempDir, TestFlotilla};
use serde_json::{Value, json};

fn flo(api: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flo")).arg("--api").arg(api).args(args).output().expect("flo runs")
}

fn said(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn generations(flotilla: &TestFlotilla) -> Vec<(String, String, i64)> {
    let (_, listed) = flotilla.connect_json("ListDeployments", json!({})).await;
    let mut all: Vec<(String, String, i64)> = listed["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["status"] != "DEPLOYMENT_STATUS_DELETING")
        .map(|d: &Value| {
            (
                d["name"].as_str().unwrap_or_default().to_owned(),
                d["image"].as_str().unwrap_or_default().to_owned(),
                d["generation"].as_str().and_then(|g| g.parse().ok()).unwrap_or(0),
            )
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_then_changes_only_the_differences() {
    let flotilla =
        TestFlotilla::start_with(|s| s.roles = flotilla_daemon::Roles { api: true, orchestrator: false, agent: false })
            .await;
    let dir = TempDir::new();
    let file = dir.0.join("flotilla.toml");
    let path = file.to_str().expect("path");
    let api = flotilla.base_url.clone();
    let write = |text: &str| std::fs::write(&file, text).expect("write the file");
    let declared = |api_image: &str, with_worker: bool| {
        let mut text = format!(
            "[[deployment]]\nname = \"api\"\nimage = \"{api_image}\"\nport = 8080\nreplicas = 2\nenv = {{ MODE = \"prod\" }}\n"
        );
        if with_worker {
            text.push_str("\n[[deployment]]\nname = \"worker\"\nimage = \"flotilla/demo-http:latest\"\nport = 8080\n");
        }
        text
    };

    write(&declared("flotilla/demo-http:latest", true));
    let first = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path]));
    assert_eq!(first.status.code(), Some(0), "{}", said(&first));
    assert!(said(&first).contains("+ create api") && said(&first).contains("+ create worker"), "{}", said(&first));
    let after_first = generations(&flotilla).await;
    assert_eq!(after_first.len(), 2, "{after_first:?}");

    let again = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path]));
    assert_eq!(again.status.code(), Some(0), "{}", said(&again));
    assert!(
        said(&again).contains("= api unchanged") && said(&again).contains("= worker unchanged"),
        "{}",
        said(&again)
    );
    assert_eq!(generations(&flotilla).await, after_first, "applying the same file changes nothing");

    write(&declared("flotilla/demo-http:2", false));
    let plan = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path, "--prune", "--dry-run"]));
    assert!(said(&plan).contains("~ update api: image") && said(&plan).contains("- delete worker"), "{}", said(&plan));
    assert_eq!(generations(&flotilla).await, after_first, "a dry run changes nothing");
    let edited = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path, "--prune"]));
    assert_eq!(edited.status.code(), Some(0), "{}", said(&edited));
    let now = generations(&flotilla).await;
    assert_eq!(now.len(), 1, "worker pruned: {now:?}");
    assert_eq!(
        (now[0].1.as_str(), now[0].2),
        ("flotilla/demo-http:2", after_first[0].2 + 1),
        "api updated once: {now:?}"
    );

    write("[[deployment]]\nname = \"Bad Name\"\nimage = \"x\"\nport = 8080\n");
    let refused = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path]));
    assert_eq!(refused.status.code(), Some(5), "{}", said(&refused));
    write("[[deployment]]\nname = \"api\"\n");
    let broken = tokio::task::block_in_place(|| flo(&api, &["apply", "-f", path]));
    assert_eq!(broken.status.code(), Some(5), "{}", said(&broken));
    assert!(said(&broken).contains("project file"), "{}", said(&broken));
    flotilla.stop().await;
}
