//! One scheduling pass. See the module docs of `scheduler`.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BTreeSet;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

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

/// Which kind of slot a worker is: only a created instance can be started on or shut down.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotId {
    /// An instance the cloud listed or returned from a create.
    Instance(String),
    /// A create in flight (the pool's number for it).
    Pending(u64),
    /// A VM this pass decided to create; exists only inside one `plan` call.
    Planned(usize),
}

#[derive(Clone, Debug)]
pub struct WorkerSlot {
    pub id: SlotId,
    /// Config name of its instance type; `None` when the type is not (or no longer) configured.
    pub type_name: Option<String>,
    pub status: WorkerStatus,
    /// IdleBehavior is `run` (hold and drain take no new work).
    pub accepts_work: bool,
    /// Runners on it whose container the queue does not know: the worker counts as full.
    pub foreign_runners: bool,
    /// A run probe of it succeeded since this process started: what it does not list, it
    /// does not run.
    pub probed: bool,
}

/// What a runner on some worker reported for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunnerSeen {
    /// This process sent the start command and no probe has listed it yet: it occupies the
    /// worker, but nothing is recorded from it (the start may never have reached the VM).
    Starting { worker: String },
    /// A probe listed it as running.
    Running { worker: String },
    /// Finished; its result has not been recorded yet.
    Exited { worker: String },
    /// Its supervisor is gone without a result.
    Stale { worker: String },
}

impl RunnerSeen {
    pub fn worker(&self) -> &str {
        match self {
            RunnerSeen::Starting { worker }
            | RunnerSeen::Running { worker }
            | RunnerSeen::Exited { worker }
            | RunnerSeen::Stale { worker } => worker,
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
    /// How many more instances the quota (or `max_instances`) allows; 0 = at quota.
    pub quota_headroom: usize,
    /// Provider types that cannot be created now (capacity hold-off, failing creates).
    pub at_capacity: &'a HashSet<String>,
    /// How many creates may start now (rate limit, concurrency cap); beyond that, wait.
    pub creates_allowed: usize,
    /// The $/h `limits.max_hourly_spend` still allows above the fleet's price now
    /// (`f64::INFINITY` without a cap): a create costing more waits as if over quota.
    pub spend_left: f64,
    /// Every worker listed at start-up has been probed (or the stale-lock timeout passed):
    /// only then may locks from a previous run be treated as stale.
    pub pool_recovered: bool,
    /// Two listings have come back since start: a VM absent from both is really gone.
    pub listings_settled: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Lock {
        container: String,
        instance_type: String,
    },
    Unlock {
        container: String,
    },
    /// Start on a booted worker.
    Start {
        container: String,
        worker: String,
    },
    /// Boot a VM of this type; `container` is the one it is for (already locked).
    Create {
        instance_type: String,
        container: String,
    },
    Cancel {
        container: String,
        reason: String,
    },
    /// Record a runner's result (the queue then says Complete) and forget it on the VM.
    Finalize {
        container: String,
        worker: String,
    },
    /// A runner the queue thought was only Locked: record it as Running there.
    Adopt {
        container: String,
        worker: String,
    },
    Kill {
        container: String,
        worker: String,
    },
    /// Remove a finished runner of a container whose state is already final.
    Forget {
        container: String,
        worker: String,
    },
    /// A start on a VM produced no result (its runner died, or the run vanished with its
    /// VM): one more dispatch attempt; requeued, or cancelled past the limit.
    AttemptFailed {
        container: String,
        reason: String,
    },
    /// Shut down an idle worker (to free quota for work of another size).
    Shutdown {
        worker: String,
    },
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
            scratch: clamp(
                t.included_scratch_bytes
                    .saturating_add(t.added_scratch_bytes),
            ),
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
        self.vcpus >= need.vcpus
            && self.ram >= need.ram
            && self.scratch >= need.scratch
            && self.gpus >= need.gpus
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

/// Queue order: Locked first (false < true), then priority high to low, then submission order.
type OrderKey = (bool, Reverse<i64>, i64);

/// Preference among workers of one type: busiest first, then booted, then position.
type SlotKey = (Reverse<usize>, bool, usize);

/// The workers that may still take work, per type and per number of free vCPUs.
struct OpenSlots {
    by_type: Vec<Vec<BTreeSet<SlotKey>>>,
}

impl OpenSlots {
    fn new(types: &[InstanceType]) -> Self {
        OpenSlots {
            by_type: types
                .iter()
                .map(|t| vec![BTreeSet::new(); t.vcpus as usize + 1])
                .collect(),
        }
    }

    fn key(s: &Slot<'_>, i: usize) -> SlotKey {
        (Reverse(s.count), !booted(&s.worker.status), i)
    }

    fn bucket(&mut self, s: &Slot<'_>) -> Option<&mut BTreeSet<SlotKey>> {
        let buckets = self.by_type.get_mut(s.type_index?)?;
        let free = usize::try_from(s.free.vcpus.max(0))
            .unwrap_or(0)
            .min(buckets.len() - 1);
        buckets.get_mut(free)
    }

    fn insert(&mut self, s: &Slot<'_>, i: usize) {
        if let Some(b) = self.bucket(s) {
            b.insert(Self::key(s, i));
        }
    }

    fn remove(&mut self, s: &Slot<'_>, i: usize) {
        if let Some(b) = self.bucket(s) {
            b.remove(&Self::key(s, i));
        }
    }

    /// The preferred worker of type `ti` with room for `need`.
    fn best(&self, ti: usize, need: &Resources, slots: &[Slot<'_>]) -> Option<SlotKey> {
        let buckets = self.by_type.get(ti)?;
        let from = usize::try_from(need.vcpus.max(0)).unwrap_or(usize::MAX);
        buckets
            .iter()
            .skip(from)
            .filter_map(|b| b.iter().find(|k| slots[k.2].free.covers(need)).copied())
            .min()
    }
}

impl Slot<'_> {
    fn full(&self, max_per_instance: usize) -> bool {
        self.free.vcpus <= 0
            || self.free.ram <= 0
            || (max_per_instance > 0 && self.count >= max_per_instance)
    }
}

fn booted(status: &WorkerStatus) -> bool {
    matches!(status, WorkerStatus::Idle | WorkerStatus::Running)
}

/// The containers that wait for a place, in the order the mapper serves them: Locked before
/// Queued, then priority (high first), then submission order.
pub fn waiting_order<'c>(
    containers: &'c [Container],
    runners: &HashMap<String, RunnerSeen>,
) -> Vec<&'c Container> {
    // Keys are extracted once: comparing through the (large) containers costs cache misses.
    let mut keyed: Vec<(OrderKey, &Container)> = containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Queued | ContainerState::Locked))
        .filter(|c| !runners.contains_key(&c.id))
        .map(|c| {
            (
                (
                    c.state != ContainerState::Locked,
                    Reverse(c.priority),
                    c.seq,
                ),
                c,
            )
        })
        .collect();
    keyed.sort_unstable_by_key(|(k, _)| *k);
    keyed.into_iter().map(|(_, c)| c).collect()
}

/// One pass: the syncer's reconciliations first, then the mapper.
pub fn plan(input: &PlanInput<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    sync(input, &mut actions);
    map(input, &mut actions);
    actions
}

/// The syncer: reconciles each container with what its runner reports (reference §1.2).
fn sync(input: &PlanInput<'_>, actions: &mut Vec<Action>) {
    // A run is judged gone only on evidence: its own worker was probed and does not list it,
    // or that VM is absent from two listings.
    let probed: HashMap<&str, bool> = input
        .workers
        .iter()
        .filter_map(|w| match &w.id {
            SlotId::Instance(id) => Some((id.as_str(), w.probed)),
            _ => None,
        })
        .collect();
    let run_gone = |c: &Container| match c.instance_id.as_deref() {
        Some(worker) => match probed.get(worker) {
            Some(probed) => *probed,
            None => input.listings_settled,
        },
        None => input.listings_settled,
    };
    for c in input.containers {
        let seen = input.runners.get(&c.id);
        match (c.state, seen) {
            (
                ContainerState::Running | ContainerState::Locked,
                Some(RunnerSeen::Exited { worker }),
            ) => actions.push(Action::Finalize {
                container: c.id.clone(),
                worker: worker.clone(),
            }),
            (
                ContainerState::Running | ContainerState::Locked,
                Some(RunnerSeen::Stale { worker }),
            ) => {
                actions.push(Action::AttemptFailed {
                    container: c.id.clone(),
                    reason: format!("the runner on {worker} died without a result"),
                });
                actions.push(Action::Forget {
                    container: c.id.clone(),
                    worker: worker.clone(),
                });
            }
            (
                ContainerState::Running | ContainerState::Locked,
                Some(RunnerSeen::Running { worker }),
            ) if c.priority == 0 => actions.push(Action::Kill {
                container: c.id.clone(),
                worker: worker.clone(),
            }),
            // Locked: the host died after the start. Queued: it was requeued because its run
            // looked gone, and the run turned up again. Either way it runs there: adopt it.
            (
                ContainerState::Locked | ContainerState::Queued,
                Some(RunnerSeen::Running { worker }),
            ) => actions.push(Action::Adopt {
                container: c.id.clone(),
                worker: worker.clone(),
            }),
            // A requeued container whose run turned up finished: record that result.
            (ContainerState::Queued, Some(RunnerSeen::Exited { worker })) => {
                actions.push(Action::Finalize {
                    container: c.id.clone(),
                    worker: worker.clone(),
                })
            }
            (ContainerState::Running, None) if input.pool_recovered && run_gone(c) => {
                actions.push(Action::AttemptFailed {
                    container: c.id.clone(),
                    reason: "its run vanished: no worker lists it".into(),
                })
            }
            (
                ContainerState::Complete | ContainerState::Cancelled | ContainerState::Queued,
                Some(seen),
            ) => {
                match seen {
                    // Decide once a probe has seen it.
                    RunnerSeen::Starting { .. } => {}
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
    let queue_ids: HashSet<&str> = input.containers.iter().map(|c| c.id.as_str()).collect();
    let mut strays: Vec<(&String, &RunnerSeen)> = input
        .runners
        .iter()
        .filter(|(id, _)| !queue_ids.contains(id.as_str()))
        .collect();
    strays.sort_by(|a, b| a.0.cmp(b.0));
    for (id, seen) in strays {
        actions.push(match seen {
            RunnerSeen::Starting { .. } => continue,
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
}

/// The mapper: orders waiting containers and gives each a worker, a new VM, or a reason to
/// wait (reference §3).
fn map(input: &PlanInput<'_>, actions: &mut Vec<Action>) {
    let by_name: HashMap<&str, usize> = input
        .types
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    // Capacity left on each worker.
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
        .filter_map(|(i, s)| match &s.worker.id {
            SlotId::Instance(id) => Some((id.clone(), i)),
            _ => None,
        })
        .collect();
    for c in input.containers {
        // A finished runner no longer uses the VM, even before its result is collected.
        if let Some(seen @ (RunnerSeen::Running { .. } | RunnerSeen::Starting { .. })) =
            input.runners.get(&c.id)
        {
            if let Some(&i) = slot_of.get(seen.worker()) {
                slots[i]
                    .free
                    .take(&Resources::of_need(&c.runtime_constraints));
                slots[i].count += 1;
            }
        }
    }

    let order = waiting_order(input.containers, input.runners).into_iter();

    if !input.pool_recovered {
        // A locked container may be running on a worker not yet probed; starting it elsewhere
        // could run it twice. Wait (the stale-lock fixer's rule).
        return;
    }

    // Per type, the workers that may still take work, kept in preference order: busiest first
    // (pack, so others can go idle), then booted before booting, then by position. The first
    // one that fits is the best, so a pass costs about containers × eligible types.
    // Bucketed by free vCPUs, so a container skips every worker with too few at once.
    let mut open = OpenSlots::new(input.types);
    for (i, s) in slots.iter().enumerate() {
        // A VM never probed by this process may never answer (another key, a dead VM): work
        // waits for it only once a probe has seen it, never on faith.
        if s.worker.accepts_work
            && s.worker.status != WorkerStatus::Unknown
            && !s.full(input.max_per_instance)
        {
            open.insert(s, i);
        }
    }
    let mut eligible_lists: Vec<Vec<usize>> = Vec::new();
    let mut eligible_index: HashMap<(u32, u64, u64, u32, bool), usize> = HashMap::default();

    let mut overquota: Vec<&Container> = Vec::new();
    let mut quota_left = input.quota_headroom;
    let mut creates_left = input.creates_allowed;
    let mut spend_left = input.spend_left;
    let mut planned = 0usize;
    for c in order {
        let rc = &c.runtime_constraints;
        let list = *eligible_index
            .entry((
                rc.vcpus,
                rc.ram_bytes,
                rc.scratch_bytes,
                rc.gpus,
                rc.preemptible,
            ))
            .or_insert_with(|| {
                eligible_lists.push(
                    eligible_types(rc, input.types, input.maximum_price_factor)
                        .into_iter()
                        .filter_map(|t| by_name.get(t.name.as_str()).copied())
                        .collect(),
                );
                eligible_lists.len() - 1
            });
        let eligible = &eligible_lists[list];
        // What no type fits is cancelled wherever it stands in line: it would never run.
        if eligible.is_empty() && c.priority >= 1 {
            actions.push(Action::Cancel {
                container: c.id.clone(),
                reason: unsatisfiable_reason(rc),
            });
            continue;
        }
        if !overquota.is_empty() {
            // Past the first container that cannot get a VM, nothing jumps the line.
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
        let need = Resources::of_need(rc);
        match best_slot(eligible, &need, input.types, &open, &slots) {
            Some(i) => {
                // A lock is a place on a VM that exists, booted or still booting. One waiting
                // for a create stays Queued: a failing create then changes nothing in the queue.
                if c.state == ContainerState::Queued
                    && matches!(slots[i].worker.id, SlotId::Instance(_))
                {
                    if let Some(ti) = slots[i].type_index {
                        actions.push(Action::Lock {
                            container: c.id.clone(),
                            instance_type: input.types[ti].name.clone(),
                        });
                    }
                }
                open.remove(&slots[i], i);
                slots[i].free.take(&need);
                slots[i].count += 1;
                if !slots[i].full(input.max_per_instance) {
                    open.insert(&slots[i], i);
                }
                if let (SlotId::Instance(worker), true) =
                    (&slots[i].worker.id, booted(&slots[i].worker.status))
                {
                    actions.push(Action::Start {
                        container: c.id.clone(),
                        worker: worker.clone(),
                    });
                }
            }
            None if quota_left == 0 => overquota.push(c),
            None => {
                let available = eligible
                    .iter()
                    .map(|&ti| &input.types[ti])
                    .find(|t| !input.at_capacity.contains(&t.provider_type));
                // At capacity or throttled: wait where it stands, lock unchanged.
                let Some(t) = available else { continue };
                // A hair of tolerance: sums of prices are floating point.
                if t.price > spend_left + 1e-9 {
                    // The spending cap is a quota in dollars: wait, and free idle VMs.
                    overquota.push(c);
                    continue;
                }
                if creates_left == 0 {
                    continue;
                }
                spend_left -= t.price;
                actions.push(Action::Create {
                    instance_type: t.name.clone(),
                    container: c.id.clone(),
                });
                quota_left -= 1;
                creates_left -= 1;
                // Later containers may pack onto the VM this one is waiting for; its slot lives
                // only in this pass (the pool tracks the real pending create).
                let mut free = Resources::of_type(t);
                free.take(&need);
                planned += 1;
                slots.push(Slot {
                    worker: Cow::Owned(WorkerSlot {
                        id: SlotId::Planned(planned),
                        type_name: Some(t.name.clone()),
                        status: WorkerStatus::Booting,
                        accepts_work: true,
                        foreign_runners: false,
                        probed: false,
                    }),
                    free,
                    count: 1,
                    type_index: by_name.get(t.name.as_str()).copied(),
                });
                let i = slots.len() - 1;
                if !slots[i].full(input.max_per_instance) {
                    open.insert(&slots[i], i);
                }
            }
        }
    }

    if !overquota.is_empty() {
        release_overtaken_locks(&overquota, actions);
        // Free quota held by idle instances nothing is mapped to.
        for s in &slots {
            if let SlotId::Instance(worker) = &s.worker.id {
                if s.count == 0
                    && s.worker.accepts_work
                    && matches!(s.worker.status, WorkerStatus::Idle | WorkerStatus::Booting)
                {
                    actions.push(Action::Shutdown {
                        worker: worker.clone(),
                    });
                }
            }
        }
    }
}

/// Over quota, a locked container keeps its lock while it stays next in line; it lets go only
/// when a waiting container of higher priority is behind it, so the lock never flaps while
/// nothing changes.
fn release_overtaken_locks(overquota: &[&Container], actions: &mut Vec<Action>) {
    let best_waiting = overquota
        .iter()
        .filter(|c| c.state == ContainerState::Queued)
        .map(|c| c.priority)
        .max();
    for c in overquota {
        if c.state == ContainerState::Locked && best_waiting.is_some_and(|p| p > c.priority) {
            actions.push(Action::Unlock {
                container: c.id.clone(),
            });
        }
    }
}

pub fn unsatisfiable_reason(rc: &RuntimeConstraints) -> String {
    format!(
        "no instance type fits: needs {} vCPUs, {} RAM, {} scratch, {} GPUs{}",
        rc.vcpus,
        human_bytes(rc.ram_bytes),
        human_bytes(rc.scratch_bytes),
        rc.gpus,
        if rc.preemptible { ", preemptible" } else { "" }
    )
}

/// `1.5 GiB`, `512 MiB`, `0 B`: sizes as an operator reads them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Cheapest type first; among equals the busiest worker (pack, so others can go idle), then
/// one that has booted.
fn best_slot(
    eligible: &[usize],
    need: &Resources,
    types: &[InstanceType],
    open: &OpenSlots,
    slots: &[Slot<'_>],
) -> Option<usize> {
    let mut best: Option<SlotKey> = None;
    let mut best_price = f64::INFINITY;
    for &ti in eligible {
        let price = types[ti].price;
        if best.is_some() && price > best_price {
            break;
        }
        if let Some(k) = open.best(ti, need, slots) {
            if best.is_none_or(|b| k < b) {
                best = Some(k);
                best_price = price;
            }
        }
    }
    best.map(|k| k.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn types() -> Vec<InstanceType> {
        let t = |name: &str, vcpus: u32, ram: u64, price: f64| InstanceType {
            name: name.into(),
            provider_type: format!("lb.{name}"),
            vcpus,
            ram_bytes: ram * GIB,
            price,
            ..InstanceType::minimal(name)
        };
        vec![
            t("small", 2, 2, 0.02),
            t("medium", 4, 8, 0.05),
            t("large", 8, 16, 0.08),
        ]
    }

    fn c(id: &str, state: ContainerState, priority: i64, vcpus: u32, ram_gib: u64) -> Container {
        Container {
            id: id.into(),
            state,
            priority,
            command: vec!["true".into()],
            env: Default::default(),
            working_dir: None,
            image: None,
            runtime_constraints: RuntimeConstraints {
                vcpus,
                ram_bytes: ram_gib * GIB,
                ..Default::default()
            },
            lock_count: 0,
            dispatch_attempts: 0,
            instance_type: None,
            instance_id: None,
            seq: id.bytes().map(i64::from).sum(),
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            recorded_at_ms: None,
            exit_code: None,
            runtime_error: None,
            log_dir: None,
            cost: None,
            scheduling_status: None,
        }
    }

    fn w(id: &str, type_name: &str, status: WorkerStatus) -> WorkerSlot {
        WorkerSlot {
            id: SlotId::Instance(id.into()),
            type_name: Some(type_name.into()),
            status,
            accepts_work: true,
            foreign_runners: false,
            probed: true,
        }
    }

    /// Flags a row may set.
    #[derive(Default, Clone)]
    struct Flags {
        /// Quota headroom 0.
        at_quota: bool,
        /// Creates allowed 0.
        create_held: bool,
        /// Quota headroom, when not at quota (default: unlimited).
        headroom: Option<usize>,
        not_recovered: bool,
        at_capacity: &'static [&'static str],
        price_factor: Option<f64>,
        /// $/h the spending cap leaves (default: no cap).
        spend_left: Option<f64>,
    }

    struct Row {
        name: &'static str,
        containers: Vec<Container>,
        workers: Vec<WorkerSlot>,
        runners: Vec<(&'static str, RunnerSeen)>,
        flags: Flags,
        expect: Vec<Action>,
    }

    fn lock(c: &str, t: &str) -> Action {
        Action::Lock {
            container: c.into(),
            instance_type: t.into(),
        }
    }
    fn start(c: &str, w: &str) -> Action {
        Action::Start {
            container: c.into(),
            worker: w.into(),
        }
    }
    fn create(t: &str, c: &str) -> Action {
        Action::Create {
            instance_type: t.into(),
            container: c.into(),
        }
    }
    fn unlock(c: &str) -> Action {
        Action::Unlock {
            container: c.into(),
        }
    }
    fn running(w: &str) -> RunnerSeen {
        RunnerSeen::Running { worker: w.into() }
    }
    fn exited(w: &str) -> RunnerSeen {
        RunnerSeen::Exited { worker: w.into() }
    }

    /// The one helper every scheduler row goes through.
    fn check(rows: Vec<Row>) {
        let types = types();
        for row in rows {
            let runners: HashMap<String, RunnerSeen> = row
                .runners
                .iter()
                .map(|(id, r)| (id.to_string(), r.clone()))
                .collect();
            let at_capacity: HashSet<String> = row
                .flags
                .at_capacity
                .iter()
                .map(|s| s.to_string())
                .collect();
            let input = PlanInput {
                containers: &row.containers,
                workers: &row.workers,
                runners: &runners,
                types: &types,
                maximum_price_factor: row.flags.price_factor.unwrap_or(1.5),
                max_per_instance: 0,
                quota_headroom: if row.flags.at_quota {
                    0
                } else {
                    row.flags.headroom.unwrap_or(usize::MAX)
                },
                at_capacity: &at_capacity,
                creates_allowed: if row.flags.create_held { 0 } else { usize::MAX },
                spend_left: row.flags.spend_left.unwrap_or(f64::INFINITY),
                pool_recovered: !row.flags.not_recovered,
                listings_settled: true,
            };
            assert_eq!(plan(&input), row.expect, "row: {}", row.name);
        }
    }

    use ContainerState::{Cancelled, Complete, Locked, Queued};
    use WorkerStatus::*;

    #[test]
    fn mapper_table() {
        check(vec![
            Row {
                name: "the spending cap allows one more small VM, not a second",
                containers: vec![c("a", Queued, 1, 2, 2), c("b", Queued, 1, 2, 2)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    spend_left: Some(0.03),
                    ..Flags::default()
                },
                expect: vec![create("small", "a")],
            },
            Row {
                name: "past the spending cap an idle VM of another type is let go",
                containers: vec![c("a", Queued, 1, 8, 16)],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags {
                    spend_left: Some(0.05),
                    ..Flags::default()
                },
                expect: vec![Action::Shutdown {
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "queued, no workers: create the cheapest fitting type, no lock yet",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![create("small", "a")],
            },
            Row {
                name: "an idle worker of the right type starts it at once",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![lock("a", "small"), start("a", "i1")],
            },
            Row {
                name: "two small containers pack onto one VM; the third needs another",
                containers: vec![
                    c("a", Locked, 1, 1, 1),
                    c("b", Locked, 1, 1, 1),
                    c("c", Locked, 1, 1, 1),
                ],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![start("a", "i1"), start("b", "i1"), create("small", "c")],
            },
            Row {
                name: "containers pack onto a VM still booting instead of creating more",
                containers: vec![c("a", Locked, 1, 1, 1), c("b", Queued, 1, 1, 1)],
                workers: vec![w("i1", "small", Booting)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![lock("b", "small")],
            },
            Row {
                name: "prefer the busier worker of the same price",
                containers: vec![
                    c("a", Locked, 1, 1, 1),
                    c("x", ContainerState::Running, 1, 1, 1),
                ],
                workers: vec![w("i1", "small", Idle), w("i2", "small", Running)],
                runners: vec![("x", running("i2"))],
                flags: Flags::default(),
                expect: vec![start("a", "i2")],
            },
            Row {
                name: "unsatisfiable containers are cancelled with a reason",
                containers: vec![c("a", Queued, 1, 64, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![Action::Cancel {
                    container: "a".into(),
                    reason: "no instance type fits: needs 64 vCPUs, 1 GiB RAM, 0 B scratch, 0 GPUs"
                        .into(),
                }],
            },
            Row {
                name: "locked before queued, then priority, whatever the submission order",
                containers: vec![c("q", Queued, 9, 2, 1), c("l", Locked, 1, 2, 1)],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![start("l", "i1"), create("small", "q")],
            },
            Row {
                name: "at quota: locks stay while nothing overtakes them, idle VMs nothing fits go",
                containers: vec![
                    c("a", Locked, 3, 4, 4),
                    c("b", Locked, 2, 4, 4),
                    c("c", Queued, 1, 4, 4),
                ],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags {
                    at_quota: true,
                    ..Default::default()
                },
                expect: vec![Action::Shutdown {
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "at quota: a lock overtaken by a higher-priority waiting container lets go",
                containers: vec![c("a", Locked, 1, 1, 1), c("b", Queued, 5, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    at_quota: true,
                    ..Default::default()
                },
                expect: vec![unlock("a")],
            },
            Row {
                name: "quota for one more VM: one create, the next waits over quota, unlocked",
                containers: vec![c("a", Queued, 1, 2, 1), c("b", Queued, 1, 2, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    headroom: Some(1),
                    ..Default::default()
                },
                expect: vec![create("small", "a")],
            },
            Row {
                name: "a pending create is never shut down to free quota, nor locked onto",
                containers: vec![c("a", Queued, 1, 8, 1)],
                workers: vec![WorkerSlot {
                    id: SlotId::Pending(3),
                    ..w("", "small", Booting)
                }],
                runners: vec![],
                flags: Flags {
                    at_quota: true,
                    ..Default::default()
                },
                expect: vec![],
            },
            Row {
                name: "the cheapest type at capacity: the next eligible one is used",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    at_capacity: &["lb.small"],
                    price_factor: Some(3.0),
                    ..Default::default()
                },
                expect: vec![create("medium", "a")],
            },
            Row {
                name: "every eligible type at capacity: wait, unlocked",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    at_capacity: &["lb.small"],
                    ..Default::default()
                },
                expect: vec![],
            },
            Row {
                name: "creates held off: wait, neither locked nor created",
                containers: vec![c("a", Queued, 1, 1, 1), c("b", Locked, 1, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags {
                    create_held: true,
                    ..Default::default()
                },
                expect: vec![],
            },
            Row {
                name: "priority 0 gives up its lock",
                containers: vec![c("a", Locked, 0, 1, 1), c("b", Queued, 0, 1, 1)],
                workers: vec![],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![unlock("a")],
            },
            Row {
                name: "until the pool has recovered, nothing is mapped",
                containers: vec![c("a", Locked, 1, 1, 1), c("b", Queued, 1, 1, 1)],
                workers: vec![w("i1", "small", Unknown)],
                runners: vec![],
                flags: Flags {
                    not_recovered: true,
                    ..Default::default()
                },
                expect: vec![],
            },
            Row {
                name: "a VM not yet probed takes no work: create instead of waiting on it",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![w("i1", "small", Unknown)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![create("small", "a")],
            },
            Row {
                name: "hold and drain workers take no new work",
                containers: vec![c("a", Queued, 1, 1, 1)],
                workers: vec![WorkerSlot {
                    accepts_work: false,
                    ..w("i1", "small", Idle)
                }],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![create("small", "a")],
            },
        ]);
    }

    #[test]
    fn syncer_table() {
        check(vec![
            Row {
                name: "running container whose runner exited: record the result",
                containers: vec![c("a", ContainerState::Running, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", exited("i1"))],
                flags: Flags::default(),
                expect: vec![Action::Finalize {
                    container: "a".into(),
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "locked container whose runner exited (host crashed after start): record it",
                containers: vec![c("a", Locked, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", exited("i1"))],
                flags: Flags::default(),
                expect: vec![Action::Finalize {
                    container: "a".into(),
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "locked container found running: adopt it",
                containers: vec![c("a", Locked, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", running("i1"))],
                flags: Flags::default(),
                expect: vec![Action::Adopt {
                    container: "a".into(),
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "locked and only just started by this process: nothing to record yet",
                containers: vec![c("a", Locked, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![(
                    "a",
                    RunnerSeen::Starting {
                        worker: "i1".into(),
                    },
                )],
                flags: Flags::default(),
                expect: vec![],
            },
            Row {
                name: "running, on no worker, pool recovered: cancel",
                containers: vec![c("a", ContainerState::Running, 1, 1, 1)],
                workers: vec![w("i1", "small", Idle)],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![Action::AttemptFailed {
                    container: "a".into(),
                    reason: "its run vanished: no worker lists it".into(),
                }],
            },
            Row {
                name: "running, not listed, but its own worker is unprobed: wait",
                containers: vec![Container {
                    instance_id: Some("i1".into()),
                    ..c("a", ContainerState::Running, 1, 1, 1)
                }],
                workers: vec![WorkerSlot {
                    probed: false,
                    ..w("i1", "small", Unknown)
                }],
                runners: vec![],
                flags: Flags::default(),
                expect: vec![],
            },
            Row {
                name: "requeued, but its run turned up: adopt it running, record it exited",
                containers: vec![c("a", Queued, 1, 1, 1), c("b", Queued, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", running("i1")), ("b", exited("i1"))],
                flags: Flags::default(),
                expect: vec![
                    Action::Adopt {
                        container: "a".into(),
                        worker: "i1".into(),
                    },
                    Action::Finalize {
                        container: "b".into(),
                        worker: "i1".into(),
                    },
                ],
            },
            Row {
                name: "priority 0 while running: kill",
                containers: vec![c("a", ContainerState::Running, 0, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", running("i1"))],
                flags: Flags::default(),
                expect: vec![Action::Kill {
                    container: "a".into(),
                    worker: "i1".into(),
                }],
            },
            Row {
                name: "cancelled but still running: kill; complete and exited: forget",
                containers: vec![c("a", Cancelled, 1, 1, 1), c("b", Complete, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("a", running("i1")), ("b", exited("i1"))],
                flags: Flags::default(),
                expect: vec![
                    Action::Kill {
                        container: "a".into(),
                        worker: "i1".into(),
                    },
                    Action::Forget {
                        container: "b".into(),
                        worker: "i1".into(),
                    },
                ],
            },
            Row {
                name: "a runner dead without a result: a failed attempt, and forget it",
                containers: vec![c("a", ContainerState::Running, 1, 1, 1)],
                workers: vec![w("i1", "small", Running)],
                runners: vec![(
                    "a",
                    RunnerSeen::Stale {
                        worker: "i1".into(),
                    },
                )],
                flags: Flags::default(),
                expect: vec![
                    Action::AttemptFailed {
                        container: "a".into(),
                        reason: "the runner on i1 died without a result".into(),
                    },
                    Action::Forget {
                        container: "a".into(),
                        worker: "i1".into(),
                    },
                ],
            },
            Row {
                name: "runners of containers the queue does not know: kill or forget",
                containers: vec![],
                workers: vec![w("i1", "small", Running)],
                runners: vec![("x", running("i1")), ("y", exited("i1"))],
                flags: Flags::default(),
                expect: vec![
                    Action::Kill {
                        container: "x".into(),
                        worker: "i1".into(),
                    },
                    Action::Forget {
                        container: "y".into(),
                        worker: "i1".into(),
                    },
                ],
            },
        ]);
    }

    /// Passes under changing cloud pressure (quota, throttling, creates that never succeed),
    /// with the plan's locks applied to the queue between passes: a waiting container is
    /// locked at most once and never released while nothing overtakes it.
    #[test]
    fn waiting_locks_do_not_flap_under_cloud_pressure() {
        let types = types();
        let mut containers: Vec<Container> = (0..10)
            .map(|i| c(&format!("c{i:02}"), Queued, 1, 2, 1))
            .collect();
        let mut locks: HashMap<String, usize> = HashMap::default();
        let mut unlocks = 0;
        let no_capacity = HashSet::default();
        // One VM still booting: the first in line gets a place (and a lock) there.
        let booting = [w("i1", "small", Booting)];
        for pass in 0..40 {
            let runners = HashMap::default();
            let input = PlanInput {
                containers: &containers,
                workers: &booting,
                runners: &runners,
                types: &types,
                maximum_price_factor: 1.5,
                max_per_instance: 0,
                quota_headroom: [0, 2, 0, 6][pass % 4],
                at_capacity: &no_capacity,
                creates_allowed: [0, 1, 3][pass % 3],
                spend_left: f64::INFINITY,
                pool_recovered: true,
                listings_settled: true,
            };
            for action in plan(&input) {
                match action {
                    Action::Lock { container, .. } => {
                        *locks.entry(container.clone()).or_default() += 1;
                        if let Some(c) = containers.iter_mut().find(|c| c.id == container) {
                            c.state = Locked;
                        }
                    }
                    Action::Unlock { .. } => unlocks += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(unlocks, 0);
        assert!(locks.values().all(|n| *n == 1), "{locks:?}");
        // Only the container given a place on the booting VM is locked, and only once.
        let mut locked: Vec<&String> = locks.keys().collect();
        locked.sort();
        let prefix: Vec<String> = (0..locked.len()).map(|i| format!("c{i:02}")).collect();
        assert!(!locked.is_empty());
        assert_eq!(locked, prefix.iter().collect::<Vec<_>>());
    }

    #[test]
    fn eligible_types_respect_the_price_factor_and_preemptibility() {
        let types = types();
        let names = |rc: &RuntimeConstraints, f: f64| -> Vec<String> {
            eligible_types(rc, &types, f)
                .iter()
                .map(|t| t.name.clone())
                .collect()
        };
        let one = RuntimeConstraints {
            vcpus: 1,
            ram_bytes: GIB,
            ..Default::default()
        };
        assert_eq!(names(&one, 1.5), vec!["small"]);
        assert_eq!(names(&one, 4.0), vec!["small", "medium", "large"]);
        let spot = RuntimeConstraints {
            preemptible: true,
            ..one.clone()
        };
        assert!(names(&spot, 4.0).is_empty());
        let gpu = RuntimeConstraints { gpus: 1, ..one };
        assert!(names(&gpu, 4.0).is_empty());
    }
}
