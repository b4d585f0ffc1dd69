//! `GET /v1/telemetry`: the engine's telemetry as server-sent events, one
//! event per SSE `data:` line in the `--trace` schema (`docs/trace-schema.md`):
//! a keyframe of the memory at once (an idle engine included), then a `step`
//! event every engine step and a memory event after it: deltas (a keyframe
//! again after an event was dropped for this subscriber, and every 50
//! memory events).
//!
//! A bridge thread moves events from the engine's bounded channel to the
//! HTTP stream; the engine never waits for a slow reader (its channel drops
//! events, and the subscriber's next memory event is then a keyframe).
//! The stream ends when the server starts shutting down.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use pagoda::EngineHandle;
use tokio::sync::{mpsc, watch};

use crate::server::error::ApiError;
use crate::server::generation::engine_error;
use crate::server::shutdown::{Phase, reached};

/// Events a telemetry subscriber's engine channel holds before it drops.
pub const CHANNEL_EVENTS: usize = 4096;

/// Subscribes and returns the SSE stream.
pub async fn stream(
    handle: EngineHandle,
    phase: watch::Receiver<Phase>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let h = handle.clone();
    let rx = tokio::task::spawn_blocking(move || h.subscribe_telemetry(CHANNEL_EVENTS, true))
        .await
        .map_err(|e| ApiError::internal(format!("telemetry subscription failed: {e}")))?
        .map_err(engine_error)?;
    let (tx, events) = mpsc::unbounded_channel::<String>();
    std::thread::Builder::new()
        .name("pagoda-telemetry".into())
        .spawn(move || {
            // Ends when the engine stops (the channel closes) or at the first
            // event after the HTTP stream is gone.
            for ev in rx {
                let Ok(line) = serde_json::to_string(&ev) else {
                    continue;
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| ApiError::internal(format!("cannot start the telemetry thread: {e}")))?;
    let s = futures_util::stream::unfold((events, phase), |(mut events, mut phase)| async move {
        tokio::select! {
            line = events.recv() => line.map(|l| (Ok(Event::default().data(l)), (events, phase))),
            _ = reached(&mut phase, Phase::Draining) => None,
        }
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
