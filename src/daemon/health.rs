//! Readiness for load balancers (`GET /healthz` on the HTTP endpoint): ready when the
//! listeners are bound and every dependency a new login needs answers, not ready (with the
//! reason) otherwise, and draining from the moment a stop begins, so balancers send new
//! clients elsewhere while logged-in sessions finish their grace period.
//!
//! The dependency checks are [`Probe::probe`]; their result is cached for [`CACHE_FOR`]
//! and computed by one request at a time, so a balancer polling every second (or several
//! balancers) cost the directory one cheap check every few seconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// How long a probe's result is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(3);

/// Longest time one probe may take; longer counts as not ready.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Ready for new clients.
    Ready,
    /// Not ready, and why.
    NotReady(String),
    /// Stopping: logged-in sessions finish, new clients must go elsewhere.
    Draining,
}

impl Health {
    /// Whether the answer is a success (HTTP 200).
    pub fn is_ready(&self) -> bool {
        *self == Health::Ready
    }

    /// The answer's body.
    pub fn body(&self) -> String {
        match self {
            Health::Ready => "ready\n".to_owned(),
            Health::NotReady(why) => format!("not ready: {why}\n"),
            Health::Draining => "draining\n".to_owned(),
        }
    }
}

/// A boxed probe future.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The dependencies a new login needs, checked cheaply.
pub trait Probe: Send + Sync {
    /// `Ok` when every dependency answers, else what does not, e.g. `directory: ...`.
    fn probe(&self) -> ProbeFuture<'_>;
}

impl Probe for State {
    /// The directory answers (the file directory always does), and the shared store of
    /// `[state] backend` answers where logins need it (`on_store_down = "closed"`; with
    /// `"open"` local counters stand in, and taking every instance out of the balancer for a
    /// store outage would turn it into a mail outage).
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            let directory = self.directory();
            directory.reachable().await.map_err(|e| format!("directory: {e}"))?;
            if !self.counters.serves_logins() {
                return Err("state store: down, and on_store_down = \"closed\"".to_owned());
            }
            Ok(())
        })
    }
}

/// The readiness answer of one running daemon.
pub struct Readiness {
    probe: Box<dyn Probe>,
    draining: CancellationToken,
    listening: AtomicBool,
    cache: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    /// Readiness checked with `probe`, draining once `draining` is cancelled (the
    /// daemon's `stop_accepting`). Not ready until [`Readiness::set_listening`].
    pub fn new(probe: Box<dyn Probe>, draining: CancellationToken) -> Self {
        Self { probe, draining, listening: AtomicBool::new(false), cache: tokio::sync::Mutex::new(None) }
    }

    /// Marks the listeners as bound and accepting.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Relaxed);
    }

    /// The answer now: draining as soon as a stop began, otherwise the (cached) probe.
    pub async fn check(&self) -> Health {
        if self.draining.is_cancelled() {
            return Health::Draining;
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Health::NotReady("listeners not started".to_owned());
        }
        let result = {
            // One probe at a time; requests meanwhile wait for its result.
            let mut cache = self.cache.lock().await;
            match cache.as_ref() {
                Some((at, result)) if at.elapsed() < CACHE_FOR => result.clone(),
                _ => {
                    let result = match tokio::time::timeout(PROBE_TIMEOUT, self.probe.probe()).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("dependency checks took over {} s", PROBE_TIMEOUT.as_secs())),
                    };
                    *cache = Some((Instant::now(), result.clone()));
                    result
                }
            }
        };
        if self.draining.is_cancelled() {
            return Health::Draining;
        }
        match result {
            Ok(()) => Health::Ready,
            Err(why) => Health::NotReady(why),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A probe answering what the test sets, counting its calls.
    #[derive(Default)]
    pub(crate) struct FakeProbe {
        pub(crate) calls: AtomicUsize,
        pub(crate) answer: Mutex<Option<String>>,
    }

    impl Probe for Arc<FakeProbe> {
        fn probe(&self) -> ProbeFuture<'_> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer.lock().unwrap().clone();
            Box::pin(async move {
                match answer {
                    None => Ok(()),
                    Some(why) if why == "hang" => std::future::pending().await,
                    Some(why) => Err(why),
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ready_results_are_cached_and_draining_wins() {
        let probe = Arc::new(FakeProbe::default());
        let draining = CancellationToken::new();
        let readiness = Readiness::new(Box::new(probe.clone()), draining.clone());
        assert_eq!(readiness.check().await, Health::NotReady("listeners not started".into()));
        readiness.set_listening();
        assert_eq!(readiness.check().await, Health::Ready);
        *probe.answer.lock().unwrap() = Some("directory: down".into());
        for _ in 0..5 {
            assert_eq!(readiness.check().await, Health::Ready, "cached");
        }
        assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(CACHE_FOR).await;
        let health = readiness.check().await;
        assert_eq!(health, Health::NotReady("directory: down".into()));
        assert_eq!(health.body(), "not ready: directory: down\n");
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
        draining.cancel();
        assert_eq!(readiness.check().await, Health::Draining);
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2, "draining needs no probe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_probe_is_not_ready_after_the_probe_timeout() {
        let probe = Arc::new(FakeProbe::default());
        *probe.answer.lock().unwrap() = Some("hang".into());
        let readiness = Readiness::new(Box::new(probe.clone()), CancellationToken::new());
        readiness.set_listening();
        let health = readiness.check().await;
        assert!(matches!(&health, Health::NotReady(why) if why.contains("took over")), "{health:?}");
        assert!(!health.is_ready());
    }
}
