//! The per-connection token bucket: every frame costs a token; an empty bucket is RATE_LIMITED.
//!
//! It lives in memory beside the connection (the local gateway's socket
//! task, or a Lambda instance's map keyed by connection id), so keeping it
//! costs no database write per frame.

use std::time::Instant;

/// Bucket size and refill rate; the protocol's defaults are 50 and 20 a second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub capacity: f64,
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { capacity: 50.0, per_second: 20.0 }
    }
}

#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        Self { limit, tokens: limit.capacity, updated: Instant::now() }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    /// Whether the bucket has refilled to capacity by `now`: it is then no
    /// different from a new one, so a holder of many may forget it.
    pub fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.limit.per_second >= self.limit.capacity
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(self.limit.capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_past_capacity_is_refused_until_the_bucket_refills() {
        let mut bucket = TokenBucket::new(RateLimit { capacity: 3.0, per_second: 2.0 });
        let start = bucket.updated;
        assert!((0..3).all(|_| bucket.take_at(start)));
        assert!(!bucket.take_at(start));
        assert!(!bucket.take_at(start + Duration::from_millis(400)));
        assert!(bucket.take_at(start + Duration::from_millis(600)));
        // Refill stops at capacity however long the bucket sat idle.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.take_at(later)));
        assert!(!bucket.take_at(later));
    }

    #[test]
    fn a_bucket_is_full_again_once_it_has_refilled_to_capacity() {
        let mut bucket = TokenBucket::new(RateLimit { capacity: 3.0, per_second: 2.0 });
        let start = bucket.updated;
        assert!(bucket.is_full_at(start), "a new bucket");
        assert!(bucket.take_at(start) && bucket.take_at(start));
        assert!(!bucket.is_full_at(start + Duration::from_millis(900)));
        assert!(bucket.is_full_at(start + Duration::from_secs(1)), "two tokens back at 2 a second");
    }
}
