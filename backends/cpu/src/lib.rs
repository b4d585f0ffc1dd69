//! Pagoda's CPU backend.
#![deny(missing_docs)]
