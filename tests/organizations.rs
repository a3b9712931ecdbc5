//! Organizations, members, invitations, roles and projects through the real
//! API with real OIDC tokens: who may do what, the last owner stays, an
//! invitation works once and only for the invited address.

use std::time::{Duration, Instant};

use flotilla_e2e::TestFlotilla;
use flotilla_proto::v1 as pb;
use flotilla_test_utils::{TestOidcProvider, unique_suffix};
use serde_json::{Value, json};

const ORGS: &str = "flotilla.v1.OrganizationService";
const PROJECTS: &str = "flotilla.v1.ProjectService";

/// One signed-in user, acting in `organization` when set.
struct User<'a> {
    flotilla: &'a TestFlotilla,
    token: String,
    organization: Option<String>,
}

impl User<'_> {
    async fn call(&self, path: &str, body: Value) -> (u16, Value) {
        let authorization = format!("Bearer {}", self.token);
        let mut headers = vec![("authorization", authorization.as_str())];
        if let Some(organization) = &self.organization {
            headers.push(("flotilla-organization", organization.as_str()));
        }
        self.flotilla.connect_with(path, &headers, body).await
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, answer) = self.call(path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
        answer
    }

    /// Asserts the call is refused with `code`.
    async fn refused(&self, path: &str, body: Value, code: &str) -> Value {
        let (status, answer) = self.call(path, body).await;
        assert_eq!(answer["code"].as_str(), Some(code), "{path} ({status}): {answer}");
        answer
    }

    fn acting_in(&self, organization: &str) -> Self {
        User { flotilla: self.flotilla, token: self.token.clone(), organization: Some(organization.to_owned()) }
    }
}

async fn sign_in<'a>(provider: &TestOidcProvider, flotilla: &'a TestFlotilla, name: &str) -> User<'a> {
    let token = provider.sign_in(name, &format!("{name}@example.com")).await.id_token;
    User { flotilla, token, organization: None }
}

fn roles(members: &Value) -> Vec<(String, String)> {
    let mut roles: Vec<(String, String)> = members["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (m["subject"].as_str().unwrap_or_default().to_owned(), m["role"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    roles.sort();
    roles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_invitations_roles_and_projects_follow_the_rules() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let alice = sign_in(&provider, &flotilla, "alice").await;
    let bob = sign_in(&provider, &flotilla, "bob").await;
    let carol = sign_in(&provider, &flotilla, "carol").await;

    let mine = alice.ok(&format!("{ORGS}/ListOrganizations"), json!({})).await;
    assert_eq!(mine["organizations"].as_array().map(Vec::len), Some(1), "a personal organization: {mine}");
    assert_eq!(mine["organizations"][0]["role"], "ROLE_OWNER");

    let slug = format!("acme-{}", unique_suffix().to_ascii_lowercase());
    let created = alice.ok(&format!("{ORGS}/CreateOrganization"), json!({"slug": slug, "name": "ACME"})).await;
    assert_eq!(created["organization"]["role"], "ROLE_OWNER");
    alice.refused(&format!("{ORGS}/CreateOrganization"), json!({"slug": slug}), "already_exists").await;
    let bad = alice.refused(&format!("{ORGS}/CreateOrganization"), json!({"slug": "ACME!"}), "invalid_argument").await;
    assert!(bad["message"].as_str().unwrap_or_default().starts_with("slug"), "{bad}");

    let alice = alice.acting_in(&slug);
    let invite = format!("{ORGS}/InviteMember");
    for (body, field) in [
        (json!({"email": "not-an-address", "role": "ROLE_MEMBER"}), "email"),
        (json!({"email": "bob@example.com"}), "role"),
        // Refused while decoding: the message is the decoder's.
        (json!({"email": "bob@example.com", "role": 42}), ""),
    ] {
        let refused = alice.refused(&invite, body, "invalid_argument").await;
        assert!(refused["message"].as_str().unwrap_or_default().starts_with(field), "{refused}");
    }
    assert_eq!(
        flotilla.count("SELECT count(*) FROM organization_invitations").await,
        0,
        "refused invites left nothing"
    );
    let for_bob = alice.ok(&invite, json!({"email": "Bob@Example.com", "role": "ROLE_MEMBER"})).await;
    let bob_token = for_bob["token"].as_str().expect("a token").to_owned();
    assert_eq!(for_bob["invitation"]["email"], "bob@example.com");

    // Only bob can use bob's invitation, and only once.
    let accept = format!("{ORGS}/AcceptInvitation");
    carol.refused(&accept, json!({"token": bob_token}), "not_found").await;
    let joined = bob.ok(&accept, json!({"token": bob_token})).await;
    assert_eq!(
        (joined["organization"]["slug"].as_str(), joined["organization"]["role"].as_str()),
        (Some(slug.as_str()), Some("ROLE_MEMBER"))
    );
    bob.refused(&accept, json!({"token": bob_token}), "not_found").await;
    bob.refused(&accept, json!({"token": "made-up"}), "not_found").await;

    let bob = bob.acting_in(&slug);
    let members = bob.ok(&format!("{ORGS}/ListMembers"), json!({})).await;
    assert_eq!(roles(&members), [("alice".into(), "ROLE_OWNER".into()), ("bob".into(), "ROLE_MEMBER".into())]);
    bob.refused(&invite, json!({"email": "eve@example.com", "role": "ROLE_MEMBER"}), "permission_denied").await;
    bob.refused(&format!("{ORGS}/ListInvitations"), json!({}), "permission_denied").await;

    let for_carol = alice.ok(&invite, json!({"email": "carol@example.com", "role": "ROLE_ADMIN"})).await;
    let pending = alice.ok(&format!("{ORGS}/ListInvitations"), json!({})).await;
    assert_eq!(pending["invitations"].as_array().map(Vec::len), Some(1), "{pending}");
    carol.ok(&accept, json!({"token": for_carol["token"]})).await;
    let carol = carol.acting_in(&slug);

    // An admin manages members but not owners.
    let set_role = format!("{ORGS}/SetMemberRole");
    carol.ok(&set_role, json!({"subject": "bob", "role": "ROLE_VIEWER"})).await;
    carol.refused(&set_role, json!({"subject": "bob", "role": "ROLE_OWNER"}), "permission_denied").await;
    carol.refused(&set_role, json!({"subject": "alice", "role": "ROLE_MEMBER"}), "permission_denied").await;
    carol.refused(&invite, json!({"email": "eve@example.com", "role": "ROLE_OWNER"}), "permission_denied").await;
    carol.refused(&set_role, json!({"subject": "nobody", "role": "ROLE_MEMBER"}), "not_found").await;

    // A viewer reads but changes nothing (the role change reaches callers
    // within the 5 s caller cache).
    let create = "flotilla.v1.DeploymentService/CreateDeployment";
    let since = Instant::now();
    for attempt in 0.. {
        let deployment = json!({"name": format!("web-{attempt}"), "image": "flotilla/demo-http:latest", "port": 8080});
        let (status, answer) = bob.call(create, deployment).await;
        if answer["code"] == "permission_denied" {
            break;
        }
        assert_eq!(status, 200, "{answer}");
        assert!(since.elapsed() < Duration::from_secs(7), "the viewer role never took effect");
        // The cache may expire between the two calls: a refused delete is the
        // viewer role taking effect too.
        let delete = json!({"id": answer["deployment"]["id"]});
        let (status, answer) = bob.call("flotilla.v1.DeploymentService/DeleteDeployment", delete).await;
        if answer["code"] == "permission_denied" {
            break;
        }
        assert_eq!(status, 200, "{answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bob.refused(&format!("{PROJECTS}/CreateProject"), json!({"name": "api"}), "permission_denied").await;
    bob.ok("flotilla.v1.DeploymentService/ListDeployments", json!({})).await;

    // The last owner stays.
    alice.refused(&set_role, json!({"subject": "alice", "role": "ROLE_ADMIN"}), "failed_precondition").await;
    alice.refused(&format!("{ORGS}/RemoveMember"), json!({"subject": "alice"}), "failed_precondition").await;
    alice.ok(&set_role, json!({"subject": "carol", "role": "ROLE_OWNER"})).await;
    alice.ok(&format!("{ORGS}/RemoveMember"), json!({"subject": "alice"})).await;
    let left = alice.ok(&format!("{ORGS}/ListOrganizations"), json!({})).await;
    assert!(left["organizations"].as_array().into_iter().flatten().all(|o| o["slug"] != slug.as_str()), "{left}");

    // Projects.
    let project = carol.ok(&format!("{PROJECTS}/CreateProject"), json!({"name": "api"})).await;
    carol.refused(&format!("{PROJECTS}/CreateProject"), json!({"name": "api"}), "already_exists").await;
    carol.refused(&format!("{PROJECTS}/CreateProject"), json!({"name": "Not Valid"}), "invalid_argument").await;
    let listed = carol.ok(&format!("{PROJECTS}/ListProjects"), json!({})).await;
    let names: Vec<&str> =
        listed["projects"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["default", "api"]);
    let default_id = listed["projects"][0]["id"].clone();
    carol.refused(&format!("{PROJECTS}/DeleteProject"), json!({"id": default_id}), "failed_precondition").await;
    let in_api = carol.ok(create, json!({"name": "svc", "image": "flotilla/demo-http:latest", "port": 8080, "project_id": project["project"]["id"]})).await;
    carol
        .refused(&format!("{PROJECTS}/DeleteProject"), json!({"id": project["project"]["id"]}), "failed_precondition")
        .await;
    assert!(in_api["deployment"]["id"].is_string(), "{in_api}");
    let empty = carol.ok(&format!("{PROJECTS}/CreateProject"), json!({"name": "tmp"})).await;
    carol.ok(&format!("{PROJECTS}/DeleteProject"), json!({"id": empty["project"]["id"]})).await;
    carol.refused(&format!("{PROJECTS}/DeleteProject"), json!({"id": empty["project"]["id"]}), "not_found").await;

    // Everything that changed something is in the audit log.
    let audited: Vec<String> = sqlx::query_scalar("SELECT method || ':' || code FROM audit_log ORDER BY id")
        .fetch_all(flotilla.db.pool())
        .await
        .expect("audit log");
    for expected in [
        "CreateOrganization:ok",
        "InviteMember:ok",
        "AcceptInvitation:not_found",
        "AcceptInvitation:ok",
        "SetMemberRole:permission_denied",
        "RemoveMember:ok",
        "DeleteProject:ok",
    ] {
        assert!(audited.iter().any(|a| a == expected), "{expected} not in {audited:?}");
    }
    flotilla.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_answer_over_grpc_and_connect_binary() {
    let provider = TestOidcProvider::start(3600);
    let flotilla = TestFlotilla::start_trusting(&provider, |_| {}).await;
    let token = provider.sign_in("dana", "dana@example.com").await.id_token;
    let bearer = format!("Bearer {token}");

    let mut grpc = pb::organization_service_client::OrganizationServiceClient::connect(flotilla.base_url.clone())
        .await
        .expect("gRPC connects");
    let mut request = tonic::Request::new(pb::ListOrganizationsRequest {});
    request.metadata_mut().insert("authorization", bearer.parse().expect("metadata"));
    let organizations = grpc.list_organizations(request).await.expect("gRPC").into_inner().organizations;
    assert_eq!(organizations.len(), 1);
    assert_eq!(organizations[0].role, pb::Role::Owner as i32);

    let mut headers = connectrpc_axum_client::HeaderMap::new();
    headers.insert("authorization", bearer.parse().expect("header"));
    let projects =
        flotilla_proto::v1::project_service_connect_client::ProjectServiceClient::builder(flotilla.base_url.clone())
            .use_proto()
            .default_headers(headers)
            .build()
            .expect("client");
    let created =
        projects.create_project(&pb::CreateProjectRequest { name: "web".to_owned() }).await.expect("binary create");
    assert_eq!(created.into_inner().project.map(|p| p.name).as_deref(), Some("web"));
    let listed = projects.list_projects(&pb::ListProjectsRequest {}).await.expect("binary list").into_inner();
    assert_eq!(listed.projects.len(), 2);
    let refused =
        projects.create_project(&pb::CreateProjectRequest { name: String::new() }).await.expect_err("empty name");
    assert_eq!(refused.code(), connectrpc_axum_client::Code::InvalidArgument);
    flotilla.stop().await;
}
