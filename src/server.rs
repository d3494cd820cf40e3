//! `serve`: builds the state, starts the three listeners and background tasks, and on
//! shutdown drains them within the grace period.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::runner::{OciActions, OciParts, OciSettings};
use crate::actions::sync::{SyncParts, SyncSettings, SyncWatcher};
use crate::agentcfg::source::{ConfigSource, RegistryConfigSource};
use crate::agentcfg::watch::ConfigWatch;
use crate::app::{App, Readiness};
use crate::clock::Clock;
use crate::config::{Backend, Config};
use crate::delivery::{Hub, HubConfig, HubParts};
use crate::engine::{DeliverToAll, Engine, EngineContext, LocalDelivery, MemoryEngine, RedisEngine, RedisTarget};
use crate::gitlab::jwt::GitLabJwt;
use crate::gitlab::{GitLabClient, GitLabConfigSource, GitLabDirectory};
use crate::identity::{AgentDirectory, RegistryDirectory};
use crate::intake::{Intake, Outbox};
use crate::listener::{self, ListenerSettings};
use crate::metrics::Metrics;
use crate::secrets::{SecretError, Secrets};
use crate::store::{self, StoreError};
use crate::websocket::WithWebSocket;

/// The three bound listeners; binding is the caller's job so tests can use port 0.
pub struct Listeners {
    /// Webhooks, health and metrics.
    pub http: TcpListener,
    /// Agents.
    pub agent: TcpListener,
    /// GitLab.
    pub api: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        Ok(Self {
            http: bind("HTTP", config.http_addr)?,
            agent: bind("agent", config.agent_addr)?,
            api: bind("GitLab API", config.api_addr)?,
        })
    }
}

/// Binds with a deep accept queue: when a replica dies, thousands of agents reconnect to the
/// others at once, and a full queue would make the kernel drop or reset their connections.
pub fn bind(name: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    let err = |source| ServeError::Bind { name, addr, source };
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Pending connections the kernel may hold per listener (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A secret file is unusable.
    #[error("secret file {0}")]
    Secret(#[from] SecretError),
    /// The Redis URL is unusable.
    #[error("{0}")]
    Redis(String),
    /// The GitLab-backed mode is misconfigured.
    #[error("{0}")]
    GitLab(String),
    /// TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener address could not be bound.
    #[error("cannot listen on {addr} for the {name} listener: {source}")]
    Bind {
        /// Which listener.
        name: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs kas on the given listeners until `shutdown` completes, then drains: stops accepting,
/// ends agent streams with OK, waits for connections (at most the configured grace), flushes.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with_state(config, listeners, shutdown, None).await
}

/// `serve`, handing the shared state to `state` once it is built: embedders and tests use it to
/// reach the library API (`App::tunnels`) of a running server.
pub async fn serve_with_state(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    state: Option<tokio::sync::oneshot::Sender<Arc<App>>>,
) -> Result<(), ServeError> {
    let tls = match &config.tls {
        Some(files) => Some(listener::tls_acceptor(&files.cert, &files.key).map_err(ServeError::Tls)?),
        None => None,
    };
    let store = store::open(&config.store).await?;
    store.migrate().await?;
    let secrets = Secrets::load(&config)?;
    if secrets.gitlab_jwt_key.is_none() {
        tracing::warn!("KAS_GITLAB_SECRET_FILE is not set: the GitLab-facing listener rejects every call");
    } else if config.server_version.is_none() {
        tracing::warn!(
            version = crate::grpc::server_info::VERSION,
            "KAS_SERVER_VERSION is not set: GitLab is told kas's own version, which its \"Connect a cluster\" page uses as agentk's image tag; set it to GitLab's version (e.g. v18.6.0)"
        );
    }
    let token = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let clock = Clock::system();
    let engine: Arc<dyn Engine> = match &config.redis_url {
        Some(url) => {
            let target = RedisTarget::parse(url.expose())
                .map_err(|e| ServeError::Redis(format!("invalid --redis-url (KAS_REDIS_URL): {e}")))?;
            let key = engine_key(&*store).await?;
            Arc::new(RedisEngine::new(
                target,
                &config.redis_prefix,
                &config.replica_name,
                key,
                config.replay_window,
                metrics.clone(),
                clock.clone(),
            ))
        }
        None => Arc::new(MemoryEngine::with_clock(clock.clone())),
    };
    let (directory, config_source) = identity(&config, &store, &engine, &metrics, &secrets)?;
    // Every background task joins one tracker: shutdown waits for it (positions are saved)
    // before the database closes.
    let background = TaskTracker::new();
    let hub = Hub::new(
        HubParts {
            directory: directory.clone(),
            log: store.clone(),
            durable_positions: store.clone(),
            presence: engine.clone(),
            positions: engine.clone(),
            metrics: metrics.clone(),
            tasks: background.clone(),
            clock: clock.clone(),
        },
        hub_config(&config),
    );
    hub.start(token.clone()).await;
    let config_watch = ConfigWatch::new(config_source, background.clone());
    config_watch.start(token.clone());
    let tunnels = crate::tunnel::Tunnels::new(
        engine.clone(),
        config_watch.source().clone(),
        metrics.clone(),
        tunnel_config(&config),
    );
    // Before the engine starts: it routes relayed calls to the tunnels.
    tunnels.start(token.clone(), &background);
    let oci = OciActions::new(
        OciParts {
            tunnels: tunnels.clone(),
            log: store.clone(),
            configs: config_watch.source().clone(),
            directory: directory.clone(),
            once: engine.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
        },
        oci_settings(&config),
    );
    oci.start(token.clone(), &background);
    if let Some((client, gitlab_host)) = status_client(&config, &metrics)? {
        SyncWatcher::start(
            SyncParts {
                tunnels: tunnels.clone(),
                configs: config_watch.source().clone(),
                directory: directory.clone(),
                projects: store.clone(),
                log: store.clone(),
                once: engine.clone(),
                client,
                metrics: metrics.clone(),
                clock: clock.clone(),
            },
            sync_settings(&config, gitlab_host),
            token.clone(),
            &background,
        );
    }
    // Every recorded event goes to the agent streams, the configuration watch (a push to a
    // configuration project may change an agent's configuration file) and the OCI actor.
    let local: Arc<dyn LocalDelivery> = Arc::new(DeliverToAll(vec![hub.clone(), config_watch.clone(), oci]));
    engine.clone().start(EngineContext {
        local: local.clone(),
        log: store.clone(),
        metrics: metrics.clone(),
        replay_window: config.replay_window,
        shutdown: token.clone(),
        tasks: background.clone(),
    });
    let (outbox, outbox_tasks) =
        Outbox::start(store.clone(), engine.clone(), local, metrics.clone(), config.event_retention, clock.clone());
    // SQLite has one writer at a time; more writer tasks would only queue on its lock.
    let writers = match config.store.backend() {
        Backend::Sqlite => 1,
        Backend::Postgres => 4,
    };
    let intake = Intake::start(store.clone(), outbox.clone(), metrics.clone(), writers, clock.clone());
    if config.gitlab_external_url.is_none() {
        tracing::warn!(
            "KAS_GITLAB_EXTERNAL_URL is not set: agents get an empty gitlab_external_url, so Flux never gets Receivers for GitLab's repositories"
        );
    }
    let gitlab_jwt = secrets.gitlab_jwt_key.as_ref().map(|k| GitLabJwt::new(k.expose()));
    let app = Arc::new(App {
        store,
        metrics,
        gitlab_jwt,
        intake,
        engine,
        directory,
        hub,
        config_watch,
        tunnels,
        secrets,
        readiness: Readiness::default(),
        shutdown: token.clone(),
        clock,
        tasks: background.clone(),
        config,
    });
    if let Some(state) = state {
        let _ = state.send(app.clone());
    }
    listener::raise_open_file_limit(app.config.max_connections.total());
    let connections = TaskTracker::new();
    let settings =
        |name: &'static str, max_connections: usize, max_age: Option<std::time::Duration>| ListenerSettings {
            name,
            tls: tls.clone(),
            max_age,
            max_connections,
            handshake_timeout: app.config.handshake_timeout,
            http1_idle_timeout: app.config.http_idle_timeout,
            metrics: app.metrics.listener(name),
        };
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let addrs = (addr(&listeners.http), addr(&listeners.agent), addr(&listeners.api));

    let http_router = crate::http::router(app.clone());
    listener::spawn(
        listeners.http,
        settings("http", app.config.max_connections.http, None),
        move |_| http_router.clone(),
        token.clone(),
        connections.clone(),
    );
    let agent_routes = WithWebSocket::new(crate::grpc::agent_routes(app.clone()));
    listener::spawn(
        listeners.agent,
        settings("agent", app.config.max_connections.agent, Some(app.config.max_connection_age)),
        move |_| agent_routes.clone(),
        token.clone(),
        connections.clone(),
    );
    let api_routes = crate::grpc::api_routes(app.clone());
    listener::spawn(
        listeners.api,
        settings("api", app.config.max_connections.api, None),
        move |_| api_routes.clone(),
        token.clone(),
        connections.clone(),
    );
    app.readiness.set_listeners_up();
    tracing::info!(
        http = %addrs.0, agent = %addrs.1, api = %addrs.2,
        engine = app.engine.name(),
        database = app.config.store.backend().as_str(),
        replica = %app.config.replica_name,
        "kas is serving"
    );

    shutdown.await;
    tracing::info!(grace = ?app.config.shutdown_grace, "shutting down: draining connections and streams");
    app.readiness.set_shutting_down();
    token.cancel();
    connections.close();
    let drain = async {
        connections.wait().await;
        // No request can record anything now: finish what is queued and publish it.
        app.intake.close().await;
        outbox_tasks.shutdown(outbox).await;
        background.close();
        background.wait().await;
    };
    if tokio::time::timeout(app.config.shutdown_grace, drain).await.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    app.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The key that signs what replicas leave in Redis: generated by the first replica, shared by
/// every replica through the database, never stored in Redis.
async fn engine_key(store: &dyn crate::store::Store) -> Result<crate::config::Secret<Vec<u8>>, ServeError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("system randomness");
    let candidate = crate::hex::encode(&raw);
    let key = store.shared_key("redis-signing", &candidate, crate::clock::now_ms()).await?;
    Ok(crate::config::Secret::new(key.into_bytes()))
}

/// Delivery settings from the configuration.
fn hub_config(config: &Config) -> HubConfig {
    HubConfig {
        replay_window: config.replay_window,
        // Covers a connection that died silently until keepalive noticed (about 80 s).
        replay_overlap: std::time::Duration::from_secs(120).min(config.replay_window),
        token_recheck: config.token_recheck,
        credential_grace: config.credential_grace,
        max_streams_per_agent: config.max_streams_per_agent,
        replica: config.replica_name.clone(),
    }
}

/// The OCI actor's settings, from the configuration.
fn oci_settings(config: &Config) -> OciSettings {
    OciSettings {
        registry_host: config.registry_host.clone(),
        replay_window: config.replay_window,
        retention: config.event_retention,
        // A list and a patch or two, each bounded by the tunnel's wait and call time.
        action_timeout: (config.tunnel_wait + config.tunnel_timeout) * 3,
        max_list_bytes: config.tunnel_max_response_body,
    }
}

/// The commit-status client when GitLab's REST API and a token are configured (the status
/// settings, else GitLab mode's URL and API token), with the host Git URLs must name; `None`
/// (with one warning) when they are not: sync status is off.
fn status_client(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<(Arc<crate::gitlab::statuses::StatusClient>, String)>, ServeError> {
    let Some((url, token_file)) = crate::gitlab::statuses::credentials(config) else {
        tracing::warn!(
            "Flux commit statuses are off: set KAS_GITLAB_STATUS_URL and KAS_GITLAB_STATUS_TOKEN_FILE (GitLab mode: KAS_GITLAB_API_TOKEN_FILE), a token with the api scope; agents' kas.sync_status is ignored until then"
        );
        return Ok(None);
    };
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| ServeError::GitLab(format!("--gitlab-status-token-file {}: {e}", token_file.display())))?;
    let token = crate::config::Secret::new(token.trim().to_owned());
    let roots = match &config.gitlab_ca_file {
        Some(path) => gitlab_ca(path)?,
        None => Vec::new(),
    };
    let client =
        crate::gitlab::statuses::StatusClient::new(url, token, roots, metrics.clone()).map_err(ServeError::GitLab)?;
    // Flux's GitRepository URLs name GitLab's external host, which the internal URL may not.
    let host = config.gitlab_external_url.as_deref().unwrap_or(url);
    let host = crate::actions::sync::flux::url_host(host)
        .ok_or_else(|| ServeError::GitLab(format!("no host in {}", crate::gitlab::client::redact_url(host))))?;
    tracing::info!(gitlab = %client.base_url(), git_host = %host, "Flux commit statuses are on for agents that opt in (kas.sync_status)");
    Ok(Some((Arc::new(client), host)))
}

/// The sync-status watcher's settings, from the configuration.
fn sync_settings(config: &Config, gitlab_host: String) -> SyncSettings {
    SyncSettings {
        interval: config.sync_status_interval,
        gitlab_host,
        // Long enough that claims are rare, short enough that a dead replica's agents are
        // watched again soon.
        lease: (config.sync_status_interval * 6).max(std::time::Duration::from_secs(30)),
        max_list_bytes: config.tunnel_max_response_body,
        retention: config.event_retention,
    }
}

/// Limits of calls through agents' tunnels, from the configuration.
fn tunnel_config(config: &Config) -> crate::tunnel::TunnelConfig {
    crate::tunnel::TunnelConfig {
        wait: config.tunnel_wait,
        call_timeout: config.tunnel_timeout,
        max_request_body: config.tunnel_max_request_body,
        max_response_body: config.tunnel_max_response_body,
        once_keep: config.replay_window,
    }
}

/// Who agents are, what they may see and where their configuration comes from: kas's own
/// registry, or GitLab when `KAS_GITLAB_URL` is set.
#[allow(clippy::type_complexity)]
fn identity(
    config: &Config,
    store: &Arc<dyn crate::store::Store>,
    engine: &Arc<dyn Engine>,
    metrics: &Arc<Metrics>,
    secrets: &Secrets,
) -> Result<(Arc<dyn AgentDirectory>, Arc<dyn ConfigSource>), ServeError> {
    let Some(url) = &config.gitlab_url else {
        return Ok((
            Arc::new(RegistryDirectory::new(store.clone())),
            Arc::new(RegistryConfigSource::new(store.clone())),
        ));
    };
    let key = secrets.gitlab_jwt_key.as_ref().ok_or_else(|| {
        ServeError::GitLab("--gitlab-url (KAS_GITLAB_URL) needs --gitlab-secret-file (KAS_GITLAB_SECRET_FILE): it signs kas's calls to GitLab".into())
    })?;
    let api_token = match &config.gitlab_api_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| ServeError::GitLab(format!("--gitlab-api-token-file {}: {e}", path.display())))?;
            Some(crate::config::Secret::new(token.trim().to_owned()))
        }
        None => {
            tracing::warn!(
                "KAS_GITLAB_API_TOKEN_FILE is not set: agents get an empty configuration (kas cannot read .gitlab/agents/<name>/config.yaml)"
            );
            None
        }
    };
    let roots = match &config.gitlab_ca_file {
        Some(path) => gitlab_ca(path)?,
        None => Vec::new(),
    };
    let client = Arc::new(
        GitLabClient::new(url, GitLabJwt::new(key.expose()), api_token, roots, metrics.clone())
            .map_err(ServeError::GitLab)?,
    );
    if reqwest::Url::parse(url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some()) {
        tracing::warn!(
            "the user:password in KAS_GITLAB_URL is not sent: GitLab's internal API authenticates kas by its JWT"
        );
    }
    tracing::info!(gitlab = %client.base_url(), cache = ?config.gitlab_cache_ttl, "agents, tokens, access and configuration come from GitLab");
    Ok((
        Arc::new(GitLabDirectory::new(client.clone(), engine.clone(), config.gitlab_cache_ttl)),
        Arc::new(GitLabConfigSource::new(client)),
    ))
}

/// The CA certificates in `--gitlab-ca-file` (PEM): at least one, or the start fails.
fn gitlab_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ServeError> {
    let err = |reason: String| {
        ServeError::GitLab(format!("--gitlab-ca-file (KAS_GITLAB_CA_FILE) {}: {reason}", path.display()))
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Completes on SIGTERM or SIGINT: what the binaries pass to `serve`.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
