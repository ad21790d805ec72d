//! The dispatcher and its pool driven through their seams: an in-memory cloud, scripted VMs
//! that answer the runner protocol, the real SQLite queue, and paused tokio time, so minutes
//! of timeouts pass in milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver_abi::{CreateRequest, DriverError, Instance, InstancePrice, InstanceType, Tags};
use tokio::time::Instant;

use super::*;
use crate::metrics::Metrics;
use crate::pool::{BoxFuture, Endpoint, Exec, ExecFactory, IdleBehavior, InstanceState};
use crate::queue::{ContainerState, NewContainer, RuntimeConstraints, SqliteQueue};
use crate::runner::{CollectHeader, ExitRecord, LogPart, RunEntry, RunList, RunState};
use crate::ssh::{CommandOutput, SshError};

/// What a scripted VM's runner knows.
#[derive(Default)]
struct Vm {
    runs: BTreeMap<String, Option<i32>>,
    fail_start: bool,
    /// `start` launches the run but the command reports failure (its connection dropped).
    start_runs_but_fails: bool,
    ignore_sigterm: bool,
    /// Runs it starts have no supervisor: they are listed Stale.
    stale_runs: bool,
}

/// The VMs, by address, and every command sent to them.
#[derive(Default)]
struct World {
    vms: Mutex<HashMap<String, Vm>>,
    commands: Mutex<Vec<(String, String)>>,
}

impl World {
    fn with_vm<T>(&self, address: &str, f: impl FnOnce(&mut Vm) -> T) -> Option<T> {
        self.vms.lock().expect("world").get_mut(address).map(f)
    }

    fn commands_to(&self, address: &str, needle: &str) -> usize {
        self.commands
            .lock()
            .expect("commands")
            .iter()
            .filter(|(a, c)| a == address && c.contains(needle))
            .count()
    }
}

struct FakeInstance {
    id: String,
    address: Mutex<String>,
    tags: Mutex<Tags>,
}

impl Instance for FakeInstance {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn provider_type(&self) -> String {
        "fake.small".into()
    }
    fn tags(&self) -> Tags {
        self.tags.lock().expect("tags").clone()
    }
    fn set_tags(&self, tags: &Tags) -> Result<(), DriverError> {
        *self.tags.lock().expect("tags") = tags.clone();
        Ok(())
    }
    fn destroy(&self) -> Result<(), DriverError> {
        Ok(())
    }
    fn address(&self) -> String {
        self.address.lock().expect("address").clone()
    }
    fn remote_user(&self) -> String {
        "root".into()
    }
    fn verify_host_key(&self, _: &str) -> Result<(), DriverError> {
        Ok(())
    }
    fn price_history(&self, _: &InstanceType) -> Result<Vec<InstancePrice>, DriverError> {
        Ok(Vec::new())
    }
}

#[derive(Default)]
struct FakeCloud {
    world: Arc<World>,
    instances: Mutex<BTreeMap<String, Arc<FakeInstance>>>,
    creates: AtomicUsize,
    destroys: AtomicUsize,
    fail_creates: AtomicBool,
    destroy_failures_left: AtomicUsize,
    /// New VMs never answer SSH.
    unreachable_vms: AtomicBool,
    /// New VMs have no address until a later listing (an Azure NIC's IP comes late).
    late_addresses: AtomicBool,
    /// New VMs' runners refuse `start`.
    refusing_vms: AtomicBool,
    /// New VMs' runners start the run but report failure.
    flaky_start_vms: AtomicBool,
    /// New VMs' runs lose their supervisor at once (listed Stale).
    stale_run_vms: AtomicBool,
    /// At most this many instances (0: no quota).
    quota: AtomicUsize,
}

impl FakeCloud {
    fn ids(&self) -> Vec<String> {
        self.instances
            .lock()
            .expect("cloud")
            .keys()
            .cloned()
            .collect()
    }

    fn address_of(&self, id: &str) -> String {
        self.instances.lock().expect("cloud")[id].address()
    }
}

impl Cloud for FakeCloud {
    fn instances(&self) -> BoxFuture<'_, Result<Option<Vec<Listed>>, DriverError>> {
        let list = self
            .instances
            .lock()
            .expect("cloud")
            .values()
            .map(|i| Listed::read(Arc::clone(i) as Arc<dyn Instance>))
            .collect();
        Box::pin(async move { Ok(Some(list)) })
    }

    fn create(
        &self,
        request: CreateRequest,
        _: usize,
    ) -> BoxFuture<'_, Result<Listed, CreateError>> {
        let n = self.creates.fetch_add(1, Ordering::SeqCst);
        let result = if self.fail_creates.load(Ordering::SeqCst) {
            Err(CreateError::Driver(DriverError::other("the API is down")))
        } else {
            let id = format!("i-{n}");
            let address = format!("vm-{n}");
            if !self.unreachable_vms.load(Ordering::SeqCst) {
                let vm = Vm {
                    fail_start: self.refusing_vms.load(Ordering::SeqCst),
                    start_runs_but_fails: self.flaky_start_vms.load(Ordering::SeqCst),
                    stale_runs: self.stale_run_vms.load(Ordering::SeqCst),
                    ..Vm::default()
                };
                self.world
                    .vms
                    .lock()
                    .expect("world")
                    .insert(address.clone(), vm);
            }
            let listed_address = if self.late_addresses.load(Ordering::SeqCst) {
                String::new()
            } else {
                address
            };
            let instance = Arc::new(FakeInstance {
                id: id.clone(),
                address: Mutex::new(listed_address),
                tags: Mutex::new(request.tags),
            });
            self.instances
                .lock()
                .expect("cloud")
                .insert(id, Arc::clone(&instance));
            Ok(Listed::read(instance))
        };
        Box::pin(async move { result })
    }

    fn destroy(&self, instance: Arc<dyn Instance>) -> BoxFuture<'_, Result<(), DriverError>> {
        self.destroys.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .destroy_failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let result = if failing {
            Err(DriverError::other("destroy refused"))
        } else {
            self.instances.lock().expect("cloud").remove(&instance.id());
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn set_tags(
        &self,
        instance: Arc<dyn Instance>,
        tags: Tags,
    ) -> BoxFuture<'_, Result<(), DriverError>> {
        let result = instance.set_tags(&tags);
        Box::pin(async move { result })
    }

    fn quota_headroom(&self, count: usize) -> usize {
        match self.quota.load(Ordering::SeqCst) {
            0 => usize::MAX,
            quota => quota.saturating_sub(count),
        }
    }
    fn creates_allowed(&self) -> usize {
        usize::MAX
    }
    fn at_capacity(&self, _: &InstanceType) -> bool {
        false
    }
    fn observe_instance_count(&self, _: usize) {}
    fn next_holdoff_end(&self) -> Option<Instant> {
        None
    }
    fn stop(&self) {}
}

/// An executor that answers the runner protocol from the world, at its current address.
struct FakeExec {
    world: Arc<World>,
    endpoint: Mutex<Endpoint>,
}

fn output(status: u32, stdout: impl Into<Vec<u8>>) -> CommandOutput {
    CommandOutput {
        stdout: stdout.into(),
        stderr: Vec::new(),
        exit_status: Some(status),
    }
}

/// What `runner collect` sends for a run that exited with `exit_code`: the header, then
/// "stdout of ID\n" and "stderr of ID\n".
fn collect_stream(id: &str, exit_code: i32) -> Vec<u8> {
    let stdout = format!("stdout of {id}\n");
    let stderr = format!("stderr of {id}\n");
    let part = |s: &str| LogPart {
        sent: s.len() as u64,
        total: s.len() as u64,
    };
    let header = CollectHeader {
        exit: ExitRecord {
            exit_code,
            error: None,
            started_at_ms: None,
            finished_at_ms: None,
        },
        stdout: part(&stdout),
        stderr: part(&stderr),
    };
    let mut bytes = serde_json::to_vec(&header).expect("json");
    bytes.push(b'\n');
    bytes.extend_from_slice(stdout.as_bytes());
    bytes.extend_from_slice(stderr.as_bytes());
    bytes
}

impl FakeExec {
    fn answer(&self, command: &str, stdin: &[u8]) -> Result<CommandOutput, SshError> {
        let address = self.endpoint.lock().expect("endpoint").address.clone();
        self.world
            .commands
            .lock()
            .expect("commands")
            .push((address.clone(), command.to_string()));
        let unreachable = || SshError::Connect {
            address: address.clone(),
            message: "no route to host".into(),
        };
        let args: Vec<&str> = command
            .split_once(" runner ")
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|a| a.trim_matches('\''))
                    .collect()
            })
            .unwrap_or_default();
        self.world
            .with_vm(&address, |vm| match args.as_slice() {
                ["list"] => {
                    let containers = vm
                        .runs
                        .iter()
                        .map(|(id, exit)| RunEntry {
                            id: id.clone(),
                            state: if exit.is_some() {
                                RunState::Exited
                            } else if vm.stale_runs {
                                RunState::Stale
                            } else {
                                RunState::Running
                            },
                            exit: exit.map(|exit_code| ExitRecord {
                                exit_code,
                                error: None,
                                started_at_ms: None,
                                finished_at_ms: None,
                            }),
                        })
                        .collect();
                    let list = RunList {
                        containers,
                        broken: false,
                    };
                    output(0, serde_json::to_vec(&list).expect("json"))
                }
                ["start", forget @ ..] => {
                    for id in forget {
                        // A running one is refused, as the runner does.
                        if vm.runs.get(*id).is_some_and(|r| r.is_some()) || vm.stale_runs {
                            vm.runs.remove(*id);
                        }
                    }
                    if vm.fail_start {
                        return output(1, "");
                    }
                    let spec: ContainerSpec = serde_json::from_slice(stdin).expect("spec");
                    vm.runs.entry(spec.id).or_insert(None);
                    output(if vm.start_runs_but_fails { 255 } else { 0 }, "")
                }
                ["kill", _, id] => {
                    if vm.ignore_sigterm && vm.runs.get(*id) == Some(&None) {
                        return output(1, "");
                    }
                    if let Some(run) = vm.runs.get_mut(*id) {
                        run.get_or_insert(143);
                    }
                    output(0, "")
                }
                ["version"] => output(0, crate::runner::PROTOCOL.to_string()),
                ["collect", id, _] => match vm.runs.get(*id) {
                    Some(Some(exit_code)) => output(0, collect_stream(id, *exit_code)),
                    _ => output(3, ""),
                },
                ["forget", ids @ ..] => {
                    for id in ids {
                        vm.runs.remove(*id);
                    }
                    output(0, "")
                }
                _ => output(0, ""),
            })
            .ok_or_else(unreachable)
    }
}

impl Exec for FakeExec {
    fn run<'a>(
        &'a self,
        command: &'a str,
        stdin: &'a [u8],
    ) -> BoxFuture<'a, Result<CommandOutput, SshError>> {
        let answer = self.answer(command, stdin);
        Box::pin(async move { answer })
    }

    fn retarget(&self, endpoint: &Endpoint) {
        *self.endpoint.lock().expect("endpoint") = endpoint.clone();
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct FakeFactory {
    world: Arc<World>,
}

impl ExecFactory for FakeFactory {
    fn executor(&self, listed: &Listed) -> Arc<dyn Exec> {
        Arc::new(FakeExec {
            world: Arc::clone(&self.world),
            endpoint: Mutex::new(listed.endpoint()),
        })
    }
}

/// A dispatcher on a fake cloud, running in the background of a paused-time test.
struct Rig {
    world: Arc<World>,
    cloud: Arc<FakeCloud>,
    queue: Arc<SqliteQueue>,
    handle: DispatcherHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

/// Timeouts the tests reason about: probes every second, idle after 60 s, boot and probe
/// timeouts of 30 s, SIGTERM every second for up to 10 s.
fn test_config(dir: &std::path::Path) -> ClusterConfig {
    let mut config = ClusterConfig {
        state_dir: dir.to_path_buf(),
        ..ClusterConfig::default()
    };
    let t = &mut config.timeouts;
    t.probe_interval = Duration::from_secs(1);
    t.sync_interval = Duration::from_secs(5);
    t.idle = Duration::from_secs(60);
    t.booting = Duration::from_secs(30);
    t.probe = Duration::from_secs(30);
    t.shutdown = Duration::from_secs(5);
    t.signal = Duration::from_secs(1);
    t.term = Duration::from_secs(10);
    t.stale_lock = Duration::from_secs(5);
    config.limits.max_dispatch_attempts = 3;
    config
}

impl Rig {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    fn start_with(setup: impl FnOnce(&FakeCloud)) -> Self {
        // Captured per test by the harness; `RUST_LOG=debug` shows the dispatcher's story.
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().expect("tmp");
        let config = test_config(dir.path());
        let world = Arc::new(World::default());
        let cloud = Arc::new(FakeCloud {
            world: Arc::clone(&world),
            ..FakeCloud::default()
        });
        setup(&cloud);
        let queue =
            Arc::new(SqliteQueue::open(&dir.path().join("queue.sqlite"), "zzzzz").expect("queue"));
        let metrics = Arc::new(Metrics::new("fake", &config.instance_types()));
        let dispatcher = Dispatcher::new(
            &config,
            queue.clone(),
            cloud.clone(),
            Arc::new(FakeFactory {
                world: Arc::clone(&world),
            }),
            RunnerBinary::installed("/usr/bin/dispatch-cloud"),
            None,
            metrics.clone(),
        )
        .expect("dispatcher");
        let handle = dispatcher.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async move {
            let _ = stopped.await;
        }));
        Rig {
            world,
            cloud,
            queue,
            handle,
            stop: Some(stop),
            task: Some(task),
            metrics,
            _dir: dir,
        }
    }

    /// The value of one series of a scrape taken now.
    fn metric(&self, series: &str) -> Option<f64> {
        let instances = self.handle.instances();
        let queue = self.handle.scheduler_queue();
        let text = self.metrics.render(&crate::metrics::Snapshot {
            instances: &instances,
            queue: &queue,
            spend: &self.handle.spend(),
            now_ms: crate::queue::now_ms(),
        });
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn submit(&self) -> String {
        self.submit_needing(1, 1 << 30)
    }

    fn submit_needing(&self, vcpus: u32, ram_bytes: u64) -> String {
        let c = self
            .queue
            .submit(NewContainer {
                command: vec!["true".into()],
                runtime_constraints: RuntimeConstraints {
                    vcpus,
                    ram_bytes,
                    ..Default::default()
                },
                priority: 1,
                ..Default::default()
            })
            .expect("submit");
        self.handle.poke();
        c.id
    }

    fn container(&self, id: &str) -> Container {
        self.queue.get(id).expect("container")
    }

    fn state(&self, id: &str) -> ContainerState {
        self.container(id).state
    }

    /// The address of the instance `id` runs on.
    fn vm_of(&self, id: &str) -> String {
        let instance = self.container(id).instance_id.expect("instance");
        self.cloud.address_of(&instance)
    }

    /// Waits (in paused time) until `done` holds, or fails after `within`.
    async fn eventually(&self, what: &str, within: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (in paused time) until the container `id` is in `state`.
    async fn until_state(&self, id: &str, state: ContainerState) {
        self.eventually(state.as_str(), MINUTE, || self.state(id) == state)
            .await;
    }

    /// Submits a container and waits until it runs.
    async fn submit_running(&self) -> String {
        let id = self.submit();
        self.until_state(&id, ContainerState::Running).await;
        id
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("dispatcher task");
        }
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn a_start_is_recorded_running_and_its_result_complete() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let vm = rig.vm_of(&id);
    rig.world
        .with_vm(&vm, |vm| vm.runs.insert(id.clone(), Some(7)));
    rig.until_state(&id, ContainerState::Complete).await;
    let c = rig.container(&id);
    assert_eq!(c.exit_code, Some(7));
    let log = std::path::Path::new(c.log_dir.as_deref().expect("log dir")).join("stdout");
    assert_eq!(
        std::fs::read_to_string(log).expect("stdout"),
        format!("stdout of {id}\n")
    );
    rig.eventually("the run forgotten on the VM", MINUTE, || {
        rig.world.with_vm(&vm, |vm| vm.runs.is_empty()) == Some(true)
    })
    .await;
    assert_eq!(
        rig.world.commands_to(&vm, "runner 'start'"),
        1,
        "started once"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_sends_sigterm_and_a_runner_ignoring_it_drains_its_vm() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let vm = rig.vm_of(&id);
    rig.world.with_vm(&vm, |vm| vm.ignore_sigterm = true);
    rig.queue.cancel(&id, "user asked").expect("cancel");
    rig.handle.poke();
    let cancelled_at = Instant::now();
    rig.eventually("SIGTERM sent", MINUTE, || {
        rig.world.commands_to(&vm, "runner 'kill' '15'") > 0
    })
    .await;
    rig.eventually("the VM drained and destroyed", MINUTE, || {
        rig.cloud.ids().is_empty()
    })
    .await;
    let waited = Instant::now() - cancelled_at;
    assert!(
        waited >= Duration::from_secs(10),
        "gave up after {waited:?}, before term"
    );
    assert!(
        rig.world.commands_to(&vm, "runner 'kill' '15'") >= 5,
        "SIGTERM repeated every second"
    );
    assert_eq!(
        rig.world.commands_to(&vm, "runner 'kill' '9'"),
        0,
        "never SIGKILL"
    );
    assert_eq!(rig.state(&id), ContainerState::Cancelled);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_destroy_is_retried() {
    let rig = Rig::start_with(|c| c.destroy_failures_left.store(2, Ordering::SeqCst));
    let id = rig.submit_running().await;
    let vm = rig.vm_of(&id);
    rig.world
        .with_vm(&vm, |vm| vm.runs.insert(id.clone(), Some(0)));
    rig.eventually("the idle VM destroyed", 3 * MINUTE, || {
        rig.cloud.ids().is_empty()
    })
    .await;
    assert_eq!(rig.cloud.destroys.load(Ordering::SeqCst), 3);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_instance_gone_from_the_listing_has_its_container_requeued() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let first = rig.container(&id).instance_id.expect("instance");
    // The VM vanishes behind the dispatcher's back.
    rig.cloud.instances.lock().expect("cloud").remove(&first);
    rig.eventually("a second attempt elsewhere", MINUTE, || {
        let c = rig.container(&id);
        c.dispatch_attempts == 1
            && c.state == ContainerState::Running
            && c.instance_id.as_deref() != Some(first.as_str())
    })
    .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn runs_that_go_stale_cost_attempts_until_cancelled_and_are_forgotten() {
    let rig = Rig::start_with(|c| c.stale_run_vms.store(true, Ordering::SeqCst));
    let id = rig.submit();
    rig.eventually("Cancelled", 5 * MINUTE, || {
        rig.state(&id) == ContainerState::Cancelled
    })
    .await;
    let c = rig.container(&id);
    assert_eq!(c.dispatch_attempts, 3, "{c:?}");
    // Each stale run directory was forgotten on its VM, so none is left listed.
    rig.eventually("stale runs forgotten", MINUTE, || {
        rig.world
            .vms
            .lock()
            .expect("world")
            .values()
            .all(|vm| vm.runs.is_empty())
    })
    .await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_never_starts_costs_attempts_until_cancelled() {
    let rig = Rig::start_with(|c| c.refusing_vms.store(true, Ordering::SeqCst));
    let id = rig.submit();
    rig.eventually("Cancelled", 5 * MINUTE, || {
        rig.state(&id) == ContainerState::Cancelled
    })
    .await;
    let c = rig.container(&id);
    assert_eq!(c.dispatch_attempts, 3);
    assert!(
        c.runtime_error
            .as_deref()
            .is_some_and(|e| e.contains("3 failed dispatch attempts")),
        "{c:?}"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_start_reported_failed_that_runs_anyway_is_adopted_not_rerun() {
    let rig = Rig::start_with(|c| c.flaky_start_vms.store(true, Ordering::SeqCst));
    let id = rig.submit();
    rig.eventually("Running (adopted)", MINUTE, || {
        rig.state(&id) == ContainerState::Running
    })
    .await;
    let vm = rig.vm_of(&id);
    assert_eq!(rig.container(&id).dispatch_attempts, 0);
    assert_eq!(rig.world.commands_to(&vm, "runner 'start'"), 1);
    assert_eq!(
        rig.cloud.creates.load(Ordering::SeqCst),
        1,
        "never started elsewhere"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_missing_from_one_listing_is_kept() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let instance = rig.container(&id).instance_id.expect("instance");
    let hidden = rig
        .cloud
        .instances
        .lock()
        .expect("cloud")
        .remove(&instance)
        .expect("instance");
    // One listing (every 5 s) misses it; it is back before the next.
    tokio::time::sleep(Duration::from_secs(6)).await;
    rig.cloud
        .instances
        .lock()
        .expect("cloud")
        .insert(instance.clone(), hidden);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let c = rig.container(&id);
    assert_eq!(
        (c.state, c.dispatch_attempts, c.instance_id.as_deref()),
        (ContainerState::Running, 0, Some(instance.as_str()))
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_never_answers_is_shut_down_at_the_boot_timeout() {
    let rig = Rig::start_with(|c| c.unreachable_vms.store(true, Ordering::SeqCst));
    let started = Instant::now();
    let id = rig.submit();
    rig.eventually("a create", MINUTE, || !rig.cloud.ids().is_empty())
        .await;
    let first = rig.cloud.ids()[0].clone();
    rig.cloud.unreachable_vms.store(false, Ordering::SeqCst);
    rig.eventually("the dead VM destroyed", MINUTE, || {
        !rig.cloud.ids().contains(&first)
    })
    .await;
    let waited = Instant::now() - started;
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(40)).contains(&waited),
        "boot timeout after {waited:?}"
    );
    // The container waits for another VM; it was never started, so no attempt counted.
    rig.eventually("Running elsewhere", MINUTE, || {
        rig.state(&id) == ContainerState::Running
    })
    .await;
    assert_eq!(rig.container(&id).dispatch_attempts, 0);
    // One boot failed, the next succeeded; each boot and the destroy were timed.
    let boots = |outcome: &str| {
        rig.metric(&format!(
            "dispatch_cloud_boot_outcomes_total{{outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(boots("failure"), Some(1.0));
    assert_eq!(boots("success"), Some(1.0));
    assert_eq!(boots("aborted"), Some(0.0));
    assert_eq!(
        rig.metric("dispatch_cloud_instances_time_to_ready_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        rig.metric("dispatch_cloud_instances_shutdown_to_gone_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        rig.metric("dispatch_cloud_containers_queue_to_start_seconds_count"),
        Some(1.0)
    );
    assert!(rig
        .metric("dispatch_cloud_instances_probe_duration_seconds_count{outcome=\"success\"}")
        .is_some_and(|n| n >= 1.0));
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_whose_address_comes_at_a_later_listing_is_reached_there() {
    let rig = Rig::start_with(|c| c.late_addresses.store(true, Ordering::SeqCst));
    let id = rig.submit();
    rig.eventually("a create", MINUTE, || !rig.cloud.ids().is_empty())
        .await;
    let instance = rig.cloud.ids()[0].clone();
    assert_eq!(rig.cloud.address_of(&instance), "", "no address yet");
    // Some probes come and go without an address; the container waits for this VM.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        matches!(
            rig.state(&id),
            ContainerState::Queued | ContainerState::Locked
        ),
        "{:?}",
        rig.state(&id)
    );
    assert_eq!(
        rig.world.commands_to("vm-0", "runner"),
        0,
        "nothing reached it"
    );
    // The NIC gets its IP; the next listing carries it and the executor follows.
    *rig.cloud.instances.lock().expect("cloud")[&instance]
        .address
        .lock()
        .expect("address") = "vm-0".into();
    rig.until_state(&id, ContainerState::Running).await;
    assert!(rig.world.commands_to("vm-0", "runner 'start'") > 0);
    assert_eq!(
        rig.cloud.ids(),
        [instance],
        "the same VM, not a replacement"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_stops_answering_is_shut_down_at_the_probe_timeout() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let vm = rig.vm_of(&id);
    let instance = rig.container(&id).instance_id.expect("instance");
    rig.world.vms.lock().expect("world").remove(&vm);
    let lost = Instant::now();
    rig.eventually("the silent VM destroyed", MINUTE, || {
        !rig.cloud.ids().contains(&instance)
    })
    .await;
    let waited = Instant::now() - lost;
    assert!(
        (Duration::from_secs(29)..Duration::from_secs(40)).contains(&waited),
        "probe timeout after {waited:?}"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_vm_is_shut_down_after_the_idle_timeout_and_not_before() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let vm = rig.vm_of(&id);
    rig.world
        .with_vm(&vm, |vm| vm.runs.insert(id.clone(), Some(0)));
    rig.until_state(&id, ContainerState::Complete).await;
    let idle_since = Instant::now();
    rig.eventually("the idle VM destroyed", 3 * MINUTE, || {
        rig.cloud.ids().is_empty()
    })
    .await;
    let waited = Instant::now() - idle_since;
    assert!(
        (Duration::from_secs(58)..Duration::from_secs(65)).contains(&waited),
        "idle timeout after {waited:?}"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_address_change_at_a_listing_retargets_the_executor() {
    let rig = Rig::start();
    let id = rig.submit_running().await;
    let old = rig.vm_of(&id);
    let instance = rig.container(&id).instance_id.expect("instance");
    // The cloud moves the VM (a new private IP after a host migration, say).
    let moved = {
        let mut vms = rig.world.vms.lock().expect("world");
        vms.remove(&old).expect("vm")
    };
    rig.world
        .vms
        .lock()
        .expect("world")
        .insert("vm-moved".into(), moved);
    *rig.cloud.instances.lock().expect("cloud")[&instance]
        .address
        .lock()
        .expect("address") = "vm-moved".into();
    rig.eventually("probes at the new address", MINUTE, || {
        rig.world.commands_to("vm-moved", "runner 'list'") > 0
    })
    .await;
    rig.eventually("the view shows it", MINUTE, || {
        rig.handle
            .instances()
            .iter()
            .any(|i| i.id == instance && i.address == "vm-moved")
    })
    .await;
    // Its container finishes there and is recorded.
    rig.world
        .with_vm("vm-moved", |vm| vm.runs.insert(id.clone(), Some(0)));
    rig.until_state(&id, ContainerState::Complete).await;
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failing_creates_back_off() {
    let rig = Rig::start_with(|c| c.fail_creates.store(true, Ordering::SeqCst));
    let id = rig.submit();
    tokio::time::sleep(MINUTE).await;
    let calls = rig.cloud.creates.load(Ordering::SeqCst);
    assert!((3..=8).contains(&calls), "{calls} creates in a minute");
    // Waiting for a VM, never started: still Queued, no attempt counted.
    let waiting = rig.container(&id);
    assert_eq!(waiting.state, ContainerState::Queued);
    assert_eq!(waiting.dispatch_attempts, 0);
    let why = rig
        .handle
        .scheduler_queue()
        .get(&id)
        .map(|e| e.scheduling_status.clone())
        .unwrap_or_default();
    assert!(why.contains("the API is down"), "{why:?}");
    // Once the cloud recovers, the container runs (the hold-off has grown to 32 s or 64 s).
    rig.cloud.fail_creates.store(false, Ordering::SeqCst);
    rig.eventually("Running", 2 * MINUTE, || {
        rig.state(&id) == ContainerState::Running
    })
    .await;
    let view = rig.handle.instances();
    assert!(view
        .iter()
        .all(|i| i.idle_behavior == IdleBehavior::Run && i.state != InstanceState::Shutdown));
    rig.stop().await;
}

/// The scheduler's queue says, in words, why each container waits: for a VM to boot, over
/// quota; and a container no type fits is cancelled saying what it needed.
#[tokio::test(start_paused = true)]
async fn the_scheduler_queue_says_why_each_container_waits() {
    let rig = Rig::start_with(|c| {
        c.unreachable_vms.store(true, Ordering::SeqCst);
        c.quota.store(1, Ordering::SeqCst);
    });
    let status = |id: &str| {
        rig.handle
            .scheduler_queue()
            .get(id)
            .map(|e| e.scheduling_status.clone())
    };
    // A whole `large` each: the first gets the one VM the quota allows, the second waits.
    let first = rig.submit_needing(4, 8 << 30);
    rig.eventually("the first waits for its VM", MINUTE, || {
        status(&first).as_deref() == Some("waiting for a VM of type large to boot")
    })
    .await;
    let second = rig.submit_needing(4, 8 << 30);
    rig.eventually("the second is over quota", MINUTE, || {
        status(&second).as_deref() == Some("over quota: waiting for an instance to be freed")
    })
    .await;
    let view = rig.handle.scheduler_queue();
    let order: Vec<&str> = view.entries.iter().map(|e| &*e.container).collect();
    assert_eq!(
        order,
        [first.as_str(), second.as_str()],
        "locked first, then by priority"
    );
    let entry = view.get(&first).expect("entry");
    assert_eq!(entry.instance_types.to_vec(), ["large"]);
    assert_eq!(entry.instance, None);
    assert!(entry.first_seen_at_ms > 0);
    let small = rig.submit_needing(1, 1 << 30);
    rig.eventually("a small one is listed", MINUTE, || status(&small).is_some())
        .await;
    let small_types = rig
        .handle
        .scheduler_queue()
        .get(&small)
        .expect("small")
        .instance_types
        .clone();
    // medium costs twice as much: past the default price factor (1.5).
    assert_eq!(small_types.to_vec(), ["small"]);

    let huge = rig.submit_needing(64, 1 << 30);
    rig.until_state(&huge, ContainerState::Cancelled).await;
    assert_eq!(
        rig.container(&huge).runtime_error.as_deref(),
        Some("no instance type fits: needs 64 vCPUs, 1 GiB RAM, 0 B scratch, 0 GPUs")
    );
    rig.eventually("the cancelled one to leave the queue", MINUTE, || {
        status(&huge).is_none()
    })
    .await;
    rig.stop().await;
}
