//! Domain verification tokens and certificate rows against a real
//! PostgreSQL: a token is bound to its deployment and domain, expires, is
//! kept while pending, and only its organization reaches it; one orderer
//! holds a certificate's lock at a time.

use std::time::Duration;

use flotilla_store::tenant::ensure_organization;
use flotilla_test_utils::{TestDb, demo_spec as spec};

#[tokio::test]
async fn tokens_are_bound_expire_and_stay_in_their_organization() {
    let db = TestDb::new().await;
    let (org_a, _) = ensure_organization(db.pool(), "a", "A").await.unwrap();
    let (org_b, _) = ensure_organization(db.pool(), "b", "B").await.unwrap();
    let (a, b) = (db.store.tenant(org_a), db.store.tenant(org_b));
    let shop = a.create_deployment(None, &spec("shop", "shop.example.org")).await.unwrap().id;
    let week = chrono::Duration::days(7);

    let first = a.issue_domain_token(shop, "shop.example.org", "token-1", week).await.unwrap();
    assert_eq!(first.token, "token-1");
    let kept = a.issue_domain_token(shop, "shop.example.org", "token-2", week).await.unwrap();
    assert_eq!(kept.token, "token-1", "a pending token is kept");

    // Another organization neither reads, issues for, nor proves it.
    assert!(b.domain_verification(shop, "shop.example.org").await.unwrap().is_none());
    assert!(b.issue_domain_token(shop, "shop.example.org", "mine", week).await.is_err());
    assert!(b.record_domain_check(shop, "shop.example.org", "token-1", None).await.is_err());
    assert!(a.domain_verification(shop, "shop.example.org").await.unwrap().unwrap().verified_at.is_none());

    // A check with the wrong token changes nothing; an error is recorded.
    assert!(a.record_domain_check(shop, "shop.example.org", "token-2", None).await.is_err());
    let failed = a.record_domain_check(shop, "shop.example.org", "token-1", Some("no TXT record")).await.unwrap();
    assert_eq!((failed.verified_at, failed.last_error.as_deref()), (None, Some("no TXT record")));

    // An expired token proves nothing and is replaced on request.
    let short = a.create_deployment(None, &spec("blog", "blog.example.org")).await.unwrap().id;
    a.issue_domain_token(short, "blog.example.org", "brief", chrono::Duration::milliseconds(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let late = a.record_domain_check(short, "blog.example.org", "brief", None).await.unwrap();
    assert!(late.verified_at.is_none(), "an expired token is not proof");
    let renewed = a.issue_domain_token(short, "blog.example.org", "fresh", week).await.unwrap();
    assert_eq!(renewed.token, "fresh");

    let proven = a.record_domain_check(shop, "shop.example.org", "token-1", None).await.unwrap();
    assert!(proven.verified_at.is_some());
    let after = a.issue_domain_token(shop, "shop.example.org", "token-3", week).await.unwrap();
    assert_eq!(after.token, "token-1", "a proven domain keeps its proof");
}

#[tokio::test]
async fn one_orderer_holds_a_certificate_lock_and_failures_back_off() {
    let db = TestDb::new().await;
    let first = db.store.try_lock_certificate("shop.example.org").await.unwrap().expect("free");
    assert!(db.store.try_lock_certificate("shop.example.org").await.unwrap().is_none(), "held");
    let other = db.store.try_lock_certificate("blog.example.org").await.unwrap().expect("another domain is free");
    first.release().await.unwrap();
    let again = db.store.try_lock_certificate("shop.example.org").await.unwrap().expect("released");
    again.release().await.unwrap();
    other.release().await.unwrap();

    let later = chrono::Utc::now() + chrono::Duration::minutes(5);
    assert_eq!(db.store.record_certificate_failure("shop.example.org", "refused", later).await.unwrap(), 1);
    assert_eq!(db.store.record_certificate_failure("shop.example.org", "refused", later).await.unwrap(), 2);
    assert!(db.store.certificate("shop.example.org").await.unwrap().is_none(), "nothing issued");
    let until = chrono::Utc::now() + chrono::Duration::days(90);
    db.store.save_certificate("shop.example.org", "CHAIN", b"sealed", until).await.unwrap();
    let stored = db.store.certificate("shop.example.org").await.unwrap().unwrap();
    assert_eq!((stored.chain_pem.as_str(), stored.key_sealed.as_slice()), ("CHAIN", &b"sealed"[..]));
    // A failed renewal keeps the issued certificate served.
    db.store.record_certificate_failure("shop.example.org", "refused", later).await.unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM certificates WHERE domain = 'shop.example.org'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(status, "issued");
}
