//! The worker state machine (reference §1.4), as pure functions of a worker's facts and the
//! time, so the table below is tested row by row.
//!
//! | from            | idle behaviour | event / condition                                   | to / effect |
//! |-----------------|----------------|-----------------------------------------------------|-------------|
//! | —               | —              | listed, not created by this process                 | unknown |
//! | —               | —              | created by this process                             | booting |
//! | unknown/booting | any            | boot probe ok, runner deployed, run probe ok        | idle, or running if runners are listed |
//! | unknown         | any            | boot probe fails but run probe lists runners        | unknown (runners tracked) |
//! | unknown/booting | not hold       | no successful probe for `booting` since appearing   | shutdown |
//! | booting         | drain          | —                                                   | shutdown |
//! | idle            | run            | nothing ran for `idle`                              | shutdown |
//! | idle            | drain          | —                                                   | shutdown |
//! | idle/running    | not hold       | no successful probe or event-stream line for `probe` | shutdown |
//! | idle            | —              | a container starts, or a probe lists runners        | running |
//! | running         | —              | a probe lists no runners                            | idle (idle clock starts) |
//! | running         | drain          | every runner ignored SIGTERM for `term`             | shutdown |
//! | any             | run            | run probe reports `broken`, or SIGTERM ignored      | behaviour → drain |
//! | any             | —              | management `kill`                                   | shutdown |
//! | shutdown        | —              | still listed `shutdown` after destroy               | destroy again |
//! | any             | —              | missing from two cloud listings in a row            | removed |

use std::time::Duration;

use tokio::time::Instant;

pub use crate::scheduler::WorkerStatus;

/// Stored in the VM's tags so it survives restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleBehavior {
    /// Normal: takes work, shut down when idle too long.
    Run,
    /// Takes no new work and is never shut down automatically.
    Hold,
    /// Takes no new work; shut down as soon as nothing runs.
    Drain,
}

impl IdleBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            IdleBehavior::Run => "run",
            IdleBehavior::Hold => "hold",
            IdleBehavior::Drain => "drain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "run" => Some(IdleBehavior::Run),
            "hold" => Some(IdleBehavior::Hold),
            "drain" => Some(IdleBehavior::Drain),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub booting: Duration,
    pub probe: Duration,
}

/// What the state machine looks at.
#[derive(Clone, Debug)]
pub struct Facts {
    pub status: WorkerStatus,
    pub behavior: IdleBehavior,
    pub appeared_at: Instant,
    pub last_probe_ok: Option<Instant>,
    /// Last moment a container ran (or the worker booted).
    pub busy_at: Instant,
    pub runners: usize,
    /// Every remaining runner ignored SIGTERM past the TERM timeout.
    pub all_runners_gave_up: bool,
}

/// The reason a VM that never booted in time is shut down.
pub const BOOT_TIMEOUT: &str = "boot timeout";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Shutdown(&'static str),
}

/// Whether the worker should go now.
pub fn decide(f: &Facts, now: Instant, t: &Timeouts) -> Option<Decision> {
    let since = |at: Instant| now.saturating_duration_since(at);
    let hold = f.behavior == IdleBehavior::Hold;
    match f.status {
        WorkerStatus::Shutdown => None,
        WorkerStatus::Unknown | WorkerStatus::Booting => {
            if !hold && since(f.last_probe_ok.unwrap_or(f.appeared_at)) >= t.booting {
                Some(Decision::Shutdown(BOOT_TIMEOUT))
            } else if f.status == WorkerStatus::Booting && f.behavior == IdleBehavior::Drain {
                Some(Decision::Shutdown("drained while booting"))
            } else {
                None
            }
        }
        WorkerStatus::Idle | WorkerStatus::Running => {
            if !hold && f.last_probe_ok.is_some_and(|ok| since(ok) >= t.probe) {
                Some(Decision::Shutdown("probe timeout"))
            } else if f.status == WorkerStatus::Idle && f.runners == 0 {
                match f.behavior {
                    IdleBehavior::Drain => Some(Decision::Shutdown("drained")),
                    IdleBehavior::Run if since(f.busy_at) >= t.idle => {
                        Some(Decision::Shutdown("idle timeout"))
                    }
                    _ => None,
                }
            } else if f.behavior == IdleBehavior::Drain && f.runners > 0 && f.all_runners_gave_up {
                Some(Decision::Shutdown("runners ignored SIGTERM"))
            } else {
                None
            }
        }
    }
}

/// The status after a successful probe that listed `runners`; `booted` says whether the boot
/// probe (and runner deployment) passed.
pub fn after_probe(status: &WorkerStatus, booted: bool, runners: usize) -> WorkerStatus {
    match status {
        WorkerStatus::Shutdown => WorkerStatus::Shutdown,
        WorkerStatus::Unknown | WorkerStatus::Booting if !booted => status.clone(),
        _ if runners > 0 => WorkerStatus::Running,
        _ => WorkerStatus::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        booting: Duration::from_secs(600),
        probe: Duration::from_secs(600),
    };

    /// One row: status, behaviour, seconds since appearing, since last ok probe, since busy,
    /// runners, gave up → expected decision.
    type Row = (
        WorkerStatus,
        IdleBehavior,
        u64,
        Option<u64>,
        u64,
        usize,
        bool,
        Option<&'static str>,
    );

    fn check(rows: &[Row]) {
        let base = Instant::now();
        let now = base + Duration::from_secs(10_000);
        for (i, (status, behavior, appeared, ok, busy, runners, gave_up, expected)) in
            rows.iter().enumerate()
        {
            let facts = Facts {
                status: status.clone(),
                behavior: *behavior,
                appeared_at: now - Duration::from_secs(*appeared),
                last_probe_ok: ok.map(|s| now - Duration::from_secs(s)),
                busy_at: now - Duration::from_secs(*busy),
                runners: *runners,
                all_runners_gave_up: *gave_up,
            };
            let got = decide(&facts, now, &T).map(|Decision::Shutdown(r)| r);
            assert_eq!(got, *expected, "row {i}: {facts:?}");
        }
    }

    #[test]
    fn state_table() {
        use IdleBehavior::*;
        use WorkerStatus::*;
        check(&[
            (Unknown, Run, 10, None, 10, 0, false, None),
            (Unknown, Run, 600, None, 600, 0, false, Some("boot timeout")),
            (Booting, Run, 700, None, 700, 0, false, Some("boot timeout")),
            (Booting, Hold, 700, None, 700, 0, false, None),
            (
                Booting,
                Drain,
                5,
                None,
                5,
                0,
                false,
                Some("drained while booting"),
            ),
            (Idle, Run, 900, Some(1), 59, 0, false, None),
            (Idle, Run, 900, Some(1), 60, 0, false, Some("idle timeout")),
            (Idle, Hold, 900, Some(1), 6000, 0, false, None),
            (Idle, Drain, 900, Some(1), 0, 0, false, Some("drained")),
            (
                Idle,
                Run,
                900,
                Some(600),
                0,
                0,
                false,
                Some("probe timeout"),
            ),
            (Running, Hold, 900, Some(6000), 0, 1, false, None),
            (Running, Run, 900, Some(1), 6000, 2, false, None),
            (Running, Drain, 900, Some(1), 0, 2, false, None),
            (
                Running,
                Drain,
                900,
                Some(1),
                0,
                2,
                true,
                Some("runners ignored SIGTERM"),
            ),
            (Shutdown, Run, 9000, None, 9000, 0, false, None),
        ]);
    }

    #[test]
    fn probes_move_workers_between_idle_and_running() {
        use WorkerStatus::*;
        let rows = [
            (Unknown, false, 0, Unknown),
            (Unknown, false, 2, Unknown),
            (Unknown, true, 0, Idle),
            (Booting, true, 1, Running),
            (Idle, true, 1, Running),
            (Running, true, 0, Idle),
            (Shutdown, true, 1, Shutdown),
        ];
        for (from, booted, runners, to) in rows {
            assert_eq!(
                after_probe(&from, booted, runners),
                to,
                "{from:?} booted={booted} runners={runners}"
            );
        }
    }
}
