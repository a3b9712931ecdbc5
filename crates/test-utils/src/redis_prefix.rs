use redis::AsyncCommands;

use crate::{DEFAULT_REDIS_URL, block_on_cleanup, unique_suffix};

/// A Redis key prefix owned by one test; its keys are deleted after it.
#[derive(Debug)]
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
}

impl TestRedis {
    pub async fn new() -> Self {
        let url = std::env::var("FLOTILLA_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
        let client = redis::Client::open(url.as_str()).expect("test Redis URL");
        let mut conn = client.get_multiplexed_async_connection().await.unwrap_or_else(|e| {
            panic!("cannot reach the test Redis at {url}: {e}\nStart it with: scripts/dev-services.sh start")
        });
        let _: () = redis::cmd("PING").query_async(&mut conn).await.expect("Redis PING");
        Self { url, prefix: format!("test:{}:", unique_suffix()) }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}*", self.prefix);
        block_on_cleanup(async move {
            let Ok(client) = redis::Client::open(url.as_str()) else { return };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
            let keys: Vec<String> = match conn.keys(&pattern).await {
                Ok(keys) => keys,
                Err(e) => {
                    eprintln!("test cleanup: listing {pattern}: {e}");
                    return;
                }
            };
            if !keys.is_empty() {
                let _: Result<(), _> = conn.del(keys).await;
            }
        });
    }
}
