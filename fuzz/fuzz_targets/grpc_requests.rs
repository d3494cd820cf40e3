//! Fuzzes the gRPC request messages kas decodes from agents (ReconcileProjects, Register,
//! GetConfiguration, the reverse tunnel, GitLab access) and from GitLab (GitPushEvent,
//! GetConnectedAgents). Every input is decoded as each of them, as tonic's prost codec does, and
//! run through the check its handler runs. Invariants: no panic; what decodes re-encodes to at
//! most twice the input (a varint may grow from 5 to 10 bytes) and decodes back to itself; a
//! validated GitPushEvent has a positive id and a non-empty ASCII path; a validated
//! ReconcileProjects holds at most 10,000 non-empty ids.
#![no_main]

use std::fmt::Debug;

use kas::grpc::validate;
use kas::proto::agent_configuration::rpc::ConfigurationRequest;
use kas::proto::agent_registrar::rpc::RegisterRequest;
use kas::proto::agent_tracker::rpc::GetConnectedAgentsRequest;
use kas::proto::flux::rpc::ReconcileProjectsRequest;
use kas::proto::gitlab_access::rpc::HttpRequest;
use kas::proto::notifications::rpc::GitPushEventRequest;
use kas::proto::reverse_tunnel::rpc::ConnectRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes `data` as `M`; checks the size bound and the round trip.
fn decode<M: Message + Default + PartialEq + Debug>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let encoded = message.encode_to_vec();
    assert!(encoded.len() <= 2 * data.len(), "{} bytes decoded to a message of {}", data.len(), encoded.len());
    assert_eq!(M::decode(encoded.as_slice()).expect("re-encoded message decodes"), message);
    Some(message)
}

fuzz_target!(|data: &[u8]| {
    if let Some(request) = decode::<ReconcileProjectsRequest>(data)
        && let Ok(ids) = validate::reconcile_projects(&request, 10_000, 2 << 20)
    {
        assert!(ids.len() <= 10_000);
        assert!(ids.iter().all(|id| !id.is_empty() && id.len() <= 4096));
        assert!(ids.iter().eq(request.project.iter().map(|p| &p.id)));
    }
    if let Some(request) = decode::<GitPushEventRequest>(data)
        && let Ok(push) = validate::git_push_event(&request)
    {
        assert!(push.project_id > 0);
        let path = push.project_path.as_str();
        assert!(!path.is_empty() && path.is_ascii(), "{path:?}");
    }
    decode::<RegisterRequest>(data);
    decode::<ConfigurationRequest>(data);
    decode::<GetConnectedAgentsRequest>(data);
    decode::<ConnectRequest>(data);
    decode::<HttpRequest>(data);
});
