//! The fleet's size and the queue's length over the last hour, for the status page's chart.

use std::collections::VecDeque;

use serde::Serialize;

/// Samples are at least this far apart (a later one within it replaces the last).
const SAMPLE_EVERY_MS: i64 = 10_000;
/// Samples older than this are dropped.
const KEEP_MS: i64 = 3_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub instances: usize,
    /// Containers waiting for a place (not on a VM).
    pub waiting: usize,
}

#[derive(Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Adds what is now. The last sample is live: it is replaced until a step has passed
    /// since the one before it, so the chart always ends on the present and holds at most
    /// two samples per step.
    pub fn record(&mut self, sample: Sample) {
        let n = self.samples.len();
        let within_step = n >= 2
            && self
                .samples
                .get(n - 2)
                .is_some_and(|prev| sample.at_ms - prev.at_ms < SAMPLE_EVERY_MS);
        match self.samples.back_mut() {
            Some(last) if within_step => *last = sample,
            _ => self.samples.push_back(sample),
        }
        while self
            .samples
            .front()
            .is_some_and(|s| sample.at_ms - s.at_ms > KEEP_MS)
        {
            self.samples.pop_front();
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: i64, instances: usize) -> Sample {
        Sample {
            at_ms,
            instances,
            waiting: 0,
        }
    }

    #[test]
    fn keeps_one_sample_per_step_and_one_hour() {
        let mut h = History::default();
        h.record(at(0, 1));
        h.record(at(1_000, 2));
        h.record(at(2_000, 3));
        // The first stays (where the line starts); later ones within a step of it replace
        // the live last one.
        assert_eq!(h.samples(), vec![at(0, 1), at(2_000, 3)]);
        h.record(at(13_000, 4));
        assert_eq!(h.samples().len(), 3);
        for i in 2..=400 {
            h.record(at(i * SAMPLE_EVERY_MS, 5));
        }
        let kept = h.samples();
        assert!(kept.len() <= 722, "{}", kept.len());
        let newest = kept.last().expect("newest").at_ms;
        assert!(kept.iter().all(|s| newest - s.at_ms <= KEEP_MS));
    }
}
