//! A growing back-off for throttled cloud calls, for drivers to share.

use std::sync::Mutex;
use std::time::Duration;

/// Growing back-off for one kind of call: 1.5 × previous + 1 s, between 1 s and 60 s, reset by
/// any answer that is not a throttle.
#[derive(Debug, Default)]
pub struct Backoff {
    delay: Mutex<Duration>,
}

impl Backoff {
    /// Records a throttle and returns how long to hold off.
    pub fn throttled(&self) -> Duration {
        let mut d = self.delay.lock().unwrap_or_else(|p| p.into_inner());
        let next = (d.mul_f64(1.5) + Duration::from_secs(1))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        *d = next;
        next
    }

    pub fn reset(&self) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_a_minute_and_resets() {
        let b = Backoff::default();
        let first = b.throttled();
        let second = b.throttled();
        assert_eq!(first, Duration::from_secs(1));
        assert!(second > first);
        for _ in 0..20 {
            b.throttled();
        }
        assert_eq!(b.throttled(), Duration::from_secs(60));
        b.reset();
        assert_eq!(b.throttled(), Duration::from_secs(1));
    }
}
