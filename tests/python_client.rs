//! A real Connect client we did not write — `connectrpc` from PyPI, with code
//! generated from our protos by `protoc-gen-py` and `protoc-gen-connectrpc`
//! (PyPI too, installed by scripts/dev-services.sh) — against the server:
//! unary calls in binary (gzip-compressed requests) and JSON, a server
//! stream, and errors with their codes.

use std::process::Command;

use flotilla_e2e::{TempDir, TestFlotilla};
use flotilla_test_utils::TestOidcProvider;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_connect_client_works_against_the_server() {
    let python = std::env::var("FLOTILLA_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.cache/flotilla/venv/bin/python", std::env::var("HOME").unwrap_or_default()));
    let bin = std::path::Path::new(&python).parent().expect("the venv's bin").to_owned();
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let generated = TempDir::new();
    let mut protoc = Command::new("protoc");
    protoc
        .arg(format!("-I{proto}"))
        .arg("-I/usr/include")
        .arg(format!("--plugin=protoc-gen-py={}", bin.join("protoc-gen-py").display()))
        .arg(format!("--py_out={}", generated.0.display()))
        .arg(format!("--plugin=protoc-gen-connectrpc={}", bin.join("protoc-gen-connectrpc").display()))
        .arg(format!("--connectrpc_out={}", generated.0.display()));
    for file in std::fs::read_dir(format!("{proto}/flotilla/v1")).expect("protos") {
        protoc.arg(file.expect("entry").path());
    }
    let output = protoc.output().expect("protoc runs (scripts/dev-services.sh installs it)");
    assert!(output.status.success(), "code generation: {}", String::from_utf8_lossy(&output.stderr));

    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let token = provider.sign_in("py", "py@example.com").await.id_token;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/connect_client.py");
    let base = flotilla.base_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python).arg(script).arg(&base).arg(&token).env("PYTHONPATH", &generated.0).output()
    })
    .await
    .expect("join")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("its JSON summary");
    eprintln!("the Python client saw: {seen}");
    assert_eq!(seen["masked"], serde_json::json!(["********"]), "secrets come back masked");
    assert_eq!(seen["env"], serde_json::json!(["KEY", "LANG_USED"]));
    assert_eq!(seen["streamed"], seen["created"]);
    assert_eq!(seen["listed"], serde_json::json!(["from-python"]));
    assert_eq!(seen["organizations"], 1);
    assert!(seen["invalid"].as_str().unwrap_or_default().starts_with("name"), "{seen}");
    flotilla.stop().await;
}
