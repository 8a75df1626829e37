//! A node-wide byte-rate limit, shared by every transfer in and out.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket. `None` rate: unlimited, and `acquire` returns at once.
pub struct RateLimiter {
    rate: Option<u64>,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `bytes_per_sec`: `None` or 0 for unlimited.
    pub fn new(bytes_per_sec: Option<u64>) -> RateLimiter {
        let rate = bytes_per_sec.filter(|&r| r > 0);
        RateLimiter { rate, state: Mutex::new(Bucket { tokens: 0.0, last: Instant::now() }) }
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Waits until `bytes` may pass. Bursts are capped at a tenth of a second
    /// of traffic (at least 64 KiB), so the limit holds over short windows.
    ///
    /// # Cancel safety
    /// Cancel safe: tokens are taken only when the call returns; a dropped
    /// call takes nothing.
    pub async fn acquire(&self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let burst = (rate as f64 / 10.0).max(65536.0);
        let mut waited: Option<Instant> = None;
        loop {
            let wait = {
                let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let refill = now.duration_since(bucket.last).as_secs_f64() * rate as f64;
                bucket.tokens = (bucket.tokens + refill).min(burst);
                bucket.last = now;
                // A request larger than the burst passes once the bucket is
                // full, going into debt that later requests pay back.
                let need = (bytes as f64).min(burst);
                if bucket.tokens >= need {
                    bucket.tokens -= bytes as f64;
                    if let Some(since) = waited {
                        let metrics = crate::metrics::global();
                        metrics.rate_limit_waits.inc();
                        metrics.rate_limit_wait_seconds.inc_by(since.elapsed().as_secs_f64());
                    }
                    return;
                }
                Duration::from_secs_f64((need - bucket.tokens) / rate as f64)
            };
            waited.get_or_insert_with(Instant::now);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate() {
        let limiter = RateLimiter::new(Some(1_000_000));
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            limiter.acquire(100_000).await;
        }
        // 2 MB at 1 MB/s: about 2 s (the first burst is free of waiting).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1800) && took <= Duration::from_millis(2200), "{took:?}");
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let limiter = RateLimiter::new(None);
        for _ in 0..1000 {
            limiter.acquire(u64::MAX / 2).await;
        }
        assert_eq!(RateLimiter::new(Some(0)).rate(), None);
    }
}
