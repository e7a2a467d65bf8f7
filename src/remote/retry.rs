//! Bounded retries: transient failures are retried with exponential backoff
//! until a total deadline; then the caller answers its readers with EIO.

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{FetchError, RangeSource};

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total time allowed for one fetch, all attempts included.
    pub deadline: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
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
    let started = Instant::now();
    let mut backoff = policy.first_backoff;
    let mut failed = 0u32;
    loop {
        let remaining = policy.deadline.saturating_sub(started.elapsed());
        let attempt = tokio::time::timeout(remaining, source.fetch(range.clone())).await;
        let err = match attempt {
            Ok(Ok(bytes)) => return Ok(Fetched { bytes, failed_attempts: failed }),
            Ok(Err(e)) => e,
            Err(_) => FetchError::Transient(format!("{}: no answer within the retry deadline", source.describe())),
        };
        failed += 1;
        let elapsed = started.elapsed();
        if !err.is_transient() || elapsed + backoff >= policy.deadline {
            return Err((err, failed));
        }
        tracing::warn!(range = ?range, attempt = failed, error = %err, "fetch failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}
