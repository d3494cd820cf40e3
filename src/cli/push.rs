//! `kas push`: calls GitPushEvent exactly as GitLab Rails does (JWT from the shared secret,
//! gzip), so an operator can test the GitLab-facing door by hand.

use std::path::PathBuf;

use tonic::codec::CompressionEncoding;

use super::client::ConnectArgs;
use super::{CliError, io};
use crate::domain::ProjectPath;
use crate::gitlab::jwt::GitLabJwt;
use crate::proto::event::{GitPushEvent, Project};
use crate::proto::notifications::rpc::GitPushEventRequest;
use crate::proto::notifications::rpc::notifications_client::NotificationsClient;
use crate::secrets::read_gitlab_secret;

/// Arguments of `kas push`.
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// Where to connect.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// GitLab's shared secret file (base64 of 32 bytes, as .gitlab_kas_secret)
    #[arg(long)]
    pub secret_file: PathBuf,
    /// GitLab project id
    #[arg(long)]
    pub project_id: i64,
    /// Project full path
    #[arg(long)]
    pub full_path: String,
    /// Optional idempotency key; a repeat with the same key is recorded once
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// Runs `kas push`.
pub async fn run(args: PushArgs, out: &mut impl std::io::Write) -> Result<(), CliError> {
    ProjectPath::parse(&args.full_path)?;
    let secret = read_gitlab_secret(&args.secret_file).map_err(|e| CliError::Other(format!("--secret-file {e}")))?;
    let jwt = GitLabJwt::new(secret.expose()).sign_as_gitlab("kas-push");
    let channel = args.connect.connect().await?;
    let mut client = NotificationsClient::new(channel).send_compressed(CompressionEncoding::Gzip);
    let mut request = tonic::Request::new(GitPushEventRequest {
        event: Some(GitPushEvent { project: Some(Project { id: args.project_id, full_path: args.full_path.clone() }) }),
    });
    request.set_timeout(std::time::Duration::from_secs(5));
    let bearer = format!("Bearer {jwt}").parse().map_err(|_| CliError::Other("JWT is not valid metadata".into()))?;
    request.metadata_mut().insert("authorization", bearer);
    if let Some(key) = &args.idempotency_key {
        let value = key.parse().map_err(|_| CliError::Other("--idempotency-key must be printable ASCII".into()))?;
        request.metadata_mut().insert("idempotency-key", value);
    }
    client
        .git_push_event(request)
        .await
        .map_err(|s| CliError::Other(format!("GitPushEvent failed: {:?}: {}", s.code(), s.message())))?;
    writeln!(out, "push to {} (id {}) accepted", args.full_path, args.project_id).map_err(io)
}
