//! Fault injection: make the k-th allocation fail.
//!
//! Every pool allocation and every KV page allocation is a *fault site*: it
//! calls [`FaultInjector::check`] first. Sites are numbered from 1 in the order
//! they are reached. With a target `k` set (by [`FaultInjector::fail_at`] or the
//! environment variable `PAGODA_FAULT_ALLOC=k`), the k-th site returns
//! [`BackendError::FaultInjected`] instead of allocating. Clones share one
//! counter, so one injector covers a pool and a block manager together.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{BackendError, Result};

/// Name of the environment variable read by [`FaultInjector::from_env`].
pub const FAULT_ENV: &str = "PAGODA_FAULT_ALLOC";

#[derive(Debug, Default)]
struct Inner {
    /// Number of sites reached so far.
    reached: AtomicU64,
    /// 1-based site to fail; 0 = none.
    target: AtomicU64,
    /// Faults that actually fired.
    fired: AtomicU64,
}

/// A shared counter of allocation sites with an optional site to fail.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    inner: Arc<Inner>,
}

impl FaultInjector {
    /// An injector that never fails.
    pub fn new() -> Self {
        Self::default()
    }

    /// An injector configured from `PAGODA_FAULT_ALLOC` (ignored when unset or
    /// not a positive integer).
    pub fn from_env() -> Self {
        let f = Self::new();
        if let Some(k) = std::env::var(FAULT_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            f.fail_at(k);
        }
        f
    }

    /// Makes the `k`-th site (1-based, counted from now on the shared counter's
    /// absolute numbering) fail. `0` disables injection.
    pub fn fail_at(&self, k: u64) {
        self.inner.target.store(k, Ordering::SeqCst);
    }

    /// Resets the site counter and the fired count (not the target).
    pub fn reset_counter(&self) {
        self.inner.reached.store(0, Ordering::SeqCst);
        self.inner.fired.store(0, Ordering::SeqCst);
    }

    /// Number of sites reached so far.
    pub fn sites_reached(&self) -> u64 {
        self.inner.reached.load(Ordering::SeqCst)
    }

    /// Number of faults that fired.
    pub fn faults_fired(&self) -> u64 {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// Marks one fault site. Fails when this is the target site.
    pub fn check(&self, what: &str) -> Result<()> {
        let site = self.inner.reached.fetch_add(1, Ordering::SeqCst) + 1;
        let target = self.inner.target.load(Ordering::SeqCst);
        if target != 0 && site == target {
            self.inner.fired.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::FaultInjected {
                site,
                what: what.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kth_site_fails_once_and_clones_share_the_counter() {
        let f = FaultInjector::new();
        f.fail_at(3);
        let g = f.clone();
        assert!(f.check("a").is_ok());
        assert!(g.check("b").is_ok());
        let err = f.check("c").unwrap_err();
        assert!(matches!(err, BackendError::FaultInjected { site: 3, .. }));
        assert!(g.check("d").is_ok());
        assert_eq!(f.sites_reached(), 4);
        assert_eq!(g.faults_fired(), 1);
    }
}
