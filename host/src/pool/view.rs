//! What the management API shows of an instance: a wire type, kept apart from the pool's
//! internal state so changing the pool does not change the API by accident.

use serde::{Deserialize, Serialize};

use super::state::IdleBehavior;
use crate::scheduler::WorkerStatus;

/// An instance's state as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Asked for; the cloud has not returned it yet.
    Creating,
    /// Listed, not yet probed by this process.
    Unknown,
    Booting,
    Idle,
    Running,
    Shutdown,
}

impl From<&WorkerStatus> for InstanceState {
    fn from(s: &WorkerStatus) -> Self {
        match s {
            WorkerStatus::Unknown => InstanceState::Unknown,
            WorkerStatus::Booting => InstanceState::Booting,
            WorkerStatus::Idle => InstanceState::Idle,
            WorkerStatus::Running => InstanceState::Running,
            WorkerStatus::Shutdown => InstanceState::Shutdown,
        }
    }
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Creating => "creating",
            InstanceState::Unknown => "unknown",
            InstanceState::Booting => "booting",
            InstanceState::Idle => "idle",
            InstanceState::Running => "running",
            InstanceState::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Empty for a create in flight.
    pub id: String,
    /// Config name; absent when the type is not (or no longer) configured.
    pub instance_type: Option<String>,
    pub provider_type: String,
    pub state: InstanceState,
    pub idle_behavior: IdleBehavior,
    pub address: String,
    pub price: f64,
    pub containers: Vec<String>,
    /// Why the VM is not in use, when something is wrong with it (host key refused, probes
    /// failing, draining because it broke).
    #[serde(default)]
    pub reason: Option<String>,
    /// The last container started on it.
    #[serde(default)]
    pub last_container: Option<String>,
    /// When it last started a container (or appeared), Unix ms.
    #[serde(default)]
    pub last_busy_at_ms: i64,
    /// When a probe of it last succeeded, Unix ms.
    #[serde(default)]
    pub last_probe_ok_at_ms: Option<i64>,
    /// Its runner's event stream is open.
    #[serde(default)]
    pub event_stream: bool,
}
