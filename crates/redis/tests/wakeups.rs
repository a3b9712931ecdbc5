//! Wake-ups travel between processes through a real Redis.

use std::time::Duration;

use flotilla_redis::WakeBus;
use flotilla_test_utils::TestRedis;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_wakeup_published_by_one_bus_reaches_the_listener_of_another() {
    let redis = TestRedis::new().await;
    let sender = WakeBus::with_redis(&redis.url, &redis.prefix).unwrap();
    let receiver = WakeBus::with_redis(&redis.url, &redis.prefix).unwrap();
    let cancel = CancellationToken::new();
    let waiter = receiver.waiter("agent:n1");
    let listener = receiver.spawn_listener(vec!["agent:n1".into()], cancel.clone());

    // The listener wakes its waiters once when it (re)connects; absorb that.
    tokio::time::timeout(Duration::from_secs(5), waiter.notified()).await.expect("initial wake-up");
    // Let XREAD start blocking before the wake-up is sent.
    tokio::time::sleep(Duration::from_millis(200)).await;

    sender.wake("agent:n1").await;
    tokio::time::timeout(Duration::from_secs(5), waiter.notified()).await.expect("wake-up relayed");
    assert_eq!(sender.stats().published, 1);
    assert!(receiver.stats().received >= 1);

    // Another topic does not wake this waiter.
    sender.wake("agent:n2").await;
    assert!(tokio::time::timeout(Duration::from_millis(500), waiter.notified()).await.is_err());

    cancel.cancel();
    listener.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_is_counted_not_fatal() {
    // Nothing listens on port 1.
    let bus = WakeBus::with_redis("redis://127.0.0.1:1", "x:").unwrap();
    let waiter = bus.waiter("orchestrator");
    bus.wake("orchestrator").await;
    // Local waiters are still woken.
    tokio::time::timeout(Duration::from_secs(1), waiter.notified()).await.expect("local wake-up");
    assert_eq!(bus.stats().publish_failures, 1);
    assert_eq!(bus.stats().published, 0);
}
