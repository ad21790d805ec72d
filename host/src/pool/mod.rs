//! The worker pool: one state machine per VM (`state`), probes and runner deployment
//! (`probe`). The dispatcher owns the workers and drives them; this module holds the rules.

pub mod probe;
pub mod state;

pub use state::IdleBehavior;

/// Tag keys the host sets on every VM. With the set-ID tag the driver adds, they let a
/// restarted host re-adopt its VMs.
pub mod tags {
    pub const INSTANCE_TYPE: &str = "dispatch-cloud-instance-type";
    pub const IDLE_BEHAVIOR: &str = "dispatch-cloud-idle-behavior";
    pub use crate::instance_secret::TAG as INSTANCE_SECRET;
}
