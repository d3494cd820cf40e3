//! `kas agents`: the agents connected across all replicas, from a server's `GET /agents`.

use std::path::PathBuf;

use super::{CliError, format_time, io};
use crate::engine::{ConnectionRecord, PodRecord, TunnelCount};

/// Arguments of `kas agents`.
#[derive(Debug, clap::Args)]
pub struct AgentsArgs {
    /// Any replica's HTTP listener, e.g. http://127.0.0.1:8080
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub addr: String,
    /// The admin secret file [default: <data dir>/admin-secret]
    #[arg(long, env = "KAS_ADMIN_SECRET_FILE")]
    pub admin_secret_file: Option<PathBuf>,
    /// The server's data directory, where it generated the admin secret
    #[arg(long, env = "KAS_DATA_DIR", default_value = "./kas-data")]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Deserialize)]
struct Answer {
    connections: Vec<ConnectionRecord>,
    #[serde(default)]
    pods: Vec<PodRecord>,
    #[serde(default)]
    tunnels: Vec<TunnelCount>,
    #[serde(default)]
    cluster_actions: Vec<crate::store::ActionRecord>,
    #[serde(default)]
    sync: Vec<crate::store::KustomizationState>,
}

/// Runs `kas agents`.
pub async fn run(args: AgentsArgs, out: &mut impl std::io::Write) -> Result<(), CliError> {
    let file = args.admin_secret_file.unwrap_or_else(|| args.data_dir.join("admin-secret"));
    let secret = crate::secrets::read_admin_secret(&file).map_err(|e| CliError::Other(format!("admin secret: {e}")))?;
    let secret = String::from_utf8_lossy(secret.expose()).into_owned();
    let url = format!("{}/agents", args.addr.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(secret)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(CliError::Other(format!("{url}: {status}: {}", body.trim())));
    }
    let answer: Answer = response.json().await.map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    if args.json {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "connections": answer.connections,
            "pods": answer.pods,
            "tunnels": answer.tunnels,
            "cluster_actions": answer.cluster_actions,
            "sync": answer.sync,
        }))
        .expect("serializable");
        return writeln!(out, "{text}").map_err(io);
    }
    writeln!(out, "STREAMS").map_err(io)?;
    writeln!(out, "{:<8} {:<24} {:<20} {:<20} {:<9} CONNECTED", "AGENT", "NAME", "RPC", "REPLICA", "PROJECTS")
        .map_err(io)?;
    for c in answer.connections {
        writeln!(
            out,
            "{:<8} {:<24} {:<20} {:<20} {:<9} {}",
            c.agent_id,
            c.agent_name,
            c.rpc,
            c.replica,
            c.projects,
            format_time(c.connected_at)
        )
        .map_err(io)?;
    }
    writeln!(out, "\nREGISTERED PODS").map_err(io)?;
    writeln!(out, "{:<8} {:<20} {:<40} {:<12} {:<20} CONNECTED", "AGENT", "POD ID", "POD", "VERSION", "REPLICA")
        .map_err(io)?;
    for p in answer.pods {
        let pod = format!("{}/{}", p.meta.pod_namespace, p.meta.pod_name);
        writeln!(
            out,
            "{:<8} {:<20} {:<40} {:<12} {:<20} {}",
            p.agent_id,
            p.pod_id,
            pod,
            p.meta.version,
            p.replica,
            format_time(p.connected_at)
        )
        .map_err(io)?;
    }
    writeln!(out, "\nTUNNELS").map_err(io)?;
    writeln!(out, "{:<8} {:<24} {:<30} {:<6} BUSY", "AGENT", "NAME", "REPLICA", "IDLE").map_err(io)?;
    for t in answer.tunnels {
        writeln!(out, "{:<8} {:<24} {:<30} {:<6} {}", t.agent_id, t.agent_name, t.replica, t.idle, t.busy)
            .map_err(io)?;
    }
    writeln!(out, "\nLAST CLUSTER ACTION PER AGENT").map_err(io)?;
    writeln!(out, "{:<8} {:<8} {:<14} {:<20} DETAIL", "AGENT", "EVENT", "OUTCOME", "AT").map_err(io)?;
    let mut seen = std::collections::HashSet::new();
    for a in answer.cluster_actions.iter().filter(|a| seen.insert(a.agent)) {
        writeln!(out, "{:<8} {:<8} {:<14} {:<20} {}", a.agent, a.seq, a.outcome, format_time(a.done_at), a.detail)
            .map_err(io)?;
    }
    writeln!(out, "\nFLUX SYNC (last state per Kustomization)").map_err(io)?;
    writeln!(
        out,
        "{:<8} {:<32} {:<8} {:<12} {:<20} {:<20} REVISION",
        "AGENT", "KUSTOMIZATION", "STATE", "STATUS", "PROJECT", "AT"
    )
    .map_err(io)?;
    for k in answer.sync {
        let name = format!("{}/{}", k.namespace, k.name);
        let project = k.project.as_deref().unwrap_or("-");
        writeln!(
            out,
            "{:<8} {:<32} {:<8} {:<12} {:<20} {:<20} {}",
            k.agent,
            name,
            k.state,
            k.reported,
            project,
            format_time(k.updated_at),
            k.revision
        )
        .map_err(io)?;
    }
    Ok(())
}
