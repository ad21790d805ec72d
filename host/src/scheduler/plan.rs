//! One scheduling pass. See the module docs of `scheduler`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use driver_abi::InstanceType;

use crate::queue::{Container, ContainerState, RuntimeConstraints};

/// A worker as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkerStatus {
    /// Listed but not yet probed since this process started.
    Unknown,
    Booting,
    Idle,
    Running,
    /// Being destroyed; takes no work.
    Shutdown,
}

#[derive(Clone, Debug)]
pub struct WorkerSlot {
    /// Instance ID, or `pending-N` for a create in flight.
    pub id: String,
    /// Config name of its instance type; `None` when the type is not (or no longer) configured.
    pub type_name: Option<String>,
    pub status: WorkerStatus,
    /// IdleBehavior is `run` (hold and drain take no new work).
    pub accepts_work: bool,
    /// Runners on it whose container the queue does not know: the worker counts as full.
    pub foreign_runners: bool,
}

/// What a runner on some worker reported for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerSeen {
    /// Starting or running.
    Running { worker: String },
    /// Finished; its result has not been recorded yet.
    Exited { worker: String },
    /// Its supervisor is gone without a result.
    Stale { worker: String },
}

impl RunnerSeen {
    pub fn worker(&self) -> &str {
        match self {
            RunnerSeen::Running { worker } | RunnerSeen::Exited { worker } | RunnerSeen::Stale { worker } => {
                worker
            }
        }
    }
}

pub struct PlanInput<'a> {
    /// Containers of interest: every non-final one, plus final ones that still have a runner.
    pub containers: &'a [Container],
    pub workers: &'a [WorkerSlot],
    /// Container ID → what a runner reported.
    pub runners: &'a HashMap<String, RunnerSeen>,
    pub types: &'a [InstanceType],
    pub maximum_price_factor: f64,
    /// 0 = as many as fit.
    pub max_per_instance: usize,
    /// No instance may be added (quota or max_instances).
    pub at_quota: bool,
    /// Provider types that are in a capacity hold-off.
    pub at_capacity: &'a HashSet<String>,
    /// Creates are held off (rate limit, concurrency cap): wait rather than create.
    pub create_held: bool,
    /// Every worker listed at start-up has been probed (or the stale-lock timeout passed):
    /// only then may locks from a previous run be treated as stale.
    pub pool_recovered: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Lock { container: String, instance_type: String },
    Unlock { container: String },
    /// Start on a booted worker.
    Start { container: String, worker: String },
    /// Boot a VM of this type; `container` is the one it is for (already locked).
    Create { instance_type: String, container: String },
    Cancel { container: String, reason: String },
    /// Record a runner's result (the queue then says Complete) and forget it on the VM.
    Finalize { container: String, worker: String },
    /// A runner the queue thought was only Locked: record it as Running there.
    Adopt { container: String, worker: String },
    Kill { container: String, worker: String },
    /// Remove a finished runner of a container whose state is already final.
    Forget { container: String, worker: String },
    /// Shut down an idle worker (to free quota for work of another size).
    Shutdown { worker: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Resources {
    vcpus: i64,
    ram: i64,
    scratch: i64,
    gpus: i64,
}

impl Resources {
    fn of_type(t: &InstanceType) -> Self {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Resources {
            vcpus: i64::from(t.vcpus),
            ram: clamp(t.ram_bytes),
            scratch: clamp(t.included_scratch_bytes.saturating_add(t.added_scratch_bytes)),
            gpus: i64::from(t.gpu_count),
        }
    }

    fn of_need(c: &RuntimeConstraints) -> Self {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Resources {
            vcpus: i64::from(c.vcpus),
            ram: clamp(c.ram_bytes),
            scratch: clamp(c.scratch_bytes),
            gpus: i64::from(c.gpus),
        }
    }

    fn covers(&self, need: &Resources) -> bool {
        self.vcpus >= need.vcpus && self.ram >= need.ram && self.scratch >= need.scratch && self.gpus >= need.gpus
    }

    fn take(&mut self, need: &Resources) {
        self.vcpus -= need.vcpus;
        self.ram -= need.ram;
        self.scratch -= need.scratch;
        self.gpus -= need.gpus;
    }
}

/// The types a container may run on, cheapest first, within the price factor.
pub fn eligible_types<'t>(
    need: &RuntimeConstraints,
    types: &'t [InstanceType],
    price_factor: f64,
) -> Vec<&'t InstanceType> {
    let want = Resources::of_need(need);
    let mut fit: Vec<&InstanceType> = types
        .iter()
        .filter(|t| Resources::of_type(t).covers(&want))
        .filter(|t| t.preemptible == need.preemptible)
        // A container without GPUs must not take a GPU machine.
        .filter(|t| (need.gpus == 0) == (t.gpu_count == 0))
        .collect();
    fit.sort_by(|a, b| {
        a.price
            .total_cmp(&b.price)
            .then(b.ram_bytes.cmp(&a.ram_bytes))
            .then(b.vcpus.cmp(&a.vcpus))
            .then(a.name.cmp(&b.name))
    });
    if let Some(cheapest) = fit.first().map(|t| t.price) {
        let ceiling = cheapest * price_factor.max(1.0);
        fit.retain(|t| t.price <= ceiling);
    }
    fit
}

struct Slot<'a> {
    /// Borrowed from the input, or owned for a VM this pass decided to create.
    worker: Cow<'a, WorkerSlot>,
    free: Resources,
    count: usize,
    type_index: Option<usize>,
}

fn booted(status: &WorkerStatus) -> bool {
    matches!(status, WorkerStatus::Idle | WorkerStatus::Running)
}

/// One pass: the syncer's reconciliations first, then the mapper.
pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let by_name: HashMap<&str, usize> = input
        .types
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let queue_ids: HashSet<&str> = input.containers.iter().map(|c| c.id.as_str()).collect();

    // Syncer: reconcile each container with its runner.
    let any_unknown = input.workers.iter().any(|w| w.status == WorkerStatus::Unknown);
    for c in input.containers {
        let seen = input.runners.get(&c.id);
        match (c.state, seen) {
            (ContainerState::Running | ContainerState::Locked, Some(RunnerSeen::Exited { worker })) => {
                actions.push(Action::Finalize {
                    container: c.id.clone(),
                    worker: worker.clone(),
                })
            }
            (ContainerState::Running | ContainerState::Locked, Some(RunnerSeen::Stale { worker })) => {
                actions.push(Action::Cancel {
                    container: c.id.clone(),
                    reason: "the runner on the VM died without a result".into(),
                });
                actions.push(Action::Forget {
                    container: c.id.clone(),
                    worker: worker.clone(),
                });
            }
            (ContainerState::Running | ContainerState::Locked, Some(RunnerSeen::Running { worker }))
                if c.priority == 0 =>
            {
                actions.push(Action::Kill {
                    container: c.id.clone(),
                    worker: worker.clone(),
                })
            }
            (ContainerState::Locked, Some(RunnerSeen::Running { worker })) => actions.push(Action::Adopt {
                container: c.id.clone(),
                worker: worker.clone(),
            }),
            (ContainerState::Running, None) if !any_unknown && input.pool_recovered => {
                actions.push(Action::Cancel {
                    container: c.id.clone(),
                    reason: "not running on any worker".into(),
                })
            }
            (ContainerState::Complete | ContainerState::Cancelled | ContainerState::Queued, Some(seen)) => {
                match seen {
                    RunnerSeen::Running { worker } => actions.push(Action::Kill {
                        container: c.id.clone(),
                        worker: worker.clone(),
                    }),
                    RunnerSeen::Exited { worker } | RunnerSeen::Stale { worker } => {
                        actions.push(Action::Forget {
                            container: c.id.clone(),
                            worker: worker.clone(),
                        })
                    }
                }
            }
            _ => {}
        }
    }
    // Runners of containers the queue does not know at all.
    let mut strays: Vec<(&String, &RunnerSeen)> = input
        .runners
        .iter()
        .filter(|(id, _)| !queue_ids.contains(id.as_str()))
        .collect();
    strays.sort_by(|a, b| a.0.cmp(b.0));
    for (id, seen) in strays {
        actions.push(match seen {
            RunnerSeen::Running { worker } => Action::Kill {
                container: id.clone(),
                worker: worker.clone(),
            },
            RunnerSeen::Exited { worker } | RunnerSeen::Stale { worker } => Action::Forget {
                container: id.clone(),
                worker: worker.clone(),
            },
        });
    }

    // Mapper: capacity left on each worker.
    let mut slots: Vec<Slot<'_>> = input
        .workers
        .iter()
        .filter(|w| w.status != WorkerStatus::Shutdown)
        .map(|w| {
            let type_index = w.type_name.as_deref().and_then(|n| by_name.get(n).copied());
            let free = match type_index {
                Some(i) if !w.foreign_runners => Resources::of_type(&input.types[i]),
                _ => Resources::default(),
            };
            Slot {
                worker: Cow::Borrowed(w),
                free,
                count: 0,
                type_index,
            }
        })
        .collect();
    let slot_of: HashMap<String, usize> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| (s.worker.id.clone(), i))
        .collect();
    for c in input.containers {
        if let Some(seen) = input.runners.get(&c.id) {
            if let Some(&i) = slot_of.get(seen.worker()) {
                slots[i].free.take(&Resources::of_need(&c.runtime_constraints));
                slots[i].count += 1;
            }
        }
    }

    // Order: Locked before Queued, then priority (high first), then submission order.
    let mut order: Vec<&Container> = input
        .containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Queued | ContainerState::Locked))
        .filter(|c| !input.runners.contains_key(&c.id))
        .collect();
    order.sort_by(|a, b| {
        let locked = |c: &Container| c.state != ContainerState::Locked;
        locked(a)
            .cmp(&locked(b))
            .then(b.priority.cmp(&a.priority))
            .then(a.seq.cmp(&b.seq))
    });

    if !input.pool_recovered {
        // A locked container may be running on a worker not yet probed; starting it elsewhere
        // could run it twice. Wait (the stale-lock fixer's rule).
        return actions;
    }

    let mut overquota: Vec<&Container> = Vec::new();
    let mut pending = 0usize;
    for c in order {
        if !overquota.is_empty() {
            overquota.push(c);
            continue;
        }
        if c.priority < 1 {
            if c.state == ContainerState::Locked {
                actions.push(Action::Unlock {
                    container: c.id.clone(),
                });
            }
            continue;
        }
        let eligible = eligible_types(&c.runtime_constraints, input.types, input.maximum_price_factor);
        if eligible.is_empty() {
            actions.push(Action::Cancel {
                container: c.id.clone(),
                reason: format!(
                    "constraints not satisfiable by any configured instance type (needs {} vCPUs, {} bytes RAM, {} bytes scratch, {} GPUs{})",
                    c.runtime_constraints.vcpus,
                    c.runtime_constraints.ram_bytes,
                    c.runtime_constraints.scratch_bytes,
                    c.runtime_constraints.gpus,
                    if c.runtime_constraints.preemptible { ", preemptible" } else { "" }
                ),
            });
            continue;
        }
        let need = Resources::of_need(&c.runtime_constraints);
        let eligible_names: HashSet<&str> = eligible.iter().map(|t| t.name.as_str()).collect();
        // Candidates: cheapest first; prefer packing onto busier workers, then booted ones.
        let mut best: Option<usize> = None;
        for (i, s) in slots.iter().enumerate() {
            let Some(ti) = s.type_index else { continue };
            let fits = s.worker.accepts_work
                && eligible_names.contains(input.types[ti].name.as_str())
                && s.free.covers(&need)
                && (input.max_per_instance == 0 || s.count < input.max_per_instance);
            if !fits {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) => {
                    let (bs, cs) = (&slots[b], s);
                    let (bp, cp) = (
                        input.types[bs.type_index.unwrap_or(ti)].price,
                        input.types[ti].price,
                    );
                    let better = cp < bp
                        || (cp == bp && cs.count > bs.count)
                        || (cp == bp
                            && cs.count == bs.count
                            && booted(&cs.worker.status)
                            && !booted(&bs.worker.status));
                    Some(if better { i } else { b })
                }
            };
        }
        let available = eligible.iter().find(|t| !input.at_capacity.contains(&t.provider_type)).copied();
        if c.state == ContainerState::Queued {
            let type_for_lock = best
                .and_then(|i| slots[i].type_index)
                .map(|ti| &input.types[ti])
                .or(available);
            match (best, type_for_lock) {
                (None, _) if input.at_quota => {
                    overquota.push(c);
                    continue;
                }
                (_, None) => continue,
                (_, Some(t)) => actions.push(Action::Lock {
                    container: c.id.clone(),
                    instance_type: t.name.clone(),
                }),
            }
        }
        match best {
            Some(i) => {
                slots[i].free.take(&need);
                slots[i].count += 1;
                if booted(&slots[i].worker.status) {
                    actions.push(Action::Start {
                        container: c.id.clone(),
                        worker: slots[i].worker.id.clone(),
                    });
                }
            }
            None if input.at_quota => overquota.push(c),
            None => {
                let Some(t) = available else { continue };
                if input.create_held {
                    continue;
                }
                actions.push(Action::Create {
                    instance_type: t.name.clone(),
                    container: c.id.clone(),
                });
                // Later containers may pack onto the VM this one is waiting for; its slot lives
                // only in this pass (the dispatcher tracks the real pending create).
                let ti = by_name.get(t.name.as_str()).copied();
                let mut free = Resources::of_type(t);
                free.take(&need);
                pending += 1;
                slots.push(Slot {
                    worker: Cow::Owned(WorkerSlot {
                        id: format!("planned-{pending}"),
                        type_name: Some(t.name.clone()),
                        status: WorkerStatus::Booting,
                        accepts_work: true,
                        foreign_runners: false,
                    }),
                    free,
                    count: 1,
                    type_index: ti,
                });
            }
        }
    }

    if !overquota.is_empty() {
        // The next in line keeps its lock so it is not lock-cycled to death while it waits;
        // with no instances at all, everything lets go so an impossible one cannot starve others.
        let keep_first = !input.workers.is_empty();
        for (n, c) in overquota.iter().enumerate() {
            if c.state == ContainerState::Locked && !(keep_first && n == 0) {
                actions.push(Action::Unlock {
                    container: c.id.clone(),
                });
            }
        }
        // Free quota held by idle workers nothing is mapped to.
        for s in &slots {
            if s.count == 0
                && s.worker.accepts_work
                && matches!(s.worker.status, WorkerStatus::Idle | WorkerStatus::Booting)
                && !s.worker.id.starts_with("planned-")
            {
                actions.push(Action::Shutdown {
                    worker: s.worker.id.clone(),
                });
            }
        }
    }
    actions
}
