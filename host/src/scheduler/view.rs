//! The scheduler's queue as the management API shows it: a wire type, rebuilt at each pass.
//! A queue holds few shapes and few VMs: the eligible types and the words of each status are
//! built once and shared (`Arc`), so a pass over 100k containers copies little.

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;
use serde::{Deserialize, Serialize};

use super::plan::{eligible_types, waiting_order, Action, PlanInput, RunnerSeen};
use super::status::{waiting_reason, Pressure, Waiting};
use crate::queue::{Container, ContainerState, RuntimeConstraints};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub container: Arc<str>,
    pub state: ContainerState,
    pub priority: i64,
    pub created_at_ms: i64,
    pub runtime_constraints: RuntimeConstraints,
    /// The types it may run on, cheapest first (within the price factor).
    pub instance_types: Arc<[String]>,
    /// When this dispatcher process first saw it (Unix milliseconds).
    pub first_seen_at_ms: i64,
    /// Why it waits, or where it runs, in words.
    pub scheduling_status: Arc<str>,
    /// What it waits for, as a word; absent once it is on a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// The VM it runs (or starts) on.
    pub instance: Option<Arc<str>>,
}

/// Words built once and handed out shared.
#[derive(Default)]
struct Phrases<'a> {
    by_key: HashMap<(u8, &'a str), Arc<str>>,
}

impl<'a> Phrases<'a> {
    fn get(&mut self, kind: u8, subject: &'a str, make: impl FnOnce() -> String) -> Arc<str> {
        self.by_key
            .entry((kind, subject))
            .or_insert_with(|| Arc::from(make()))
            .clone()
    }
}

/// Every active container: the waiting ones in the order the scheduler serves them, then
/// those on VMs, then those the queue says run but no VM has reported yet. `first_seen`
/// gives the Unix milliseconds a container was first seen.
pub fn queue_view<'a>(
    input: &PlanInput<'a>,
    actions: &'a [Action],
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
    // not on the container: worked out once per shape.
    type Shape = (u32, u64, u64, u32, bool, bool);
    type ShapeWords = (Arc<[String]>, Waiting, Arc<str>);
    let mut by_shape: HashMap<Shape, ShapeWords> = HashMap::default();
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
                let types: Vec<String> =
                    eligible_types(rc, pressure.types, pressure.maximum_price_factor)
                        .into_iter()
                        .map(|t| t.name.clone())
                        .collect();
                let (waiting, words) = waiting_reason(c, pressure);
                (types.into(), waiting, Arc::from(words))
            })
            .clone()
    };
    let mut phrases = Phrases::default();
    let mut workers: HashMap<&str, Arc<str>> = HashMap::default();
    let mut worker = |name: &'a str| {
        workers
            .entry(name)
            .or_insert_with(|| Arc::from(name))
            .clone()
    };
    let entry = |c: &Container,
                 types: Arc<[String]>,
                 (waiting, status): (Option<Waiting>, Arc<str>),
                 instance: Option<Arc<str>>| QueueEntry {
        container: Arc::from(c.id.as_str()),
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
        let (types, waiting, reason) = shape_of(c);
        if let Some(on) = started.get(c.id.as_str()) {
            let status = phrases.get(0, on, || format!("starting on {on}"));
            entries.push(entry(c, types, (None, status), Some(worker(on))));
            continue;
        }
        let status = match (c.state, &c.instance_type) {
            // Locked: it has its place on a VM that is booting (or its lock is stale from a
            // previous run, and is about to be released).
            (ContainerState::Locked, Some(t)) => (
                Waiting::Boot,
                phrases.get(1, t, || format!("waiting for a VM of type {t} to boot")),
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
        let (types, _, _) = shape_of(c);
        let on = seen.worker();
        let status = match seen {
            RunnerSeen::Starting { .. } => phrases.get(0, on, || format!("starting on {on}")),
            RunnerSeen::Running { .. } => phrases.get(2, on, || format!("running on {on}")),
            RunnerSeen::Exited { .. } => {
                phrases.get(3, on, || format!("finished on {on}; recording its result"))
            }
            RunnerSeen::Stale { .. } => {
                phrases.get(4, on, || format!("its runner on {on} died; to be requeued"))
            }
        };
        entries.push(entry(c, types, (None, status), Some(worker(on))));
    }
    for c in unreported {
        let (types, _, _) = shape_of(c);
        let on = c.instance_id.as_deref().unwrap_or_default();
        let status = phrases.get(5, on, || {
            format!("running on {on} (its VM has not reported it since this start)")
        });
        entries.push(entry(c, types, (None, status), Some(worker(on))));
    }
    entries
}
