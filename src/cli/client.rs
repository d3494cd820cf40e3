//! gRPC channels for the client commands (`kas push`, `kas watch`): plain or TLS, optionally
//! trusting a given CA.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::CliError;

/// Where and how to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server URL: http://host:port, or https://host:port for TLS
    #[arg(long)]
    pub addr: String,
    /// PEM CA certificate to trust for https:// (default: the public web roots)
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

impl ConnectArgs {
    /// Opens a channel.
    pub async fn connect(&self) -> Result<Channel, CliError> {
        let bad = |e: String| CliError::Other(format!("--addr {}: {e}", self.addr));
        let mut endpoint = Endpoint::from_shared(self.addr.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(55))
            .keep_alive_while_idle(true);
        if self.addr.starts_with("https://") {
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
