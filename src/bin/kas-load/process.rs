//! Servers under test run as child processes (this same binary in a server mode), so their
//! CPU and memory are measured apart from the load generator.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Addresses a child prints on its first stdout line.
#[derive(Debug, Clone, Deserialize)]
pub struct Addrs {
    pub http: SocketAddr,
    #[serde(default = "unset")]
    pub agent: SocketAddr,
}

fn unset() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A running child server.
pub struct ServerProcess {
    child: Child,
    pub addrs: Addrs,
}

/// CPU time and resident memory at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub at: Instant,
    pub cpu_seconds: f64,
    pub rss_kib: u64,
}

impl ServerProcess {
    /// Starts `kas-load <mode> <args…>` and waits for its addresses.
    pub fn spawn(mode: &str, args: &[String], log_dir: &std::path::Path) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let log = log_dir.join(format!("{mode}-{}.log", std::process::id() ^ rand_u32()));
        let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        // KAS_LOAD_WRAP runs the server under another command, e.g. a profiler:
        // KAS_LOAD_WRAP="valgrind --tool=massif --massif-out-file=/tmp/massif.%p".
        let wrap: Vec<String> =
            std::env::var("KAS_LOAD_WRAP").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        let mut command = match wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg(mode)
            .args(args)
            .env("RUST_LOG", std::env::var("KAS_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).map_err(|e| e.to_string())?;
        let addrs: Addrs =
            serde_json::from_str(&line).map_err(|e| format!("{mode} did not start ({e}); see {}", log.display()))?;
        Ok(Self { child, addrs })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Current CPU time and RSS of the child.
    pub fn usage(&self) -> Usage {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Usage { at: Instant::now(), cpu_seconds: ticks / clock_ticks(), rss_kib }
    }

    /// SIGTERM, then wait (killing after 10 s).
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Cores used between two samples.
pub fn cores(a: Usage, b: Usage) -> f64 {
    (b.cpu_seconds - a.cpu_seconds) / b.at.duration_since(a.at).as_secs_f64().max(1e-9)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A random 32-bit number.
pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}
