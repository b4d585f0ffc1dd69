//! `--api-key`: every route, `/metrics` and `/v1/telemetry` included, wants
//! `Authorization: Bearer KEY`. The key is compared in constant time (the
//! SHA-256 digests of both, so not even the length leaks).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::server::error::ApiError;

/// The expected key, kept as its digest.
#[derive(Debug, Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// A key to check against.
    pub fn new(key: &str) -> Self {
        ApiKey {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Whether `given` is the key (constant time in its content).
    pub fn matches(&self, given: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

/// The middleware: a 401 without the right bearer token.
pub async fn require_key(State(key): State<Arc<ApiKey>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::unauthorized(
            "no API key: send the header `Authorization: Bearer KEY` (the server runs with --api-key)",
        )
        .into_response(),
        Some(k) if !key.matches(k.trim()) => {
            ApiError::unauthorized("the API key is not the one this server was started with")
                .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_key_matches() {
        let k = ApiKey::new("secret");
        assert!(k.matches("secret"));
        assert!(!k.matches("secreT"));
        assert!(!k.matches(""));
        assert!(!k.matches("secret-and-more"));
    }
}
