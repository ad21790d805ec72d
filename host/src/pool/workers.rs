//! `Pool`: the registry of workers and pending creates. It applies what the cloud and the VMs
//! report (listings, creates, destroys, probes, starts) and the worker timeouts, and hands the
//! dispatcher the work to do as values (`ProbeJob`, `Effect`). It does no I/O itself, so every
//! rule here runs in memory, under paused time in the tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use driver_abi::{CreateRequest, DriverError, Instance, InstanceType, Tags};
use rustc_hash::FxHashMap;
use tokio::time::Instant;

use super::backoff::CreateBackoff;
use super::probe::RemoteError;
use super::seams::{BootOutcome, CreateError, Exec, ExecFactory, FleetObserver, Listed};
use super::state::{self, after_probe, Decision, Facts, IdleBehavior};
use super::tags;
use super::view::{InstanceState, InstanceView};
use crate::instance_secret;
use crate::runner::{RunEntry, RunList, RunState};
use crate::scheduler::{RunnerSeen, SlotId, WorkerSlot, WorkerStatus};

/// Rate limits, quota and capacity errors have hold-offs in the wrappers already.
fn has_own_holdoff(e: &DriverError) -> bool {
    matches!(
        e,
        DriverError::RateLimit { .. } | DriverError::Quota { .. } | DriverError::Capacity { .. }
    )
}

/// The most runs one worker's event stream may report between probes.
const MAX_RUNS_PER_WORKER: usize = 10_000;

/// The longest wait between probes of a VM that has not booted yet.
const BOOTING_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait before probing a VM whose event stream ended (doubling per failure, up to
/// the probe interval): a probe opens the stream again.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// The wait before probing a worker whose event stream is down, after `failures` failures.
fn watch_retry(failures: u32, interval: Duration) -> Duration {
    WATCH_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(interval)
}

/// What the pool needs to know, fixed for its life.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub types: Vec<InstanceType>,
    pub timeouts: state::Timeouts,
    pub probe_interval: Duration,
    /// Between probes of a worker whose event stream is up (at least `probe_interval`).
    pub watched_probe_interval: Duration,
    /// Wait this long after a failed destroy before trying again.
    pub shutdown_retry: Duration,
    pub max_probes_per_second: f64,
    /// After this long, locks from a previous run count as stale even if some worker was
    /// never probed.
    pub stale_lock: Duration,
    pub image: String,
    pub init_command: String,
    pub resource_tags: Tags,
    /// The dispatcher's public key (OpenSSH), for drivers that install it.
    pub public_key: Option<String>,
}

/// Work the pool asks the dispatcher to carry out.
pub enum Effect {
    /// Destroy this instance (the pool already marked it Shutdown).
    Destroy {
        worker: String,
        instance: Arc<dyn Instance>,
    },
    /// Save the idle behaviour in the instance's tags, so it survives a restart.
    SaveTags {
        worker: String,
        instance: Arc<dyn Instance>,
        tags: Tags,
    },
    /// The worker is gone: drop its connection.
    Close(Arc<dyn Exec>),
    /// A start on a VM produced no result: one more dispatch attempt for the container.
    AttemptFailed { container: String, reason: String },
    /// Open the worker's event stream (`runner watch`); report back with `watch_ended`.
    Watch {
        worker: String,
        exec: Arc<dyn Exec>,
        sudo: bool,
    },
}

/// What a returned start command means.
pub enum Started {
    /// Record it Running (of this type, when configured).
    Running { instance_type: Option<String> },
    /// The command failed; the next probe tells whether it runs anyway.
    Unconfirmed,
    /// The worker went away while the start was in flight: the start produced nothing.
    WorkerGone,
}

/// A probe to run: boot probe and runner deployment first when `needs_boot`, then the run list.
pub struct ProbeJob {
    pub worker: String,
    pub exec: Arc<dyn Exec>,
    pub sudo: bool,
    pub needs_boot: bool,
    pub started: Instant,
}

/// What a probe found.
pub struct ProbeReport {
    /// When an SSH session of this probe first reached the VM (whatever its commands
    /// answered).
    pub reached_at: Option<Instant>,
    /// When the boot probe had passed and the runner was deployed.
    pub ready_at: Option<Instant>,
    /// The boot probe passed and the runner is deployed.
    pub booted: bool,
    /// How long `runner list` took.
    pub list_took: Duration,
    pub list: Result<RunList, RemoteError>,
}

struct Worker {
    listed: Listed,
    type_name: Option<String>,
    status: WorkerStatus,
    behavior: IdleBehavior,
    exec: Arc<dyn Exec>,
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
    /// Starts whose command failed, with why: the next probe tells whether they run anyway.
    failed_starts: HashMap<String, String>,
    booted: bool,
    shutdown_at: Option<Instant>,
    destroying: bool,
    gave_up: HashSet<String>,
    /// Why the VM is not in use, when something is wrong with it.
    reason: Option<String>,
    /// Consecutive listings that did not show it: one miss is not enough to forget a VM
    /// (and requeue what it runs).
    missed_listings: u32,
    /// Its event stream is open (or being opened).
    watching: bool,
    /// Streams that ended since the last one that delivered its snapshot.
    watch_failures: u32,
    /// What the event stream (or a forget) said about a run since the last probe began, and
    /// when: a probe that began earlier must not undo it. `None`: forgotten.
    fresh: HashMap<String, (Option<RunState>, Instant)>,
    /// This process created it (its boot is ours to time and count).
    created_here: bool,
    /// When an SSH session first reached it.
    reached_at: Option<Instant>,
    /// Its boot outcome has been counted.
    boot_counted: bool,
    /// When it was decided to shut it down.
    shutdown_requested_at: Option<Instant>,
    /// The last container started on it.
    last_container: Option<String>,
}

/// What of a worker the scheduler and the instance view depend on.
#[derive(PartialEq)]
struct Fingerprint {
    status: WorkerStatus,
    booted: bool,
    runners: HashMap<String, RunState>,
    starting: Vec<String>,
    reason: Option<String>,
}

impl Worker {
    fn fingerprint(&self) -> Fingerprint {
        let mut starting: Vec<String> = self.starting.keys().cloned().collect();
        starting.sort();
        Fingerprint {
            status: self.status.clone(),
            booted: self.booted,
            runners: self.runners.clone(),
            starting,
            reason: self.reason.clone(),
        }
    }

    fn active_runners(&self) -> usize {
        self.runners
            .values()
            .filter(|s| **s == RunState::Running)
            .count()
            + self.starting.len()
    }

    fn sudo(&self) -> bool {
        self.listed.remote_user != "root"
    }
}

struct Pending {
    type_name: String,
    secret: String,
}

pub struct Pool {
    config: PoolConfig,
    factory: Arc<dyn ExecFactory>,
    observer: Arc<dyn FleetObserver>,
    workers: HashMap<String, Worker>,
    pending: HashMap<u64, Pending>,
    next_pending: u64,
    backoff: CreateBackoff,
    started_at: Instant,
    listed_once: bool,
    /// Listings applied since start (saturating at 2: all that matters is "settled").
    listings: u8,
    next_probe_slot: Instant,
    /// Bumped whenever a probe, snapshot or listing changed what the scheduler sees: the
    /// dispatcher re-plans only then (most probes and listings of a large fleet change
    /// nothing).
    generation: u64,
}

impl Pool {
    pub fn new(
        config: PoolConfig,
        factory: Arc<dyn ExecFactory>,
        observer: Arc<dyn FleetObserver>,
        now: Instant,
    ) -> Self {
        Pool {
            config,
            factory,
            observer,
            workers: HashMap::new(),
            pending: HashMap::new(),
            next_pending: 0,
            backoff: CreateBackoff::default(),
            started_at: now,
            listed_once: false,
            listings: 0,
            next_probe_slot: now,
            generation: 0,
        }
    }

    /// Instances including creates in flight.
    pub fn instance_count(&self) -> usize {
        self.workers.len() + self.pending.len()
    }

    /// Changes with every probe, snapshot or listing that changed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When `recovered` will turn true by time alone (None: it has or cannot).
    pub fn recovery_deadline(&self, now: Instant) -> Option<Instant> {
        (!self.recovered(now)).then_some(self.started_at + self.config.stale_lock)
    }

    /// When the next create back-off ends.
    pub fn next_backoff_end(&self, now: Instant) -> Option<Instant> {
        self.backoff.next_end(now)
    }

    pub fn listed_once(&self) -> bool {
        self.listed_once
    }

    /// Two listings have come back since start: an instance absent from both is gone.
    pub fn listings_settled(&self) -> bool {
        self.listings >= 2
    }

    /// Every worker listed at start-up has been probed, or the stale-lock time passed: only
    /// then may a lock from a previous run be judged stale.
    pub fn recovered(&self, now: Instant) -> bool {
        self.listed_once
            && (!self
                .workers
                .values()
                .any(|w| w.status == WorkerStatus::Unknown)
                || now.saturating_duration_since(self.started_at) >= self.config.stale_lock)
    }

    fn add_worker(&mut self, listed: Listed, status: WorkerStatus, now: Instant) {
        let id = listed.id.clone();
        let mut type_name = listed.tags.get(tags::INSTANCE_TYPE).cloned();
        let mut behavior = listed
            .tags
            .get(tags::IDLE_BEHAVIOR)
            .and_then(|b| IdleBehavior::parse(b))
            .unwrap_or(IdleBehavior::Run);
        if !type_name
            .as_deref()
            .is_some_and(|n| self.config.types.iter().any(|t| t.name == n))
        {
            // A type no longer configured: let it finish what it runs, then go.
            type_name = None;
            if behavior != IdleBehavior::Hold {
                behavior = IdleBehavior::Drain;
            }
        }
        let created_here = status == WorkerStatus::Booting;
        log::info!(
            "instance={id} type={} state={status:?} behavior={} added",
            type_name.as_deref().unwrap_or("?"),
            behavior.as_str()
        );
        let exec = self.factory.executor(&listed);
        self.workers.insert(
            id,
            Worker {
                listed,
                type_name,
                status,
                behavior,
                exec,
                appeared_at: now,
                last_probe_ok: None,
                busy_at: now,
                probing: false,
                next_probe_at: now,
                runners: HashMap::new(),
                starting: HashMap::new(),
                failed_starts: HashMap::new(),
                booted: false,
                shutdown_at: None,
                destroying: false,
                gave_up: HashSet::new(),
                reason: None,
                missed_listings: 0,
                watching: false,
                watch_failures: 0,
                fresh: HashMap::new(),
                created_here,
                reached_at: None,
                boot_counted: false,
                shutdown_requested_at: None,
                last_container: None,
            },
        );
    }

    /// Counts the boot outcome of a VM this process created, once.
    fn count_boot(observer: &dyn FleetObserver, w: &mut Worker, outcome: BootOutcome) {
        if w.created_here && !w.boot_counted {
            w.boot_counted = true;
            observer.boot_outcome(outcome);
        }
    }

    /// Takes a worker out; starts that failed on it count as attempts (they cannot be checked
    /// any more), the rest is settled by the scheduler once no worker lists it.
    fn remove_worker(&mut self, id: &str, effects: &mut Vec<Effect>) {
        if let Some(w) = self.workers.remove(id) {
            for (container, why) in w.failed_starts {
                effects.push(Effect::AttemptFailed {
                    container,
                    reason: format!("start on {id} failed ({why}) and the VM is gone"),
                });
            }
            effects.push(Effect::Close(w.exec));
        }
    }

    /// Reconciles with a listing launched at `launched`: new instances are adopted (`unknown`,
    /// unless they are a create of ours in flight), known ones get the listing's address and
    /// tags (the executor follows a new address), ones missing from two listings in a row are
    /// removed.
    pub fn apply_listing(
        &mut self,
        list: Vec<Listed>,
        launched: Instant,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        // Until two listings are in, each changes what the plan may conclude.
        let mut changed = self.listings < 2;
        let secrets: HashSet<&str> = self.pending.values().map(|p| p.secret.as_str()).collect();
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        for listed in list {
            seen.insert(listed.id.clone());
            match self.workers.get_mut(&listed.id) {
                Some(w) => {
                    let endpoint = listed.endpoint();
                    if endpoint != w.listed.endpoint() {
                        log::info!(
                            "instance={} address={:?} user={} (was {:?}): reconnecting there",
                            listed.id,
                            endpoint.address,
                            endpoint.user,
                            w.listed.address
                        );
                        w.exec.retarget(&endpoint);
                        changed = true;
                    }
                    w.listed = listed;
                    w.missed_listings = 0;
                }
                None => {
                    let ours_in_flight = listed
                        .tags
                        .get(tags::INSTANCE_SECRET)
                        .is_some_and(|s| secrets.contains(s.as_str()));
                    if !ours_in_flight {
                        fresh.push(listed);
                    }
                }
            }
        }
        let fresh_added: Vec<String> = fresh.iter().map(|l| l.id.clone()).collect();
        for listed in fresh {
            self.add_worker(listed, WorkerStatus::Unknown, now);
        }
        let mut gone = Vec::new();
        for (id, w) in &mut self.workers {
            if !seen.contains(id) && w.appeared_at < launched {
                w.missed_listings += 1;
                if w.missed_listings >= 2 {
                    gone.push(id.clone());
                } else {
                    log::debug!("instance={id} missing from a listing; checking at the next");
                }
            }
        }
        changed |= !fresh_added.is_empty() || !gone.is_empty();
        for id in gone {
            log::info!("instance={id} disappeared from the cloud's list; removing it");
            if let Some(w) = self.workers.get_mut(&id) {
                // One we were destroying did not disappear: it went.
                if w.shutdown_requested_at.is_none() {
                    self.observer
                        .instance_disappeared(InstanceState::from(&w.status).as_str());
                }
                if !w.booted {
                    Self::count_boot(&*self.observer, w, BootOutcome::Disappeared);
                }
                if let Some(at) = w.shutdown_requested_at {
                    self.observer
                        .shutdown_to_gone(now.saturating_duration_since(at));
                }
            }
            self.remove_worker(&id, &mut effects);
        }
        if changed {
            self.generation += 1;
        }
        if !self.listed_once {
            log::info!(
                "Initial instance list: {} instance(s) of this set.",
                self.workers.len()
            );
        }
        self.listed_once = true;
        self.listings = self.listings.saturating_add(1).min(2);
        effects
    }

    /// Registers a create about to be made for a `type_name` VM: its number and the request.
    pub fn begin_create(&mut self, type_name: &str) -> Option<(u64, CreateRequest)> {
        let t = self.config.types.iter().find(|t| t.name == type_name)?;
        let secret = instance_secret::generate();
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
            init_command: instance_secret::init_command(&secret, &self.config.init_command),
            public_key: self.config.public_key.clone(),
        };
        let n = self.next_pending;
        self.next_pending += 1;
        self.pending.insert(
            n,
            Pending {
                type_name: t.name.clone(),
                secret,
            },
        );
        log::info!("type={} creating an instance", t.name);
        Some((n, request))
    }

    /// A create came back. A failure the wrappers have no hold-off for backs that type off.
    pub fn apply_created(
        &mut self,
        pending: u64,
        result: Result<Listed, CreateError>,
        now: Instant,
    ) {
        let Some(p) = self.pending.remove(&pending) else {
            return;
        };
        match result {
            Ok(listed) => {
                self.backoff.succeeded(&p.type_name);
                if !self.workers.contains_key(&listed.id) {
                    self.add_worker(listed, WorkerStatus::Booting, now);
                }
            }
            Err(CreateError::HeldOff(why)) => {
                log::debug!("type={} create held off: {why}", p.type_name);
            }
            Err(CreateError::Driver(e)) if has_own_holdoff(&e) => {
                log::info!("type={} create refused: {e}", p.type_name);
            }
            Err(CreateError::Driver(e)) => {
                let delay = self.backoff.failed(&p.type_name, &e.to_string(), now);
                log::warn!(
                    "type={} creating an instance failed: {e}; holding off creates of this type for {delay:?}",
                    p.type_name
                );
            }
        }
    }

    /// Why creates of this type are held after failures, while they are.
    pub fn create_trouble(&self, type_name: &str, now: Instant) -> Option<String> {
        self.backoff.trouble(type_name, now)
    }

    /// Creates of this type are backed off after failures.
    pub fn create_backed_off(&self, type_name: &str, now: Instant) -> bool {
        self.backoff.held(type_name, now)
    }

    /// Probes due now, paced by `max_probes_per_second`; each is marked in flight.
    pub fn due_probes(&mut self, now: Instant) -> Vec<ProbeJob> {
        let pace = Duration::from_secs_f64(1.0 / self.config.max_probes_per_second.max(0.001));
        let mut due: Vec<(Instant, &String)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                !w.probing && w.status != WorkerStatus::Shutdown && now >= w.next_probe_at
            })
            .map(|(id, w)| (w.next_probe_at, id))
            .collect();
        // Longest overdue first: when more are due than the pace allows, the ones left out
        // come first next time (by ID alone, VMs failing often could starve the rest).
        due.sort();
        let due: Vec<String> = due.into_iter().map(|(_, id)| id.clone()).collect();
        let mut jobs = Vec::new();
        for id in due {
            if now < self.next_probe_slot {
                break;
            }
            self.next_probe_slot = self.next_probe_slot.max(now - pace) + pace;
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            w.probing = true;
            jobs.push(ProbeJob {
                worker: id,
                exec: Arc::clone(&w.exec),
                sudo: w.sudo(),
                needs_boot: !w.booted,
                started: now,
            });
        }
        jobs
    }

    /// Applies a probe that began at `started`.
    pub fn apply_probe(
        &mut self,
        id: &str,
        started: Instant,
        report: ProbeReport,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(w) = self.workers.get_mut(id) else {
            return Vec::new();
        };
        let before = w.fingerprint();
        w.probing = false;
        if let (Some(at), None) = (report.reached_at, w.reached_at) {
            w.reached_at = Some(at);
            if w.created_here {
                self.observer
                    .time_to_ssh(at.saturating_duration_since(w.appeared_at));
            }
        }
        if report.booted && !w.booted {
            if w.created_here && !w.boot_counted {
                let ready = report.ready_at.unwrap_or(now);
                let reached = w.reached_at.unwrap_or(ready);
                self.observer
                    .time_to_ready(ready.saturating_duration_since(reached));
            }
            Self::count_boot(&*self.observer, w, BootOutcome::Success);
        }
        if report.booted {
            w.booted = true;
        }
        self.observer
            .probe_finished(report.list.is_ok(), report.list_took);
        let mut refused = false;
        let effects = match report.list {
            Ok(list) => self.apply_run_list(id, started, list, now),
            Err(e) => {
                refused = e.is_refusal();
                let reason = e.to_string();
                if e.is_refusal() && w.reason.as_deref() != Some(reason.as_str()) {
                    log::warn!("instance={id} not used: {reason}");
                } else {
                    log::debug!("instance={id} probe failed: {reason}");
                }
                w.reason = Some(reason);
                if w.booted && !w.watching {
                    w.watch_failures = w.watch_failures.saturating_add(1);
                }
                Vec::new()
            }
        };
        let interval = self.config.probe_interval;
        // Well inside the probe timeout, whatever the config says (the stream's heartbeats
        // keep a VM alive too, but a probe must come before it would be given up).
        let watched_interval = self
            .config
            .watched_probe_interval
            .min(self.config.timeouts.probe / 2)
            .max(interval);
        if let Some(w) = self.workers.get_mut(id) {
            // Probes of a VM with an event stream can be rare; one still booting (containers
            // wait for it) or whose stream is down (a probe reopens it) is looked at soon.
            let delay = if refused {
                // A refused key or runner does not fix itself in a second.
                interval
            } else if !w.booted {
                interval.min(BOOTING_PROBE_INTERVAL)
            } else if !w.watching {
                watch_retry(w.watch_failures, interval)
            } else {
                watched_interval
            };
            w.next_probe_at = now + delay;
            if !effects.is_empty() || w.fingerprint() != before {
                self.generation += 1;
            }
        }
        effects
    }

    /// The event stream's first line: every run on the worker, listed after `launched` (when
    /// the stream was asked for), like a probe's list.
    pub fn apply_snapshot(
        &mut self,
        id: &str,
        launched: Instant,
        list: RunList,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(w) = self.workers.get_mut(id) else {
            return Vec::new();
        };
        w.watch_failures = 0;
        let before = w.fingerprint();
        let effects = self.apply_run_list(id, launched, list, now);
        if !effects.is_empty()
            || self
                .workers
                .get(id)
                .is_none_or(|w| w.fingerprint() != before)
        {
            self.generation += 1;
        }
        effects
    }

    /// A full list of the worker's runs, as of `started`.
    fn apply_run_list(
        &mut self,
        id: &str,
        started: Instant,
        list: RunList,
        now: Instant,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(w) = self.workers.get_mut(id) else {
            return effects;
        };
        w.reason = None;
        w.last_probe_ok = Some(w.last_probe_ok.map_or(started, |t| t.max(started)));
        w.runners = list
            .containers
            .iter()
            .map(|e| (e.id.clone(), e.state.clone()))
            .collect();
        // What the event stream said after this list was taken is newer.
        for (c, (state, at)) in &w.fresh {
            if *at > started {
                match state {
                    Some(state) => w.runners.insert(c.clone(), state.clone()),
                    None => w.runners.remove(c),
                };
            }
        }
        w.fresh.retain(|_, (_, at)| *at > started);
        let listed = &w.runners;
        let vanished: Vec<String> = w
            .starting
            .iter()
            .filter(|(c, done)| !listed.contains_key(*c) && done.is_some_and(|t| t <= started))
            .map(|(c, _)| c.clone())
            .collect();
        for c in vanished {
            w.starting.remove(&c);
            // A start that failed and is not running either produced nothing. One that
            // returned fine but is gone is settled by the scheduler (its run vanished).
            if let Some(why) = w.failed_starts.remove(&c) {
                effects.push(Effect::AttemptFailed {
                    container: c,
                    reason: format!("runner start on {id} failed: {why}"),
                });
            }
        }
        w.starting.retain(|c, _| !listed.contains_key(c));
        w.failed_starts.retain(|c, _| w.starting.contains_key(c));
        w.gave_up
            .retain(|c| w.runners.get(c) == Some(&RunState::Running));
        let active = w.active_runners();
        let before = w.status.clone();
        w.status = after_probe(&w.status, w.booted, w.runners.len() + w.starting.len());
        if active > 0 || (before == WorkerStatus::Running && w.status == WorkerStatus::Idle) {
            w.busy_at = now;
        }
        if matches!(before, WorkerStatus::Unknown | WorkerStatus::Booting) && w.status != before {
            w.busy_at = now;
            log::info!("instance={id} from={before:?} to={:?} (booted)", w.status);
        }
        if list.broken {
            effects.extend(self.apply_broken(id));
        }
        if let Some(w) = self.workers.get_mut(id) {
            // A booted worker with the runner in place streams its runs' changes from now on.
            if w.booted && !w.watching && w.status != WorkerStatus::Shutdown {
                w.watching = true;
                effects.push(Effect::Watch {
                    worker: id.to_string(),
                    exec: Arc::clone(&w.exec),
                    sudo: w.sudo(),
                });
            }
        }
        effects
    }

    /// The event stream reported a run that started, ended or went stale.
    pub fn apply_run_event(&mut self, id: &str, entry: RunEntry, now: Instant) {
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        // A VM is untrusted: it cannot grow the host's memory without bound with made-up runs.
        if !w.runners.contains_key(&entry.id) && w.runners.len() >= MAX_RUNS_PER_WORKER {
            log::debug!(
                "instance={id} reports more than {MAX_RUNS_PER_WORKER} runs; {} ignored",
                entry.id
            );
            return;
        }
        w.fresh
            .insert(entry.id.clone(), (Some(entry.state.clone()), now));
        w.starting.remove(&entry.id);
        w.failed_starts.remove(&entry.id);
        if entry.state != RunState::Running {
            w.gave_up.remove(&entry.id);
        }
        w.runners.insert(entry.id, entry.state);
        Self::refresh_status(w, now);
    }

    /// The node reports itself broken: it drains (takes no new work).
    pub fn apply_broken(&mut self, id: &str) -> Option<Effect> {
        let w = self.workers.get_mut(id)?;
        if w.behavior != IdleBehavior::Run {
            return None;
        }
        log::warn!("instance={id} reports a broken node; draining");
        w.reason = Some("the node reports itself broken".into());
        self.generation += 1;
        self.set_behavior(id, IdleBehavior::Drain)
    }

    /// A line arrived on the worker's event stream: the VM is alive and reachable, as good as
    /// a successful probe for the probe timeout.
    pub fn heard_from(&mut self, id: &str, now: Instant) {
        if let Some(w) = self.workers.get_mut(id) {
            w.last_probe_ok = Some(w.last_probe_ok.map_or(now, |t| t.max(now)));
        }
    }

    /// The event stream ended (the connection dropped, the VM went, or the runner is too old
    /// to stream): the next successful probe opens it again.
    pub fn watch_ended(&mut self, id: &str, now: Instant) {
        let interval = self.config.probe_interval;
        if let Some(w) = self.workers.get_mut(id) {
            self.observer.event_stream_ended();
            w.watching = false;
            w.watch_failures = w.watch_failures.saturating_add(1);
            w.next_probe_at = w
                .next_probe_at
                .min(now + watch_retry(w.watch_failures, interval));
        }
    }

    /// Running or Idle again from what the worker is known to run, between probes.
    fn refresh_status(w: &mut Worker, now: Instant) {
        if matches!(w.status, WorkerStatus::Running | WorkerStatus::Idle) {
            let before = w.status.clone();
            w.status = after_probe(&w.status, true, w.runners.len() + w.starting.len());
            if before != w.status {
                w.busy_at = now;
            }
        }
    }

    /// Whether `id` is one of the pool's workers.
    pub fn has_worker(&self, id: &str) -> bool {
        self.workers.contains_key(id)
    }

    /// Whether `id` is being shut down (or destroyed).
    pub fn is_shutting_down(&self, id: &str) -> bool {
        self.workers
            .get(id)
            .is_some_and(|w| w.status == WorkerStatus::Shutdown || w.destroying)
    }

    /// Sets the idle behaviour; the effect saves it in the VM's tags.
    pub fn set_behavior(&mut self, id: &str, behavior: IdleBehavior) -> Option<Effect> {
        let w = self.workers.get_mut(id)?;
        w.behavior = behavior;
        let mut new_tags = w.listed.tags.clone();
        new_tags.insert(tags::IDLE_BEHAVIOR.into(), behavior.as_str().into());
        Some(Effect::SaveTags {
            worker: id.to_string(),
            instance: Arc::clone(&w.listed.instance),
            tags: new_tags,
        })
    }

    /// Every runner SIGTERM was sent to ignored it past `term`: the worker drains.
    pub fn runner_ignored_sigterm(&mut self, id: &str, container: &str) -> Option<Effect> {
        let w = self.workers.get_mut(id)?;
        w.gave_up.insert(container.to_string());
        log::warn!("container={container} instance={id} ignored SIGTERM; draining");
        if w.behavior == IdleBehavior::Run {
            w.reason = Some(format!("container {container} ignored SIGTERM"));
            return self.set_behavior(id, IdleBehavior::Drain);
        }
        None
    }

    /// SIGTERM ended the runner: until the next probe says more, it counts as exited (so it
    /// is not signalled again in the meantime).
    pub fn runner_stopped(&mut self, id: &str, container: &str) {
        if let Some(state) = self
            .workers
            .get_mut(id)
            .and_then(|w| w.runners.get_mut(container))
        {
            *state = RunState::Exited;
        }
    }

    /// The run directory was removed on the VM: nothing is left to reconcile (and a probe
    /// that began before must not bring it back).
    pub fn runner_forgotten(&mut self, id: &str, container: &str, now: Instant) {
        if let Some(w) = self.workers.get_mut(id) {
            w.runners.remove(container);
            w.fresh.insert(container.to_string(), (None, now));
            Self::refresh_status(w, now);
        }
    }

    /// Marks the worker Shutdown and asks for its destruction, unless it is already going.
    pub fn shutdown(&mut self, id: &str, reason: &str, now: Instant) -> Option<Effect> {
        let w = self.workers.get_mut(id)?;
        if w.status == WorkerStatus::Shutdown {
            return None;
        }
        log::info!(
            "instance={id} from={:?} to=Shutdown reason={reason:?}",
            w.status
        );
        if !w.booted {
            let outcome = if reason == state::BOOT_TIMEOUT {
                BootOutcome::Failure
            } else {
                BootOutcome::Aborted
            };
            Self::count_boot(&*self.observer, w, outcome);
        }
        w.status = WorkerStatus::Shutdown;
        w.shutdown_requested_at = Some(now);
        Some(Self::destroy(id, w))
    }

    fn destroy(id: &str, w: &mut Worker) -> Effect {
        w.destroying = true;
        w.shutdown_at = None;
        Effect::Destroy {
            worker: id.to_string(),
            instance: Arc::clone(&w.listed.instance),
        }
    }

    /// A destroy came back: the worker goes, or is destroyed again after `shutdown_retry`.
    pub fn apply_destroyed(&mut self, id: &str, ok: bool, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(w) = self.workers.get_mut(id) else {
            return effects;
        };
        w.destroying = false;
        if ok {
            log::info!("instance={id} destroyed");
            if let Some(at) = w.shutdown_requested_at {
                self.observer
                    .shutdown_to_gone(now.saturating_duration_since(at));
            }
            self.remove_worker(id, &mut effects);
        } else {
            w.shutdown_at = Some(now);
        }
        effects
    }

    /// A failed destroy is due to be tried again (cheap: no timeout is evaluated).
    pub fn destroy_retry_due(&self, now: Instant) -> bool {
        self.workers.values().any(|w| {
            !w.destroying
                && w.shutdown_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.config.shutdown_retry)
        })
    }

    /// Boot, probe and idle timeouts, drained workers, and destroys to retry.
    pub fn apply_timeouts(&mut self, now: Instant) -> Vec<Effect> {
        let mut go = Vec::new();
        let mut effects = Vec::new();
        for (id, w) in &mut self.workers {
            if w.status == WorkerStatus::Shutdown {
                let retry_due = !w.destroying
                    && w.shutdown_at.is_some_and(|t| {
                        now.saturating_duration_since(t) >= self.config.shutdown_retry
                    });
                if retry_due {
                    log::info!("instance={id} destroying again");
                    effects.push(Self::destroy(id, w));
                }
                continue;
            }
            let runners = w.active_runners();
            let facts = Facts {
                status: w.status.clone(),
                behavior: w.behavior,
                appeared_at: w.appeared_at,
                last_probe_ok: w.last_probe_ok,
                busy_at: w.busy_at,
                runners,
                all_runners_gave_up: runners > 0 && w.gave_up.len() >= runners,
            };
            if let Some(Decision::Shutdown(reason)) =
                state::decide(&facts, now, &self.config.timeouts)
            {
                go.push((id.clone(), reason));
            }
        }
        for (id, reason) in go {
            effects.extend(self.shutdown(&id, reason, now));
        }
        effects
    }

    /// Reserves the worker for a start of `container`; returns its executor and whether
    /// commands need sudo.
    pub fn begin_start(
        &mut self,
        container: &str,
        worker: &str,
        now: Instant,
    ) -> Option<(Arc<dyn Exec>, bool)> {
        let w = self.workers.get_mut(worker)?;
        if w.status == WorkerStatus::Shutdown {
            return None;
        }
        w.starting.insert(container.to_string(), None);
        w.status = WorkerStatus::Running;
        w.busy_at = now;
        w.last_container = Some(container.to_string());
        Some((Arc::clone(&w.exec), w.sudo()))
    }

    /// The start command returned. Whether it failed or not, the next probe tells whether the
    /// runner is there; a failure that the probe confirms becomes an attempt then.
    pub fn apply_started(
        &mut self,
        container: &str,
        worker: &str,
        result: &Result<(), RemoteError>,
        now: Instant,
    ) -> Started {
        let Some(w) = self.workers.get_mut(worker) else {
            return Started::WorkerGone;
        };
        // The event stream may have reported it running (or even finished) already.
        if !w.runners.contains_key(container) {
            w.starting.insert(container.to_string(), Some(now));
        }
        match result {
            Ok(()) => Started::Running {
                instance_type: w.type_name.clone(),
            },
            Err(e) => {
                if w.starting.contains_key(container) {
                    w.failed_starts.insert(container.to_string(), e.to_string());
                    // Only a probe can tell whether it runs anyway: one soon, not a watched
                    // worker's rare one.
                    w.next_probe_at = w.next_probe_at.min(now + self.config.probe_interval);
                }
                Started::Unconfirmed
            }
        }
    }

    /// The executor of a worker (also one being shut down: its results are still collected),
    /// and whether it needs sudo.
    pub fn remote(&self, worker: &str) -> Option<(Arc<dyn Exec>, bool)> {
        let w = self.workers.get(worker)?;
        Some((Arc::clone(&w.exec), w.sudo()))
    }

    pub fn type_of(&self, worker: &str) -> Option<&str> {
        self.workers.get(worker)?.type_name.as_deref()
    }

    /// What runners report, as the scheduler sees it.
    pub fn runners(&self) -> FxHashMap<String, RunnerSeen> {
        let mut runners: FxHashMap<String, RunnerSeen> = FxHashMap::default();
        for (wid, w) in &self.workers {
            for (cid, st) in &w.runners {
                let worker = wid.clone();
                let seen = match st {
                    RunState::Running => RunnerSeen::Running { worker },
                    RunState::Exited => RunnerSeen::Exited { worker },
                    RunState::Stale => RunnerSeen::Stale { worker },
                };
                runners.insert(cid.clone(), seen);
            }
            for cid in w.starting.keys() {
                runners.entry(cid.clone()).or_insert(RunnerSeen::Starting {
                    worker: wid.clone(),
                });
            }
        }
        runners
    }

    /// Workers and pending creates as scheduler slots; `foreign` names workers running
    /// containers the queue does not know (they count as full).
    pub fn slots(&self, foreign: &HashSet<String>) -> Vec<WorkerSlot> {
        let mut slots: Vec<WorkerSlot> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerSlot {
                id: SlotId::Instance(id.clone()),
                type_name: w.type_name.clone(),
                status: w.status.clone(),
                accepts_work: w.behavior == IdleBehavior::Run,
                foreign_runners: foreign.contains(id),
                probed: w.last_probe_ok.is_some(),
            })
            .chain(self.pending.iter().map(|(n, p)| WorkerSlot {
                id: SlotId::Pending(*n),
                type_name: Some(p.type_name.clone()),
                status: WorkerStatus::Booting,
                accepts_work: true,
                foreign_runners: false,
                probed: false,
            }))
            .collect();
        slots.sort_by(|a, b| a.id.cmp(&b.id));
        slots
    }

    /// Containers some worker runs or is starting.
    pub fn running_containers(&self) -> HashSet<&str> {
        self.workers
            .values()
            .flat_map(|w| w.runners.keys().chain(w.starting.keys()))
            .map(String::as_str)
            .collect()
    }

    /// When the pool next needs attention: a probe due, or a create back-off ending.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let probes = self
            .workers
            .values()
            .filter(|w| !w.probing && w.status != WorkerStatus::Shutdown)
            .map(|w| w.next_probe_at.max(self.next_probe_slot));
        let retries = self
            .workers
            .values()
            .filter_map(|w| w.shutdown_at.map(|t| t + self.config.shutdown_retry));
        probes
            .chain(retries)
            .chain(self.backoff.next_end(now))
            .min()
    }

    /// Every executor, to close at shutdown.
    pub fn executors(&self) -> Vec<Arc<dyn Exec>> {
        self.workers.values().map(|w| Arc::clone(&w.exec)).collect()
    }

    /// What the fleet costs per hour now: every instance of a configured type, creates in
    /// flight included (a cloud bills from the create).
    pub fn hourly_price(&self) -> f64 {
        let price = |name: &str| {
            self.config
                .types
                .iter()
                .find(|t| t.name == name)
                .map_or(0.0, |t| t.price)
        };
        let listed: f64 = self
            .workers
            .values()
            .filter_map(|w| w.type_name.as_deref())
            .map(price)
            .sum();
        let pending: f64 = self.pending.values().map(|p| price(&p.type_name)).sum();
        listed + pending
    }

    /// The instances as the API shows them; `now` and `wall_now_ms` are the same moment on
    /// the loop's clock and the wall clock.
    pub fn view(&self, now: Instant, wall_now_ms: i64) -> Vec<InstanceView> {
        let wall = |at: Instant| {
            let ago = i64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(0);
            wall_now_ms.saturating_sub(ago)
        };
        let price = |name: Option<&str>| {
            name.and_then(|n| self.config.types.iter().find(|t| t.name == n))
                .map_or(0.0, |t| t.price)
        };
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
                    provider_type: w.listed.provider_type.clone(),
                    state: InstanceState::from(&w.status),
                    idle_behavior: w.behavior,
                    address: w.listed.address.clone(),
                    price: price(w.type_name.as_deref()),
                    containers,
                    reason: w.reason.clone(),
                    last_container: w.last_container.clone(),
                    last_busy_at_ms: wall(w.busy_at),
                    last_probe_ok_at_ms: w.last_probe_ok.map(wall),
                    event_stream: w.watching,
                }
            })
            .collect();
        views.extend(self.pending.values().map(|p| InstanceView {
            id: String::new(),
            instance_type: Some(p.type_name.clone()),
            provider_type: String::new(),
            state: InstanceState::Creating,
            idle_behavior: IdleBehavior::Run,
            address: String::new(),
            price: price(Some(&p.type_name)),
            containers: Vec::new(),
            reason: None,
            last_container: None,
            last_busy_at_ms: wall_now_ms,
            last_probe_ok_at_ms: None,
            event_stream: false,
        }));
        views.sort_by(|a, b| a.id.cmp(&b.id));
        views
    }
}
