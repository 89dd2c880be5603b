//! The budget of bytes all connections may buffer before login, together.
//!
//! Each session holds a [`Claim`] sized to what its pre-login input buffer and pending
//! literals take beyond a small free allowance. Growing a claim past the budget fails (the
//! session then refuses the literal or closes); shrinking always succeeds, and a dropped
//! claim gives everything back.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The shared budget: a limit and what all claims hold now.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes, none of them claimed.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0) })
    }

    /// The budget, bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes claimed now, all claims together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty claim on this budget.
    pub fn claim(self: &Arc<Self>) -> Claim {
        Claim { budget: Arc::clone(self), held: 0 }
    }
}

/// One session's share of the [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Claim {
    budget: Arc<Budget>,
    held: usize,
}

impl Claim {
    /// Bytes this claim holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Makes the claim `bytes` large. Growing fails, leaving the claim as it was, when the
    /// budget has not that much left; shrinking always succeeds.
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            self.budget.used.fetch_sub(self.held - bytes, Ordering::Relaxed);
            self.held = bytes;
            return true;
        }
        let more = bytes - self.held;
        let limit = self.budget.limit;
        let grown = self.budget.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
            used.checked_add(more).filter(|&total| total <= limit)
        });
        if grown.is_ok() {
            self.held = bytes;
        }
        grown.is_ok()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_share_the_budget_and_give_it_back() {
        let budget = Budget::new(100);
        let mut a = budget.claim();
        let mut b = budget.claim();
        assert!(a.resize(60));
        assert!(!b.resize(41), "beyond the budget");
        assert_eq!((b.held(), budget.used()), (0, 60), "a failed claim takes nothing");
        assert!(b.resize(40));
        assert!(!a.resize(61));
        assert!(a.resize(10), "shrinking always works");
        assert_eq!(budget.used(), 50);
        assert!(b.resize(90));
        drop(b);
        assert_eq!(budget.used(), 10);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_huge_claim_fails_without_overflow() {
        let budget = Budget::new(100);
        let mut a = budget.claim();
        assert!(a.resize(50));
        assert!(!budget.claim().resize(usize::MAX));
        assert_eq!(budget.used(), 50);
    }
}
