//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed on the build machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "gitlab/agent/flux.proto",
        "gitlab/agent/notifications.proto",
        "gitlab/agent/agent_configuration.proto",
        "gitlab/agent/agent_registrar.proto",
        "gitlab/agent/agent_tracker_rpc.proto",
        "gitlab/agent/reverse_tunnel.proto",
        "gitlab/agent/gitlab_access.proto",
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
    Ok(())
}
