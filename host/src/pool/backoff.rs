//! Back-off for creates that fail for no reason the cloud named (a driver's `Other`, a panic,
//! a bad parameter): per instance type, 1 s doubling to a cap, reset by a success. Rate limits,
//! quota and capacity have hold-offs of their own in the wrappers.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

pub const FIRST_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(180);

#[derive(Default)]
pub struct CreateBackoff {
    /// Type name → (the current delay, held until, the last error).
    held: HashMap<String, (Duration, Instant, String)>,
}

impl CreateBackoff {
    /// Records a failure; returns the new hold-off.
    pub fn failed(&mut self, type_name: &str, error: &str, now: Instant) -> Duration {
        let delay = match self.held.get(type_name) {
            Some((previous, _, _)) => (*previous * 2).min(MAX_DELAY),
            None => FIRST_DELAY,
        };
        self.held.insert(
            type_name.to_string(),
            (delay, now + delay, error.to_string()),
        );
        delay
    }

    /// Why creates of this type are held, while they are.
    pub fn trouble(&self, type_name: &str, now: Instant) -> Option<String> {
        let (_, until, error) = self.held.get(type_name)?;
        (now < *until).then(|| {
            format!(
                "creating a {type_name} instance failed ({error}); next try in {:.0?}",
                *until - now
            )
        })
    }

    pub fn succeeded(&mut self, type_name: &str) {
        self.held.remove(type_name);
    }

    pub fn held(&self, type_name: &str, now: Instant) -> bool {
        self.held
            .get(type_name)
            .is_some_and(|(_, until, _)| now < *until)
    }

    pub fn next_end(&self, now: Instant) -> Option<Instant> {
        self.held
            .values()
            .map(|(_, t, _)| *t)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_and_reset_on_success() {
        let now = Instant::now();
        let mut b = CreateBackoff::default();
        let delays: Vec<u64> = (0..10)
            .map(|_| b.failed("small", "down", now).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 180, 180]);
        assert!(b.held("small", now) && !b.held("large", now));
        assert!(b.trouble("small", now).is_some_and(|t| t.contains("down")));
        b.succeeded("small");
        assert!(!b.held("small", now));
        assert_eq!(b.failed("small", "down", now), FIRST_DELAY);
    }
}
