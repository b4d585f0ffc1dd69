//! Where the telemetry comes from: an engine in this process, a running
//! `pagoda serve`, or a recorded trace. All three feed the same
//! [`crate::timeline::Timeline`], so every view looks the same whatever the
//! source.

pub mod attach;
pub mod in_process;
pub mod replay;
