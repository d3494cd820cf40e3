//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed on the build machine), and
//! records the git ref kas is built from (`KAS_GIT_REF`, reported to GitLab by `GetServerInfo`).

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "gitlab/agent/flux.proto",
        "gitlab/agent/notifications.proto",
        "gitlab/agent/agent_configuration.proto",
        "gitlab/agent/agent_registrar.proto",
        "gitlab/agent/agent_tracker_rpc.proto",
        "gitlab/agent/reverse_tunnel.proto",
        "gitlab/agent/gitlab_access.proto",
        "gitlab/agent/kubernetes_api.proto",
        "gitlab/agent/server_info.proto",
        "gitlab/agent/configuration_project.proto",
        "gitlab/agent/entity.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // ReverseTunnel has an RPC named Connect, which collides with the generated
        // `connect` constructor; clients are built from a Channel instead.
        .build_transport(false)
        .include_file("gitlab.rs")
        // Small buffers: see src/grpc/codec.rs.
        .codec_path("crate::grpc::codec::LeanCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    git_ref();
    Ok(())
}

/// Sets `KAS_GIT_REF`: the environment's value when given (builds without a checkout, e.g. a
/// container build), else the checked-out commit, else "unknown". Never fails the build.
fn git_ref() {
    println!("cargo:rerun-if-env-changed=KAS_GIT_REF");
    let from_env = std::env::var("KAS_GIT_REF").ok().filter(|v| !v.trim().is_empty());
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let value = from_env.or_else(|| git(&["rev-parse", "HEAD"])).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KAS_GIT_REF={value}");
    // Rebuild when the checkout moves: HEAD, and the branch it points to.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) {
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]).map(PathBuf::from);
            let base = common.unwrap_or(dir);
            let path = base.join(&branch);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
