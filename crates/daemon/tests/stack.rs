//! The Swarm stack (stack/flotilla.yml), checked by Docker's own compose
//! loader (`docker stack config`) and read back: the agent in global mode
//! with the socket and a read-only cgroup view, replicated control plane with
//! start-first updates and rollback, host-mode ports only, secrets from
//! Docker. The flotillad image built offline runs its own health check.
//! (`docker stack deploy` of this file runs in tests/swarm.rs.)

use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stack_config() -> Value {
    let output = Command::new("docker")
        .args(["stack", "config", "-c", "flotilla.yml"])
        .current_dir(root().join("stack"))
        .env("FLOTILLA_IMAGE", "flotilla/flotillad:test")
        .output()
        .expect("the docker CLI runs");
    assert!(
        output.status.success(),
        "docker stack config refused the file: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_yaml::from_slice(&output.stdout).expect("YAML")
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

#[test]
fn the_stack_file_lays_out_the_cluster() {
    let config = stack_config();
    let services = &config["services"];
    let flotillad = ["agent", "orchestrator", "api"];
    for name in flotillad {
        let service = &services[name];
        assert_eq!(service["image"], "flotilla/flotillad:test", "{name} runs the image built here");
        let env = &service["environment"];
        for (variable, secret) in [
            ("FLOTILLA_DATABASE_URL_FILE", "flotilla_database_url"),
            ("FLOTILLA_REDIS_URL_FILE", "flotilla_redis_url"),
            ("FLOTILLA_INTERNAL_TOKEN_FILE", "flotilla_internal_token"),
        ] {
            assert_eq!(env[variable], format!("/run/secrets/{secret}").as_str(), "{name}: {variable}");
            let mounted = service["secrets"].as_sequence().expect("secrets").iter().any(|s| s["source"] == secret);
            assert!(mounted, "{name} mounts the secret {secret}");
        }
        assert!(service["healthcheck"]["test"].as_sequence().is_some_and(|t| t.len() > 1), "{name} checks its health");
        assert_eq!(service["deploy"]["update_config"]["failure_action"], "rollback", "{name} rolls back");
    }

    let orchestrator = &services["orchestrator"];
    assert_eq!(orchestrator["environment"]["FLOTILLA_CERTIFICATE_KEY_FILE"], "/run/secrets/flotilla_certificate_key");
    let secrets = orchestrator["secrets"].as_sequence().expect("secrets");
    assert!(secrets.iter().any(|s| s["source"] == "flotilla_certificate_key"), "the key that seals certificate keys");
    let traefik_secrets = services["traefik"]["secrets"].as_sequence().expect("Traefik's secrets");
    assert!(
        traefik_secrets.iter().any(|s| s["source"] == "flotilla_traefik_static"),
        "Traefik's static configuration carries the internal token: a secret, not a config"
    );

    let agent = &services["agent"];
    assert_eq!(agent["deploy"]["mode"], "global", "one agent per node");
    assert_eq!(strings(&agent["deploy"]["placement"]["constraints"]), ["node.labels.compute == true"]);
    let volumes = agent["volumes"].as_sequence().expect("volumes");
    let mount = |target: &str| volumes.iter().find(|v| v["target"] == target).cloned().unwrap_or(Value::Null);
    assert_eq!(mount("/var/run/docker.sock")["source"], "/var/run/docker.sock");
    assert_eq!(mount("/host/sys/fs/cgroup")["source"], "/sys/fs/cgroup");
    assert_eq!(mount("/host/sys/fs/cgroup")["read_only"], true, "the cgroup view is read-only");
    assert_eq!(agent["environment"]["FLOTILLA_METRICS_CGROUP_ROOT"], "/host/sys/fs/cgroup");

    for name in ["orchestrator", "api"] {
        let deploy = &services[name]["deploy"];
        assert!(deploy["replicas"].as_u64() >= Some(2), "{name}: no single point of failure");
        assert_eq!(deploy["placement"]["max_replicas_per_node"], 1, "{name}: replicas on different nodes");
        assert_eq!(deploy["update_config"]["order"], "start-first", "{name}: new before old");
        assert_eq!(deploy["rollback_config"]["order"], "start-first", "{name}");
    }
    let api_labels = &services["api"]["deploy"]["labels"];
    assert_eq!(api_labels["flotilla.edge"], "true", "the label Traefik's swarm provider is constrained to");
    assert_eq!(api_labels["traefik.http.services.flotilla-api.loadbalancer.server.port"], "7800");

    assert_eq!(services["traefik"]["deploy"]["mode"], "global", "Traefik on every edge node");
    assert_eq!(strings(&services["traefik"]["deploy"]["placement"]["constraints"]), ["node.labels.edge == true"]);
    // The data plane: one member of each kind on each of the nodes labelled
    // data=1, 2, 3, and a proxy on every node that flotillad reaches as
    // db-proxy (its own node).
    for kind in ["etcd", "pg", "redis", "sentinel"] {
        for member in 1..=3 {
            let name = format!("{kind}{member}");
            let service = &services[name.as_str()];
            assert_eq!(service["deploy"]["replicas"], 1, "{name}");
            assert_eq!(
                strings(&service["deploy"]["placement"]["constraints"]),
                [format!("node.labels.data == {member}")]
            );
            assert_eq!(service["environment"]["FLOTILLA_DATA_NAME"], name.as_str(), "{name} knows its name");
            let volumes = service["volumes"].as_sequence().expect("volumes");
            assert!(
                volumes.iter().any(|v| v["source"] == name.as_str() && v["target"] == "/data"),
                "{name}: own volume"
            );
        }
    }
    for member in 1..=3 {
        let volumes = services[format!("pg{member}").as_str()]["volumes"].as_sequence().expect("volumes").clone();
        assert!(volumes.iter().any(|v| v["target"] == "/backups" && v["type"] == "bind"), "pg{member} archives WAL");
    }
    assert_eq!(services["db-proxy"]["deploy"]["mode"], "global", "a proxy on every node");
    for name in flotillad {
        assert_eq!(
            strings(&services[name]["extra_hosts"]),
            ["db-proxy:host-gateway"],
            "{name} reaches its node's proxy"
        );
    }

    // No routing mesh and no VIPs: they need IPVS (docs/environment.md).
    for (name, service) in services.as_mapping().expect("services") {
        assert_eq!(service["deploy"]["endpoint_mode"], "dnsrr", "{name:?}");
        for port in service["ports"].as_sequence().into_iter().flatten() {
            assert_eq!(port["mode"], "host", "{name:?} publishes {port:?} through the mesh");
        }
    }
    for (name, secret) in config["secrets"].as_mapping().expect("secrets") {
        assert_eq!(secret["external"], true, "{name:?}: created by the operator, never in the file");
    }
    for (name, file) in config["configs"].as_mapping().expect("configs") {
        let path = file["file"].as_str().expect("a file");
        assert!(std::path::Path::new(path).exists(), "{name:?}: {path} exists");
    }
}

/// Every `flotilla_*` metric a dashboard or the Prometheus setup names is
/// one the code exports (a renamed metric must not leave a blank panel).
#[test]
fn the_dashboards_chart_metrics_that_exist() {
    let mut exported = String::new();
    let mut stack = vec![root().join("crates")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("crates") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                exported.push_str(&std::fs::read_to_string(&path).expect("source"));
            }
        }
    }
    let mut charted = 0;
    for name in ["node-health", "deployments", "platform-health"] {
        let path = root().join(format!("stack/grafana/{name}.json"));
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
        assert!(dashboard["uid"].as_str().is_some_and(|u| u.starts_with("flotilla-")), "{name}");
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if let Some(metric) = word.strip_prefix("flotilla_") {
                        // Histograms and counters are named without their suffixes in code.
                        let base = metric.trim_end_matches("_bucket");
                        assert!(exported.contains(&format!("\"flotilla_{base}\"")), "{name}: {word} is not exported");
                        charted += 1;
                    }
                }
            }
        }
    }
    assert!(charted >= 20, "{charted} metric references");
    if let Ok(output) = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(root().join("stack/prometheus/prometheus.yml"))
        .output()
    {
        assert!(
            output.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_image_built_offline_runs_and_checks_its_health() {
    let tag = format!("flotilla/flotillad:test-{}", std::process::id());
    let built = Command::new(root().join("scripts/build-flotillad-image.sh"))
        .args(["--tag", &tag, "--binary", env!("CARGO_BIN_EXE_flotillad")])
        .output()
        .expect("the build script runs");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    eprintln!("{}", String::from_utf8_lossy(&built.stderr).trim());
    let run = |args: &[&str]| {
        Command::new("docker").args(["run", "--rm", "--network", "none", &tag]).args(args).output().expect("docker run")
    };
    let version = run(&["--version"]);
    // Nothing listens in a container with no network: the check must fail, and say so.
    let unhealthy = run(&["health", "--url", "http://127.0.0.1:7800/health", "--timeout", "1s"]);
    let _ = Command::new("docker").args(["image", "rm", "-f", &tag]).output();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("flotillad "),
        "{}",
        String::from_utf8_lossy(&version.stdout)
    );
    assert!(!unhealthy.status.success(), "no server, no health");
    assert!(
        String::from_utf8_lossy(&unhealthy.stderr).contains("is not healthy"),
        "{}",
        String::from_utf8_lossy(&unhealthy.stderr)
    );
}
