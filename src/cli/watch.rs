//! `kas watch`: the simplest real agent client. Opens ReconcileProjects as agentk does (bearer
//! token, gzip), says on stderr when the stream is open, prints one JSON line per notification,
//! reopens the stream at once after a clean end and with backoff after an error, and stops on a
//! refused token.
//!
//! Replayed notifications are marked by the client, not the wire: the agent protocol has no field
//! for it, and a count the server could send in a header would leak pushes to projects the agent
//! may not see (the access rule runs just before each send). The server queues its replay before
//! it answers the call, so replayed projects arrive as one burst right after the stream opens;
//! notifications in that first burst are marked `"replayed": true`.

use std::path::PathBuf;
use std::time::Duration;

use tonic::Code;
use tonic::codec::CompressionEncoding;

use tokio::time::Instant;

use super::client::ConnectArgs;
use super::{CliError, format_time, io};
use crate::clock::now_ms;
use crate::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use crate::proto::flux::rpc::{Project, ReconcileProjectsRequest};

/// A notification that arrives this long after the stream opened (or after the previous replayed
/// one) is live: the replay burst has ended. Long enough for a replay to reach a client on a
/// loaded machine, short enough that a push made after watching starts is rarely mistaken for it.
const REPLAY_QUIET: Duration = Duration::from_millis(500);

/// Arguments of `kas watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Where to connect (the agent listener).
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// File holding the agent token
    #[arg(long)]
    pub token_file: PathBuf,
    /// Stop after this many notifications
    #[arg(long)]
    pub count: Option<u64>,
    /// Do not reopen the stream when it ends
    #[arg(long)]
    pub once: bool,
    /// Full paths of the projects to watch
    #[arg(required = true)]
    pub projects: Vec<String>,
}

/// Runs `kas watch`.
pub async fn run(args: WatchArgs, out: &mut impl std::io::Write) -> Result<(), CliError> {
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| CliError::Other(format!("--token-file {}: {e}", args.token_file.display())))?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| CliError::Other("the token file holds characters a token cannot have".into()))?;
    let mut seen = 0u64;
    let mut backoff = Duration::from_secs(1);
    loop {
        let result = async {
            let channel = args.connect.connect().await?;
            let mut client = GitLabFluxClient::new(channel).send_compressed(CompressionEncoding::Gzip);
            let mut request = tonic::Request::new(ReconcileProjectsRequest {
                project: args.projects.iter().map(|p| Project { id: p.clone() }).collect(),
            });
            request.metadata_mut().insert("authorization", bearer.clone());
            let mut stream = client.reconcile_projects(request).await.map_err(status_error)?.into_inner();
            // The server has answered the call: the stream is registered and any replay queued.
            eprintln!("connected to {}; watching {} project(s)", args.connect.addr, args.projects.len());
            let mut burst = Some(Instant::now());
            while let Some(response) = stream.message().await.map_err(status_error)? {
                let replayed = match burst {
                    Some(last) if last.elapsed() < REPLAY_QUIET => {
                        burst = Some(Instant::now());
                        true
                    }
                    _ => {
                        burst = None;
                        false
                    }
                };
                let project = response.project.map(|p| p.id).unwrap_or_default();
                let line = serde_json::json!({ "project": project, "at": format_time(now_ms()), "replayed": replayed });
                writeln!(out, "{line}").map_err(io)?;
                out.flush().map_err(io)?;
                seen += 1;
                if args.count.is_some_and(|c| seen >= c) {
                    return Ok(true);
                }
            }
            Ok::<bool, CliError>(false)
        }
        .await;
        match result {
            Ok(true) => return Ok(()),
            Ok(false) if args.once => return Ok(()),
            Ok(false) => {
                eprintln!("stream ended; reopening");
                backoff = Duration::from_secs(1);
            }
            Err(CliError::Other(m)) if m.starts_with("Unauthenticated") || args.once => {
                return Err(CliError::Other(m));
            }
            Err(e) => {
                eprintln!("{e}; retrying in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

fn status_error(s: tonic::Status) -> CliError {
    let code = match s.code() {
        Code::Unauthenticated => "Unauthenticated",
        other => return CliError::Other(format!("{other:?}: {}", s.message())),
    };
    CliError::Other(format!("{code}: {}", s.message()))
}
