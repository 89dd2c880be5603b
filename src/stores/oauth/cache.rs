//! Access tokens cached per key (a mailbox, or one key for a tenant-wide token) until
//! shortly before they expire, with at most one request in flight per key.
//!
//! Each key has a slot behind an async mutex. The first login that finds no usable token
//! keeps the lock while it asks the endpoint; logins arriving meanwhile wait and then take
//! the fresh token, or the same error if the request failed, so an outage costs one request
//! per key rather than one per waiting login.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::TokenError;
use super::grant::Issued;
use crate::secret::Secret;

/// A token handed to a login.
#[derive(Debug)]
pub struct Obtained {
    /// The access token.
    pub token: Secret,
    /// Whether it came from the cache (it may then have been revoked since).
    pub from_cache: bool,
    /// A rotated refresh token, only for the login whose request received it.
    pub refresh_token: Option<Secret>,
}

#[derive(Default)]
struct Slot {
    token: Option<Cached>,
    failure: Option<(Instant, TokenError)>,
}

struct Cached {
    token: Secret,
    /// Until then the token is handed out without asking for a new one.
    renew_at: Instant,
    /// When the endpoint said it stops working.
    expires: Instant,
}

/// The cache of one token source.
pub struct TokenCache {
    slots: DashMap<String, Arc<Mutex<Slot>>>,
    margin: Duration,
}

/// A token about to expire is not worth handing out even during an outage.
const LAST_USE_MARGIN: Duration = Duration::from_secs(5);

impl TokenCache {
    /// A cache renewing tokens `margin` before they expire (or at half their lifetime,
    /// whichever comes later).
    pub fn new(margin: Duration) -> Self {
        Self { slots: DashMap::new(), margin }
    }

    /// The token of `key`: the cached one while it is fresh, else a new one from `fetch`.
    /// If `fetch` fails while the cached token still works for a few seconds, that one is
    /// returned instead of the error.
    pub async fn get<F, Fut>(&self, key: &str, fetch: F) -> Result<Obtained, TokenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Issued, TokenError>>,
    {
        let slot = Arc::clone(&self.slots.entry(key.to_owned()).or_default());
        let asked = Instant::now();
        let mut slot = slot.lock().await;
        if let Some(cached) = &slot.token
            && Instant::now() < cached.renew_at
        {
            return Ok(Obtained { token: cached.token.clone(), from_cache: true, refresh_token: None });
        }
        if let Some((failed_at, error)) = &slot.failure
            && *failed_at >= asked
        {
            return Err(error.clone());
        }
        match fetch().await {
            Ok(issued) => {
                let now = Instant::now();
                let margin = self.margin.min(issued.lifetime / 2);
                slot.token = Some(Cached {
                    token: issued.token.clone(),
                    renew_at: now + issued.lifetime - margin,
                    expires: now + issued.lifetime,
                });
                slot.failure = None;
                Ok(Obtained { token: issued.token, from_cache: false, refresh_token: issued.refresh_token })
            }
            Err(error) => {
                slot.failure = Some((Instant::now(), error.clone()));
                match &slot.token {
                    Some(cached) if Instant::now() + LAST_USE_MARGIN < cached.expires => {
                        tracing::warn!(%error, "token renewal failed; using the cached token until it expires");
                        Ok(Obtained { token: cached.token.clone(), from_cache: true, refresh_token: None })
                    }
                    _ => {
                        slot.token = None;
                        Err(error)
                    }
                }
            }
        }
    }

    /// Drops the cached token of `key` if it is `token` (the upstream refused it), so the
    /// next login asks for a new one.
    pub async fn forget(&self, key: &str, token: &Secret) {
        let Some(slot) = self.slots.get(key).map(|s| Arc::clone(&s)) else {
            return;
        };
        let mut slot = slot.lock().await;
        if slot.token.as_ref().is_some_and(|c| c.token.constant_time_eq(token.expose())) {
            slot.token = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::stores::oauth::http::HttpError;

    fn issued(token: &str, secs: u64) -> Issued {
        Issued { token: Secret::new(token), lifetime: Duration::from_secs(secs), refresh_token: None }
    }

    fn outage() -> TokenError {
        TokenError::Unreachable { url: "https://t/".into(), source: HttpError::Connect("refused".into()) }
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_reused_until_the_margin_then_renewed() {
        let cache = TokenCache::new(Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let fetch = || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok(issued(&format!("t{n}"), 3600))
        };
        let first = cache.get("a", fetch).await.unwrap();
        assert_eq!((first.token.expose(), first.from_cache), ("t0", false));
        let again = cache.get("a", fetch).await.unwrap();
        assert_eq!((again.token.expose(), again.from_cache), ("t0", true));
        assert_eq!(cache.get("b", fetch).await.unwrap().token.expose(), "t1");
        tokio::time::advance(Duration::from_secs(3600 - 61)).await;
        assert_eq!(cache.get("a", fetch).await.unwrap().token.expose(), "t0");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get("a", fetch).await.unwrap().token.expose(), "t2");
        cache.forget("a", &Secret::new("t2")).await;
        assert_eq!(cache.get("a", fetch).await.unwrap().token.expose(), "t3");
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_tokens_renew_at_half_their_lifetime() {
        let cache = TokenCache::new(Duration::from_secs(60));
        let calls = AtomicU32::new(0);
        let fetch = || async { Ok(issued(&format!("t{}", calls.fetch_add(1, Ordering::SeqCst)), 10)) };
        cache.get("a", fetch).await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(cache.get("a", fetch).await.unwrap().token.expose(), "t0");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.get("a", fetch).await.unwrap().token.expose(), "t1");
    }

    #[tokio::test]
    async fn concurrent_logins_share_one_request_and_its_failure() {
        let cache = Arc::new(TokenCache::new(Duration::from_secs(60)));
        let calls = Arc::new(AtomicU32::new(0));
        let run = |ok: bool| {
            let tasks: Vec<_> = (0..20)
                .map(|_| {
                    let (cache, calls) = (cache.clone(), calls.clone());
                    tokio::spawn(async move {
                        cache
                            .get("k", || async move {
                                calls.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                if ok { Ok(issued("tok", 3600)) } else { Err(outage()) }
                            })
                            .await
                    })
                })
                .collect();
            async move {
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await.unwrap());
                }
                results
            }
        };
        let failed = run(false).await;
        assert!(failed.iter().all(Result::is_err));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let ok = run(true).await;
        assert!(ok.iter().all(|r| r.as_ref().is_ok_and(|o| o.token.expose() == "tok")));
        assert_eq!(ok.iter().filter(|r| r.as_ref().is_ok_and(|o| !o.from_cache)).count(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_falls_back_to_a_token_that_still_works() {
        let cache = TokenCache::new(Duration::from_secs(60));
        cache.get("a", || async { Ok(issued("old", 100)) }).await.unwrap();
        tokio::time::advance(Duration::from_secs(80)).await;
        let got = cache.get("a", || async { Err(outage()) }).await.unwrap();
        assert_eq!((got.token.expose(), got.from_cache), ("old", true));
        tokio::time::advance(Duration::from_secs(17)).await;
        assert!(cache.get("a", || async { Err(outage()) }).await.is_err());
    }
}
