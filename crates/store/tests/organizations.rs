//! Members, invitations and projects against a real PostgreSQL: the owner
//! rules hold under concurrency, and one organization's tenant reaches
//! nothing of another's.

use flotilla_store::StoreError;
use flotilla_test_utils::TestDb;

#[tokio::test]
async fn two_owners_demoting_each_other_at_once_leave_one_owner() {
    let db = TestDb::new().await;
    let store = &db.store;
    let alice = store.sign_in("alice", Some("alice@example.com")).await.unwrap();
    let organization = alice.memberships[0].organization_id;
    store.sign_in("bob", Some("bob@example.com")).await.unwrap();
    store.ensure_member(organization, "bob", "owner").await.unwrap();

    for round in 0..10 {
        let tenant = store.tenant(organization);
        let (first, second) =
            tokio::join!(tenant.set_member_role("alice", "admin", true), tenant.set_member_role("bob", "admin", true),);
        let outcomes = [first.is_ok(), second.is_ok()];
        assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "round {round}: exactly one demotion wins");
        for failed in [first, second].into_iter().filter_map(Result::err) {
            assert!(matches!(failed, StoreError::FailedPrecondition { .. }), "{failed:?}");
        }
        let owners = tenant.list_members().await.unwrap().into_iter().filter(|m| m.role == "owner").count();
        assert_eq!(owners, 1, "round {round}");
        // Both owners again for the next round.
        store.ensure_member(organization, "alice", "owner").await.unwrap();
        store.ensure_member(organization, "bob", "owner").await.unwrap();
    }
}

#[tokio::test]
async fn another_organizations_tenant_reaches_nothing() {
    let db = TestDb::new().await;
    let store = &db.store;
    let a = store.sign_in("alice", Some("alice@example.com")).await.unwrap().memberships[0].clone();
    let b = store.sign_in("bob", Some("bob@example.com")).await.unwrap().memberships[0].clone();
    assert_ne!(a.organization_id, b.organization_id);
    let (tenant_a, tenant_b) = (store.tenant(a.organization_id), store.tenant(b.organization_id));
    let invitation =
        tenant_a.invite("carol@example.com", "member", "alice", b"hash", chrono::Duration::days(1)).await.unwrap();
    let project = tenant_a.create_project("api").await.unwrap();

    assert!(tenant_b.list_members().await.unwrap().iter().all(|m| m.subject == "bob"));
    assert!(tenant_b.list_invitations().await.unwrap().is_empty());
    assert!(matches!(tenant_b.revoke_invitation(invitation.id).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(tenant_b.remove_member("alice", true).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(tenant_b.set_member_role("alice", "viewer", true).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(tenant_b.delete_project(project.id).await, Err(StoreError::NotFound { .. })));
    assert!(tenant_b.list_projects().await.unwrap().iter().all(|p| p.is_default));

    // A's things are as they were.
    assert_eq!(tenant_a.list_invitations().await.unwrap().len(), 1);
    assert_eq!(tenant_a.list_projects().await.unwrap().len(), 2);
    assert_eq!(tenant_a.list_members().await.unwrap()[0].role, "owner");

    // The invitation is carol's only, and once.
    let carol = store.sign_in("carol", Some("carol@example.com")).await.unwrap();
    assert!(matches!(
        store.accept_invitation(b"hash", carol.user_id, Some("eve@example.com")).await,
        Err(StoreError::NotFound { .. })
    ));
    let joined = store.accept_invitation(b"hash", carol.user_id, Some("CAROL@example.com")).await.unwrap();
    assert_eq!((joined.organization_id, joined.role.as_str()), (a.organization_id, "member"));
    assert!(matches!(
        store.accept_invitation(b"hash", carol.user_id, Some("carol@example.com")).await,
        Err(StoreError::NotFound { .. })
    ));
}
