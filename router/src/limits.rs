//! Per-key rate limits: requests and tokens per minute, each a bucket that refills evenly
//! over the minute. A request is admitted while its key has a request and a token to spend;
//! the tokens it streams back are spent as they come, so a long answer can run the bucket
//! into debt, which the key's next requests wait out. Pure: every call says when it is.

use std::time::{Duration, Instant};

/// What a key may use; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// A bucket of `capacity` that refills `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Bucket {
            capacity,
            level: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let seconds = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + seconds * self.capacity / 60.0).min(self.capacity);
        self.at = now;
    }

    /// How long until the bucket holds `amount`; zero when it does now.
    fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount - self.level;
        if missing <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing * 60.0 / self.capacity)
    }
}

/// One key's buckets.
#[derive(Debug)]
pub struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Buckets {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Buckets {
            requests: limits.requests_per_minute.map(|n| Bucket::full(n, now)),
            tokens: limits.tokens_per_minute.map(|n| Bucket::full(n, now)),
        }
    }

    /// Takes one request, or says how long until one may go.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
        }
        // Any token debt is paid off first: a request will stream at least one token.
        let wait = [
            self.tokens.as_ref().map(|b| b.wait_for(1.0)),
            self.requests.as_ref().map(|b| b.wait_for(1.0)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(requests) = &mut self.requests {
            requests.level -= 1.0;
        }
        Ok(())
    }

    /// Spends `tokens` streamed back to the key.
    pub fn spend(&mut self, tokens: u64, now: Instant) {
        if let Some(bucket) = &mut self.tokens {
            bucket.refill(now);
            bucket.level -= tokens as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: Option<u32>, tokens: Option<u32>) -> Limits {
        Limits {
            requests_per_minute: requests,
            tokens_per_minute: tokens,
        }
    }

    #[test]
    fn requests_refill_evenly_over_the_minute() {
        let start = Instant::now();
        let mut key = Buckets::new(limits(Some(2), None), start);
        assert_eq!(key.admit(start), Ok(()));
        assert_eq!(key.admit(start), Ok(()));
        // Empty: one request comes back every 30 s.
        assert_eq!(key.admit(start), Err(Duration::from_secs(30)));
        let later = start + Duration::from_secs(20);
        let wait = key.admit(later).unwrap_err();
        assert!(
            wait.abs_diff(Duration::from_secs(10)) < Duration::from_millis(1),
            "{wait:?}"
        );
        assert_eq!(key.admit(start + Duration::from_secs(30)), Ok(()));
        // Never more than the bucket holds, however long the key waits.
        let hour = start + Duration::from_secs(3600);
        assert_eq!((key.admit(hour), key.admit(hour)), (Ok(()), Ok(())));
        assert!(key.admit(hour).is_err());
    }

    #[test]
    fn a_token_debt_is_waited_out() {
        let start = Instant::now();
        let mut key = Buckets::new(limits(None, Some(600)), start);
        assert_eq!(key.admit(start), Ok(()));
        key.spend(900, start);
        // 300 tokens of debt, then one to spend, at 10 per second.
        let wait = key.admit(start).unwrap_err();
        assert!(wait.abs_diff(Duration::from_millis(30_100)) < Duration::from_millis(1));
        assert_eq!(key.admit(start + Duration::from_millis(30_101)), Ok(()));
    }

    #[test]
    fn no_limits_admit_everything() {
        let start = Instant::now();
        let mut key = Buckets::new(Limits::default(), start);
        key.spend(1_000_000, start);
        assert!((0..1000).all(|_| key.admit(start).is_ok()));
    }
}
