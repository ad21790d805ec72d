//! The worker pool: where a VM's life is decided.
//!
//! - `workers` — [`Pool`]: the registry of workers and pending creates; applies listings,
//!   creates, destroys, probe results and timeouts, and hands back the work to do as values.
//! - `state` — the state machine of one worker as pure functions, its table in the doc.
//! - `probe` — boot probe, runner deployment by hash, and the runner protocol, over [`Exec`].
//! - `collect` — a finished run's result and logs, streamed from the VM into log files.
//! - `seams` — the traits the pool and dispatcher work through: [`Cloud`], [`Exec`],
//!   [`ExecFactory`], [`FleetObserver`]; production wires `CloudOps`, SSH and the metrics,
//!   tests wire fakes.
//! - `backoff` — failing creates are retried with a growing delay per instance type.
//! - `view` — the API's serializable picture of an instance.

mod backoff;
pub mod collect;
pub mod probe;
pub mod seams;
pub mod state;
pub mod view;
mod workers;

pub use seams::{
    BootOutcome, BoxFuture, Cloud, CreateError, Endpoint, Exec, ExecFactory, FleetObserver, Listed,
};
pub use state::IdleBehavior;
pub use view::{InstanceState, InstanceView};
pub use workers::{Effect, Pool, PoolConfig, ProbeJob, ProbeReport, Started};

/// Tag keys the host sets on every VM. With the set-ID tag the driver adds, they let a
/// restarted host re-adopt its VMs.
pub mod tags {
    pub const INSTANCE_TYPE: &str = "dispatch-cloud-instance-type";
    pub const IDLE_BEHAVIOR: &str = "dispatch-cloud-idle-behavior";
    pub use crate::instance_secret::TAG as INSTANCE_SECRET;
}
