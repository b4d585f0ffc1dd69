//! The viewer's integration tests, one binary (one link): snapshots of
//! every view from every fixture trace, the numbers shown against the
//! trace's, the real binary under Xvfb, and the frame-time benchmark.

mod common;
mod frame_time;
mod replay_numbers;
mod smoke;
mod snapshots;
