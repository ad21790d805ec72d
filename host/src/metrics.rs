//! Prometheus metrics (`GET /metrics`, the Prometheus text format), all under
//! `dispatch_cloud_`. Counters and histograms are counted where things happen (driver calls,
//! plugin loads, and what the pool and dispatcher report through `FleetObserver`); the fleet
//! and queue gauges are computed from the dispatcher's published snapshots at each scrape, so
//! they can never drift from what the API shows, and a scrape never reads the queue database.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use driver_abi::{DriverError, InstanceType};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::cost::Spend;
use crate::dispatcher::SchedulerQueue;
use crate::pool::{BootOutcome, FleetObserver, InstanceView};
use crate::scheduler::status::Waiting;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Times from 0.1 s to about 1.9 h (boots, waits in the queue).
fn slow_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 17))
}

/// Times from 1 ms to about 33 s (probes).
fn fast_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The driver calls the host makes.
pub const OPERATIONS: &[&str] = &["create", "list", "destroy", "set_tags"];

/// What a scrape reports on, as the dispatcher last published it.
pub struct Snapshot<'a> {
    pub instances: &'a [InstanceView],
    pub queue: &'a SchedulerQueue,
    pub spend: &'a Spend,
    /// Unix milliseconds.
    pub now_ms: i64,
}

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: the gauges are cleared and refilled for each.
    scrape: std::sync::Mutex<()>,
    driver: String,
    /// Config type name → (vCPUs, RAM bytes).
    types: HashMap<String, (u32, u64)>,
    driver_operations: Family<Labels, Counter>,
    plugin_loads: Family<Labels, Counter>,
    boot_outcomes: Family<Labels, Counter>,
    disappeared: Family<Labels, Counter>,
    time_to_ssh: Histogram,
    time_to_ready: Histogram,
    shutdown_to_gone: Histogram,
    queue_to_start: Histogram,
    probe_duration: Histograms,
    event_stream_ends: Counter,
    event_streams: Family<Labels, Gauge>,
    containers_running: Gauge,
    allocated_not_started: Gauge,
    over_quota: Gauge,
    at_quota: Gauge,
    queue_entries: Family<Labels, Gauge>,
    longest_wait: FloatGauge,
    probe_age_max: FloatGauge,
    probe_age_median: FloatGauge,
    instances: Family<Labels, Gauge>,
    instances_price: Family<Labels, FloatGauge>,
    vcpus: Family<Labels, Gauge>,
    memory: Family<Labels, Gauge>,
    spent_today: FloatGauge,
    spend_cap: FloatGauge,
}

impl Metrics {
    pub fn new(driver: &str, types: &[InstanceType]) -> Metrics {
        let mut registry = Registry::with_prefix("dispatch_cloud");
        let driver_operations = Family::<Labels, Counter>::default();
        registry.register(
            "driver_operations",
            "Calls into the cloud driver, by operation and error kind (none for success)",
            driver_operations.clone(),
        );
        // Every operation starts at 0, so rates exist before the first call.
        for op in OPERATIONS {
            let _ = driver_operations.get_or_create_owned(&labels(&[
                ("driver", driver),
                ("operation", op),
                ("error", "none"),
            ]));
        }
        let plugin_loads = Family::<Labels, Counter>::default();
        registry.register(
            "plugin_loads",
            "Driver plugins loaded, by plugin and result",
            plugin_loads.clone(),
        );
        let boot_outcomes = Family::<Labels, Counter>::default();
        registry.register(
            "boot_outcomes",
            "VMs this process created, by how their boot ended",
            boot_outcomes.clone(),
        );
        for outcome in BootOutcome::ALL {
            let _ = boot_outcomes.get_or_create_owned(&labels(&[("outcome", outcome.as_str())]));
        }
        let disappeared = Family::<Labels, Counter>::default();
        registry.register(
            "instances_disappeared",
            "Instances gone from the cloud's list without a destroy of ours, by their state then",
            disappeared.clone(),
        );
        let time_to_ssh = slow_buckets();
        registry.register_with_unit(
            "instances_time_to_ssh",
            "From a create returning to the first SSH session that reached the VM",
            Unit::Seconds,
            time_to_ssh.clone(),
        );
        let time_to_ready = slow_buckets();
        registry.register_with_unit(
            "instances_time_to_ready",
            "From the first SSH session to booted (boot probe passed, runner deployed)",
            Unit::Seconds,
            time_to_ready.clone(),
        );
        let shutdown_to_gone = slow_buckets();
        registry.register_with_unit(
            "instances_shutdown_to_gone",
            "From the decision to shut a VM down to its destroy confirmed (or its disappearance)",
            Unit::Seconds,
            shutdown_to_gone.clone(),
        );
        let queue_to_start = slow_buckets();
        registry.register_with_unit(
            "containers_queue_to_start",
            "From a container's submission to its runner started on a VM",
            Unit::Seconds,
            queue_to_start.clone(),
        );
        let probe_duration: Histograms = Family::new_with_constructor(fast_buckets);
        registry.register_with_unit(
            "instances_probe_duration",
            "Run probes (runner list), by outcome",
            Unit::Seconds,
            probe_duration.clone(),
        );
        let event_stream_ends = Counter::default();
        registry.register(
            "event_stream_ends",
            "Workers' event streams that ended (each is reopened by the next probe)",
            event_stream_ends.clone(),
        );
        let event_streams = Family::<Labels, Gauge>::default();
        registry.register(
            "event_streams",
            "Booted workers by whether their event stream is open",
            event_streams.clone(),
        );
        let containers_running = Gauge::default();
        registry.register(
            "containers_running",
            "Containers starting or running on VMs",
            containers_running.clone(),
        );
        let allocated_not_started = Gauge::default();
        registry.register(
            "containers_allocated_not_started",
            "Containers given a place on a VM that is still booting",
            allocated_not_started.clone(),
        );
        let over_quota = Gauge::default();
        registry.register(
            "containers_not_allocated_over_quota",
            "Containers waiting because the quota or the spending cap allows no new VM",
            over_quota.clone(),
        );
        let at_quota = Gauge::default();
        registry.register(
            "at_quota",
            "1 when the quota (or max_instances) allowed no more instances at the last pass",
            at_quota.clone(),
        );
        let queue_entries = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_entries",
            "Active containers, by state and cheapest eligible instance type",
            queue_entries.clone(),
        );
        let longest_wait = FloatGauge::default();
        registry.register_with_unit(
            "containers_longest_wait",
            "How long the oldest waiting container (priority above 0) has waited",
            Unit::Seconds,
            longest_wait.clone(),
        );
        let probe_age_max = FloatGauge::default();
        registry.register_with_unit(
            "probe_age_max",
            "Age of the oldest last successful probe among probed workers",
            Unit::Seconds,
            probe_age_max.clone(),
        );
        let probe_age_median = FloatGauge::default();
        registry.register_with_unit(
            "probe_age_median",
            "Median age of the workers' last successful probes",
            Unit::Seconds,
            probe_age_median.clone(),
        );
        let instances = Family::<Labels, Gauge>::default();
        registry.register(
            "instances",
            "VMs, by state and instance type",
            instances.clone(),
        );
        let instances_price = Family::<Labels, FloatGauge>::default();
        registry.register(
            "instances_price_per_hour",
            "Summed hourly price of the VMs, by state",
            instances_price.clone(),
        );
        let vcpus = Family::<Labels, Gauge>::default();
        registry.register("vcpus", "Summed vCPUs of the VMs, by state", vcpus.clone());
        let memory = Family::<Labels, Gauge>::default();
        registry.register_with_unit(
            "memory",
            "Summed RAM of the VMs, by state",
            Unit::Bytes,
            memory.clone(),
        );
        let spent_today = FloatGauge::default();
        registry.register_with_unit(
            "spent_today",
            "What the fleet cost since 00:00 UTC, as far as this dispatcher saw it",
            Unit::Other("dollars".into()),
            spent_today.clone(),
        );
        let spend_cap = FloatGauge::default();
        registry.register(
            "max_hourly_spend",
            "limits.max_hourly_spend in dollars per hour (0: no cap)",
            spend_cap.clone(),
        );
        Metrics {
            registry,
            scrape: std::sync::Mutex::new(()),
            driver: driver.to_string(),
            types: types
                .iter()
                .map(|t| (t.name.clone(), (t.vcpus, t.ram_bytes)))
                .collect(),
            driver_operations,
            plugin_loads,
            boot_outcomes,
            disappeared,
            time_to_ssh,
            time_to_ready,
            shutdown_to_gone,
            queue_to_start,
            probe_duration,
            event_stream_ends,
            event_streams,
            containers_running,
            allocated_not_started,
            over_quota,
            at_quota,
            queue_entries,
            longest_wait,
            probe_age_max,
            probe_age_median,
            instances,
            instances_price,
            vcpus,
            memory,
            spent_today,
            spend_cap,
        }
    }

    /// One driver call came back.
    pub fn driver_operation(&self, operation: &str, error: Option<&DriverError>) {
        let error = error.map(DriverError::kind).unwrap_or("none");
        self.driver_operations
            .get_or_create(&labels(&[
                ("driver", &self.driver),
                ("operation", operation),
                ("error", error),
            ]))
            .inc();
    }

    pub fn plugin_loaded(&self, plugin: &str, result: &str) {
        self.plugin_loads
            .get_or_create(&labels(&[("plugin", plugin), ("result", result)]))
            .inc();
    }

    /// The metrics in the Prometheus text format, the gauges taken from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot<'_>) -> String {
        // A poisoned lock only means another scrape panicked; the gauges are refilled anyway.
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.queue_gauges(snapshot.queue, snapshot.now_ms);
        self.fleet_gauges(snapshot.instances, snapshot.now_ms);
        self.spent_today.set(snapshot.spend.spent_today);
        self.spend_cap
            .set(snapshot.spend.max_hourly_spend.unwrap_or(0.0));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    fn queue_gauges(&self, queue: &SchedulerQueue, now_ms: i64) {
        let entries = &queue.entries;
        let on_vm = entries.iter().filter(|e| e.instance.is_some()).count();
        self.containers_running.set(on_vm as i64);
        let waiting_for = |kinds: &[Waiting]| {
            entries
                .iter()
                .filter(|e| e.waiting.is_some_and(|w| kinds.contains(&w)))
                .count() as i64
        };
        self.allocated_not_started.set(
            entries
                .iter()
                .filter(|e| e.instance.is_none() && e.state == crate::queue::ContainerState::Locked)
                .count() as i64,
        );
        self.over_quota
            .set(waiting_for(&[Waiting::OverQuota, Waiting::OverSpendCap]));
        self.at_quota.set(i64::from(queue.at_quota));
        let mut by_state_and_type: HashMap<(&str, &str), i64> = HashMap::new();
        for e in entries {
            let cheapest = e.instance_types.first().map_or("none", String::as_str);
            *by_state_and_type
                .entry((e.state.as_str(), cheapest))
                .or_default() += 1;
        }
        self.queue_entries.clear();
        for ((state, type_name), n) in by_state_and_type {
            self.queue_entries
                .get_or_create(&labels(&[("state", state), ("instance_type", type_name)]))
                .set(n);
        }
        let oldest = entries
            .iter()
            .filter(|e| e.priority > 0 && e.instance.is_none())
            .map(|e| e.created_at_ms)
            .min();
        self.longest_wait.set(
            oldest
                .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
    }

    fn fleet_gauges(&self, instances: &[InstanceView], now_ms: i64) {
        for family in [
            &self.instances,
            &self.vcpus,
            &self.memory,
            &self.event_streams,
        ] {
            family.clear();
        }
        self.instances_price.clear();
        let mut ages: Vec<f64> = Vec::new();
        for i in instances {
            let state = i.state.as_str();
            let type_name = i.instance_type.as_deref().unwrap_or(&i.provider_type);
            self.instances
                .get_or_create(&labels(&[("state", state), ("instance_type", type_name)]))
                .inc();
            let by_state = labels(&[("state", state)]);
            self.instances_price
                .get_or_create(&by_state)
                .inc_by(i.price);
            if let Some((vcpus, ram)) = i.instance_type.as_ref().and_then(|t| self.types.get(t)) {
                self.vcpus
                    .get_or_create(&by_state)
                    .inc_by(i64::from(*vcpus));
                self.memory
                    .get_or_create(&by_state)
                    .inc_by(i64::try_from(*ram).unwrap_or(i64::MAX));
            }
            if matches!(
                i.state,
                crate::pool::InstanceState::Idle | crate::pool::InstanceState::Running
            ) {
                let open = if i.event_stream { "open" } else { "down" };
                self.event_streams
                    .get_or_create(&labels(&[("state", open)]))
                    .inc();
            }
            if let Some(at) = i.last_probe_ok_at_ms {
                ages.push((now_ms - at).max(0) as f64 / 1000.0);
            }
        }
        ages.sort_by(f64::total_cmp);
        self.probe_age_max.set(ages.last().copied().unwrap_or(0.0));
        self.probe_age_median
            .set(ages.get(ages.len() / 2).copied().unwrap_or(0.0));
    }
}

impl FleetObserver for Metrics {
    fn boot_outcome(&self, outcome: BootOutcome) {
        self.boot_outcomes
            .get_or_create(&labels(&[("outcome", outcome.as_str())]))
            .inc();
    }

    fn instance_disappeared(&self, state: &str) {
        self.disappeared
            .get_or_create(&labels(&[("state", state)]))
            .inc();
    }

    fn time_to_ssh(&self, took: Duration) {
        self.time_to_ssh.observe(took.as_secs_f64());
    }

    fn time_to_ready(&self, took: Duration) {
        self.time_to_ready.observe(took.as_secs_f64());
    }

    fn shutdown_to_gone(&self, took: Duration) {
        self.shutdown_to_gone.observe(took.as_secs_f64());
    }

    fn probe_finished(&self, ok: bool, took: Duration) {
        let outcome = if ok { "success" } else { "failure" };
        self.probe_duration
            .get_or_create(&labels(&[("outcome", outcome)]))
            .observe(took.as_secs_f64());
    }

    fn container_started(&self, waited: Duration) {
        self.queue_to_start.observe(waited.as_secs_f64());
    }

    fn event_stream_ended(&self) {
        self.event_stream_ends.inc();
    }
}

/// The `Content-Type` of `render`'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
