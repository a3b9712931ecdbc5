//! The edge's configuration files, checked without running Traefik (there
//! is no Traefik image or package on the machines we test on): the static
//! configuration and the platform's dynamic configuration validate against
//! Traefik's own JSON schemas, and they agree with what the daemon serves
//! and labels (entry points, the route table's path, the opt-in label).

use std::path::PathBuf;

use flotilla_edge::EdgeSettings;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A vendored schema, checked to still equal the copy the project was given.
fn schema(name: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(root().join("traefik/schemas").join(name)).expect("the vendored schema");
    if let Ok(shared) = std::fs::read_to_string(root().join("../shared/schemas").join(name)) {
        assert_eq!(shared, text, "traefik/schemas/{name} must be the same as ../shared/schemas/");
    }
    jsonschema::draft7::new(&serde_json::from_str(&text).expect("JSON")).expect("a valid schema")
}

fn toml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not TOML: {e}"));
    serde_json::to_value(value).expect("as JSON")
}

fn assert_valid(validator: &jsonschema::Validator, config: &Value, what: &str) {
    let errors: Vec<String> = validator.iter_errors(config).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "{what} is not valid Traefik configuration: {errors:#?}");
}

#[test]
fn the_static_configuration_is_valid_and_matches_the_platform() {
    let config = toml_file("traefik/traefik.toml");
    assert_valid(&schema("traefik-v3-static-config.schema.json"), &config, "traefik/traefik.toml");

    let edge = EdgeSettings::default();
    let entry_points = &config["entryPoints"];
    assert!(entry_points[&edge.http_entrypoint].is_object(), "the entry point routes name: {}", edge.http_entrypoint);
    assert!(entry_points[&edge.https_entrypoint].is_object(), "the entry point routes name: {}", edge.https_entrypoint);
    // Each TLS route brings its own redirect to HTTPS (the route table
    // renders it); the entry point redirects nothing, so a host nobody
    // routes is a 404 (tests/edge.rs asks a real Traefik).
    assert!(entry_points[&edge.http_entrypoint]["http"]["redirections"].is_null(), "{entry_points}");

    let http = &config["providers"]["http"];
    let endpoint = http["endpoint"].as_str().expect("an endpoint");
    let (path, query) = endpoint.split_once('?').expect("a long poll: ?wait=N");
    assert!(path.ends_with(flotilla_edge::ROUTE_TABLE_PATH), "Traefik polls the orchestrators' table: {endpoint}");
    let wait: f64 = query.strip_prefix("wait=").expect("wait=N").parse().expect("seconds");
    let timeout = flotilla_daemon::config::parse_duration(http["pollTimeout"].as_str().unwrap()).unwrap();
    assert!(timeout.as_secs_f64() > wait + 5.0, "a held poll ends well before Traefik gives up on it");
    assert!(
        wait <= flotilla_edge::ServeConfig::default().max_wait.as_secs_f64(),
        "the orchestrators hold a poll as long as Traefik asks"
    );
    assert_eq!(config["providers"]["providersThrottleDuration"], "0s", "a new table is taken at once");
    let swarm = &config["providers"]["swarm"];
    assert_eq!(swarm["exposedByDefault"], false, "nothing is exposed unless it opts in");
    assert_eq!(swarm["constraints"], "Label(`flotilla.edge`, `true`)");
    // TLS on the entry point, but no resolver there: routers name theirs
    // (a custom domain has Flotilla's certificate, not a second one).
    let tls = &config["entryPoints"][&edge.https_entrypoint]["http"]["tls"];
    assert!(tls.is_object() && tls.get("certResolver").is_none(), "{tls}");
    assert!(config["certificatesResolvers"]["platform"]["acme"]["httpChallenge"].is_object());
    assert!(config["metrics"]["prometheus"].is_object() && config["accessLog"].is_object());
    let headers = &config["accessLog"]["fields"]["headers"];
    assert_eq!(headers["defaultMode"], "drop", "headers are not logged unless named");
    assert_eq!(headers["names"]["Authorization"], "drop", "credentials are never logged");
}

#[test]
fn the_platforms_dynamic_configuration_is_valid() {
    let validator = schema("traefik-v3-dynamic-config.schema.json");
    let dir = root().join("traefik/dynamic");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("traefik/dynamic") {
        let path = entry.expect("entry").path();
        let relative = path.strip_prefix(root()).expect("inside").to_string_lossy().into_owned();
        let config = toml_file(&relative);
        assert_valid(&validator, &config, &relative);
        checked += 1;
    }
    assert!(checked > 0, "no files in {}", dir.display());
    let platform = toml_file("traefik/dynamic/platform.toml");
    let challenge = &platform["http"]["routers"]["flotilla-acme-challenge"];
    assert_eq!(challenge["entryPoints"][0], EdgeSettings::default().http_entrypoint.as_str());
    assert_eq!(platform["tls"]["options"]["default"]["minVersion"], "VersionTLS12");
}

#[test]
fn a_schema_violation_is_caught() {
    // The checks above can fail: a misspelt key is refused by the schema.
    let mut config = toml_file("traefik/traefik.toml");
    config["entryPoints"]["web"]["adress"] = Value::String(":80".to_owned());
    let validator = schema("traefik-v3-static-config.schema.json");
    assert!(validator.iter_errors(&config).next().is_some(), "a misspelt key must not validate");
}

/// The secret Traefik's static configuration is deployed as: the same file
/// with the cluster's internal token in the route table request, still
/// valid; a token that could break out of the TOML string is refused.
#[test]
fn the_traefik_secret_carries_the_internal_token() {
    let dir = std::env::temp_dir().join(format!("flotilla-traefik-secret-{}", flotilla_test_utils::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = root().join("stack/traefik-secret.sh");
    let render = |token: &str| {
        let file = dir.join("token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        std::process::Command::new("bash").arg(&script).arg(&file).arg("--print").output().unwrap()
    };
    let rendered = render("c2VjcmV0LXRva2VuLWZvci10ZXN0cw");
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let text = String::from_utf8(rendered.stdout).unwrap();
    let config = serde_json::to_value(toml::from_str::<toml::Value>(&text).expect("TOML")).unwrap();
    assert_valid(&schema("traefik-v3-static-config.schema.json"), &config, "the rendered secret");
    assert_eq!(config["providers"]["http"]["headers"]["Authorization"], "Bearer c2VjcmV0LXRva2VuLWZvci10ZXN0cw");
    let committed = toml_file("traefik/traefik.toml");
    assert_eq!(
        committed["providers"]["http"]["headers"]["Authorization"], "Bearer FLOTILLA_INTERNAL_TOKEN",
        "the committed file holds only the placeholder"
    );
    for hostile in ["tok\"en", "", "a b"] {
        assert!(!render(hostile).status.success(), "{hostile:?} is refused");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
