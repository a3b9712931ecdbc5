//! Tenancy over every RPC: a member of organization B can neither read nor
//! change anything of organization A, and a viewer of A can change nothing.
//! The RPCs are read from the proto files, so an RPC added without a row
//! here fails this test.

use std::time::Duration;

use flotilla_e2e::{Protocol, TestFlotilla, every_rpc};
use flotilla_test_utils::TestOidcProvider;
use serde_json::{Value, json};

/// What an outsider's call must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outsider {
    /// `not_found`: it names A's resource.
    NotFound,
    /// Answers, with nothing of A in it (`A`'s ids must not appear).
    OnlyOwn,
    /// `permission_denied`: platform administrators only.
    AdminOnly,
}

/// What a viewer of A must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Viewer {
    Allowed,
    Denied,
}

struct Ids {
    deployment: String,
    project: String,
    invitation: String,
    node: String,
}

/// The table: per RPC, a request naming A's resources, what an outsider gets,
/// what a viewer gets, and whether it streams.
fn case(rpc: &str, ids: &Ids) -> Option<(Value, Outsider, Viewer, bool)> {
    use Outsider::*;
    use Viewer::*;
    let d = &ids.deployment;
    let method = rpc.rsplit('/').next().unwrap_or_default();
    Some(match method {
        "CreateDeployment" => (
            json!({"name": "intruder", "image": "flotilla/demo-http:latest", "port": 8080, "project_id": ids.project}),
            NotFound,
            Denied,
            false,
        ),
        "GetDeployment" => (json!({"id": d}), NotFound, Allowed, false),
        "ListDeployments" => (json!({}), OnlyOwn, Allowed, false),
        "UpdateDeployment" => (json!({"id": d, "image": "flotilla/demo-http:2"}), NotFound, Denied, false),
        "DeleteDeployment" | "StartDeployment" | "StopDeployment" | "RestartDeployment" => {
            (json!({"id": d}), NotFound, Denied, false)
        }
        "ScaleDeployment" => (json!({"id": d, "replicas": 3}), NotFound, Denied, false),
        "GetDeploymentMetrics" => (json!({"deployment_id": d}), NotFound, Allowed, false),
        "StreamDeploymentMetrics" => (json!({"deployment_id": d, "max_duration_seconds": 1}), NotFound, Allowed, true),
        "GetUsage" | "GetDeploymentUsage" => (json!({"deployment_id": d}), NotFound, Allowed, false),
        "GetEnvVars" | "GetRoutings" => (json!({"id": d}), NotFound, Allowed, false),
        "StreamDeploymentStatus" => (json!({"id": d, "max_duration_seconds": 1}), NotFound, Allowed, true),
        "StreamDeploymentLogs" => (json!({"deployment_id": d}), NotFound, Allowed, true),
        "UpdateEnvVars" => (json!({"id": d, "vars": [{"name": "X", "value": "1"}]}), NotFound, Denied, false),
        "UpdateRoutings" => (json!({"id": d, "domain": "intruder.example.com"}), NotFound, Denied, false),
        "GetDomainStatus" => (json!({"id": d}), NotFound, Allowed, false),
        "VerifyDomain" => (json!({"id": d}), NotFound, Denied, false),
        "ListNodes" => (json!({}), AdminOnly, Denied, false),
        "GetNode" | "DrainNode" | "ActivateNode" => (json!({"id": ids.node}), AdminOnly, Denied, false),
        "ListDatabaseBackups" => (json!({}), AdminOnly, Denied, false),
        "ListOrganizations" | "ListMembers" | "ListProjects" => (json!({}), OnlyOwn, Allowed, false),
        "ListInvitations" => (json!({}), OnlyOwn, Denied, false),
        // Acts for the caller: their own new organization.
        "CreateOrganization" => return None,
        "InviteMember" => (json!({"email": "x@example.com", "role": "ROLE_MEMBER"}), OnlyOwn, Denied, false),
        "RevokeInvitation" => (json!({"id": ids.invitation}), NotFound, Denied, false),
        // Only the token names an invitation: a guessed one finds nothing.
        "AcceptInvitation" => (json!({"token": "guessed"}), NotFound, Allowed, false),
        "SetMemberRole" => (json!({"subject": "alice", "role": "ROLE_VIEWER"}), NotFound, Denied, false),
        "RemoveMember" => (json!({"subject": "alice"}), NotFound, Denied, false),
        "CreateProject" => (json!({"name": "intruded"}), OnlyOwn, Denied, false),
        "DeleteProject" => (json!({"id": ids.project}), NotFound, Denied, false),
        _ => panic!("{rpc} has no row in the tenancy table: add one"),
    })
}

/// Everything of organization `slug` as one JSON value, to compare.
async fn snapshot(flotilla: &TestFlotilla, slug: &str) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object( \
           'deployments', (SELECT jsonb_agg(to_jsonb(d) - 'updated_at' ORDER BY d.id) FROM deployments d \
                           JOIN organizations o ON o.id = d.organization_id WHERE o.slug = $1), \
           'members', (SELECT jsonb_agg(to_jsonb(m) ORDER BY m.user_id) FROM organization_members m \
                       JOIN organizations o ON o.id = m.organization_id WHERE o.slug = $1), \
           'invitations', (SELECT jsonb_agg(to_jsonb(i) ORDER BY i.id) FROM organization_invitations i \
                           JOIN organizations o ON o.id = i.organization_id WHERE o.slug = $1), \
           'projects', (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.id) FROM projects p \
                        JOIN organizations o ON o.id = p.organization_id WHERE o.slug = $1))",
    )
    .bind(slug)
    .fetch_one(flotilla.db.pool())
    .await
    .expect("snapshot")
}

fn error_code(answer: &Value) -> Option<&str> {
    answer["code"].as_str().or_else(|| answer["error"]["code"].as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_reach_nothing_and_viewers_change_nothing_on_every_rpc_over_connect_json() {
    every_rpc_over(Protocol::ConnectJson).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_reach_nothing_and_viewers_change_nothing_on_every_rpc_over_connect_binary() {
    every_rpc_over(Protocol::ConnectProto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_reach_nothing_and_viewers_change_nothing_on_every_rpc_over_grpc() {
    every_rpc_over(Protocol::Grpc).await;
}

/// The table's calls in `protocol` (the setup is Connect JSON).
async fn every_rpc_over(protocol: Protocol) {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let token = |name: &'static str| {
        let provider = &provider;
        async move { format!("Bearer {}", provider.sign_in(name, &format!("{name}@example.com")).await.id_token) }
    };
    let (alice, bob, victor) = (token("alice").await, token("bob").await, token("victor").await);
    let call = |authorization: &str, rpc: &str, body: Value| {
        let headers = [("authorization", authorization.to_owned())];
        let flotilla = &flotilla;
        let rpc = rpc.to_owned();
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            flotilla.connect_with(&rpc, &headers, body).await
        }
    };

    // Organization A: alice's, with a deployment, a project, a pending
    // invitation, and victor as a viewer.
    let (_, orgs) = call(&alice, "flotilla.v1.OrganizationService/ListOrganizations", json!({})).await;
    let slug = orgs["organizations"][0]["slug"].as_str().expect("alice's organization").to_owned();
    let (_, created) = call(
        &alice,
        "flotilla.v1.DeploymentService/CreateDeployment",
        json!({"name": "web", "image": "flotilla/demo-http:latest", "port": 8080}),
    )
    .await;
    let (_, project) = call(&alice, "flotilla.v1.ProjectService/CreateProject", json!({"name": "api"})).await;
    let (_, invited) = call(
        &alice,
        "flotilla.v1.OrganizationService/InviteMember",
        json!({"email": "victor@example.com", "role": "ROLE_VIEWER"}),
    )
    .await;
    call(&victor, "flotilla.v1.OrganizationService/AcceptInvitation", json!({"token": invited["token"]})).await;
    let (_, pending) = call(
        &alice,
        "flotilla.v1.OrganizationService/InviteMember",
        json!({"email": "zoe@example.com", "role": "ROLE_MEMBER"}),
    )
    .await;
    let ids = Ids {
        deployment: created["deployment"]["id"].as_str().expect("deployment").to_owned(),
        project: project["project"]["id"].as_str().expect("project").to_owned(),
        invitation: pending["invitation"]["id"].as_str().expect("invitation").to_owned(),
        node: flotilla.node_id.to_string(),
    };
    let a_ids = [ids.deployment.clone(), ids.project.clone(), ids.invitation.clone(), slug.clone()];
    let before = snapshot(&flotilla, &slug).await;

    let rpcs = every_rpc();
    assert!(rpcs.len() >= 28, "the proto files declare {} RPCs: {rpcs:?}", rpcs.len());
    let victor_in_a = [("authorization", victor.as_str()), ("flotilla-organization", slug.as_str())];
    let mut checked = 0;
    for rpc in &rpcs {
        let Some((body, outsider, viewer, streams)) = case(rpc, &ids) else { continue };
        for (who, headers, expected) in [
            ("outsider", vec![("authorization", bob.as_str())], Some(outsider)),
            ("viewer", victor_in_a.to_vec(), None),
        ] {
            let (status, answer) = if streams {
                let (messages, end) =
                    flotilla.stream(protocol, rpc, &headers, body.clone(), 1, Duration::from_secs(3)).await;
                let end = end.unwrap_or(Value::Null);
                (if error_code(&end).is_some() { 0 } else { 200 }, json!({"messages": messages, "end": end}))
            } else {
                flotilla.call(protocol, rpc, &headers, body.clone()).await
            };
            let code = error_code(&answer).or_else(|| error_code(&answer["end"]));
            match (expected, viewer) {
                (Some(Outsider::NotFound), _) => assert_eq!(code, Some("not_found"), "{who} {rpc}: {answer}"),
                (Some(Outsider::AdminOnly), _) => assert_eq!(code, Some("permission_denied"), "{who} {rpc}: {answer}"),
                (Some(Outsider::OnlyOwn), _) => {
                    assert_eq!(status, 200, "{who} {rpc}: {answer}");
                    let text = answer.to_string();
                    assert!(!a_ids.iter().any(|id| text.contains(id.as_str())), "{who} {rpc} shows A's: {answer}");
                }
                (None, Viewer::Denied) => assert_eq!(code, Some("permission_denied"), "{who} {rpc}: {answer}"),
                // Reads are tested elsewhere; here: the role lets them through.
                (None, Viewer::Allowed) => {
                    assert!(!matches!(code, Some("permission_denied" | "unauthenticated")), "{who} {rpc}: {answer}")
                }
            }
            checked += 1;
        }
    }
    eprintln!("{checked} calls over {} RPCs in {protocol:?}", rpcs.len());
    assert_eq!(snapshot(&flotilla, &slug).await, before, "nothing of A changed");
    flotilla.stop().await;
}
