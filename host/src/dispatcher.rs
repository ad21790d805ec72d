//! The dispatcher: one task that owns the pool's workers and carries out the scheduler's
//! actions. It reacts to events — a queue change, a probe or cloud call that finished, a timer —
//! rather than polling: every slow operation (SSH, cloud API) runs in a task of its own and
//! reports back as an event, so the loop itself never waits on the network.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driver_abi::{CreateRequest, Instance, InstanceType, Tags};
use russh::keys::PrivateKey;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use crate::cloudops::{CloudOps, CreateError};
use crate::config::{seconds, ClusterConfig};
use crate::instance_secret;
use crate::pool::probe::{boot_probe, Remote, RunnerBinary};
use crate::pool::state::{self, after_probe, Decision, Facts, IdleBehavior};
use crate::pool::tags;
use crate::queue::{Container, ContainerState, Queue};
use crate::runner::{ContainerSpec, RunList, RunState};
use crate::scheduler::{plan, Action, PlanInput, RunnerSeen, WorkerSlot, WorkerStatus};
use crate::ssh::{DriverTarget, Executor};

/// Events from the tasks the dispatcher started. Bounded: a task waits rather than letting
/// results pile up without limit; 1024 covers a full probe round of a large pool.
const EVENT_QUEUE: usize = 1024;

enum Event {
    Listed(Result<Option<Vec<Arc<dyn Instance>>>, String>),
    Created {
        pending: u64,
        result: Result<Box<dyn Instance>, String>,
    },
    Destroyed {
        worker: String,
        ok: bool,
    },
    Probed {
        worker: String,
        started: Instant,
        booted: bool,
        list: Result<RunList, String>,
    },
    Started {
        container: String,
        worker: String,
        result: Result<(), String>,
    },
    Killed {
        container: String,
        gave_up: bool,
    },
    /// A finalize or forget finished (successfully or not): the container's op lock is free.
    OpDone {
        container: String,
    },
}

/// What the management API shows of an instance.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub instance_type: Option<String>,
    pub provider_type: String,
    pub state: String,
    pub idle_behavior: String,
    pub address: String,
    pub price: f64,
    pub containers: Vec<String>,
}

/// Handle for the API: wake the dispatcher, read the instance list.
#[derive(Clone)]
pub struct DispatcherHandle {
    wake: Arc<Notify>,
    instances: Arc<Mutex<Vec<InstanceView>>>,
}

impl DispatcherHandle {
    /// Something changed in the queue; coalesces with other wake-ups.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn instances(&self) -> Vec<InstanceView> {
        self.instances.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

struct Worker {
    instance: Arc<dyn Instance>,
    type_name: Option<String>,
    status: WorkerStatus,
    behavior: IdleBehavior,
    executor: Arc<Executor>,
    appeared_at: Instant,
    last_probe_ok: Option<Instant>,
    busy_at: Instant,
    probing: bool,
    next_probe_at: Instant,
    /// From the last run probe.
    runners: HashMap<String, RunState>,
    /// Started by this process, not yet seen by a probe: `None` while the start command runs,
    /// then when it returned. A probe that began after that and does not list it means the
    /// runner is gone.
    starting: HashMap<String, Option<Instant>>,
    booted: bool,
    shutdown_at: Option<Instant>,
    destroying: bool,
    gave_up: HashSet<String>,
}

struct Pending {
    type_name: String,
    secret: String,
}

struct Kill {
    worker: String,
}

pub struct Dispatcher {
    config: ClusterConfig,
    types: Vec<InstanceType>,
    queue: Arc<dyn Queue>,
    cloud: Arc<CloudOps>,
    key: Arc<PrivateKey>,
    binary: RunnerBinary,
    log_dir: PathBuf,
    workers: HashMap<String, Worker>,
    pending: HashMap<u64, Pending>,
    next_pending: u64,
    kills: HashMap<String, Kill>,
    /// Containers with a finalize/forget/start in flight: one operation per container at a time.
    busy: HashSet<String>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    handle: DispatcherHandle,
    started_at: Instant,
    listed_once: bool,
    /// When the listing in flight was launched; workers added after it are not "gone".
    listing: Option<Instant>,
    next_sync_at: Instant,
    next_probe_slot: Instant,
    /// Locked containers found at start-up: unlocked once the pool has recovered unless a
    /// worker turns out to run them.
    stale_locks: Option<HashSet<String>>,
}

fn type_price(types: &[InstanceType], name: Option<&str>) -> f64 {
    name.and_then(|n| types.iter().find(|t| t.name == n))
        .map_or(0.0, |t| t.price)
}

impl Dispatcher {
    pub fn new(
        config: ClusterConfig,
        queue: Arc<dyn Queue>,
        cloud: Arc<CloudOps>,
        key: Arc<PrivateKey>,
        binary: RunnerBinary,
    ) -> Result<Self, crate::queue::QueueError> {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let now = Instant::now();
        let stale: HashSet<String> = queue
            .list(true)?
            .into_iter()
            .filter(|c| c.state == ContainerState::Locked)
            .map(|c| c.id)
            .collect();
        Ok(Dispatcher {
            types: config.instance_types(),
            log_dir: config.state_dir.join("logs"),
            config,
            queue,
            cloud,
            key,
            binary,
            workers: HashMap::new(),
            pending: HashMap::new(),
            next_pending: 0,
            kills: HashMap::new(),
            busy: HashSet::new(),
            events_tx,
            events_rx,
            handle: DispatcherHandle {
                wake: Arc::new(Notify::new()),
                instances: Arc::new(Mutex::new(Vec::new())),
            },
            started_at: now,
            listed_once: false,
            listing: None,
            next_sync_at: now,
            next_probe_slot: now,
            stale_locks: Some(stale),
        })
    }

    pub fn handle(&self) -> DispatcherHandle {
        self.handle.clone()
    }

    fn t(&self) -> &crate::config::Timeouts {
        &self.config.timeouts
    }

    /// Runs until `shutdown` resolves. VMs stay, as they would with the original.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let wake = Arc::clone(&self.handle.wake);
        loop {
            self.pass();
            let deadline = self.next_wake();
            tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.notified() => {}
                Some(event) = self.events_rx.recv() => self.apply(event),
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            // Take whatever else arrived before planning again.
            while let Ok(event) = self.events_rx.try_recv() {
                self.apply(event);
            }
        }
        for w in self.workers.values() {
            w.executor.close().await;
        }
        self.cloud.stop();
        log::info!("Dispatcher stopped; VMs stay up and are adopted at the next start.");
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut at = now + seconds(self.t().probe_interval_seconds);
        at = at.min(self.next_sync_at.max(now));
        for w in self.workers.values() {
            if !w.probing && w.status != WorkerStatus::Shutdown {
                at = at.min(w.next_probe_at.max(self.next_probe_slot));
            }
        }
        if let Some(h) = self.cloud.next_holdoff_end() {
            at = at.min(h);
        }
        at.max(now + Duration::from_millis(1))
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = Option<Event>> + Send + 'static,
    {
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            if let Some(event) = f.await {
                // Only fails when the dispatcher stopped; the result no longer matters then.
                let _ = tx.send(event).await;
            }
        });
    }

    fn instance_count(&self) -> usize {
        self.workers.len() + self.pending.len()
    }

    fn pool_recovered(&self) -> bool {
        self.listed_once
            && (!self
                .workers
                .values()
                .any(|w| w.status == WorkerStatus::Unknown)
                || self.started_at.elapsed() >= seconds(self.t().stale_lock_seconds))
    }

    fn add_worker(&mut self, instance: Arc<dyn Instance>, status: WorkerStatus) {
        let id = instance.id();
        let itags = instance.tags();
        let mut type_name = itags.get(tags::INSTANCE_TYPE).cloned();
        let mut behavior = itags
            .get(tags::IDLE_BEHAVIOR)
            .and_then(|b| IdleBehavior::parse(b))
            .unwrap_or(IdleBehavior::Run);
        if type_name
            .as_deref()
            .is_some_and(|n| !self.types.iter().any(|t| t.name == n))
            || type_name.is_none()
        {
            // A type no longer configured: let it finish what it runs, then go.
            type_name = None;
            if behavior != IdleBehavior::Hold {
                behavior = IdleBehavior::Drain;
            }
        }
        let executor = Arc::new(
            Executor::new(
                Arc::new(DriverTarget {
                    instance: Arc::clone(&instance),
                }),
                Arc::clone(&self.key),
            )
            .with_dial_timeout(seconds(self.t().ssh_dial_seconds)),
        );
        let now = Instant::now();
        log::info!(
            "instance={id} type={} state={status:?} behavior={} added",
            type_name.as_deref().unwrap_or("?"),
            behavior.as_str()
        );
        self.workers.insert(
            id,
            Worker {
                instance,
                type_name,
                status,
                behavior,
                executor,
                appeared_at: now,
                last_probe_ok: None,
                busy_at: now,
                probing: false,
                next_probe_at: now,
                runners: HashMap::new(),
                starting: HashMap::new(),
                booted: false,
                shutdown_at: None,
                destroying: false,
                gave_up: HashSet::new(),
            },
        );
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Listed(result) => {
                let launched = self.listing.take().unwrap_or_else(Instant::now);
                self.next_sync_at = Instant::now() + seconds(self.t().sync_interval_seconds);
                match result {
                    Ok(Some(list)) => self.apply_listing(list, launched),
                    Ok(None) => {}
                    Err(e) => log::warn!("Listing instances failed: {e}"),
                }
            }
            Event::Created { pending, result } => {
                let Some(p) = self.pending.remove(&pending) else {
                    return;
                };
                match result {
                    Ok(instance) => {
                        let instance: Arc<dyn Instance> = Arc::from(instance);
                        if !self.workers.contains_key(&instance.id()) {
                            self.add_worker(instance, WorkerStatus::Booting);
                        }
                    }
                    Err(e) => log::warn!("Creating a {} instance failed: {e}", p.type_name),
                }
            }
            Event::Destroyed { worker, ok } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.destroying = false;
                    if ok {
                        log::info!("instance={worker} destroyed");
                        let w = self.workers.remove(&worker);
                        if let Some(w) = w {
                            let exec = w.executor;
                            tokio::spawn(async move { exec.close().await });
                        }
                        // Confirm with the cloud soon.
                        self.next_sync_at = self
                            .next_sync_at
                            .min(Instant::now() + seconds(self.t().shutdown_seconds));
                    } else {
                        w.shutdown_at = Some(Instant::now());
                    }
                }
            }
            Event::Probed {
                worker,
                started,
                booted,
                list,
            } => self.apply_probe(&worker, started, booted, list),
            Event::Started {
                container,
                worker,
                result,
            } => {
                self.busy.remove(&container);
                match result {
                    Ok(()) => {
                        let mut type_name = None;
                        if let Some(w) = self.workers.get_mut(&worker) {
                            w.starting.insert(container.clone(), Some(Instant::now()));
                            type_name = w.type_name.clone();
                        }
                        match self
                            .queue
                            .set_running(&container, &worker, type_name.as_deref())
                        {
                            Ok(()) => log::info!(
                                "container={container} instance={worker} from=Locked to=Running"
                            ),
                            Err(e) => log::warn!(
                                "container={container} started, but recording it failed: {e}"
                            ),
                        }
                    }
                    Err(e) => {
                        log::warn!("container={container} instance={worker} start failed: {e}");
                        if let Some(w) = self.workers.get_mut(&worker) {
                            w.starting.remove(&container);
                        }
                    }
                }
            }
            Event::Killed { container, gave_up } => {
                if let Some(k) = self.kills.remove(&container) {
                    if gave_up {
                        if let Some(w) = self.workers.get_mut(&k.worker) {
                            w.gave_up.insert(container.clone());
                            log::warn!(
                                "container={container} instance={} ignored SIGTERM; draining",
                                k.worker
                            );
                            if w.behavior == IdleBehavior::Run {
                                self.set_behavior(&k.worker, IdleBehavior::Drain);
                            }
                        }
                    }
                }
            }
            Event::OpDone { container } => {
                self.busy.remove(&container);
            }
        }
    }

    fn apply_listing(&mut self, list: Vec<Arc<dyn Instance>>, launched: Instant) {
        let secrets: HashSet<&str> = self.pending.values().map(|p| p.secret.as_str()).collect();
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        for instance in list {
            let id = instance.id();
            seen.insert(id.clone());
            match self.workers.get_mut(&id) {
                Some(w) => w.instance = instance,
                None => {
                    let ours_in_flight = instance
                        .tags()
                        .get(tags::INSTANCE_SECRET)
                        .is_some_and(|s| secrets.contains(s.as_str()));
                    if !ours_in_flight {
                        fresh.push(instance);
                    }
                }
            }
        }
        for instance in fresh {
            self.add_worker(instance, WorkerStatus::Unknown);
        }
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(id, w)| !seen.contains(*id) && w.appeared_at < launched)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            log::info!("instance={id} disappeared from the cloud's list; removing it");
            if let Some(w) = self.workers.remove(&id) {
                let exec = w.executor;
                tokio::spawn(async move { exec.close().await });
            }
        }
        self.cloud.observe_instance_count(self.workers.len());
        if !self.listed_once {
            log::info!(
                "Initial instance list: {} instance(s) of this set.",
                self.workers.len()
            );
        }
        self.listed_once = true;
    }

    fn apply_probe(
        &mut self,
        id: &str,
        started: Instant,
        booted: bool,
        list: Result<RunList, String>,
    ) {
        let now = Instant::now();
        let interval = seconds(self.t().probe_interval_seconds);
        let mut drain = false;
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.probing = false;
        w.next_probe_at = now + interval;
        if booted {
            w.booted = true;
        }
        match list {
            Ok(list) => {
                w.last_probe_ok = Some(started);
                w.runners = list
                    .containers
                    .iter()
                    .map(|e| (e.id.clone(), e.state.clone()))
                    .collect();
                let listed = &w.runners;
                w.starting
                    .retain(|c, done| !listed.contains_key(c) && done.is_none_or(|t| started < t));
                w.gave_up
                    .retain(|c| w.runners.get(c) == Some(&RunState::Running));
                let active = w
                    .runners
                    .values()
                    .filter(|s| **s == RunState::Running)
                    .count()
                    + w.starting.len();
                let before = w.status.clone();
                w.status = after_probe(&w.status, w.booted, w.runners.len() + w.starting.len());
                if active > 0 || (before == WorkerStatus::Running && w.status == WorkerStatus::Idle)
                {
                    w.busy_at = now;
                }
                if matches!(before, WorkerStatus::Unknown | WorkerStatus::Booting)
                    && w.status != before
                {
                    w.busy_at = now;
                    log::info!("instance={id} from={before:?} to={:?} (booted)", w.status);
                }
                if list.broken && w.behavior == IdleBehavior::Run {
                    log::warn!("instance={id} reports a broken node; draining");
                    drain = true;
                }
            }
            Err(e) => log::debug!("instance={id} probe failed: {e}"),
        }
        if drain {
            self.set_behavior(id, IdleBehavior::Drain);
        }
    }

    fn set_behavior(&mut self, id: &str, behavior: IdleBehavior) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.behavior = behavior;
        let mut new_tags: Tags = w.instance.tags();
        new_tags.insert(tags::IDLE_BEHAVIOR.into(), behavior.as_str().into());
        let instance = Arc::clone(&w.instance);
        let cloud = Arc::clone(&self.cloud);
        let id = id.to_string();
        self.spawn(async move {
            if let Err(e) = cloud.set_tags(instance, new_tags).await {
                log::warn!("instance={id} saving idle behavior failed: {e}");
            }
            None
        });
    }

    fn shutdown_worker(&mut self, id: &str, reason: &str) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        if w.status == WorkerStatus::Shutdown && (w.destroying || w.shutdown_at.is_none()) {
            return;
        }
        log::info!(
            "instance={id} from={:?} to=Shutdown reason={reason:?}",
            w.status
        );
        w.status = WorkerStatus::Shutdown;
        w.destroying = true;
        w.shutdown_at = None;
        let instance = Arc::clone(&w.instance);
        let cloud = Arc::clone(&self.cloud);
        let worker = id.to_string();
        self.spawn(async move {
            let ok = match cloud.destroy(instance).await {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("instance={worker} destroy failed: {e}");
                    false
                }
            };
            Some(Event::Destroyed { worker, ok })
        });
    }

    /// One round: cloud sync, probes, worker timeouts, then the scheduler's plan.
    fn pass(&mut self) {
        let now = Instant::now();
        if self.listing.is_none() && now >= self.next_sync_at {
            self.listing = Some(now);
            let cloud = Arc::clone(&self.cloud);
            self.spawn(async move {
                Some(Event::Listed(
                    cloud.instances().await.map_err(|e| e.to_string()),
                ))
            });
        }
        self.launch_probes(now);
        self.apply_timeouts(now);
        if self.listed_once {
            self.fix_stale_locks();
            self.schedule();
        }
        self.publish();
    }

    fn launch_probes(&mut self, now: Instant) {
        let pace =
            Duration::from_secs_f64(1.0 / self.config.limits.max_probes_per_second.max(0.001));
        let mut due: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                !w.probing && w.status != WorkerStatus::Shutdown && now >= w.next_probe_at
            })
            .map(|(id, _)| id.clone())
            .collect();
        due.sort();
        for id in due {
            if now < self.next_probe_slot {
                break;
            }
            self.next_probe_slot = self.next_probe_slot.max(now - pace) + pace;
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            w.probing = true;
            let needs_boot = !w.booted;
            let exec = Arc::clone(&w.executor);
            let sudo = w.instance.remote_user() != "root";
            let binary = self.binary.clone();
            let boot_command = self.config.boot_probe_command.clone();
            let started = Instant::now();
            self.spawn(async move {
                let remote = Remote {
                    binary: &binary,
                    sudo,
                };
                let mut booted = !needs_boot;
                if needs_boot {
                    booted = matches!(boot_probe(&*exec, &boot_command).await, Ok(true));
                    // Deploy even when the boot probe failed: a VM already running containers
                    // must still be listable (reference #20235).
                    if let Err(e) = remote.deploy(&*exec).await {
                        log::debug!("instance={id} runner deploy failed: {e}");
                        booted = false;
                    }
                }
                let list = remote.list(&*exec).await;
                Some(Event::Probed {
                    worker: id,
                    started,
                    booted,
                    list,
                })
            });
        }
    }

    fn apply_timeouts(&mut self, now: Instant) {
        let timeouts = state::Timeouts {
            idle: seconds(self.t().idle_seconds),
            booting: seconds(self.t().booting_seconds),
            probe: seconds(self.t().probe_seconds),
        };
        let shutdown_retry = seconds(self.t().shutdown_seconds);
        let mut go = Vec::new();
        for (id, w) in &self.workers {
            if w.status == WorkerStatus::Shutdown {
                if !w.destroying
                    && w.shutdown_at
                        .is_some_and(|t| now.saturating_duration_since(t) >= shutdown_retry)
                {
                    go.push((id.clone(), "destroy retry"));
                }
                continue;
            }
            let runners = w
                .runners
                .values()
                .filter(|s| **s == RunState::Running)
                .count()
                + w.starting.len();
            let facts = Facts {
                status: w.status.clone(),
                behavior: w.behavior,
                appeared_at: w.appeared_at,
                last_probe_ok: w.last_probe_ok,
                busy_at: w.busy_at,
                runners,
                all_runners_gave_up: runners > 0 && w.gave_up.len() >= runners,
            };
            if let Some(Decision::Shutdown(reason)) = state::decide(&facts, now, &timeouts) {
                go.push((id.clone(), reason));
            }
        }
        for (id, reason) in go {
            if let Some(w) = self.workers.get_mut(&id) {
                if w.status == WorkerStatus::Shutdown {
                    w.shutdown_at = None;
                    w.status = WorkerStatus::Idle;
                }
            }
            self.shutdown_worker(&id, reason);
        }
    }

    fn fix_stale_locks(&mut self) {
        if !self.pool_recovered() {
            return;
        }
        let Some(stale) = self.stale_locks.take() else {
            return;
        };
        let running: HashSet<&String> = self
            .workers
            .values()
            .flat_map(|w| w.runners.keys().chain(w.starting.keys()))
            .collect();
        for id in stale.iter().filter(|id| !running.contains(id)) {
            match self
                .queue
                .unlock(id, self.config.limits.max_dispatch_attempts)
            {
                Ok(to) => log::info!(
                    "container={id} from=Locked to={to:?} (stale lock from a previous run)"
                ),
                Err(e) => log::debug!("container={id} stale lock not released: {e}"),
            }
        }
    }

    fn schedule(&mut self) {
        let mut containers = match self.queue.list(true) {
            Ok(c) => c,
            Err(e) => {
                log::error!("Reading the queue failed: {e}");
                return;
            }
        };
        let mut runners: rustc_hash::FxHashMap<String, RunnerSeen> = Default::default();
        for (wid, w) in &self.workers {
            for (cid, st) in &w.runners {
                let seen = match st {
                    RunState::Running => RunnerSeen::Running {
                        worker: wid.clone(),
                    },
                    RunState::Exited => RunnerSeen::Exited {
                        worker: wid.clone(),
                    },
                    RunState::Stale => RunnerSeen::Stale {
                        worker: wid.clone(),
                    },
                };
                runners.insert(cid.clone(), seen);
            }
            for cid in w.starting.keys() {
                runners.entry(cid.clone()).or_insert(RunnerSeen::Starting {
                    worker: wid.clone(),
                });
            }
        }
        let known: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        let mut foreign: HashSet<String> = HashSet::new();
        for (cid, seen) in &runners {
            if known.contains(cid) {
                continue;
            }
            match self.queue.get(cid) {
                Ok(c) => containers.push(c),
                Err(_) => {
                    foreign.insert(seen.worker().to_string());
                }
            }
        }
        let mut slots: Vec<WorkerSlot> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerSlot {
                id: id.clone(),
                type_name: w.type_name.clone(),
                status: w.status.clone(),
                accepts_work: w.behavior == IdleBehavior::Run,
                foreign_runners: foreign.contains(id),
            })
            .collect();
        for (n, p) in &self.pending {
            slots.push(WorkerSlot {
                id: format!("pending-{n}"),
                type_name: Some(p.type_name.clone()),
                status: WorkerStatus::Booting,
                accepts_work: true,
                foreign_runners: false,
            });
        }
        slots.sort_by(|a, b| a.id.cmp(&b.id));
        let at_capacity: rustc_hash::FxHashSet<String> = self
            .types
            .iter()
            .filter(|t| self.cloud.at_capacity(t))
            .map(|t| t.provider_type.clone())
            .collect();
        let input = PlanInput {
            containers: &containers,
            workers: &slots,
            runners: &runners,
            types: &self.types,
            maximum_price_factor: self.config.limits.maximum_price_factor,
            max_per_instance: self.config.limits.max_running_containers_per_instance,
            at_quota: self.cloud.at_quota(self.instance_count()),
            at_capacity: &at_capacity,
            create_held: self.cloud.create_held(),
            pool_recovered: self.pool_recovered(),
        };
        let actions = plan(&input);
        let by_id: HashMap<String, Container> =
            containers.into_iter().map(|c| (c.id.clone(), c)).collect();
        let mut lock_failed: HashSet<String> = HashSet::new();
        let mut created_this_pass = 0usize;
        for action in actions {
            match action {
                Action::Lock {
                    container,
                    instance_type,
                } => match self.queue.lock(&container, &instance_type) {
                    Ok(true) => log::info!(
                        "container={container} type={instance_type} from=Queued to=Locked"
                    ),
                    _ => {
                        lock_failed.insert(container);
                    }
                },
                Action::Unlock { container } => {
                    match self
                        .queue
                        .unlock(&container, self.config.limits.max_dispatch_attempts)
                    {
                        Ok(to) => log::info!("container={container} from=Locked to={to:?}"),
                        Err(e) => log::debug!("container={container} unlock: {e}"),
                    }
                }
                Action::Cancel { container, reason } => {
                    match self.queue.cancel(&container, &reason) {
                        Ok(()) => {
                            log::info!("container={container} to=Cancelled reason={reason:?}")
                        }
                        Err(e) => log::debug!("container={container} cancel: {e}"),
                    }
                }
                Action::Adopt { container, worker } => match self.queue.set_running(
                    &container,
                    &worker,
                    self.workers
                        .get(&worker)
                        .and_then(|w| w.type_name.as_deref()),
                ) {
                    Ok(()) => log::info!(
                        "container={container} instance={worker} from=Locked to=Running (adopted)"
                    ),
                    Err(e) => log::debug!("container={container} adopt: {e}"),
                },
                Action::Start { container, worker } => {
                    if lock_failed.contains(&container) || self.busy.contains(&container) {
                        continue;
                    }
                    if let Some(c) = by_id.get(&container) {
                        self.start(c, &worker);
                    }
                }
                Action::Create {
                    instance_type,
                    container,
                } => {
                    if lock_failed.contains(&container) {
                        continue;
                    }
                    if self
                        .cloud
                        .at_quota(self.instance_count() + created_this_pass)
                        || self.cloud.create_held()
                    {
                        continue;
                    }
                    created_this_pass += 1;
                    self.create(&instance_type);
                }
                Action::Finalize { container, worker } => {
                    self.finalize(&container, &worker, by_id.get(&container))
                }
                Action::Kill { container, worker } => self.kill(&container, &worker),
                Action::Forget { container, worker } => self.forget(&container, &worker),
                Action::Shutdown { worker } => {
                    self.shutdown_worker(&worker, "frees quota for other work")
                }
            }
        }
    }

    fn start(&mut self, c: &Container, worker: &str) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.status == WorkerStatus::Shutdown {
            return;
        }
        w.starting.insert(c.id.clone(), None);
        w.status = WorkerStatus::Running;
        w.busy_at = Instant::now();
        self.busy.insert(c.id.clone());
        let spec = ContainerSpec {
            id: c.id.clone(),
            command: c.command.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            image: c.image.clone(),
        };
        let exec = Arc::clone(&w.executor);
        let sudo = w.instance.remote_user() != "root";
        let binary = self.binary.clone();
        let worker = worker.to_string();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let result = remote.start(&*exec, &spec).await;
            Some(Event::Started {
                container: spec.id,
                worker,
                result,
            })
        });
    }

    fn create(&mut self, type_name: &str) {
        let Some(t) = self.types.iter().find(|t| t.name == type_name).cloned() else {
            return;
        };
        let secret = instance_secret::generate();
        let n = self.next_pending;
        self.next_pending += 1;
        self.pending.insert(
            n,
            Pending {
                type_name: t.name.clone(),
                secret: secret.clone(),
            },
        );
        let mut vm_tags = self.config.resource_tags.clone();
        vm_tags.insert(tags::INSTANCE_TYPE.into(), t.name.clone());
        vm_tags.insert(
            tags::IDLE_BEHAVIOR.into(),
            IdleBehavior::Run.as_str().into(),
        );
        vm_tags.insert(tags::INSTANCE_SECRET.into(), secret.clone());
        let request = CreateRequest {
            instance_type: t.clone(),
            image_id: self.config.image.clone(),
            tags: vm_tags,
            init_command: instance_secret::init_command(
                &secret,
                &self.config.instance_init_command,
            ),
            public_key: self.key.public_key().to_openssh().ok(),
        };
        let cloud = Arc::clone(&self.cloud);
        let count = self.instance_count();
        log::info!("type={} creating an instance", t.name);
        self.spawn(async move {
            let result = cloud.create(request, count).await.map_err(|e| match e {
                CreateError::HeldOff(why) => format!("held off: {why}"),
                CreateError::Driver(d) => d.to_string(),
            });
            Some(Event::Created { pending: n, result })
        });
    }

    fn remote_for(&self, worker: &str) -> Option<(Arc<Executor>, bool)> {
        let w = self.workers.get(worker)?;
        Some((Arc::clone(&w.executor), w.instance.remote_user() != "root"))
    }

    fn finalize(&mut self, container: &str, worker: &str, c: Option<&Container>) {
        if self.busy.contains(container) {
            return;
        }
        let Some((exec, sudo)) = self.remote_for(worker) else {
            return;
        };
        let Some(c) = c.cloned() else { return };
        self.busy.insert(container.to_string());
        let binary = self.binary.clone();
        let queue = Arc::clone(&self.queue);
        let dir = self.log_dir.join(container);
        let id = container.to_string();
        let worker = worker.to_string();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let outcome: Result<(), String> = async {
                let list = remote.list(&*exec).await?;
                let exit = list
                    .containers
                    .iter()
                    .find(|e| e.id == id)
                    .and_then(|e| e.exit.clone())
                    .ok_or_else(|| "runner has no exit status".to_string())?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("log dir {}: {e}", dir.display()))?;
                for stream in ["stdout", "stderr"] {
                    let bytes = remote.logs(&*exec, &id, stream).await?;
                    std::fs::write(dir.join(stream), bytes)
                        .map_err(|e| format!("saving {stream}: {e}"))?;
                }
                let dir_text = dir.display().to_string();
                let recorded = if c.state == ContainerState::Cancelled {
                    Ok(())
                } else if c.priority == 0 && exit.exit_code != 0 {
                    queue
                        .cancel(&id, "priority set to 0")
                        .map_err(|e| e.to_string())
                } else {
                    queue
                        .complete(&id, exit.exit_code, exit.error.as_deref(), &dir_text)
                        .map_err(|e| e.to_string())
                };
                recorded?;
                log::info!(
                    "container={id} instance={worker} to=Complete exit_code={}",
                    exit.exit_code
                );
                remote.forget(&*exec, &id).await
            }
            .await;
            if let Err(e) = outcome {
                log::warn!("container={id} instance={worker} recording the result failed: {e}");
            }
            Some(Event::OpDone { container: id })
        });
    }

    fn forget(&mut self, container: &str, worker: &str) {
        if self.busy.contains(container) {
            return;
        }
        let Some((exec, sudo)) = self.remote_for(worker) else {
            return;
        };
        self.busy.insert(container.to_string());
        let binary = self.binary.clone();
        let id = container.to_string();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            if let Err(e) = remote.forget(&*exec, &id).await {
                log::debug!("container={id} forget: {e}");
            }
            Some(Event::OpDone { container: id })
        });
    }

    /// SIGTERM, repeated every `signal` until the runner is gone or `term` passed; never SIGKILL.
    fn kill(&mut self, container: &str, worker: &str) {
        if self.kills.contains_key(container) {
            return;
        }
        let Some((exec, sudo)) = self.remote_for(worker) else {
            return;
        };
        self.kills.insert(
            container.to_string(),
            Kill {
                worker: worker.to_string(),
            },
        );
        log::info!("container={container} instance={worker} sending SIGTERM");
        let binary = self.binary.clone();
        let id = container.to_string();
        let every = seconds(self.t().signal_seconds);
        let give_up_after = seconds(self.t().term_seconds);
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let started = Instant::now();
            loop {
                if matches!(remote.kill(&*exec, &id, libc::SIGTERM).await, Ok(true)) {
                    return Some(Event::Killed {
                        container: id,
                        gave_up: false,
                    });
                }
                if started.elapsed() >= give_up_after {
                    return Some(Event::Killed {
                        container: id,
                        gave_up: true,
                    });
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    fn publish(&self) {
        let mut views: Vec<InstanceView> = self
            .workers
            .iter()
            .map(|(id, w)| {
                let mut containers: Vec<String> = w
                    .runners
                    .iter()
                    .filter(|(_, s)| **s == RunState::Running)
                    .map(|(c, _)| c.clone())
                    .chain(w.starting.keys().cloned())
                    .collect();
                containers.sort();
                containers.dedup();
                InstanceView {
                    id: id.clone(),
                    instance_type: w.type_name.clone(),
                    provider_type: w.instance.provider_type(),
                    state: format!("{:?}", w.status).to_lowercase(),
                    idle_behavior: w.behavior.as_str().into(),
                    address: w.instance.address(),
                    price: type_price(&self.types, w.type_name.as_deref()),
                    containers,
                }
            })
            .collect();
        for p in self.pending.values() {
            views.push(InstanceView {
                id: String::new(),
                instance_type: Some(p.type_name.clone()),
                provider_type: String::new(),
                state: "booting".into(),
                idle_behavior: "run".into(),
                address: String::new(),
                price: type_price(&self.types, Some(&p.type_name)),
                containers: Vec::new(),
            });
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        if let Ok(mut slot) = self.handle.instances.lock() {
            *slot = views;
        }
    }
}
