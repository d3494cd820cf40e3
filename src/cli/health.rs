//! `kas health`: asks a server's `GET /healthz` and exits 0 when it answers 200, 1 otherwise, so
//! container health checks need no curl in the image.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::{CliError, io};

/// Arguments of `kas health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The HTTP listener: host:port as kas serve binds it (0.0.0.0 means this host), or a URL
    #[arg(long, env = "KAS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Set (as for kas serve) when the listener speaks TLS: the check then uses https:// and does
    /// not verify the certificate (it only asks whether the local process is alive)
    #[arg(long, env = "KAS_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// Give up after this many seconds
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

/// The URL to probe. A listen address such as `0.0.0.0:8080` (what containers set in
/// `KAS_HTTP_ADDR`) is not a place to connect to; its loopback twin is.
pub fn healthz_url(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        return format!("{}/healthz", addr.trim_end_matches('/'));
    }
    let host_port = match addr.parse::<SocketAddr>() {
        Ok(mut sa) => {
            match sa.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => sa.set_ip(Ipv4Addr::LOCALHOST.into()),
                IpAddr::V6(ip) if ip.is_unspecified() => sa.set_ip(Ipv6Addr::LOCALHOST.into()),
                _ => {}
            }
            sa.to_string()
        }
        Err(_) => addr.to_owned(),
    };
    format!("{}://{host_port}/healthz", if tls { "https" } else { "http" })
}

/// Runs `kas health`.
pub async fn run(args: HealthArgs, out: &mut impl std::io::Write) -> Result<(), CliError> {
    let url = healthz_url(&args.addr, args.tls_cert_file.is_some());
    let client = reqwest::Client::builder()
        // A liveness check of a local process: nothing secret is sent, and the serving
        // certificate names the public host, not the loopback address used here.
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .map_err(|e| CliError::Other(format!("cannot build an HTTP client: {e}")))?;
    let response = client.get(&url).send().await.map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err(CliError::Other(format!("{url}: {status}")));
    }
    writeln!(out, "{url}: {status}").map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_become_loopback_urls() {
        assert_eq!(healthz_url("0.0.0.0:8080", false), "http://127.0.0.1:8080/healthz");
        assert_eq!(healthz_url("[::]:8080", true), "https://[::1]:8080/healthz");
        assert_eq!(healthz_url("10.0.0.5:9080", false), "http://10.0.0.5:9080/healthz");
        assert_eq!(healthz_url("localhost:8080", false), "http://localhost:8080/healthz");
        assert_eq!(healthz_url("https://kas.example.com/", false), "https://kas.example.com/healthz");
    }
}
