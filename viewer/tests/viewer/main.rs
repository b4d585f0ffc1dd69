//! The viewer's integration tests, one binary (one link): snapshots of
//! every view from every fixture trace, the numbers shown against the
//! trace's, the real binary under Xvfb, and the frame-time benchmark.

mod attach;
mod common;
mod frame_time;
mod in_process;
mod replay_controls;
mod replay_numbers;
mod smoke;
mod snapshots;
