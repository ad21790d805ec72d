//! The dispatcher: the event loop, and the execution of what the scheduler and the pool
//! decide. It reacts to events — a queue change, a probe or cloud call that finished, a timer —
//! rather than polling: every slow operation (SSH, cloud API) runs in a task of its own and
//! reports back as an event, so the loop itself never waits on the network.
//!
//! Decisions live elsewhere: which container goes where and what to reconcile in
//! `scheduler::plan`, what a result means in `scheduler::outcome`, a VM's life in
//! `pool::Pool`. This file only carries them out.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver_abi::{DriverError, InstanceType};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::ClusterConfig;
use crate::cost::{Spend, SpendMeter};
use crate::history::{History, Sample};
use crate::pool::probe::{boot_probe, Remote, RemoteError, RunnerBinary};
use crate::pool::{
    state, Cloud, CreateError, Effect, Exec, ExecFactory, FleetObserver, IdleBehavior,
    InstanceView, Listed, Pool, PoolConfig, ProbeJob, ProbeReport, Started,
};
use crate::queue::ContainerState;
use crate::queue::{Container, Queue, QueueError, RunResult};
use crate::runner::{ContainerSpec, RunEntry, RunList, WatchLine};
use crate::scheduler::status::Pressure;
use crate::scheduler::{outcome, plan, Action, Outcome, PlanInput};
use crate::scheduler::{queue_view, QueueEntry};

/// How often worker timeouts are checked when nothing else prompts it.
const TIMEOUT_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Events from the tasks the dispatcher started. Bounded: a task waits rather than letting
/// results pile up without limit; 1024 covers a full probe round of a large pool.
const EVENT_QUEUE: usize = 1024;

/// How often the spend meter is written to the state directory (and at shutdown): a crash
/// loses at most this much of the day's spend figure.
const SPEND_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// The longest the spend meter and the fleet chart go without a sample on a quiet fleet.
const METER_INTERVAL: Duration = Duration::from_secs(5);

enum Event {
    Listed {
        launched: Instant,
        result: Result<Option<Vec<Listed>>, DriverError>,
    },
    Created {
        pending: u64,
        result: Result<Listed, CreateError>,
    },
    Destroyed {
        worker: String,
        ok: bool,
    },
    Probed {
        worker: String,
        started: Instant,
        report: ProbeReport,
    },
    Started {
        container: String,
        worker: String,
        result: Result<(), RemoteError>,
        /// Finished runs the start command was asked to forget first.
        forgot: Vec<String>,
    },
    Killed {
        container: String,
        worker: String,
        gave_up: bool,
    },
    /// The first line of a worker's event stream, asked for at `launched`.
    WatchSnapshot {
        worker: String,
        launched: Instant,
        list: RunList,
    },
    /// A run on the worker started, ended or went stale (its event stream said so).
    RunSeen {
        worker: String,
        entry: RunEntry,
    },
    /// A run directory on the worker was forgotten.
    RunGone {
        worker: String,
        container: String,
    },
    /// The worker's runner flagged the node broken.
    Broken {
        worker: String,
    },
    /// The worker's event stream is alive (a heartbeat).
    Alive {
        worker: String,
    },
    /// The worker's event stream ended.
    WatchEnded {
        worker: String,
        error: Option<RemoteError>,
    },
    /// A finalize finished: the container's op lock is free. Recorded, its run is forgotten
    /// at the next pass (batched, or carried by a start); not, it is retried after a while.
    Recorded {
        container: String,
        ok: bool,
    },
    /// A forget of these finished runs came back: when it worked the pool stops reporting
    /// them; when not, they are retried after a while.
    Forgot {
        worker: String,
        containers: Vec<String>,
        ok: bool,
    },
}

/// What an operator asks of one instance, and why (logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceAction {
    /// Keep it, idle or not, and give it no new work.
    Hold { reason: String },
    /// Give it no new work; shut it down once idle.
    Drain { reason: String },
    /// Back to normal: take work, shut down after the idle timeout.
    Run { reason: String },
    /// Destroy it now; its containers go back to the queue (or are cancelled when out of
    /// attempts), as for a VM that vanished.
    Kill { reason: String },
}

/// Why an instance action was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("no instance {0}")]
    NotFound(String),
    #[error("instance {0} is already being shut down")]
    ShuttingDown(String),
    #[error("the dispatcher is stopping")]
    Stopped,
}

struct ActionRequest {
    instance: String,
    action: InstanceAction,
    reply: tokio::sync::oneshot::Sender<Result<(), ActionError>>,
}

/// Handle for the API: wake the dispatcher, read the instance list, act on instances.
#[derive(Clone)]
pub struct DispatcherHandle {
    wake: Arc<Notify>,
    actions: mpsc::Sender<ActionRequest>,
    /// std mutex: replaced whole once per pass, read by API handlers; never held across await.
    instances: Arc<Mutex<Vec<InstanceView>>>,
    /// The scheduler's queue with why each container waits; replaced at each scheduling pass.
    queue_view: Arc<Mutex<Arc<SchedulerQueue>>>,
    /// The fleet's spend today; advanced whenever the fleet changes.
    spend: Arc<Mutex<SpendMeter>>,
    /// Instances and waiting containers over the last hour.
    history: Arc<Mutex<History>>,
    max_hourly_spend: Option<f64>,
}

/// The scheduler's queue at its last pass, for the management API.
#[derive(Default)]
pub struct SchedulerQueue {
    pub entries: Vec<QueueEntry>,
    /// Entries not on a VM.
    pub waiting: usize,
    /// The quota (or `max_instances`) allowed no more instances at that pass.
    pub at_quota: bool,
    /// Container ID → position; the keys share the entries' strings.
    index: HashMap<Arc<str>, usize>,
}

impl SchedulerQueue {
    fn new(entries: Vec<QueueEntry>, at_quota: bool) -> Self {
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.container.clone(), i))
            .collect();
        SchedulerQueue {
            waiting: entries.iter().filter(|e| e.instance.is_none()).count(),
            entries,
            at_quota,
            index,
        }
    }

    pub fn get(&self, container: &str) -> Option<&QueueEntry> {
        self.index.get(container).map(|&i| &self.entries[i])
    }
}

impl DispatcherHandle {
    /// Something changed in the queue; coalesces with other wake-ups.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn instances(&self) -> Vec<InstanceView> {
        self.instances.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The fleet's price now and its spend today.
    pub fn spend(&self) -> Spend {
        let now = crate::queue::now_ms();
        match self.spend.lock() {
            Ok(m) => m.spend(now, self.max_hourly_spend),
            Err(_) => SpendMeter::new(now).spend(now, self.max_hourly_spend),
        }
    }

    /// Instances and waiting containers over the last hour, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history.lock().map(|h| h.samples()).unwrap_or_default()
    }

    /// The scheduler's queue as of its last pass.
    pub fn scheduler_queue(&self) -> Arc<SchedulerQueue> {
        self.queue_view
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Asks the loop to apply `action` to `instance`; answers once it is applied (the tag
    /// write or destroy it starts goes on in the background).
    pub async fn act(&self, instance: &str, action: InstanceAction) -> Result<(), ActionError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = ActionRequest {
            instance: instance.to_string(),
            action,
            reply,
        };
        self.actions
            .send(request)
            .await
            .map_err(|_| ActionError::Stopped)?;
        answer.await.map_err(|_| ActionError::Stopped)?
    }
}

/// What the loop itself needs of the cluster config.
struct Settings {
    types: Vec<InstanceType>,
    sync_interval: Duration,
    probe_interval: Duration,
    shutdown_confirm: Duration,
    signal: Duration,
    term: Duration,
    boot_probe_command: String,
    log_dir: PathBuf,
    max_dispatch_attempts: u32,
    maximum_price_factor: f64,
    max_per_instance: usize,
    max_log_bytes: u64,
    max_hourly_spend: Option<f64>,
    container_user: crate::runner::RunAs,
    /// Where the spend meter is kept across restarts.
    spend_path: PathBuf,
}

pub struct Dispatcher {
    settings: Settings,
    queue: Arc<dyn Queue>,
    cloud: Arc<dyn Cloud>,
    pool: Pool,
    binary: RunnerBinary,
    /// Containers being sent SIGTERM → the worker they run on.
    kills: HashMap<String, String>,
    /// Containers with a finalize/forget/start in flight: one operation per container at a time.
    busy: HashSet<String>,
    /// Containers whose finalize or forget failed: not retried before this time (a failing VM
    /// must not be asked again in a tight loop).
    retry_at: HashMap<String, Instant>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    /// Operators' instance actions, from the API.
    actions_rx: mpsc::Receiver<ActionRequest>,
    handle: DispatcherHandle,
    /// When the listing in flight was launched.
    listing: Option<Instant>,
    next_sync_at: Instant,
    /// Locked containers found at start-up: unlocked once the pool has recovered unless a
    /// worker turns out to run them.
    stale_locks: Option<HashSet<String>>,
    /// Something the plan depends on changed since the last one. Re-planning reads the whole
    /// active queue, so probes that changed nothing (most, in a large fleet) do not cause it.
    replan: bool,
    /// The earliest moment a plan made now could come out differently by time alone (a
    /// hold-off, back-off or retry ending, or the pool counting as recovered).
    plan_expires_at: Option<Instant>,
    /// The last plan wrote to the queue: the next pass comes at once.
    plan_again_now: bool,
    /// Worker timeouts are not checked again before this (unless something changed).
    next_timeouts_at: Instant,
    /// The active containers in queue order, kept up to date from the queue's changes (a
    /// pass reads what changed since the last, not the whole queue).
    active: Vec<Container>,
    /// The queue revision `active` reflects; `None` before the first read.
    active_rev: Option<i64>,
    /// When this process first saw each active container (Unix milliseconds).
    first_seen: HashMap<String, i64>,
    /// When the spend meter was last saved.
    spend_saved_at: Instant,
    /// When the meter and the chart move next if nothing else happens.
    next_meter_at: Instant,
    observer: Arc<dyn FleetObserver>,
}

impl Dispatcher {
    pub fn new(
        config: &ClusterConfig,
        queue: Arc<dyn Queue>,
        cloud: Arc<dyn Cloud>,
        factory: Arc<dyn ExecFactory>,
        binary: RunnerBinary,
        public_key: Option<String>,
        observer: Arc<dyn FleetObserver>,
    ) -> Result<Self, QueueError> {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (actions_tx, actions_rx) = mpsc::channel(64);
        let now = Instant::now();
        let stale: HashSet<String> = queue
            .list(true)?
            .into_iter()
            .filter(|c| c.state == ContainerState::Locked)
            .map(|c| c.id)
            .collect();
        let t = &config.timeouts;
        let pool = Pool::new(
            PoolConfig {
                types: config.instance_types(),
                timeouts: state::Timeouts {
                    idle: t.idle,
                    booting: t.booting,
                    probe: t.probe,
                },
                probe_interval: t.probe_interval,
                watched_probe_interval: t.watched_probe_interval,
                shutdown_retry: t.shutdown,
                max_probes_per_second: config.limits.max_probes_per_second,
                stale_lock: t.stale_lock,
                image: config.image.clone(),
                init_command: config.instance_init_command.clone(),
                resource_tags: config.resource_tags.clone(),
                public_key,
            },
            factory,
            Arc::clone(&observer),
            now,
        );
        Ok(Dispatcher {
            settings: Settings {
                types: config.instance_types(),
                sync_interval: t.sync_interval,
                probe_interval: t.probe_interval,
                shutdown_confirm: t.shutdown,
                signal: t.signal,
                term: t.term,
                boot_probe_command: config.boot_probe_command.clone(),
                log_dir: config.state_dir.join("logs"),
                max_dispatch_attempts: config.limits.max_dispatch_attempts,
                maximum_price_factor: config.limits.maximum_price_factor,
                max_per_instance: config.limits.max_running_containers_per_instance,
                max_log_bytes: config.limits.max_log_bytes,
                max_hourly_spend: (config.limits.max_hourly_spend > 0.0)
                    .then_some(config.limits.max_hourly_spend),
                spend_path: config.state_dir.join("spend.json"),
                container_user: config.container_user.clone(),
            },
            queue,
            cloud,
            pool,
            binary,
            kills: HashMap::new(),
            busy: HashSet::new(),
            retry_at: HashMap::new(),
            events_tx,
            events_rx,
            actions_rx,
            handle: DispatcherHandle {
                wake: Arc::new(Notify::new()),
                actions: actions_tx,
                instances: Arc::new(Mutex::new(Vec::new())),
                queue_view: Arc::new(Mutex::new(Arc::new(SchedulerQueue::default()))),
                spend: Arc::new(Mutex::new(SpendMeter::load(
                    &config.state_dir.join("spend.json"),
                    crate::queue::now_ms(),
                ))),
                max_hourly_spend: (config.limits.max_hourly_spend > 0.0)
                    .then_some(config.limits.max_hourly_spend),
                history: Arc::new(Mutex::new(History::default())),
            },
            listing: None,
            next_sync_at: now,
            stale_locks: Some(stale),
            replan: true,
            plan_expires_at: None,
            plan_again_now: false,
            next_timeouts_at: now,
            active: Vec::new(),
            active_rev: None,
            first_seen: HashMap::new(),
            spend_saved_at: now,
            next_meter_at: now,
            observer,
        })
    }

    pub fn handle(&self) -> DispatcherHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown` resolves. VMs stay, as they would with the original.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let wake = Arc::clone(&self.handle.wake);
        loop {
            self.pass();
            let deadline = self.next_wake(Instant::now());
            tokio::select! {
                _ = &mut shutdown => {
                    // Actions asked from now on, or still queued, are refused at once.
                    self.actions_rx.close();
                    while self.actions_rx.try_recv().is_ok() {}
                    break;
                }
                _ = wake.notified() => self.replan = true,
                Some(event) = self.events_rx.recv() => self.apply(event),
                Some(request) = self.actions_rx.recv() => self.act(request),
                _ = tokio::time::sleep_until(deadline) => {}
            }
            // Take whatever else arrived before planning again.
            while let Ok(event) = self.events_rx.try_recv() {
                self.apply(event);
            }
        }
        self.meter_spend(Instant::now(), true);
        for exec in self.pool.executors() {
            exec.close().await;
        }
        // `stop` is a driver call: off the event loop, like every other.
        let cloud = Arc::clone(&self.cloud);
        if let Err(e) = tokio::task::spawn_blocking(move || cloud.stop()).await {
            log::warn!("Stopping the instance set failed: {e}");
        }
        log::info!("Dispatcher stopped; VMs stay up and are adopted at the next start.");
    }

    fn next_wake(&self, now: Instant) -> Instant {
        if self.plan_again_now {
            return now + Duration::from_millis(1);
        }
        let mut at = now + self.settings.probe_interval;
        if self.listing.is_none() {
            // While a listing is in flight its result is the wake-up.
            at = at.min(self.next_sync_at.max(now));
        }
        if let Some(t) = self.pool.next_deadline(now) {
            at = at.min(t);
        }
        if let Some(t) = self.cloud.next_holdoff_end() {
            at = at.min(t);
        }
        if let Some(t) = self.retry_at.values().filter(|t| **t > now).min() {
            at = at.min(*t);
        }
        at.max(now + Duration::from_millis(1))
    }

    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future<Output = Event> + Send + 'static,
    {
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            // Only fails when the dispatcher stopped; the result no longer matters then.
            let _ = tx.send(f.await).await;
        });
    }

    fn act(&mut self, request: ActionRequest) {
        let id = request.instance.as_str();
        let result = if !self.pool.has_worker(id) {
            Err(ActionError::NotFound(id.to_string()))
        } else if self.pool.is_shutting_down(id) {
            Err(ActionError::ShuttingDown(id.to_string()))
        } else {
            let effect = match &request.action {
                InstanceAction::Kill { reason } => {
                    let reason = format!("killed by an operator: {reason}");
                    self.pool.shutdown(id, &reason, Instant::now())
                }
                InstanceAction::Hold { reason }
                | InstanceAction::Drain { reason }
                | InstanceAction::Run { reason } => {
                    let behavior = match &request.action {
                        InstanceAction::Hold { .. } => IdleBehavior::Hold,
                        InstanceAction::Drain { .. } => IdleBehavior::Drain,
                        _ => IdleBehavior::Run,
                    };
                    log::info!(
                        "instance={id} idle_behavior={} reason={reason:?} (set by an operator)",
                        behavior.as_str()
                    );
                    self.pool.set_behavior(id, behavior)
                }
            };
            self.execute(effect.into_iter().collect());
            self.replan = true;
            Ok(())
        };
        let _ = request.reply.send(result);
    }

    fn apply(&mut self, event: Event) {
        let now = Instant::now();
        let generation = self.pool.generation();
        let headroom = self.cloud.quota_headroom(self.pool.instance_count());
        match &event {
            // These change the plan's inputs only if the pool (or the quota) says so.
            Event::Probed { .. }
            | Event::WatchSnapshot { .. }
            | Event::WatchEnded { .. }
            | Event::Alive { .. }
            | Event::Listed { .. } => {}
            _ => self.replan = true,
        }
        if let Event::RunSeen { worker, .. }
        | Event::RunGone { worker, .. }
        | Event::Broken { worker } = &event
        {
            self.pool.heard_from(worker, now);
        }
        self.apply_event(event, now);
        if self.pool.generation() != generation
            || self.cloud.quota_headroom(self.pool.instance_count()) != headroom
        {
            self.replan = true;
        }
    }

    fn apply_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::Listed { launched, result } => {
                self.listing = None;
                self.next_sync_at = now + self.settings.sync_interval;
                match result {
                    Ok(Some(list)) => {
                        let effects = self.pool.apply_listing(list, launched, now);
                        self.cloud
                            .observe_instance_count(self.pool.instance_count());
                        self.execute(effects);
                    }
                    Ok(None) => log::debug!("Listing held off by a rate limit."),
                    Err(e) => log::warn!("Listing instances failed: {e}"),
                }
            }
            Event::Created { pending, result } => self.pool.apply_created(pending, result, now),
            Event::Destroyed { worker, ok } => {
                let effects = self.pool.apply_destroyed(&worker, ok, now);
                if ok {
                    // Confirm with the cloud soon.
                    self.next_sync_at = self.next_sync_at.min(now + self.settings.shutdown_confirm);
                }
                self.execute(effects);
            }
            Event::Probed {
                worker,
                started,
                report,
            } => {
                let effects = self.pool.apply_probe(&worker, started, report, now);
                self.execute(effects);
            }
            Event::Started {
                container,
                worker,
                result,
                forgot,
            } => {
                let ok = result.is_ok();
                self.apply_started(container, worker.clone(), result, now);
                if !forgot.is_empty() {
                    self.forgot(&worker, forgot, ok, now);
                }
            }
            Event::WatchSnapshot {
                worker,
                launched,
                list,
            } => {
                let effects = self.pool.apply_snapshot(&worker, launched, list, now);
                self.execute(effects);
            }
            Event::RunSeen { worker, entry } => {
                log::debug!(
                    "container={} instance={worker} runner reports {:?}",
                    entry.id,
                    entry.state
                );
                self.pool.apply_run_event(&worker, entry, now);
            }
            Event::Alive { worker } => self.pool.heard_from(&worker, now),
            Event::RunGone { worker, container } => {
                self.pool.runner_forgotten(&worker, &container, now)
            }
            Event::Broken { worker } => {
                let effect = self.pool.apply_broken(&worker);
                self.execute(effect.into_iter().collect());
            }
            Event::WatchEnded { worker, error } => {
                match error {
                    Some(e) => log::debug!("instance={worker} event stream ended: {e}"),
                    None => log::debug!("instance={worker} event stream ended"),
                }
                self.pool.watch_ended(&worker, now);
            }
            Event::Killed {
                container,
                worker,
                gave_up,
            } => {
                self.kills.remove(&container);
                if gave_up {
                    let effect = self.pool.runner_ignored_sigterm(&worker, &container);
                    self.execute(effect.into_iter().collect());
                } else {
                    self.pool.runner_stopped(&worker, &container);
                }
            }
            Event::Recorded { container, ok } => {
                self.busy.remove(&container);
                if ok {
                    self.retry_at.remove(&container);
                } else {
                    self.retry_at
                        .insert(container, now + self.settings.probe_interval);
                }
            }
            Event::Forgot {
                worker,
                containers,
                ok,
            } => self.forgot(&worker, containers, ok, now),
        }
    }

    fn apply_started(
        &mut self,
        container: String,
        worker: String,
        result: Result<(), RemoteError>,
        now: Instant,
    ) {
        self.busy.remove(&container);
        match self.pool.apply_started(&container, &worker, &result, now) {
            Started::Running { instance_type } => {
                match self
                    .queue
                    .set_running(&container, &worker, instance_type.as_deref())
                {
                    Ok(()) => {
                        log::info!("container={container} instance={worker} from=Locked to=Running")
                    }
                    // A probe saw it running here first and it was adopted: nothing to record.
                    Err(QueueError::Conflict {
                        state: ContainerState::Running,
                        ..
                    }) if self
                        .queue
                        .get(&container)
                        .is_ok_and(|c| c.instance_id.as_deref() == Some(worker.as_str())) =>
                    {
                        log::debug!("container={container} already recorded running here")
                    }
                    // Running elsewhere already (a run thought gone turned up meanwhile): this
                    // second run must not go on.
                    Err(QueueError::Conflict {
                        state: ContainerState::Running,
                        ..
                    }) => {
                        log::warn!(
                            "container={container} instance={worker} started while it already runs elsewhere; stopping this run"
                        );
                        self.kill(&container, &worker);
                    }
                    Err(e) => {
                        log::warn!("container={container} started, but recording it failed: {e}")
                    }
                }
            }
            Started::Unconfirmed => {
                if let Err(e) = result {
                    log::warn!(
                        "container={container} instance={worker} start failed: {e}; the next probe tells whether it runs"
                    );
                }
            }
            Started::WorkerGone => {
                self.attempt_failed(&container, &format!("{worker} went away during the start"))
            }
        }
    }

    /// Carries out the pool's requests.
    fn execute(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Destroy { worker, instance } => {
                    let cloud = Arc::clone(&self.cloud);
                    self.spawn(async move {
                        let ok = match cloud.destroy(instance).await {
                            Ok(()) => true,
                            Err(e) => {
                                log::warn!("instance={worker} destroy failed: {e}");
                                false
                            }
                        };
                        Event::Destroyed { worker, ok }
                    });
                }
                Effect::SaveTags {
                    worker,
                    instance,
                    tags,
                } => {
                    let cloud = Arc::clone(&self.cloud);
                    tokio::spawn(async move {
                        if let Err(e) = cloud.set_tags(instance, tags).await {
                            log::warn!("instance={worker} saving idle behavior failed: {e}");
                        }
                    });
                }
                Effect::Close(exec) => {
                    tokio::spawn(async move { exec.close().await });
                }
                Effect::AttemptFailed { container, reason } => {
                    self.attempt_failed(&container, &reason)
                }
                Effect::Watch { worker, exec, sudo } => self.watch(worker, exec, sudo),
            }
        }
    }

    /// One round: cloud sync, probes, worker timeouts, then the scheduler's plan.
    fn pass(&mut self) {
        let now = Instant::now();
        if self.listing.is_none() && now >= self.next_sync_at {
            self.listing = Some(now);
            let cloud = Arc::clone(&self.cloud);
            self.spawn(async move {
                Event::Listed {
                    launched: now,
                    result: cloud.instances().await,
                }
            });
        }
        for job in self.pool.due_probes(now) {
            self.probe(job);
        }
        // Timeouts are seconds to minutes long: checking every worker at each heartbeat of a
        // large fleet would cost more than everything else the loop does.
        if self.replan || now >= self.next_timeouts_at || self.pool.destroy_retry_due(now) {
            self.next_timeouts_at = now + TIMEOUT_CHECK_INTERVAL;
            let effects = self.pool.apply_timeouts(now);
            if !effects.is_empty() {
                self.replan = true;
            }
            self.execute(effects);
        }
        let expired = self.plan_expires_at.is_some_and(|t| now >= t);
        if !(self.replan || expired) {
            // A quiet fleet still costs money: the meter and the chart move on a timer too.
            if now >= self.next_meter_at {
                self.meter_spend(now, false);
            }
            return;
        }
        if self.pool.listed_once() {
            self.replan = false;
            self.release_stale_locks(now);
            let read = self.schedule(now);
            // What this pass wrote to the queue (a requeue, a cancel, an adoption) is an input
            // of the next: plan again at once rather than at the next event. Not after a failed
            // read: that waits for the next wake-up, never a tight loop.
            self.plan_again_now = read && Some(self.queue.revision()) != self.active_rev;
            self.replan |= self.plan_again_now;
            self.plan_expires_at = [
                self.cloud.next_holdoff_end(),
                self.pool.next_backoff_end(now),
                self.pool.recovery_deadline(now),
                self.retry_at.values().filter(|t| **t > now).min().copied(),
            ]
            .into_iter()
            .flatten()
            .min();
        }
        if let Ok(mut slot) = self.handle.instances.lock() {
            *slot = self.pool.view(now, crate::queue::now_ms());
        }
        self.meter_spend(now, false);
    }

    /// Counts the fleet's spend up to now at the price it had, and takes today's price; saves
    /// the meter at most once a minute (and at `final_save`).
    fn meter_spend(&mut self, now: Instant, final_save: bool) {
        self.next_meter_at = now + METER_INTERVAL;
        let price = self.pool.hourly_price();
        let waiting = self
            .handle
            .queue_view
            .lock()
            .map(|q| q.waiting)
            .unwrap_or(0);
        if let Ok(mut history) = self.handle.history.lock() {
            history.record(Sample {
                at_ms: crate::queue::now_ms(),
                instances: self.pool.instance_count(),
                waiting,
            });
        }
        let Ok(mut meter) = self.handle.spend.lock() else {
            return;
        };
        meter.accrue(crate::queue::now_ms(), price);
        if final_save || now >= self.spend_saved_at + SPEND_SAVE_INTERVAL {
            self.spend_saved_at = now;
            if let Err(e) = meter.save(&self.settings.spend_path) {
                log::warn!(
                    "Saving the spend meter to {} failed: {e}",
                    self.settings.spend_path.display()
                );
            }
        }
    }

    fn probe(&self, job: ProbeJob) {
        let binary = self.binary.clone();
        let boot_command = self.settings.boot_probe_command.clone();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo: job.sudo,
            };
            let exec: &dyn Exec = &*job.exec;
            let mut booted = !job.needs_boot;
            // When SSH first answered and when the VM was ready, for the boot metrics.
            let mut reached_at = None;
            let mut ready_at = None;
            if job.needs_boot {
                let boot = boot_probe(exec, &boot_command).await;
                if boot.is_ok() {
                    reached_at = Some(Instant::now());
                }
                booted = matches!(boot, Ok(true));
                // Deploy even when the boot probe failed: a VM already running containers
                // must still be listable (reference #20235).
                if let Err(e) = remote.deploy(exec).await {
                    booted = false;
                    // A runner of the wrong protocol is an operator's fault to show, not a
                    // VM still booting.
                    if matches!(e, RemoteError::Protocol { .. }) {
                        return Event::Probed {
                            worker: job.worker,
                            started: job.started,
                            report: ProbeReport {
                                reached_at,
                                ready_at: None,
                                booted,
                                list_took: Duration::ZERO,
                                list: Err(e),
                            },
                        };
                    }
                    log::debug!("instance={} runner deploy failed: {e}", job.worker);
                }
                if booted {
                    ready_at = Some(Instant::now());
                }
            }
            let list_started = Instant::now();
            let list = remote.list(exec).await;
            if list.is_ok() && reached_at.is_none() {
                reached_at = Some(list_started);
            }
            Event::Probed {
                worker: job.worker,
                started: job.started,
                report: ProbeReport {
                    reached_at,
                    ready_at,
                    booted,
                    list_took: list_started.elapsed(),
                    list,
                },
            }
        });
    }

    /// Follows the worker's event stream: its snapshot and each change become events, so a
    /// container's end is acted on the moment the runner sees it, not at the next probe.
    fn watch(&self, worker: String, exec: Arc<dyn Exec>, sudo: bool) {
        let binary = self.binary.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let launched = Instant::now();
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let (lines_tx, mut lines) = mpsc::channel::<WatchLine>(64);
            let stream = remote.watch(&*exec, lines_tx);
            let forward = async {
                while let Some(line) = lines.recv().await {
                    let event = match line {
                        WatchLine::Snapshot(list) => Event::WatchSnapshot {
                            worker: worker.clone(),
                            launched,
                            list,
                        },
                        WatchLine::Run(entry) => Event::RunSeen {
                            worker: worker.clone(),
                            entry,
                        },
                        WatchLine::Gone(id) => Event::RunGone {
                            worker: worker.clone(),
                            container: id,
                        },
                        WatchLine::Broken => Event::Broken {
                            worker: worker.clone(),
                        },
                        WatchLine::Heartbeat => Event::Alive {
                            worker: worker.clone(),
                        },
                    };
                    if events.send(event).await.is_err() {
                        // The dispatcher stopped.
                        return;
                    }
                }
            };
            let (result, ()) = tokio::join!(stream, forward);
            let _ = events
                .send(Event::WatchEnded {
                    worker,
                    error: result.err(),
                })
                .await;
        });
    }

    /// Locks from a previous run that no worker turned out to hold go back to the queue once
    /// the pool has recovered (the stale-lock fixer).
    fn release_stale_locks(&mut self, now: Instant) {
        if !self.pool.recovered(now) {
            return;
        }
        let Some(stale) = self.stale_locks.take() else {
            return;
        };
        let running = self.pool.running_containers();
        for id in stale.iter().filter(|id| !running.contains(id.as_str())) {
            match self.queue.unlock(id) {
                Ok(()) => log::info!(
                    "container={id} from=Locked to=Queued (stale lock from a previous run)"
                ),
                Err(e) => log::debug!("container={id} stale lock not released: {e}"),
            }
        }
    }

    /// Brings `active` up to date with what was written to the queue since the last read.
    fn refresh_active(&mut self) -> Result<(), QueueError> {
        let changes = self.queue.changes_since(self.active_rev)?;
        if self.active_rev.is_none() {
            self.active = changes.containers;
        } else {
            for c in changes.containers {
                let at = self.active.binary_search_by_key(&c.seq, |a| a.seq);
                let keep = matches!(
                    c.state,
                    ContainerState::Queued | ContainerState::Locked | ContainerState::Running
                );
                match (at, keep) {
                    (Ok(i), true) => self.active[i] = c,
                    (Ok(i), false) => {
                        self.active.remove(i);
                    }
                    (Err(i), true) => self.active.insert(i, c),
                    (Err(_), false) => {}
                }
            }
        }
        self.active_rev = Some(changes.rev);
        Ok(())
    }

    /// Containers of interest besides the active ones: those a runner still reports (finished,
    /// not yet forgotten); and the workers running containers the queue does not know.
    fn containers_of_interest(
        &mut self,
        runners: &rustc_hash::FxHashMap<String, crate::scheduler::RunnerSeen>,
    ) -> Result<(Vec<Container>, HashSet<String>), QueueError> {
        self.refresh_active()?;
        let mut extra = Vec::new();
        let mut foreign = HashSet::new();
        let known: rustc_hash::FxHashSet<&str> =
            self.active.iter().map(|c| c.id.as_str()).collect();
        for (cid, seen) in runners {
            if known.contains(cid.as_str()) {
                continue;
            }
            match self.queue.get(cid) {
                Ok(c) => extra.push(c),
                Err(_) => {
                    foreign.insert(seen.worker().to_string());
                }
            }
        }
        Ok((extra, foreign))
    }

    /// Plans and carries out the plan; false when the queue could not be read.
    fn schedule(&mut self, now: Instant) -> bool {
        let runners = self.pool.runners();
        let (extra, foreign) = match self.containers_of_interest(&runners) {
            Ok(c) => c,
            Err(e) => {
                log::error!("Reading the queue failed: {e}");
                // Planned again at the next wake-up, whatever it is.
                self.replan = true;
                return false;
            }
        };
        // Borrowed, not copied, for the pass (a copy per pass is most of a pass's cost with a
        // long queue); put back at the end.
        let active = std::mem::take(&mut self.active);
        let containers: std::borrow::Cow<'_, [Container]> = if extra.is_empty() {
            std::borrow::Cow::Borrowed(&active)
        } else {
            let mut all = active.clone();
            all.extend(extra);
            std::borrow::Cow::Owned(all)
        };
        self.plan_and_carry_out(&containers, &runners, &foreign, now);
        drop(containers);
        self.active = active;
        true
    }

    fn plan_and_carry_out(
        &mut self,
        containers: &[Container],
        runners: &rustc_hash::FxHashMap<String, crate::scheduler::RunnerSeen>,
        foreign: &HashSet<String>,
        now: Instant,
    ) {
        self.note_first_seen(containers);
        let slots = self.pool.slots(foreign);
        let at_capacity: rustc_hash::FxHashSet<String> = self
            .settings
            .types
            .iter()
            .filter(|t| self.cloud.at_capacity(t) || self.pool.create_backed_off(&t.name, now))
            .map(|t| t.provider_type.clone())
            .collect();
        let input = PlanInput {
            containers,
            workers: &slots,
            runners,
            types: &self.settings.types,
            maximum_price_factor: self.settings.maximum_price_factor,
            max_per_instance: self.settings.max_per_instance,
            quota_headroom: self.cloud.quota_headroom(self.pool.instance_count()),
            at_capacity: &at_capacity,
            creates_allowed: self.cloud.creates_allowed(),
            spend_left: match self.settings.max_hourly_spend {
                Some(cap) => (cap - self.pool.hourly_price()).max(0.0),
                None => f64::INFINITY,
            },
            pool_recovered: self.pool.recovered(now),
            listings_settled: self.pool.listings_settled(),
        };
        let actions = plan(&input);
        self.publish_queue_view(&input, &actions, now);
        let by_id: rustc_hash::FxHashMap<&str, &Container> =
            containers.iter().map(|c| (c.id.as_str(), c)).collect();
        let mut lock_failed: HashSet<String> = HashSet::new();
        // Finished runs to forget, per worker: carried by a start on that worker if there is
        // one this pass, otherwise one command per worker.
        let mut forgets: HashMap<String, Vec<String>> = HashMap::new();
        for action in &actions {
            if let Action::Forget { container, worker } = action {
                if !self.held_back(container, now) && !self.busy.contains(container) {
                    forgets
                        .entry(worker.clone())
                        .or_default()
                        .push(container.clone());
                }
            }
        }
        for action in actions {
            self.carry_out(action, &by_id, &mut lock_failed, &mut forgets, now);
        }
        for (worker, containers) in forgets {
            self.forget(&worker, containers);
        }
    }

    /// Records, for the API, the queue in scheduling order and why each container waits.
    fn publish_queue_view(&self, input: &PlanInput<'_>, actions: &[Action], now: Instant) {
        let pressure = Pressure {
            types: input.types,
            maximum_price_factor: input.maximum_price_factor,
            quota_headroom: input.quota_headroom,
            creates_allowed: input.creates_allowed,
            spend_left: input.spend_left,
            at_capacity: &|t| input.at_capacity.contains(&t.provider_type),
            create_trouble: &|t| self.pool.create_trouble(&t.name, now),
        };
        let wall_now = crate::queue::now_ms();
        let first_seen = |id: &str| self.first_seen.get(id).copied().unwrap_or(wall_now);
        let view = SchedulerQueue::new(
            queue_view(input, actions, &pressure, &first_seen),
            input.quota_headroom == 0,
        );
        if let Ok(mut slot) = self.handle.queue_view.lock() {
            *slot = Arc::new(view);
        }
    }

    /// Keeps when each active container was first seen, for the queue view.
    fn note_first_seen(&mut self, containers: &[Container]) {
        let wall_now = crate::queue::now_ms();
        let active: HashSet<&str> = containers
            .iter()
            .filter(|c| !c.state.is_final())
            .map(|c| c.id.as_str())
            .collect();
        self.first_seen.retain(|id, _| active.contains(id.as_str()));
        for id in active {
            if !self.first_seen.contains_key(id) {
                self.first_seen.insert(id.to_string(), wall_now);
            }
        }
    }

    fn carry_out(
        &mut self,
        action: Action,
        by_id: &rustc_hash::FxHashMap<&str, &Container>,
        lock_failed: &mut HashSet<String>,
        forgets: &mut HashMap<String, Vec<String>>,
        now: Instant,
    ) {
        match action {
            Action::Lock {
                container,
                instance_type,
            } => match self.queue.lock(&container, &instance_type) {
                Ok(true) => {
                    log::info!("container={container} type={instance_type} from=Queued to=Locked")
                }
                Ok(false) => {
                    lock_failed.insert(container);
                }
                Err(e) => {
                    log::warn!("container={container} lock: {e}");
                    lock_failed.insert(container);
                    self.replan = true;
                }
            },
            Action::Unlock { container } => match self.queue.unlock(&container) {
                Ok(()) => log::info!("container={container} from=Locked to=Queued"),
                Err(e) => log::debug!("container={container} unlock: {e}"),
            },
            Action::Cancel { container, reason } => match self.queue.cancel(&container, &reason) {
                Ok(()) => log::info!("container={container} to=Cancelled reason={reason:?}"),
                Err(e) => log::debug!("container={container} cancel: {e}"),
            },
            // Not while its result is being collected: that result wins.
            Action::AttemptFailed { container, reason } => {
                if !self.busy.contains(&container) {
                    self.attempt_failed(&container, &reason)
                }
            }
            Action::Adopt { container, worker } => {
                let type_name = self.pool.type_of(&worker).map(str::to_string);
                match self
                    .queue
                    .set_running(&container, &worker, type_name.as_deref())
                {
                    Ok(()) => {
                        log::info!("container={container} instance={worker} to=Running (adopted)")
                    }
                    Err(e) => log::debug!("container={container} adopt: {e}"),
                }
            }
            Action::Start { container, worker } => {
                if !lock_failed.contains(&container) {
                    if let Some(c) = by_id.get(container.as_str()) {
                        let forget = forgets.remove(&worker).unwrap_or_default();
                        self.start(c, &worker, forget, now);
                    }
                }
            }
            Action::Create {
                instance_type,
                container,
            } => {
                if !lock_failed.contains(&container) {
                    self.create(&instance_type);
                }
            }
            Action::Finalize { container, worker } => {
                if let (Some(c), false) = (
                    by_id.get(container.as_str()),
                    self.held_back(&container, now),
                ) {
                    self.finalize((*c).clone(), &worker);
                }
            }
            Action::Kill { container, worker } => self.kill(&container, &worker),
            // Gathered per worker before the other actions (see `schedule`).
            Action::Forget { .. } => {}
            Action::Shutdown { worker } => {
                let effect = self
                    .pool
                    .shutdown(&worker, "frees quota for other work", now);
                self.execute(effect.into_iter().collect());
            }
        }
    }

    /// A finalize or forget of this container failed a moment ago.
    fn held_back(&self, container: &str, now: Instant) -> bool {
        self.retry_at.get(container).is_some_and(|t| now < *t)
    }

    fn attempt_failed(&mut self, container: &str, reason: &str) {
        match self
            .queue
            .attempt_failed(container, reason, self.settings.max_dispatch_attempts)
        {
            Ok(to) => {
                log::warn!("container={container} to={to:?} dispatch attempt failed: {reason}")
            }
            Err(e) => log::debug!("container={container} attempt not recorded: {e}"),
        }
    }

    fn start(&mut self, c: &Container, worker: &str, forget: Vec<String>, now: Instant) {
        if self.busy.contains(&c.id) {
            if !forget.is_empty() {
                self.forget(worker, forget);
            }
            return;
        }
        let Some((exec, sudo)) = self.pool.begin_start(&c.id, worker, now) else {
            // Worker gone or going: its runs are nobody's to forget any more.
            return;
        };
        let forget: Vec<String> = forget
            .into_iter()
            .filter(|id| !self.busy.contains(id))
            .collect();
        self.busy.extend(forget.iter().cloned());
        self.busy.insert(c.id.clone());
        let spec = ContainerSpec {
            id: c.id.clone(),
            command: c.command.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            image: c.image.clone(),
            run_as: self.settings.container_user.clone(),
        };
        let binary = self.binary.clone();
        let worker = worker.to_string();
        let observer = Arc::clone(&self.observer);
        let submitted_at_ms = c.created_at_ms;
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let result = remote.start(&*exec, &spec, &forget).await;
            if result.is_ok() {
                let waited = crate::queue::now_ms().saturating_sub(submitted_at_ms);
                observer
                    .container_started(Duration::from_millis(u64::try_from(waited).unwrap_or(0)));
            }
            Event::Started {
                container: spec.id,
                worker,
                result,
                forgot: forget,
            }
        });
    }

    /// A forget (alone or carried by a start) came back for `containers`.
    fn forgot(&mut self, worker: &str, containers: Vec<String>, ok: bool, now: Instant) {
        for id in containers {
            self.busy.remove(&id);
            if ok {
                self.pool.runner_forgotten(worker, &id, now);
                self.retry_at.remove(&id);
            } else {
                self.retry_at.insert(id, now + self.settings.probe_interval);
            }
        }
    }

    fn create(&mut self, type_name: &str) {
        let Some((pending, request)) = self.pool.begin_create(type_name) else {
            return;
        };
        let cloud = Arc::clone(&self.cloud);
        let count = self.pool.instance_count();
        self.spawn(async move {
            Event::Created {
                pending,
                result: cloud.create(request, count).await,
            }
        });
    }

    fn finalize(&mut self, c: Container, worker: &str) {
        if self.busy.contains(&c.id) {
            return;
        }
        let Some((exec, sudo)) = self.pool.remote(worker) else {
            return;
        };
        self.busy.insert(c.id.clone());
        let binary = self.binary.clone();
        let queue = Arc::clone(&self.queue);
        let dir = self.settings.log_dir.join(&c.id);
        let cap = self.settings.max_log_bytes;
        let price = self.price_of(worker);
        let worker = worker.to_string();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let id = c.id.clone();
            let into = RecordInto {
                dir: &dir,
                max_log_bytes: cap,
                price_per_hour: price,
            };
            let result = record_result(&remote, &*exec, &*queue, &c, &worker, &into).await;
            if let Err(e) = &result {
                log::warn!("container={id} instance={worker} recording the result failed: {e}");
            }
            Event::Recorded {
                container: id,
                ok: result.is_ok(),
            }
        });
    }

    /// Forgets finished runs on one worker in one command; they are busy until it returns.
    fn forget(&mut self, worker: &str, containers: Vec<String>) {
        // Busy meanwhile (a start this pass, a finalize) leaves them for a later pass.
        let containers: Vec<String> = containers
            .into_iter()
            .filter(|c| !self.busy.contains(c))
            .collect();
        if containers.is_empty() {
            return;
        }
        let Some((exec, sudo)) = self.pool.remote(worker) else {
            return;
        };
        self.busy.extend(containers.iter().cloned());
        let binary = self.binary.clone();
        let queue = Arc::clone(&self.queue);
        let price = self.price_of(worker);
        let worker = worker.to_string();
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let result = remote.forget(&*exec, &containers).await;
            if let Err(e) = &result {
                log::debug!("instance={worker} forget {containers:?}: {e}");
            } else if let Some(price) = price {
                // Containers cancelled while they ran end here, not in a finalize.
                for id in &containers {
                    record_cost(&*queue, id, price);
                }
            }
            Event::Forgot {
                worker,
                containers,
                ok: result.is_ok(),
            }
        });
    }

    /// The hourly price of a worker's (configured) type.
    fn price_of(&self, worker: &str) -> Option<f64> {
        let type_name = self.pool.type_of(worker)?;
        self.settings
            .types
            .iter()
            .find(|t| t.name == type_name)
            .map(|t| t.price)
    }

    /// SIGTERM, repeated every `signal` until the runner is gone or `term` passed; never SIGKILL.
    fn kill(&mut self, container: &str, worker: &str) {
        if self.kills.contains_key(container) {
            return;
        }
        let Some((exec, sudo)) = self.pool.remote(worker) else {
            return;
        };
        self.kills.insert(container.to_string(), worker.to_string());
        log::info!("container={container} instance={worker} sending SIGTERM");
        let binary = self.binary.clone();
        let id = container.to_string();
        let worker = worker.to_string();
        let every = self.settings.signal;
        let give_up_after = self.settings.term;
        self.spawn(async move {
            let remote = Remote {
                binary: &binary,
                sudo,
            };
            let started = Instant::now();
            loop {
                if matches!(remote.kill(&*exec, &id, libc::SIGTERM).await, Ok(true)) {
                    break Event::Killed {
                        container: id,
                        worker,
                        gave_up: false,
                    };
                }
                if started.elapsed() >= give_up_after {
                    break Event::Killed {
                        container: id,
                        worker,
                        gave_up: true,
                    };
                }
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// Records a finished container's share of its VM's price (once; a failure only loses the
/// figure, never the result).
fn record_cost(queue: &dyn Queue, id: &str, price_per_hour: f64) {
    match queue.record_cost(id, price_per_hour) {
        Ok(Some(cost)) => log::debug!("container={id} cost={cost:.6}"),
        Ok(None) => {}
        Err(e) => log::warn!("container={id} recording its cost failed: {e}"),
    }
}

/// Why a result could not be recorded.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Where a result goes and what it is recorded with.
#[derive(Clone, Copy)]
struct RecordInto<'a> {
    /// The container's log directory.
    dir: &'a std::path::Path,
    max_log_bytes: u64,
    /// Its VM's price, for its cost.
    price_per_hour: Option<f64>,
}

/// Fetches a finished runner's exit status and logs in one streamed command and records the
/// outcome. The run is forgotten on the VM afterwards (only once the result is safely in the
/// queue), by the next pass.
async fn record_result(
    remote: &Remote<'_>,
    exec: &dyn Exec,
    queue: &dyn Queue,
    c: &Container,
    worker: &str,
    into: &RecordInto<'_>,
) -> Result<(), RecordError> {
    let RecordInto {
        dir,
        max_log_bytes,
        price_per_hour,
    } = *into;
    let id = &c.id;
    let collected = remote.collect(exec, id, max_log_bytes, dir).await?;
    let exit = collected.exit;
    match outcome(c, exit.exit_code) {
        Outcome::AlreadyFinal => {}
        Outcome::Cancel(reason) => {
            queue.cancel(id, reason)?;
            log::info!("container={id} instance={worker} to=Cancelled reason={reason:?}");
        }
        Outcome::Complete => {
            let log_dir = dir.display().to_string();
            queue.complete(
                id,
                &RunResult {
                    exit_code: exit.exit_code,
                    runtime_error: exit.error.as_deref(),
                    log_dir: &log_dir,
                    started_at_ms: exit.started_at_ms,
                    finished_at_ms: exit.finished_at_ms,
                    price_per_hour,
                },
            )?;
            log::info!(
                "container={id} instance={worker} to=Complete exit_code={}",
                exit.exit_code
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
