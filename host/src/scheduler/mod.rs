//! The scheduler as a pure function: queue and pool state in, actions out.
//!
//! `plan` runs the mapper (reference §3: order, cheapest fitting type within the price factor,
//! packing, quota and capacity handling, next-in-line keeps its lock) and the syncer (reference
//! §1.2: reconcile the queue with what runners report). It neither calls a driver nor touches
//! the queue: the dispatcher carries out the actions, so every rule here is testable as a table
//! and the whole pass is benchmarkable in memory.

pub mod outcome;
pub mod plan;
pub mod status;
pub mod view;

pub use outcome::{outcome, Outcome};
pub use plan::{
    plan, waiting_order, Action, PlanInput, RunnerSeen, SlotId, WorkerSlot, WorkerStatus,
};
pub use view::{queue_view, QueueEntry};
