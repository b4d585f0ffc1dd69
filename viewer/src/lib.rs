//! Pagoda's viewer: a desktop chat with a live picture of where the
//! device's memory goes while the model talks.
//!
//! Three sources feed one [`timeline::Timeline`] with the engine's
//! telemetry (schema `pagoda-trace/2`, `docs/trace-schema.md`): an engine in
//! this process ([`source::in_process`]), a running `pagoda serve`
//! ([`source::attach`]), a recorded trace ([`source::replay`]). The views
//! ([`views`]) draw from the timeline only, so every source looks the same.
//! [`app::ViewerApp`] is the eframe application; the binary parses flags.
#![deny(missing_docs)]

pub mod app;
pub mod chat;
pub mod dashboard;
pub mod error;
pub mod palette;
pub mod source;
pub mod timeline;
pub mod units;
pub mod views;

pub use error::ViewerError;
