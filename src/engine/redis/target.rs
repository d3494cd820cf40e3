//! `KAS_REDIS_URL`: one server, Sentinel or Cluster, and connecting to each.

use redis::aio::PubSub;
use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, RedisConnectionInfo};

use super::{Conn, OP_TIMEOUT};

/// Where Redis is, from `KAS_REDIS_URL`.
pub enum RedisTarget {
    /// `redis://…`, `rediss://…` or `unix://…`: one server.
    Single(Client),
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]`: the master that
    /// Sentinel names, asked again after every lost connection (so failovers are followed).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// `redis+cluster://[user:password@]host:port[,host:port…]`: a Redis Cluster.
    Cluster {
        /// Client for commands.
        client: ClusterClient,
        /// Seed nodes, for the subscription.
        nodes: Vec<String>,
    },
}

impl RedisTarget {
    /// Parses one of the URL forms above.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (user, password, rest) = split_userinfo(rest);
            let (hosts, path) =
                rest.split_once('/').ok_or("expected redis+sentinel://host:port[,…]/master_name[/db]")?;
            let mut segments = path.split('/');
            let master = segments.next().filter(|m| !m.is_empty()).ok_or("the Sentinel master name is missing")?;
            let db = match segments.next().filter(|d| !d.is_empty()) {
                Some(d) => d.parse::<i64>().map_err(|_| format!("database {d:?} is not a number"))?,
                None => 0,
            };
            let mut info = RedisConnectionInfo::default().set_db(db);
            if let Some(u) = user {
                info = info.set_username(u);
            }
            if let Some(p) = password {
                info = info.set_password(p);
            }
            let sentinels: Vec<String> =
                hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
            if sentinels.is_empty() {
                return Err("no Sentinel address".into());
            }
            let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
            let client = SentinelClient::build(sentinels, master, Some(node), SentinelServerType::Master)
                .map_err(|e| e.to_string())?;
            Ok(Self::Sentinel(tokio::sync::Mutex::new(client)))
        } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (user, password, hosts) = split_userinfo(rest);
            let auth = match (user, password) {
                (None, None) => String::new(),
                (u, p) => format!("{}:{}@", u.unwrap_or_default(), p.unwrap_or_default()),
            };
            let nodes: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err("no cluster node address".into());
            }
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(OP_TIMEOUT)
                .response_timeout(OP_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Self::Cluster { client, nodes })
        } else {
            Client::open(url).map(Self::Single).map_err(|e| e.to_string())
        }
    }

    pub(super) fn config() -> AsyncConnectionConfig {
        AsyncConnectionConfig::new().set_connection_timeout(Some(OP_TIMEOUT)).set_response_timeout(Some(OP_TIMEOUT))
    }

    pub(super) async fn connect(&self) -> redis::RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&Self::config()).await?))
            }
            Self::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&Self::config()).await?))
            }
            Self::Cluster { client, .. } => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }

    pub(super) async fn pubsub(&self) -> redis::RedisResult<PubSub> {
        match self {
            Self::Single(client) => client.get_async_pubsub().await,
            Self::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_async_pubsub().await
            }
            Self::Cluster { nodes, .. } => {
                let mut last = None;
                for node in nodes {
                    match Client::open(node.as_str()) {
                        Ok(client) => match client.get_async_pubsub().await {
                            Ok(pubsub) => return Ok(pubsub),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("at least one node"))
            }
        }
    }
}

/// Splits `user:password@rest` (the userinfo ends at the last `@` before the first `/`).
fn split_userinfo(s: &str) -> (Option<&str>, Option<&str>, &str) {
    let authority_end = s.find('/').unwrap_or(s.len());
    match s[..authority_end].rfind('@') {
        Some(at) => {
            let (userinfo, rest) = (&s[..at], &s[at + 1..]);
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (Some(u).filter(|u| !u.is_empty()), Some(p).filter(|p| !p.is_empty())),
                None => (Some(userinfo).filter(|u| !u.is_empty()), None),
            };
            (user, password, rest)
        }
        None => (None, None, s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert!(matches!(RedisTarget::parse("redis://127.0.0.1:6379/2").unwrap(), RedisTarget::Single(_)));
        assert!(matches!(
            RedisTarget::parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/1").unwrap(),
            RedisTarget::Sentinel(_)
        ));
        match RedisTarget::parse("redis+cluster://u:pw@a:7000,b:7001/").unwrap() {
            RedisTarget::Cluster { nodes, .. } => {
                assert_eq!(nodes, ["redis://u:pw@a:7000", "redis://u:pw@b:7001"])
            }
            _ => panic!("cluster"),
        }
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/m/x",
            "redis+cluster://",
            "nonsense://x",
        ] {
            assert!(RedisTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn userinfo() {
        assert_eq!(split_userinfo("u:p@h:1,h:2/m"), (Some("u"), Some("p"), "h:1,h:2/m"));
        assert_eq!(split_userinfo(":p@h:1/m"), (None, Some("p"), "h:1/m"));
        assert_eq!(split_userinfo("h:1/m@x"), (None, None, "h:1/m@x"));
    }
}
