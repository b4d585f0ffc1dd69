//! Shared helpers for Pagoda's integration tests.
