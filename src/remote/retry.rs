//! Bounded retries: transient failures are retried with exponential backoff
//! until a total deadline; then the caller answers its readers with EIO.

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{FetchError, Parts, RangeSource};

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total time allowed for one fetch, all attempts included.
    pub deadline: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts at most (each bounded by the source's own request timeout).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_attempts: u32::MAX,
        }
    }
}

/// Outcome of a fetch with retries: the bytes, plus how many attempts failed.
pub struct Fetched {
    pub bytes: Bytes,
    pub failed_attempts: u32,
}

pub async fn fetch_with_retry(
    source: &dyn RangeSource,
    range: Range<u64>,
    policy: &RetryPolicy,
) -> Result<Fetched, (FetchError, u32)> {
    let what = format!("{range:?}");
    let (bytes, failed_attempts) = retry(source, policy, &what, || source.fetch(range.clone())).await?;
    Ok(Fetched { bytes, failed_attempts })
}

/// Outcome of a multi-range fetch with retries.
pub struct FetchedMany {
    pub parts: Parts,
    pub failed_attempts: u32,
}

/// [`fetch_with_retry`] for [`RangeSource::fetch_many`]: the whole set is
/// asked again on a transient failure.
pub async fn fetch_many_with_retry(
    source: &dyn RangeSource,
    ranges: Vec<Range<u64>>,
    policy: &RetryPolicy,
) -> Result<FetchedMany, (FetchError, u32)> {
    let what = format!("{} ranges", ranges.len());
    let (parts, failed_attempts) = retry(source, policy, &what, || source.fetch_many(ranges.clone())).await?;
    Ok(FetchedMany { parts, failed_attempts })
}

/// Runs `attempt` until it succeeds, fails permanently, or the policy's
/// attempts or deadline run out; returns the value and the failed attempts.
async fn retry<'a, T>(
    source: &dyn RangeSource,
    policy: &RetryPolicy,
    what: &str,
    mut attempt: impl FnMut() -> BoxFuture<'a, Result<T, FetchError>>,
) -> Result<(T, u32), (FetchError, u32)> {
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    let mut failed = 0u32;
    loop {
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let err = match tokio::time::timeout(remaining, attempt()).await {
            Ok(Ok(value)) => return Ok((value, failed)),
            Ok(Err(e)) => e,
            Err(_) => FetchError::Transient(format!("{}: no answer within the retry deadline", source.describe())),
        };
        failed += 1;
        let elapsed = started.elapsed();
        if !err.is_transient() || failed >= policy.max_attempts || elapsed + backoff >= policy.deadline {
            return Err((err, failed));
        }
        tracing::warn!(what, attempt = failed, error = %err, "fetch failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails the first `failures` fetches with the given kind, then serves zeros.
    struct Flaky {
        failures: u32,
        permanent: bool,
        calls: AtomicU32,
    }

    impl RangeSource for Flaky {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn fetch(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, FetchError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n < self.failures {
                    if self.permanent {
                        Err(FetchError::Permanent("404".into()))
                    } else {
                        Err(FetchError::Transient("500".into()))
                    }
                } else {
                    Ok(Bytes::from(vec![0u8; (range.end - range.start) as usize]))
                }
            })
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn quick(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_millis(deadline_ms),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_attempts: u32::MAX,
        }
    }

    #[tokio::test]
    async fn attempts_are_capped() {
        let src = Flaky { failures: u32::MAX, permanent: false, calls: AtomicU32::new(0) };
        let policy = RetryPolicy { max_attempts: 1, ..quick(5_000) };
        let (_, attempts) = fetch_with_retry(&src, 0..10, &policy).await.err().unwrap();
        assert_eq!(attempts, 1);
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let src = Flaky { failures: 3, permanent: false, calls: AtomicU32::new(0) };
        let got = fetch_with_retry(&src, 0..10, &quick(5_000)).await.ok().unwrap();
        assert_eq!(got.bytes.len(), 10);
        assert_eq!(got.failed_attempts, 3);
        assert_eq!(src.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let src = Flaky { failures: 1, permanent: true, calls: AtomicU32::new(0) };
        let (err, attempts) = fetch_with_retry(&src, 0..10, &quick(5_000)).await.err().unwrap();
        assert!(!err.is_transient());
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn retries_stop_at_the_deadline() {
        let src = Flaky { failures: u32::MAX, permanent: false, calls: AtomicU32::new(0) };
        let started = Instant::now();
        let (err, attempts) = fetch_with_retry(&src, 0..10, &quick(200)).await.err().unwrap();
        assert!(err.is_transient());
        assert!(attempts > 2, "only {attempts} attempts");
        assert!(started.elapsed() < Duration::from_millis(1_000));
    }
}
