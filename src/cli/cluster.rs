//! `kas cluster get AGENT PATH`: a read-only GET of an agent's Kubernetes API through its
//! tunnel, from a server's `GET /cluster` (admin secret; only for agents with
//! `kas.cluster_read: true`).

use std::path::PathBuf;
use std::time::Duration;

use super::{CliError, io};

/// `kas cluster …`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// GET a Kubernetes API path through the agent's tunnel, e.g. `kas cluster get prod /version`
    Get(GetArgs),
}

/// Arguments of `kas cluster get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Agent id, or name when only one agent has it
    pub agent: String,
    /// Kubernetes API path, with an optional ?query, e.g. /apis/source.toolkit.fluxcd.io/v1/gitrepositories
    pub path: String,
    /// Any replica's HTTP listener, e.g. http://127.0.0.1:8080
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub addr: String,
    /// The admin secret file [default: <data dir>/admin-secret]
    #[arg(long, env = "KAS_ADMIN_SECRET_FILE")]
    pub admin_secret_file: Option<PathBuf>,
    /// The server's data directory, where it generated the admin secret
    #[arg(long, env = "KAS_DATA_DIR", default_value = "./kas-data")]
    pub data_dir: PathBuf,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 90)]
    pub timeout: u64,
}

/// Longest error text quoted from an answer.
const QUOTED: usize = 1000;

/// Runs `kas cluster …`.
pub async fn run(command: ClusterCommand, out: &mut impl std::io::Write) -> Result<(), CliError> {
    let ClusterCommand::Get(args) = command;
    if !args.path.starts_with('/') {
        return Err(CliError::Other(format!("PATH must start with /: {:?}", args.path)));
    }
    let file = args.admin_secret_file.unwrap_or_else(|| args.data_dir.join("admin-secret"));
    let secret = crate::secrets::read_admin_secret(&file).map_err(|e| CliError::Other(format!("admin secret: {e}")))?;
    let secret = String::from_utf8_lossy(secret.expose()).into_owned();
    let url = format!("{}/cluster", args.addr.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .query(&[("agent", args.agent.as_str()), ("path", args.path.as_str())])
        .bearer_auth(secret)
        .timeout(Duration::from_secs(args.timeout))
        .send()
        .await
        .map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    let status = response.status();
    let from_cluster = response.headers().contains_key(crate::http::CLUSTER_STATUS);
    let body = response.bytes().await.map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    if from_cluster && status.is_success() {
        out.write_all(&body).map_err(io)?;
        if !body.ends_with(b"\n") {
            writeln!(out).map_err(io)?;
        }
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body);
    if from_cluster {
        // Kubernetes explains a refusal in a Status object's message.
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_else(|| text.trim().to_owned());
        return Err(CliError::Other(format!("the cluster answered {status}: {}", quoted(&message))));
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned());
    Err(CliError::Other(format!("kas refused ({status}): {}", quoted(&message))))
}

fn quoted(s: &str) -> &str {
    match s.char_indices().nth(QUOTED) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}
