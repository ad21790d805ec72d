//! The containers of interest and their states.
//!
//! | from    | event                                  | to        |
//! |---------|----------------------------------------|-----------|
//! | —       | submit                                 | Queued    |
//! | Queued  | scheduler gives it a place on an existing VM, booted or booting (lock_count += 1) | Locked |
//! | Locked  | unlock (stale lock, priority 0, overtaken while over quota) | Queued |
//! | Locked  | runner started on a VM                 | Running   |
//! | Locked/Running | a start that produced no result (`runner start` failed, run vanished with its VM or supervisor) | Queued with dispatch_attempts += 1, or Cancelled once it reaches `max_dispatch_attempts` |
//! | Locked  | runner seen exited (host crashed between start and record) | Complete |
//! | Queued  | a run judged gone turns up running / exited | Running / Complete |
//! | Running | runner exited, result recorded         | Complete  |
//! | any non-final | cancel (user, unsatisfiable)     | Cancelled |
//!
//! Complete and Cancelled are final.

pub mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use sqlite::{now_ms, SqliteQueue};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum ContainerState {
    Queued,
    Locked,
    Running,
    Complete,
    Cancelled,
}

impl ContainerState {
    pub fn is_final(self) -> bool {
        matches!(self, ContainerState::Complete | ContainerState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Queued => "Queued",
            ContainerState::Locked => "Locked",
            ContainerState::Running => "Running",
            ContainerState::Complete => "Complete",
            ContainerState::Cancelled => "Cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ContainerState::Queued,
            ContainerState::Locked,
            ContainerState::Running,
            ContainerState::Complete,
            ContainerState::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// What a container needs from a VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConstraints {
    pub vcpus: u32,
    pub ram_bytes: u64,
    pub scratch_bytes: u64,
    pub gpus: u32,
    pub preemptible: bool,
}

/// A submission.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewContainer {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default = "default_priority")]
    pub priority: i64,
    #[serde(default)]
    pub runtime_constraints: RuntimeConstraints,
}

fn default_priority() -> i64 {
    1
}

impl NewContainer {
    /// What is wrong with this submission, naming the field: what a VM's shell, `env` or the
    /// runner would misread (NUL bytes, keys with `=`, values taken for options) never gets in.
    pub fn problem(&self) -> Option<String> {
        if self.command.is_empty() {
            return Some("command: must not be empty".into());
        }
        if let Some(i) = self.command.iter().position(|a| a.contains('\0')) {
            return Some(format!("command[{i}]: contains a NUL byte"));
        }
        for (key, value) in &self.env {
            if key.is_empty() {
                return Some("env: a key is empty".into());
            }
            if key.contains('=') {
                return Some(format!("env.{key}: a key must not contain '='"));
            }
            if key.contains('\0') || value.contains('\0') {
                return Some(format!(
                    "env.{}: contains a NUL byte",
                    key.replace('\0', "\\0")
                ));
            }
        }
        for (field, value) in [("working_dir", &self.working_dir), ("image", &self.image)] {
            let Some(v) = value else { continue };
            if v.starts_with('-') {
                return Some(format!("{field}: must not start with '-'"));
            }
            if v.contains('\0') {
                return Some(format!("{field}: contains a NUL byte"));
            }
        }
        if self.priority < 0 {
            return Some("priority: must be 0 or more".into());
        }
        None
    }
}

/// A container as the queue stores it; also the API's JSON view.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub state: ContainerState,
    pub priority: i64,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub image: Option<String>,
    pub runtime_constraints: RuntimeConstraints,
    /// Times it was locked (a statistic: a lock is a scheduler decision, not an attempt).
    pub lock_count: u32,
    /// Starts on a VM that produced no result; `max_dispatch_attempts` of them cancel it.
    #[serde(default)]
    pub dispatch_attempts: u32,
    pub instance_type: Option<String>,
    pub instance_id: Option<String>,
    /// Submission order; breaks priority ties so equal-priority work does not flap.
    pub seq: i64,
    pub created_at_ms: i64,
    /// When it started and ended: the VM's own times once the runner reported them.
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// When the host recorded its final state (its end as the queue saw it).
    #[serde(default)]
    pub recorded_at_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub runtime_error: Option<String>,
    /// Directory holding `stdout` and `stderr` once the result is recorded.
    pub log_dir: Option<String>,
    /// Dollars: its VM's price over its run, shared with the containers on that VM at each
    /// moment. Set once it has ended on a VM of a configured type.
    #[serde(default)]
    pub cost: Option<f64>,
    /// Why a waiting container has not started, as the dispatcher saw it at its last pass.
    /// Not stored: the API fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_status: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database {path}: {source}")]
    Database {
        path: String,
        source: rusqlite::Error,
    },
    #[error("no container {0}")]
    NotFound(String),
    #[error("container {id} is {state:?}: {message}")]
    Conflict {
        id: String,
        state: ContainerState,
        message: String,
    },
    #[error("invalid submission: {0}")]
    Invalid(String),
}

/// What `Queue::changes_since` returns.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub rev: i64,
    pub containers: Vec<Container>,
}

/// What a finished run produced, as `complete` records it.
#[derive(Clone, Debug, Default)]
pub struct RunResult<'a> {
    pub exit_code: i32,
    pub runtime_error: Option<&'a str>,
    pub log_dir: &'a str,
    /// When the process started and ended on the VM (Unix ms); when the runner does not
    /// say, the start the host recorded and the moment of recording stand in.
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Its VM's hourly price: the cost is recorded with the result, in one transaction.
    pub price_per_hour: Option<f64>,
}

/// The queue as the scheduler and the API use it. Implemented by [`SqliteQueue`]; later
/// backends (PostgreSQL, the Arvados controller) implement the same trait.
pub trait Queue: Send + Sync {
    fn submit(&self, new: NewContainer) -> Result<Container, QueueError>;
    /// All of them or, when one is refused (the error names its index), none.
    fn submit_many(&self, batch: Vec<NewContainer>) -> Result<Vec<Container>, QueueError>;
    /// Up to `limit` containers older than `before_seq` (all, when `None`), newest first:
    /// the next page starts before the last one's `seq`.
    fn page(&self, limit: usize, before_seq: Option<i64>) -> Result<Vec<Container>, QueueError>;
    fn get(&self, id: &str) -> Result<Container, QueueError>;
    /// Every container, newest first; `active_only` limits it to Queued, Locked and Running
    /// (then in queue order).
    fn list(&self, active_only: bool) -> Result<Vec<Container>, QueueError>;
    /// With `None`, the active containers in queue order; with the revision of an earlier
    /// answer, every container written since (in any state), in queue order. Either way, the
    /// revision to ask from next time.
    fn changes_since(&self, rev: Option<i64>) -> Result<Changes, QueueError>;
    /// The revision of the latest write (cheap: no database read).
    fn revision(&self) -> i64;
    /// Queued → Locked for `instance_type`; false if it was no longer Queued.
    fn lock(&self, id: &str, instance_type: &str) -> Result<bool, QueueError>;
    /// Locked → Queued. Not an attempt: the container never reached a VM.
    fn unlock(&self, id: &str) -> Result<(), QueueError>;
    /// A start on a VM produced no result (`why`): Locked/Running → Queued with one more
    /// dispatch attempt, or Cancelled once `max_attempts` (0 = unlimited) is reached.
    fn attempt_failed(
        &self,
        id: &str,
        why: &str,
        max_attempts: u32,
    ) -> Result<ContainerState, QueueError>;
    /// Locked (or Queued, for a run that turned up again) → Running on `instance_id`.
    fn set_running(
        &self,
        id: &str,
        instance_id: &str,
        instance_type: Option<&str>,
    ) -> Result<(), QueueError>;
    /// Queued/Locked/Running → Complete with the runner's result.
    fn complete(&self, id: &str, result: &RunResult<'_>) -> Result<(), QueueError>;
    /// Any non-final state → Cancelled, with `reason` as the runtime error.
    fn cancel(&self, id: &str, reason: &str) -> Result<(), QueueError>;
    fn set_priority(&self, id: &str, priority: i64) -> Result<(), QueueError>;
    /// Records what a finished container that ran on a VM cost, at that VM's hourly price;
    /// `None` when it never ran or is not final.
    fn record_cost(&self, id: &str, price_per_hour: f64) -> Result<Option<f64>, QueueError>;
}
