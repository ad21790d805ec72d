//! What the fleet and each container cost: a container's share of its VM, and the fleet's
//! spend per UTC day.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const MS_PER_HOUR: f64 = 3_600_000.0;
const MS_PER_DAY: i64 = 86_400_000;

/// A container's cost: its VM's hourly price over its run, each moment shared equally with
/// the other containers on that VM then. `others` are their runs as `(start, end)` in Unix
/// ms (`None`: still running); only the parts inside `[start, end)` count.
pub fn container_cost(
    price_per_hour: f64,
    start_ms: i64,
    end_ms: i64,
    others: &[(i64, Option<i64>)],
) -> f64 {
    if end_ms <= start_ms || price_per_hour <= 0.0 {
        return 0.0;
    }
    let clip = |t: i64| t.clamp(start_ms, end_ms);
    let mut edges: Vec<i64> = vec![start_ms, end_ms];
    for &(s, e) in others {
        edges.push(clip(s));
        edges.push(clip(e.unwrap_or(end_ms)));
    }
    edges.sort_unstable();
    edges.dedup();
    edges
        .windows(2)
        .map(|w| {
            let (from, to) = (w[0], w[1]);
            let sharing = 1 + others
                .iter()
                .filter(|(s, e)| *s <= from && e.is_none_or(|e| e >= to))
                .count();
            price_per_hour * ((to as f64 - from as f64) / MS_PER_HOUR) / sharing as f64
        })
        .sum()
}

/// The fleet's spend on the current UTC day: the hourly price integrated over time, kept in
/// the state directory so a restart the same day goes on from it. Times come from the caller
/// (Unix ms), so tests pass any clock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpendMeter {
    /// Days since the Unix epoch (UTC) that `spent` belongs to.
    day: i64,
    /// Dollars spent on `day` up to `at_ms`.
    spent: f64,
    at_ms: i64,
    /// The fleet's $/h since `at_ms`.
    price_per_hour: f64,
}

/// What the API and the page show of spend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    /// The fleet's price now, $/h (every instance, booting and being created included).
    pub hourly_price: f64,
    /// Dollars spent since 00:00 UTC, as far as this dispatcher saw the fleet.
    pub spent_today: f64,
    /// `limits.max_hourly_spend`, when set.
    pub max_hourly_spend: Option<f64>,
}

impl SpendMeter {
    pub fn new(now_ms: i64) -> Self {
        SpendMeter {
            day: now_ms.div_euclid(MS_PER_DAY),
            at_ms: now_ms,
            ..SpendMeter::default()
        }
    }

    /// The meter saved in `path`, or a new one. Time the dispatcher did not run is not
    /// counted (it did not see what the fleet was then).
    pub fn load(path: &Path, now_ms: i64) -> Self {
        let saved: Option<SpendMeter> = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match saved {
            Some(m) if m.day == now_ms.div_euclid(MS_PER_DAY) && m.spent.is_finite() => {
                SpendMeter {
                    at_ms: now_ms,
                    price_per_hour: 0.0,
                    ..m
                }
            }
            _ => SpendMeter::new(now_ms),
        }
    }

    /// Counts the time since the last call at the price then, and takes `price_per_hour` from
    /// now on. A new UTC day starts from 0.
    pub fn accrue(&mut self, now_ms: i64, price_per_hour: f64) {
        let today = now_ms.div_euclid(MS_PER_DAY);
        if today != self.day {
            // Only the part of the interval inside today counts toward today.
            self.at_ms = self.at_ms.max(today * MS_PER_DAY);
            self.day = today;
            self.spent = 0.0;
        }
        if now_ms > self.at_ms {
            self.spent += self.price_per_hour * ((now_ms as f64 - self.at_ms as f64) / MS_PER_HOUR);
            self.at_ms = now_ms;
        }
        self.price_per_hour = price_per_hour.max(0.0);
    }

    /// Spend as of `now_ms`, without changing the meter.
    pub fn spend(&self, now_ms: i64, max_hourly_spend: Option<f64>) -> Spend {
        let mut at_now = self.clone();
        at_now.accrue(now_ms, self.price_per_hour);
        Spend {
            hourly_price: self.price_per_hour,
            spent_today: at_now.spent,
            max_hourly_spend,
        }
    }

    /// Writes the meter (0600, replaced whole) for a restart the same day.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp: PathBuf = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_container_alone_pays_its_vm_for_its_run() {
        assert!(close(container_cost(0.5, 0, 2 * HOUR, &[]), 1.0));
        assert!(close(container_cost(0.5, 10, 10, &[]), 0.0));
    }

    #[test]
    fn times_from_a_vm_cannot_overflow_the_sum() {
        let cost = container_cost(1.0, i64::MIN, i64::MAX, &[(i64::MIN, None)]);
        assert!(cost.is_finite() && cost > 0.0);
    }

    #[test]
    fn sharing_splits_each_moment_among_the_containers_then() {
        // First hour shared with one other, second hour alone: 0.5/2 + 0.5.
        let cost = container_cost(1.0, 0, 2 * HOUR, &[(-HOUR, Some(HOUR))]);
        assert!(close(cost, 1.5), "{cost}");
        // A neighbour still running shares the whole run; one before or after shares nothing.
        let cost = container_cost(1.0, 0, HOUR, &[(0, None), (-5 * HOUR, Some(0))]);
        assert!(close(cost, 0.5), "{cost}");
        // Three at once for half the run.
        let cost = container_cost(1.2, 0, 2 * HOUR, &[(HOUR, Some(3 * HOUR)), (HOUR, None)]);
        assert!(close(cost, 1.2 + 1.2 / 3.0), "{cost}");
    }

    #[test]
    fn the_meter_integrates_the_price_and_restarts_each_utc_day() {
        let day = 20_000 * MS_PER_DAY;
        let mut m = SpendMeter::new(day);
        m.accrue(day, 2.0);
        m.accrue(day + HOUR, 4.0);
        assert!(close(m.spend(day + HOUR, None).spent_today, 2.0));
        assert!(close(m.spend(day + 2 * HOUR, None).spent_today, 6.0));
        // Across midnight only the new day's part counts.
        let next = day + MS_PER_DAY;
        m.accrue(next + HOUR / 2, 4.0);
        let spend = m.spend(next + HOUR / 2, Some(10.0));
        assert!(close(spend.spent_today, 2.0), "{spend:?}");
        assert_eq!(spend.max_hourly_spend, Some(10.0));
        assert!(close(spend.hourly_price, 4.0));
    }

    #[test]
    fn a_restart_the_same_day_goes_on_from_the_saved_spend() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("spend.json");
        let day = 20_000 * MS_PER_DAY;
        let mut m = SpendMeter::new(day);
        m.accrue(day, 1.0);
        m.accrue(day + HOUR, 1.0);
        m.save(&path).expect("save");
        let loaded = SpendMeter::load(&path, day + 3 * HOUR);
        // The two hours it was down are not counted; the hour before is.
        assert!(close(loaded.spend(day + 3 * HOUR, None).spent_today, 1.0));
        let next_day = SpendMeter::load(&path, day + MS_PER_DAY + 1);
        assert!(close(
            next_day.spend(day + MS_PER_DAY + 1, None).spent_today,
            0.0
        ));
    }
}
