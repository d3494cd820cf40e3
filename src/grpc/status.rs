//! The one place gRPC codes are chosen: `From` impls turning the library's errors into
//! `tonic::Status`, and the metric label that goes with an intake outcome. Handlers use `?`.

use tonic::Status;

use crate::agentcfg::source::ConfigSourceError;
use crate::delivery::{StreamEnd, TooManyStreams};
use crate::engine::{EngineError, TooManyPods};
use crate::identity::IdentityError;
use crate::intake::IntakeError;

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Unauthenticated => Status::unauthenticated(e.to_string()),
            IdentityError::PermissionDenied(m) => Status::permission_denied(m),
            IdentityError::NotFound(m) => Status::not_found(m),
            IdentityError::Unavailable(source) => Status::unavailable(source.to_string()),
        }
    }
}

impl From<ConfigSourceError> for Status {
    fn from(e: ConfigSourceError) -> Self {
        match e {
            ConfigSourceError::NotFound(m) => Status::not_found(m),
            ConfigSourceError::Unavailable(source) => Status::unavailable(source.to_string()),
            ConfigSourceError::Invalid(m) => Status::failed_precondition(m),
        }
    }
}

/// An agent over its stream limit.
impl From<TooManyStreams> for Status {
    fn from(e: TooManyStreams) -> Self {
        tracing::warn!(agent = e.agent, limit = e.limit, "refusing a stream: the agent holds as many as it may");
        Status::resource_exhausted(e.to_string())
    }
}

/// An agent over its pod registration limit.
impl From<TooManyPods> for Status {
    fn from(e: TooManyPods) -> Self {
        tracing::warn!(
            agent = e.agent,
            limit = e.limit,
            "refusing a pod registration: the agent has as many as it may"
        );
        Status::resource_exhausted(e.to_string())
    }
}

/// How a long stream ends when delivery ends it.
impl From<StreamEnd> for Status {
    fn from(end: StreamEnd) -> Self {
        match end {
            StreamEnd::Revoked => Status::unauthenticated("agent token revoked"),
            StreamEnd::Unverified => Status::unavailable("agent token could not be re-checked for too long; reconnect"),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        Status::unavailable(e.to_string())
    }
}

impl From<IntakeError> for Status {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::KeyTooLong => Status::invalid_argument(e.to_string()),
            IntakeError::Unavailable(_) | IntakeError::Timeout | IntakeError::ShuttingDown => {
                Status::unavailable(format!("cannot record the push now: {e}"))
            }
        }
    }
}

/// The `kas_git_push_events_total{result}` label of a failed intake.
pub(crate) fn intake_label(e: &IntakeError) -> &'static str {
    match e {
        IntakeError::KeyTooLong => "invalid",
        IntakeError::Unavailable(_) | IntakeError::Timeout | IntakeError::ShuttingDown => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_refusals_pair_code_and_label() {
        for (e, code, label) in [
            (IntakeError::KeyTooLong, tonic::Code::InvalidArgument, "invalid"),
            (IntakeError::Timeout, tonic::Code::Unavailable, "unavailable"),
            (IntakeError::ShuttingDown, tonic::Code::Unavailable, "unavailable"),
        ] {
            let got = intake_label(&e);
            assert_eq!((Status::from(e).code(), got), (code, label));
        }
    }

    #[test]
    fn unavailable_sources_keep_their_message() {
        let status = Status::from(IdentityError::Unavailable("the agent's token is no longer known".into()));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "the agent's token is no longer known");
    }
}
