//! The scheduler's queue as the management API shows it: a wire type, rebuilt at each pass.

use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};

use super::plan::{eligible_types, waiting_order, Action, PlanInput, RunnerSeen};
use super::status::{waiting_reason, Pressure, Waiting};
use crate::queue::{Container, ContainerState, RuntimeConstraints};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub container: String,
    pub state: ContainerState,
    pub priority: i64,
    pub created_at_ms: i64,
    pub runtime_constraints: RuntimeConstraints,
    /// The types it may run on, cheapest first (within the price factor).
    pub instance_types: Vec<String>,
    /// When this dispatcher process first saw it (Unix milliseconds).
    pub first_seen_at_ms: i64,
    /// Why it waits, or where it runs, in words.
    pub scheduling_status: String,
    /// What it waits for, as a word; absent once it is on a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// The VM it runs (or starts) on.
    pub instance: Option<String>,
}

/// Every active container: the waiting ones in the order the scheduler serves them, then
/// those on VMs, then those the queue says run but no VM has reported yet. `first_seen` gives the Unix milliseconds a container was first seen.
pub fn queue_view(
    input: &PlanInput<'_>,
    actions: &[Action],
    pressure: &Pressure<'_>,
    first_seen: &dyn Fn(&str) -> i64,
) -> Vec<QueueEntry> {
    let started: HashMap<&str, &str> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { container, worker } => Some((container.as_str(), worker.as_str())),
            _ => None,
        })
        .collect();
    // Eligible types and the reason to wait depend on the shape and whether priority is 0,
    // not on the container: worked out once per shape (a queue of 100k holds few shapes).
    type Shape = (u32, u64, u64, u32, bool, bool);
    let mut by_shape: HashMap<Shape, (Vec<String>, (Waiting, String))> = HashMap::default();
    let mut shape_of = |c: &Container| {
        let rc = &c.runtime_constraints;
        let shape = (
            rc.vcpus,
            rc.ram_bytes,
            rc.scratch_bytes,
            rc.gpus,
            rc.preemptible,
            c.priority < 1,
        );
        by_shape
            .entry(shape)
            .or_insert_with(|| {
                let types = eligible_types(rc, pressure.types, pressure.maximum_price_factor)
                    .into_iter()
                    .map(|t| t.name.clone())
                    .collect();
                (types, waiting_reason(c, pressure))
            })
            .clone()
    };
    let entry = |c: &Container,
                 types: Vec<String>,
                 (waiting, status): (Option<Waiting>, String),
                 instance: Option<String>| QueueEntry {
        container: c.id.clone(),
        state: c.state,
        priority: c.priority,
        created_at_ms: c.created_at_ms,
        runtime_constraints: c.runtime_constraints.clone(),
        instance_types: types,
        first_seen_at_ms: first_seen(&c.id),
        scheduling_status: status,
        waiting,
        instance,
    };
    let mut entries = Vec::new();
    for c in waiting_order(input.containers, input.runners) {
        let (types, (waiting, reason)) = shape_of(c);
        let status = match (started.get(c.id.as_str()), c.state, &c.instance_type) {
            (Some(worker), _, _) => {
                entries.push(entry(
                    c,
                    types,
                    (None, format!("starting on {worker}")),
                    Some(worker.to_string()),
                ));
                continue;
            }
            // Locked: it has its place on a VM that is booting (or its lock is stale from a
            // previous run, and is about to be released).
            (None, ContainerState::Locked, Some(t)) => (
                Waiting::Boot,
                format!("waiting for a VM of type {t} to boot"),
            ),
            _ => (waiting, reason),
        };
        entries.push(entry(c, types, (Some(status.0), status.1), None));
    }
    let mut on_vms: Vec<(&Container, &RunnerSeen)> = input
        .containers
        .iter()
        .filter(|c| !c.state.is_final())
        .filter_map(|c| input.runners.get(&c.id).map(|seen| (c, seen)))
        .collect();
    on_vms.sort_by_key(|(c, _)| c.seq);
    // Running by the queue, but no VM has reported it (yet, or any more): the syncer decides.
    let mut unreported: Vec<&Container> = input
        .containers
        .iter()
        .filter(|c| c.state == ContainerState::Running && !input.runners.contains_key(&c.id))
        .collect();
    unreported.sort_by_key(|c| c.seq);
    for (c, seen) in on_vms {
        let (types, _) = shape_of(c);
        let worker = seen.worker().to_string();
        let status = match seen {
            RunnerSeen::Starting { .. } => format!("starting on {worker}"),
            RunnerSeen::Running { .. } => format!("running on {worker}"),
            RunnerSeen::Exited { .. } => format!("finished on {worker}; recording its result"),
            RunnerSeen::Stale { .. } => format!("its runner on {worker} died; to be requeued"),
        };
        entries.push(entry(c, types, (None, status), Some(worker)));
    }
    for c in unreported {
        let (types, _) = shape_of(c);
        let worker = c.instance_id.clone().unwrap_or_default();
        let status = format!("running on {worker} (its VM has not reported it since this start)");
        entries.push(entry(c, types, (None, status), Some(worker)));
    }
    entries
}
