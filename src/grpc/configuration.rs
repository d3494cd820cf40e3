//! `AgentConfiguration/GetConfiguration`: agentk's Flux module starts only once this stream
//! has delivered a configuration. Sent when the request's commit id differs, then again on every
//! change, on every replica; the stream stays open until shutdown, maximum age or revocation.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::OpenGauge;
use crate::agentcfg::source::ConfigSnapshot;
use crate::agentcfg::{self, AgentConfigFile, LogLevel};
use crate::app::App;
use crate::engine::AgentMetaRecord;
use crate::identity::AgentIdentity;
use crate::proto::agent_configuration::rpc::agent_configuration_server::AgentConfiguration;
use crate::proto::agent_configuration::rpc::{ConfigurationRequest, ConfigurationResponse};
use crate::proto::agentcfg::{self as cf, LogLevelEnum};

/// How often a configuration stream that registered its pod refreshes the registration.
const REGISTRATION_REFRESH: Duration = Duration::from_secs(4 * 60);

/// The AgentConfiguration service.
pub struct ConfigurationService {
    app: Arc<App>,
}

impl ConfigurationService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ConfigurationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentConfiguration for ConfigurationService {
    type GetConfigurationStream = ResponseStream;

    async fn get_configuration(
        &self,
        request: Request<ConfigurationRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let app = self.app.clone();
        let agent = super::authenticate_agent(&app, request.metadata(), request.extensions()).await?;
        let closing = super::closing(&app, request.extensions());
        let request = request.into_inner();
        // Registration on this stream, as upstream does, only for agents that send who they are
        // and do not register themselves: agentk 17.1+ sends only the commit id (and registers
        // through AgentRegistrar), so registering it here would list a pod that does not exist.
        let registration = match (&request.agent_meta, request.skip_register) {
            (Some(raw), false) => {
                let mut id = [0u8; 8];
                getrandom::fill(&mut id).expect("random source");
                Some((
                    (i64::from_le_bytes(id) & i64::MAX).max(1),
                    super::registrar::meta_record(raw, app.config.max_agent_meta)?,
                ))
            }
            _ => None,
        };
        let (tx, rx) = mpsc::channel(1);
        tracing::info!(agent = agent.id, name = %agent.name, "GetConfiguration stream opened");
        // On the server's tracker: shutdown waits for the stream to unregister its pod.
        app.tasks.spawn(serve(app.clone(), agent, request.commit_id, registration, closing, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve(
    app: Arc<App>,
    agent: AgentIdentity,
    mut last_sent: String,
    registration: Option<(i64, AgentMetaRecord)>,
    closing: tokio_util::sync::CancellationToken,
    tx: mpsc::Sender<Result<ConfigurationResponse, Status>>,
) {
    let _gauge = OpenGauge::new(app.metrics.streams("get_configuration"));
    let credential = match app.hub.watch_credential(&agent) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(Status::from(e))).await;
            return;
        }
    };
    if let Some((pod_id, meta)) = &registration
        && let Err(e) = app
            .engine
            .register_pod(
                super::registrar::pod_record(&app, &agent, *pod_id, meta.clone()),
                app.config.max_pods_per_agent,
            )
            .await
    {
        let _ = tx.send(Err(Status::from(e))).await;
        return;
    }
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + REGISTRATION_REFRESH, REGISTRATION_REFRESH);
    let mut subscription = None;
    loop {
        let snapshot = match app.config_watch.source().load(&agent).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(Status::from(e))).await;
                break;
            }
        };
        let subscription =
            subscription.get_or_insert_with(|| app.config_watch.subscribe(&agent, snapshot.version.clone()));
        match response(&app, &agent, &snapshot) {
            Ok(response) if response.commit_id != last_sent => {
                last_sent = response.commit_id.clone();
                tracing::info!(agent = agent.id, commit = %last_sent, "configuration sent");
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
        }
        let changed = loop {
            tokio::select! {
                changed = subscription.changes.changed() => break changed.is_ok(),
                _ = closing.cancelled() => break false,
                end = credential.revoked.ended() => {
                    let _ = tx.send(Err(Status::from(end))).await;
                    break false;
                }
                _ = tx.closed() => break false,
                _ = refresh.tick() => {
                    if let Some((pod_id, meta)) = &registration {
                        // A refresh of a pod already registered is never refused.
                        let pod = super::registrar::pod_record(&app, &agent, *pod_id, meta.clone());
                        if let Err(e) = app.engine.register_pod(pod, app.config.max_pods_per_agent).await {
                            tracing::warn!(agent = agent.id, error = %e, "cannot refresh a pod registration");
                        }
                    }
                }
            }
        };
        if !changed {
            break;
        }
    }
    if let Some((pod_id, _)) = registration {
        app.engine.unregister_pod(agent.id, pod_id).await;
    }
    // Dropping `tx` ends the stream with OK (unless an error was sent above).
}

fn level(l: LogLevel) -> i32 {
    (match l {
        LogLevel::Info => LogLevelEnum::Info,
        LogLevel::Debug => LogLevelEnum::Debug,
        LogLevel::Warn => LogLevelEnum::Warn,
        LogLevel::Error => LogLevelEnum::Error,
    }) as i32
}

/// What is sent: `flux` and `observability` from the file, plus what kas knows of the agent.
fn response(app: &App, agent: &AgentIdentity, snapshot: &ConfigSnapshot) -> Result<ConfigurationResponse, Status> {
    let text = snapshot.text.as_str();
    let file = AgentConfigFile::parse(text).map_err(|e| Status::failed_precondition(e.to_string()))?;
    let project_id = agent.config_project_id.unwrap_or(0);
    let external_url = app.config.gitlab_external_url.clone().unwrap_or_default();
    let configuration = cf::AgentConfiguration {
        observability: file.observability.map(|o| cf::ObservabilityCf {
            logging: o.logging.map(|l| cf::LoggingCf {
                level: level(l.level.unwrap_or(LogLevel::Info)),
                grpc_level: l.grpc_level.map(level),
            }),
        }),
        agent_id: agent.id,
        project_id,
        project_path: agent.config_project.clone(),
        flux: file.flux.map(|f| cf::FluxCf { webhook_receiver_url: f.webhook_receiver_url.unwrap_or_default() }),
        gitlab_external_url: external_url.clone(),
    };
    let commit_id = snapshot
        .commit_id
        .clone()
        .unwrap_or_else(|| agentcfg::commit_id(text, agent.id, project_id, &agent.config_project, &external_url));
    Ok(ConfigurationResponse { configuration: Some(configuration), commit_id })
}
