//! The chat panel (in-process source): several conversations at once in
//! tabs, each streaming from the same engine, so three chats started
//! together fill the KV grid and the batch side by side.

pub mod panel;
pub mod session;
pub mod settings;
