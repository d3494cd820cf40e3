//! gRPC channels for the client commands (`kas push`, `kas watch`): plain or TLS, optionally
//! trusting a given CA.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::CliError;

/// Where and how to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server URL: http://host:port, or https://host:port for TLS (grpc:// and grpcs:// as agentk
    /// writes them; a bare host:port means http://)
    #[arg(long)]
    pub addr: String,
    /// PEM CA certificate to trust for https:// (default: the public web roots)
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

/// The URL tonic connects to and whether it is TLS, from what a user typed. agentk's
/// `grpc://`/`grpcs://` are accepted because operators copy addresses from agentk's settings, and a
/// bare `host:port` (what `KAS_AGENT_ADDR` holds) means plain HTTP/2, kas's default.
pub fn endpoint_url(addr: &str) -> Result<(String, bool), String> {
    let Some((scheme, rest)) = addr.split_once("://") else {
        if addr.is_empty() || addr.contains('/') {
            return Err("expected http://host:port or https://host:port".into());
        }
        return Ok((format!("http://{addr}"), false));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "grpc" => Ok((format!("http://{rest}"), false)),
        "https" | "grpcs" => Ok((format!("https://{rest}"), true)),
        "ws" | "wss" => Err(format!(
            "{scheme}:// (gRPC over WebSocket) is for agentk; kas's client commands speak plain gRPC: \
             use http://host:port (or https://) of the agent listener"
        )),
        _ => Err(format!("unknown scheme {scheme}://: use http://host:port or https://host:port")),
    }
}

impl ConnectArgs {
    /// Opens a channel.
    pub async fn connect(&self) -> Result<Channel, CliError> {
        let bad = |e: String| CliError::Other(format!("--addr {}: {e}", self.addr));
        let (url, tls) = endpoint_url(&self.addr).map_err(bad)?;
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(55))
            .keep_alive_while_idle(true);
        if tls {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &self.ca_file {
                let pem = std::fs::read(ca).map_err(|e| CliError::Other(format!("--ca-file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        endpoint.connect().await.map_err(|e| bad(format!("cannot connect: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_a_scheme() {
        let ok = |a: &str| endpoint_url(a).unwrap();
        assert_eq!(ok("127.0.0.1:8150"), ("http://127.0.0.1:8150".into(), false));
        assert_eq!(ok("[::1]:8150"), ("http://[::1]:8150".into(), false));
        assert_eq!(ok("http://kas:8150"), ("http://kas:8150".into(), false));
        assert_eq!(ok("grpc://kas:8150"), ("http://kas:8150".into(), false));
        assert_eq!(ok("HTTPS://kas:8150"), ("https://kas:8150".into(), true));
        assert_eq!(ok("grpcs://kas:8150"), ("https://kas:8150".into(), true));
        assert!(endpoint_url("wss://gitlab.example.com/-/kubernetes-agent/").unwrap_err().contains("WebSocket"));
        assert!(endpoint_url("ftp://kas:8150").unwrap_err().contains("unknown scheme ftp://"));
        assert!(endpoint_url("").is_err());
    }
}
