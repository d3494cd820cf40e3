//! Configuration: flags, then `KAS_…` environment variables, then an optional TOML file, then
//! defaults. Every value is parsed here, once; a bad value stops the start with a message that
//! names the setting.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A value that must never reach a log: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A setting that could not be used, named as the user wrote it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid {setting}: {reason}")]
    Invalid {
        /// `--flag` / `KAS_ENV` / `toml_key` of the setting.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("configuration file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Certificate and key files for TLS on every listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

macro_rules! settings {
    ($( $(#[$doc:meta])* $field:ident => $env:literal ),* $(,)?) => {
        /// Raw settings as given by flags, environment and file; every value still a string.
        #[derive(clap::Args, Debug, Default, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Settings {
            /// Optional TOML file with any of the settings below (keys in snake_case).
            #[arg(long, env = "KAS_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[$doc])*
                #[arg(long, env = $env)]
                #[serde(deserialize_with = "scalar_as_string")]
                pub $field: Option<String>,
            )*
        }

        impl Settings {
            /// Fills every unset value from `other` (lower precedence).
            fn or(self, other: Settings) -> Settings {
                Settings {
                    config: self.config.or(other.config),
                    $( $field: self.$field.or(other.$field), )*
                }
            }
        }

        /// `--flag (KAS_ENV)` for a field name, used in error messages.
        fn setting_name(field: &str) -> String {
            match field {
                $( stringify!($field) => format!("--{} ({})", stringify!($field).replace('_', "-"), $env), )*
                other => other.to_owned(),
            }
        }
    };
}

settings! {
    /// Listener for webhooks, health and metrics [default: 127.0.0.1:8080]
    http_addr => "KAS_HTTP_ADDR",
    /// Listener for agents (gRPC and gRPC over WebSocket) [default: 127.0.0.1:8150]
    agent_addr => "KAS_AGENT_ADDR",
    /// Listener for GitLab (GitPushEvent, connected agents) [default: 127.0.0.1:8153]
    api_addr => "KAS_API_ADDR",
    /// Database URL, sqlite://… or postgres://… [default: sqlite://<data dir>/kas.db]
    database_url => "KAS_DATABASE_URL",
    /// Data directory for the embedded database and generated secrets [default: ./kas-data]
    data_dir => "KAS_DATA_DIR",
    /// Redis URL; unset runs the in-process engine (single replica)
    redis_url => "KAS_REDIS_URL",
    /// Prefix of every Redis key and channel [default: kas]
    redis_prefix => "KAS_REDIS_PREFIX",
    /// File with the webhook secret(s), one per line [default: generated in the data dir]
    webhook_secret_file => "KAS_WEBHOOK_SECRET_FILE",
    /// File with GitLab's base64 shared secret (.gitlab_kas_secret); unset rejects GitLab calls
    gitlab_secret_file => "KAS_GITLAB_SECRET_FILE",
    /// File with the admin secret for operator endpoints (GET /agents) [default: generated in the data dir]
    admin_secret_file => "KAS_ADMIN_SECRET_FILE",
    /// File with the secret the container registry sends (Authorization) to POST /webhooks/registry [default: generated in the data dir]
    registry_secret_file => "KAS_REGISTRY_SECRET_FILE",
    /// The registry's host as Flux OCIRepository URLs name it (oci://HOST/...) [default: the host each notification names]
    registry_host => "KAS_REGISTRY_HOST",
    /// Longest time open streams keep serving while their credentials cannot be re-checked [default: 5m]
    credential_grace => "KAS_CREDENTIAL_GRACE",
    /// Most long streams (ReconcileProjects, configuration, tunnels) one agent may hold per replica [default: 2048]
    max_streams_per_agent => "KAS_MAX_STREAMS_PER_AGENT",
    /// Most projects one ReconcileProjects stream may ask for [default: 10000]
    max_projects_per_stream => "KAS_MAX_PROJECTS_PER_STREAM",
    /// Largest ReconcileProjects request, in bytes (or with KiB/MiB) [default: 1MiB]
    max_reconcile_request => "KAS_MAX_RECONCILE_REQUEST",
    /// How long an agent that reconnects still gets what it missed [default: 15m]
    replay_window => "KAS_REPLAY_WINDOW",
    /// How long recorded push events are kept [default: 7d]
    event_retention => "KAS_EVENT_RETENTION",
    /// Largest webhook body accepted, in bytes (or with KiB/MiB) [default: 1MiB]
    webhook_body_limit => "KAS_WEBHOOK_BODY_LIMIT",
    /// Log format: text or json [default: text]
    log_format => "KAS_LOG_FORMAT",
    /// PEM certificate chain; with --tls-key-file enables TLS on every listener
    tls_cert_file => "KAS_TLS_CERT_FILE",
    /// PEM private key for --tls-cert-file
    tls_key_file => "KAS_TLS_KEY_FILE",
    /// Longest wait for streams and connections to finish at shutdown [default: 20s]
    shutdown_grace => "KAS_SHUTDOWN_GRACE",
    /// Agent connections older than this are asked to reconnect (±10% jitter) [default: 30m]
    max_connection_age => "KAS_MAX_CONNECTION_AGE",
    /// GitLab's external URL, sent to agents so Flux can match its GitRepository URLs
    gitlab_external_url => "KAS_GITLAB_EXTERNAL_URL",
    /// Name of this replica in connection state and logs [default: host name and a random suffix]
    replica_name => "KAS_REPLICA_NAME",
    /// How often open agent streams re-check that their token is still valid [default: 5s]
    token_recheck => "KAS_TOKEN_RECHECK",
    /// GitLab's internal URL; when set, agents, tokens and access come from GitLab
    gitlab_url => "KAS_GITLAB_URL",
    /// File with a GitLab API token that can read agent configuration files (GitLab mode)
    gitlab_api_token_file => "KAS_GITLAB_API_TOKEN_FILE",
    /// How long GitLab's answers about tokens and access are trusted (GitLab mode) [default: 5m]
    gitlab_cache_ttl => "KAS_GITLAB_CACHE_TTL",
    /// PEM file with the CA certificate(s) of GitLab's https:// URL, trusted besides the public roots
    gitlab_ca_file => "KAS_GITLAB_CA_FILE",
    /// Connections that have not finished their handshake by then are closed [default: 10s]
    handshake_timeout => "KAS_HANDSHAKE_TIMEOUT",
    /// Idle HTTP/1.1 keep-alive connections are closed after this [default: 60s]
    http_idle_timeout => "KAS_HTTP_IDLE_TIMEOUT",
    /// Most connections the HTTP listener holds at once; more are closed at once [default: 4096]
    max_connections_http => "KAS_MAX_CONNECTIONS_HTTP",
    /// Most connections the agent listener holds at once; more are closed at once [default: 20000]
    max_connections_agent => "KAS_MAX_CONNECTIONS_AGENT",
    /// Most connections the GitLab-facing listener holds at once; more are closed at once [default: 2048]
    max_connections_api => "KAS_MAX_CONNECTIONS_API",
    /// Most pods one agent may have registered at once (AgentRegistrar, GetConfiguration) [default: 100]
    max_pods_per_agent => "KAS_MAX_PODS_PER_AGENT",
    /// Largest agent metadata (AgentMeta) one pod may register, in bytes (or with KiB/MiB) [default: 8KiB]
    max_agent_meta => "KAS_MAX_AGENT_META",
    /// Version answered to GitLab's ServerInfo (GitLab uses it as agentk's image tag): set it to GitLab's, e.g. v18.6.0 [default: kas's own]
    server_version => "KAS_SERVER_VERSION",
    /// How long a call into a cluster waits for an idle tunnel of its agent [default: 10s]
    tunnel_wait => "KAS_TUNNEL_WAIT",
    /// Longest a call into a cluster may take once it has a tunnel, answer included [default: 30s]
    tunnel_timeout => "KAS_TUNNEL_TIMEOUT",
    /// Largest request body kas sends into a cluster, in bytes (or with KiB/MiB) [default: 1MiB]
    tunnel_max_request_body => "KAS_TUNNEL_MAX_REQUEST_BODY",
    /// Largest answer body kas reads from a cluster, in bytes (or with KiB/MiB; at most 16MiB) [default: 4MiB]
    tunnel_max_response_body => "KAS_TUNNEL_MAX_RESPONSE_BODY",
    /// GitLab URL for Flux commit statuses in local-registry mode [default: KAS_GITLAB_URL]
    gitlab_status_url => "KAS_GITLAB_STATUS_URL",
    /// File with a GitLab API token (scope api) that posts Flux commit statuses [default: KAS_GITLAB_API_TOKEN_FILE]
    gitlab_status_token_file => "KAS_GITLAB_STATUS_TOKEN_FILE",
    /// How often opted-in clusters' Flux Kustomizations are listed for commit statuses [default: 5s]
    sync_status_interval => "KAS_SYNC_STATUS_INTERVAL",
}

/// The settings the registry commands need: where the database is.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct StoreSettings {
    /// Optional TOML file (the same file `kas serve` reads)
    #[arg(long, env = "KAS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database URL, sqlite://… or postgres://… [default: sqlite://<data dir>/kas.db]
    #[arg(long, env = "KAS_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Data directory of the embedded database [default: ./kas-data]
    #[arg(long, env = "KAS_DATA_DIR")]
    pub data_dir: Option<String>,
}

/// Where the database is and where local files go.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://…` or `postgres://…`; may hold a password.
    pub database_url: Secret<String>,
    /// Directory for the embedded database and generated secrets.
    pub data_dir: PathBuf,
}

impl StoreConfig {
    /// Which backend the URL names; anything not `sqlite:` goes to PostgreSQL's driver, which
    /// refuses what it cannot parse (`resolve` only lets through what [`Backend::from_url`] knows).
    pub fn backend(&self) -> Backend {
        Backend::from_url(self.database_url.expose()).unwrap_or(Backend::Postgres)
    }
}

/// The database kinds kas can use, told apart by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:…`, the embedded single-replica default.
    Sqlite,
    /// `postgres://…` or `postgresql://…`, for production and several replicas.
    Postgres,
}

impl Backend {
    /// The backend a database URL names; `None` for any other scheme.
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Fully resolved configuration of `kas serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database and data directory.
    pub store: StoreConfig,
    /// HTTP listener address.
    pub http_addr: SocketAddr,
    /// Agent gRPC listener address.
    pub agent_addr: SocketAddr,
    /// GitLab-facing gRPC listener address.
    pub api_addr: SocketAddr,
    /// Redis URL; `None` selects the in-process engine.
    pub redis_url: Option<Secret<String>>,
    /// Prefix of Redis keys and channels.
    pub redis_prefix: String,
    /// Webhook secret file; `None` means `<data dir>/webhook-secret`, generated if missing.
    pub webhook_secret_file: Option<PathBuf>,
    /// GitLab's shared secret file.
    pub gitlab_secret_file: Option<PathBuf>,
    /// Admin secret file; `None` means `<data dir>/admin-secret`, generated if missing.
    pub admin_secret_file: Option<PathBuf>,
    /// Registry notification secret file; `None` means `<data dir>/registry-secret`, generated if missing.
    pub registry_secret_file: Option<PathBuf>,
    /// The registry host OCIRepository URLs use, lower-case; `None` takes each event's own.
    pub registry_host: Option<String>,
    /// How long streams outlive failing credential re-checks before ending with UNAVAILABLE.
    pub credential_grace: Duration,
    /// Most long streams per agent per replica.
    pub max_streams_per_agent: usize,
    /// Most projects per ReconcileProjects stream.
    pub max_projects_per_stream: usize,
    /// Largest ReconcileProjects request in bytes.
    pub max_reconcile_request: usize,
    /// Replay window for reconnecting agents.
    pub replay_window: Duration,
    /// Retention of the push-event log.
    pub event_retention: Duration,
    /// Webhook body limit in bytes.
    pub webhook_body_limit: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// TLS files, when TLS is on.
    pub tls: Option<TlsFiles>,
    /// Grace period for shutdown.
    pub shutdown_grace: Duration,
    /// Maximum agent connection age (before jitter).
    pub max_connection_age: Duration,
    /// GitLab's external URL for agent configuration.
    pub gitlab_external_url: Option<String>,
    /// This replica's name.
    pub replica_name: String,
    /// Interval of the token re-check on open streams.
    pub token_recheck: Duration,
    /// GitLab's URL for the GitLab-backed mode.
    pub gitlab_url: Option<String>,
    /// GitLab API token file (GitLab-backed mode).
    pub gitlab_api_token_file: Option<PathBuf>,
    /// Lifetime of cached GitLab answers (GitLab-backed mode).
    pub gitlab_cache_ttl: Duration,
    /// Extra CA certificates (PEM) for GitLab's URL (GitLab-backed mode).
    pub gitlab_ca_file: Option<PathBuf>,
    /// Most live pod registrations per agent.
    pub max_pods_per_agent: usize,
    /// Largest serialized `AgentMeta` a pod may register, in bytes.
    pub max_agent_meta: usize,
    /// The version `ServerInfo` answers instead of kas's own, when set.
    pub server_version: Option<String>,
    /// Time a new connection has to complete its handshake.
    pub handshake_timeout: Duration,
    /// Idle time after which an HTTP/1.1 keep-alive connection is closed.
    pub http_idle_timeout: Duration,
    /// Connection caps of the three listeners.
    pub max_connections: MaxConnections,
    /// How long a call into a cluster waits for a tunnel.
    pub tunnel_wait: Duration,
    /// Longest a call into a cluster may take once it has a tunnel.
    pub tunnel_timeout: Duration,
    /// Largest request body sent into a cluster.
    pub tunnel_max_request_body: usize,
    /// Largest answer body read from a cluster.
    pub tunnel_max_response_body: usize,
    /// GitLab URL for commit statuses; `None` takes `gitlab_url`.
    pub gitlab_status_url: Option<String>,
    /// API token file for commit statuses; `None` takes `gitlab_api_token_file`.
    pub gitlab_status_token_file: Option<PathBuf>,
    /// How often opted-in clusters are listed for commit statuses.
    pub sync_status_interval: Duration,
}

/// How many connections each listener holds at once. The defaults fit 10,000 agents: every
/// agent holds one connection, and twice that covers the overlap while agents move between
/// replicas (maximum age, a replica going away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxConnections {
    /// Webhooks, health and metrics.
    pub http: usize,
    /// Agents (gRPC and gRPC over WebSocket).
    pub agent: usize,
    /// GitLab's gRPC calls.
    pub api: usize,
}

impl MaxConnections {
    /// All three together: what the open-file limit must allow besides kas's own files.
    pub fn total(&self) -> usize {
        self.http + self.agent + self.api
    }
}

impl Settings {
    /// Merges the file named by `--config` under these settings and resolves everything.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        let s = self.or(file);
        let store = resolve_store(s.database_url.clone(), s.data_dir.clone())?;
        let tls = match (&s.tls_cert_file, &s.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.into(), key: key.into() }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("tls_key_file", "required when a TLS certificate is set"));
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert_file", "required when a TLS key is set"));
            }
        };
        let redis_prefix = s.redis_prefix.unwrap_or_else(|| "kas".into());
        if redis_prefix.is_empty() || redis_prefix.contains(['{', '}', ' ']) {
            return Err(invalid("redis_prefix", "must be non-empty, without braces or spaces"));
        }
        let gitlab_external_url = s.gitlab_external_url.map(|u| parse_url("gitlab_external_url", &u)).transpose()?;
        let gitlab_url = s.gitlab_url.map(|u| parse_url("gitlab_url", &u)).transpose()?;
        let config = Config {
            store,
            http_addr: parse_addr("http_addr", s.http_addr.as_deref().unwrap_or("127.0.0.1:8080"))?,
            agent_addr: parse_addr("agent_addr", s.agent_addr.as_deref().unwrap_or("127.0.0.1:8150"))?,
            api_addr: parse_addr("api_addr", s.api_addr.as_deref().unwrap_or("127.0.0.1:8153"))?,
            redis_url: s.redis_url.filter(|u| !u.is_empty()).map(Secret::new),
            redis_prefix,
            webhook_secret_file: s.webhook_secret_file.map(PathBuf::from),
            gitlab_secret_file: s.gitlab_secret_file.map(PathBuf::from),
            admin_secret_file: s.admin_secret_file.map(PathBuf::from),
            registry_secret_file: s.registry_secret_file.map(PathBuf::from),
            registry_host: parse_registry_host(s.registry_host.as_deref())?,
            credential_grace: parse_duration_setting("credential_grace", s.credential_grace.as_deref(), "5m")?,
            max_streams_per_agent: parse_count("max_streams_per_agent", s.max_streams_per_agent.as_deref(), 2048)?,
            max_projects_per_stream: parse_count(
                "max_projects_per_stream",
                s.max_projects_per_stream.as_deref(),
                10_000,
            )?,
            max_reconcile_request: parse_size(
                "max_reconcile_request",
                s.max_reconcile_request.as_deref().unwrap_or("1MiB"),
            )?,
            replay_window: parse_duration_setting("replay_window", s.replay_window.as_deref(), "15m")?,
            event_retention: parse_duration_setting("event_retention", s.event_retention.as_deref(), "7d")?,
            webhook_body_limit: parse_size("webhook_body_limit", s.webhook_body_limit.as_deref().unwrap_or("1MiB"))?,
            log_format: parse_log_format(s.log_format.as_deref())?,
            tls,
            shutdown_grace: parse_duration_setting("shutdown_grace", s.shutdown_grace.as_deref(), "20s")?,
            max_connection_age: parse_duration_setting("max_connection_age", s.max_connection_age.as_deref(), "30m")?,
            gitlab_external_url,
            replica_name: s.replica_name.unwrap_or_else(default_replica_name),
            token_recheck: parse_duration_setting("token_recheck", s.token_recheck.as_deref(), "5s")?,
            gitlab_url,
            gitlab_api_token_file: s.gitlab_api_token_file.map(PathBuf::from),
            gitlab_cache_ttl: parse_duration_setting("gitlab_cache_ttl", s.gitlab_cache_ttl.as_deref(), "5m")?,
            gitlab_ca_file: s.gitlab_ca_file.map(PathBuf::from),
            handshake_timeout: parse_duration_setting("handshake_timeout", s.handshake_timeout.as_deref(), "10s")?,
            http_idle_timeout: parse_duration_setting("http_idle_timeout", s.http_idle_timeout.as_deref(), "60s")?,
            max_connections: MaxConnections {
                http: parse_count("max_connections_http", s.max_connections_http.as_deref(), 4096)?,
                agent: parse_count("max_connections_agent", s.max_connections_agent.as_deref(), 20_000)?,
                api: parse_count("max_connections_api", s.max_connections_api.as_deref(), 2048)?,
            },
            max_pods_per_agent: parse_count("max_pods_per_agent", s.max_pods_per_agent.as_deref(), 100)?,
            max_agent_meta: parse_size("max_agent_meta", s.max_agent_meta.as_deref().unwrap_or("8KiB"))?,
            server_version: s.server_version.map(|v| parse_server_version(&v)).transpose()?,
            tunnel_wait: parse_duration_setting("tunnel_wait", s.tunnel_wait.as_deref(), "10s")?,
            tunnel_timeout: parse_duration_setting("tunnel_timeout", s.tunnel_timeout.as_deref(), "30s")?,
            tunnel_max_request_body: parse_size(
                "tunnel_max_request_body",
                s.tunnel_max_request_body.as_deref().unwrap_or("1MiB"),
            )?,
            tunnel_max_response_body: parse_size(
                "tunnel_max_response_body",
                s.tunnel_max_response_body.as_deref().unwrap_or("4MiB"),
            )?,
            gitlab_status_url: s.gitlab_status_url.map(|u| parse_url("gitlab_status_url", &u)).transpose()?,
            gitlab_status_token_file: s.gitlab_status_token_file.map(PathBuf::from),
            sync_status_interval: parse_duration_setting(
                "sync_status_interval",
                s.sync_status_interval.as_deref(),
                "5s",
            )?,
        };
        config.check_consistency()?;
        Ok(config)
    }
}

/// A version GitLab can use as a container image tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`),
/// which is what it does with the one `ServerInfo` answers.
fn parse_server_version(raw: &str) -> Result<String, ConfigError> {
    let v = raw.trim();
    let ok = !v.is_empty()
        && v.len() <= 128
        && !v.starts_with(['.', '-'])
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(invalid("server_version", format!("{raw:?} is not a version usable as an image tag, e.g. v18.6.0")))
    }
}

/// Largest tunnel answer body allowed by the setting.
const MAX_TUNNEL_RESPONSE: usize = 16 << 20;

/// GitLab shows an agent as connected only while its token was used within this long.
const GITLAB_CONNECTED_WINDOW: Duration = Duration::from_secs(8 * 60);

impl Config {
    /// Refuses settings that contradict each other.
    fn check_consistency(&self) -> Result<(), ConfigError> {
        if self.event_retention < self.replay_window {
            return Err(invalid(
                "event_retention",
                format!(
                    "{:?} is shorter than the replay window ({:?}): agents could not be replayed what they missed",
                    self.event_retention, self.replay_window
                ),
            ));
        }
        if self.tunnel_max_response_body > MAX_TUNNEL_RESPONSE {
            // Relayed answers travel whole through Redis pub/sub, which drops a subscriber that
            // falls 32 MiB behind.
            return Err(invalid("tunnel_max_response_body", "must be at most 16MiB"));
        }
        if self.gitlab_cache_ttl >= GITLAB_CONNECTED_WINDOW {
            return Err(invalid(
                "gitlab_cache_ttl",
                "must be under 8m: GitLab shows an agent as connected only while its token was used within 8 minutes",
            ));
        }
        Ok(())
    }
}

impl StoreSettings {
    /// Resolves the database location, reading the same TOML file as `kas serve`.
    pub fn resolve(self) -> Result<StoreConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => Settings::default(),
        };
        resolve_store(self.database_url.or(file.database_url), self.data_dir.or(file.data_dir))
    }
}

/// The log format alone, so logging can start before the rest is resolved.
pub fn parse_log_format(raw: Option<&str>) -> Result<LogFormat, ConfigError> {
    match raw.unwrap_or("text") {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(invalid("log_format", format!("{other:?} is not text or json"))),
    }
}

fn resolve_store(database_url: Option<String>, data_dir: Option<String>) -> Result<StoreConfig, ConfigError> {
    let data_dir = PathBuf::from(data_dir.unwrap_or_else(|| "./kas-data".into()));
    let database_url = match database_url {
        Some(url) if Backend::from_url(&url).is_some() => url,
        Some(_) => {
            return Err(invalid("database_url", "must start with sqlite: or postgres://"));
        }
        None => format!("sqlite://{}", data_dir.join("kas.db").display()),
    };
    Ok(StoreConfig { database_url: Secret::new(database_url), data_dir })
}

fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let file_err = |reason: String| ConfigError::File { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| file_err(e.message().to_owned()))
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting: setting_name(field), reason: reason.into() }
}

fn parse_addr(field: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
    raw.to_socket_addrs()
        .map_err(|e| invalid(field, format!("{raw:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(field, format!("{raw:?} resolves to no address")))
}

/// A registry host as OCI URLs carry it (`registry.example.com` or `host:5000`), lower-case.
fn parse_registry_host(raw: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else { return Ok(None) };
    let host = raw.trim_start_matches("oci://").trim_end_matches('/').to_ascii_lowercase();
    if host.is_empty() || host.contains('/') || host.parse::<http::uri::Authority>().is_err() {
        return Err(invalid("registry_host", format!("{raw:?} is not a host such as registry.example.com")));
    }
    Ok(Some(host))
}

fn parse_url(field: &str, raw: &str) -> Result<String, ConfigError> {
    let trimmed = raw.trim_end_matches('/');
    let ok = (trimmed.starts_with("http://") || trimmed.starts_with("https://"))
        && trimmed.split("://").nth(1).is_some_and(|rest| !rest.is_empty());
    if ok && trimmed.parse::<http::Uri>().is_ok() {
        Ok(trimmed.to_owned())
    } else {
        let shown = crate::gitlab::client::redact_url(raw);
        Err(invalid(field, format!("{shown:?} is not an http:// or https:// URL")))
    }
}

fn parse_duration_setting(field: &str, raw: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let raw = raw.unwrap_or(default);
    let d = parse_duration(raw).map_err(|reason| invalid(field, format!("{raw:?}: {reason}")))?;
    if d.is_zero() {
        return Err(invalid(field, "must be greater than zero"));
    }
    Ok(d)
}

/// Parses `500ms`, `30s`, `15m`, `2h`, `7d`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let n: u64 = number.parse().map_err(|_| "expected a number followed by ms, s, m, h or d".to_owned())?;
    let ms_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("unknown unit {other:?}; use ms, s, m, h or d")),
    };
    n.checked_mul(ms_per_unit).map(Duration::from_millis).ok_or_else(|| "too large".to_owned())
}

/// A count of at least 1 and at most a million (more connections than that on one replica is
/// a typo, not a plan).
fn parse_count(field: &str, raw: Option<&str>, default: usize) -> Result<usize, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(invalid(field, format!("{raw:?} is not a number between 1 and 1000000"))),
    }
}

fn parse_size(field: &str, raw: &str) -> Result<usize, ConfigError> {
    let t = raw.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: usize = number.parse().map_err(|_| invalid(field, format!("{raw:?} is not a size")))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        other => {
            return Err(invalid(field, format!("unknown unit {other:?}; use B, KiB or MiB")));
        }
    };
    match n.checked_mul(mult) {
        Some(v) if v >= 1024 => Ok(v),
        _ => Err(invalid(field, format!("{raw:?} must be between 1KiB and the address space"))),
    }
}

fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kas".into());
    let mut suffix = [0u8; 3];
    let _ = getrandom::fill(&mut suffix);
    format!("{host}-{}", crate::hex::encode(&suffix))
}

/// TOML values may be strings, integers or booleans; they are kept as strings and parsed with
/// the same code as flags, so a file and a flag fail the same way.
fn scalar_as_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Str(String),
        Int(i64),
        Bool(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::Str(s) => s,
        Scalar::Int(i) => i.to_string(),
        Scalar::Bool(b) => b.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let text: String = pairs.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn database_url_scheme_names_the_backend() {
        for (url, backend) in [
            ("sqlite://./kas-data/kas.db", Some(Backend::Sqlite)),
            ("sqlite::memory:", Some(Backend::Sqlite)),
            ("postgres://kas@db/kas", Some(Backend::Postgres)),
            ("postgresql://kas@db/kas", Some(Backend::Postgres)),
            ("mysql://kas@db/kas", None),
            ("postgres:kas", None),
        ] {
            assert_eq!(Backend::from_url(url), backend, "{url}");
        }
        assert_eq!(Settings::default().resolve().unwrap().store.backend(), Backend::Sqlite);
        let c = settings(&[("database_url", "postgresql://kas@db/kas")]).resolve().unwrap();
        assert_eq!((c.store.backend(), c.store.backend().as_str()), (Backend::Postgres, "postgres"));
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.agent_addr.to_string(), "127.0.0.1:8150");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:8153");
        assert_eq!(c.store.database_url.expose(), "sqlite://./kas-data/kas.db");
        assert_eq!(c.replay_window, Duration::from_secs(900));
        assert_eq!(c.webhook_body_limit, 1 << 20);
        assert_eq!(c.redis_prefix, "kas");
        assert!(c.redis_url.is_none());
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, MaxConnections { http: 4096, agent: 20_000, api: 2048 });
        assert_eq!((c.max_pods_per_agent, c.max_agent_meta), (100, 8192));
        assert_eq!(c.server_version, None);
        let c = settings(&[("server_version", "v18.6.0")]).resolve().unwrap();
        assert_eq!(c.server_version.as_deref(), Some("v18.6.0"));
    }

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kas.toml");
        std::fs::write(&path, "http_addr = \"127.0.0.1:9000\"\nreplay_window = \"1h\"\nwebhook_body_limit = 2048\n")
            .unwrap();
        let flags = Settings { config: Some(path), http_addr: Some("127.0.0.1:9001".into()), ..Default::default() };
        let c = flags.resolve().unwrap();
        assert_eq!(c.http_addr.port(), 9001);
        assert_eq!(c.replay_window, Duration::from_secs(3600));
        assert_eq!(c.webhook_body_limit, 2048);
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (key, value, needle) in [
            ("http_addr", "nowhere", "--http-addr (KAS_HTTP_ADDR)"),
            ("replay_window", "15 parsecs", "--replay-window (KAS_REPLAY_WINDOW)"),
            ("replay_window", "0s", "KAS_REPLAY_WINDOW"),
            ("webhook_body_limit", "1TB", "KAS_WEBHOOK_BODY_LIMIT"),
            ("log_format", "xml", "KAS_LOG_FORMAT"),
            ("database_url", "mysql://x", "KAS_DATABASE_URL"),
            ("tls_cert_file", "a.pem", "KAS_TLS_KEY_FILE"),
            ("gitlab_external_url", "gitlab.example.com", "KAS_GITLAB_EXTERNAL_URL"),
            // Settings that contradict each other.
            ("event_retention", "10m", "KAS_EVENT_RETENTION"),
            ("gitlab_cache_ttl", "8m", "KAS_GITLAB_CACHE_TTL"),
            ("credential_grace", "soon", "KAS_CREDENTIAL_GRACE"),
            ("handshake_timeout", "0s", "--handshake-timeout (KAS_HANDSHAKE_TIMEOUT)"),
            ("max_connections_agent", "0", "--max-connections-agent (KAS_MAX_CONNECTIONS_AGENT)"),
            ("max_connections_http", "lots", "KAS_MAX_CONNECTIONS_HTTP"),
            ("max_connections_api", "2000000", "KAS_MAX_CONNECTIONS_API"),
            ("max_pods_per_agent", "0", "KAS_MAX_PODS_PER_AGENT"),
            ("max_agent_meta", "12", "KAS_MAX_AGENT_META"),
            ("server_version", "v18.6.0 beta", "KAS_SERVER_VERSION"),
            ("server_version", "-v18", "KAS_SERVER_VERSION"),
            ("gitlab_status_url", "gitlab.example.com", "KAS_GITLAB_STATUS_URL"),
            ("sync_status_interval", "0s", "KAS_SYNC_STATUS_INTERVAL"),
        ] {
            let err = settings(&[(key, value)]).resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{key}={value}: {err}");
        }
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("htp_addr = \"x\"").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5w").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
    }
}
