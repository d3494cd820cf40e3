//! The state every edge shares: configuration, storage, metrics, readiness and the shutdown
//! signal. Cloned (cheaply, it is an `Arc`) into axum and every tonic service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agentcfg::watch::ConfigWatch;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::Hub;
use crate::engine::Engine;
use crate::gitlab::jwt::GitLabJwt;
use crate::identity::AgentDirectory;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::secrets::Secrets;
use crate::store::Store;

/// Shared application state.
pub struct App {
    /// Resolved configuration.
    pub config: Config,
    /// Registry and event log.
    pub store: Arc<dyn Store>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Webhook secrets and GitLab's JWT key.
    pub secrets: Secrets,
    /// Verifier and signer of GitLab JWTs; `None` without a shared secret.
    pub gitlab_jwt: Option<GitLabJwt>,
    /// Records pushes.
    pub intake: Intake,
    /// Fan-out across replicas.
    pub engine: Arc<dyn Engine>,
    /// Who agents are and what they may see.
    pub directory: Arc<dyn AgentDirectory>,
    /// This replica's open agent streams.
    pub hub: Arc<Hub>,
    /// Tells configuration streams about changes.
    pub config_watch: Arc<ConfigWatch>,
    /// Agents' tunnels: calls into their clusters.
    pub tunnels: Arc<crate::tunnel::Tunnels>,
    /// What `/readyz` reports besides the database.
    pub readiness: Readiness,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// The time every part reads.
    pub clock: Clock,
    /// The server's background tasks, which shutdown waits for before the database closes.
    pub tasks: TaskTracker,
}

/// Readiness flags set by the parts that own them.
#[derive(Default)]
pub struct Readiness {
    listeners_up: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// All listeners are accepting.
    pub fn set_listeners_up(&self) {
        self.listeners_up.store(true, Ordering::Release);
    }
    /// Shutdown has begun: report not ready so load balancers stop sending work.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
    /// Whether the listeners are accepting.
    pub fn listeners_up(&self) -> bool {
        self.listeners_up.load(Ordering::Acquire)
    }
    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}
