//! The wire contract with the router (SPEC §3): assignments in, acks and
//! results out, and the error codes that connect them. Pure data and
//! validation: no I/O, no threads.

mod ack;
mod assignment;
mod error_code;
mod fast_intake;
mod ids;
mod json;
mod result;
mod scan;
mod secret;

pub use ack::{Ack, AckStatus};
pub use assignment::{
    Assignment, Correlation, EnvelopeIds, IntakeRules, JobType, PoolKind, RejectReason, Rejection,
    RetryOptions, parse_assignment, validate_assignment,
};
pub use error_code::{ErrorCode, Status};
pub use ids::{is_trace_id, is_ulid, is_uuid};
pub use json::{Checked, from_slice_unique};
pub use result::{ExecResult, JobRef, Outcome, StepStats};
pub(crate) use scan::find_string_stop;
pub use secret::is_secret_key;
