//! Refused credentials, remembered across replicas; each entry is signed so a forged one
//! cannot make kas refuse a good token.

use std::time::Duration;

use async_trait::async_trait;

use super::{RedisEngine, sign, verify};
use crate::engine::RefusalCache;

#[async_trait]
impl RefusalCache for RedisEngine {
    async fn remember_refusal(&self, key: &str, ttl: Duration) {
        if self.available().is_err() {
            return;
        }
        let mut pipe = redis::pipe();
        let tag = sign(self.key.expose(), &["refused", key]);
        pipe.cmd("SET").arg(self.keys.refusal(key)).arg(tag).arg("EX").arg(ttl.as_secs().max(1)).ignore();
        let _ = self.run::<()>(&pipe).await;
    }

    async fn was_refused(&self, key: &str) -> bool {
        if self.available().is_err() {
            return false;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.refusal(key));
        match self.run::<(Option<String>,)>(&pipe).await {
            Ok((Some(tag),)) => {
                let genuine = verify(self.key.expose(), &["refused", key], &tag);
                if !genuine {
                    self.metrics.engine_forgeries.inc();
                }
                genuine
            }
            _ => false,
        }
    }
}
