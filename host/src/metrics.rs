//! Prometheus metrics (`GET /metrics`, the Prometheus text format), all under
//! `dispatch_cloud_`. Counters are counted where things happen (driver calls, plugin loads);
//! the fleet and queue gauges are computed from the dispatcher's snapshot at each scrape, so
//! they can never drift from what the API shows.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use driver_abi::{DriverError, InstanceType};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::pool::InstanceView;
use crate::queue::{Container, ContainerState};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The driver calls the host makes.
pub const OPERATIONS: &[&str] = &["create", "list", "destroy", "set_tags"];

pub struct Metrics {
    registry: Registry,
    driver: String,
    /// Config type name → (vCPUs, RAM bytes).
    types: HashMap<String, (u32, u64)>,
    driver_operations: Family<Labels, Counter>,
    plugin_loads: Family<Labels, Counter>,
    containers_running: Gauge,
    queue_entries: Family<Labels, Gauge>,
    longest_wait: FloatGauge,
    instances: Family<Labels, Gauge>,
    instances_price: Family<Labels, FloatGauge>,
    vcpus: Family<Labels, Gauge>,
    memory: Family<Labels, Gauge>,
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
        let containers_running = Gauge::default();
        registry.register(
            "containers_running",
            "Containers starting or running on VMs",
            containers_running.clone(),
        );
        let queue_entries = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_entries",
            "Active containers in the queue, by state",
            queue_entries.clone(),
        );
        let longest_wait = FloatGauge::default();
        registry.register_with_unit(
            "containers_longest_wait",
            "How long the oldest waiting container (priority above 0) has waited",
            Unit::Seconds,
            longest_wait.clone(),
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
        Metrics {
            registry,
            driver: driver.to_string(),
            types: types
                .iter()
                .map(|t| (t.name.clone(), (t.vcpus, t.ram_bytes)))
                .collect(),
            driver_operations,
            plugin_loads,
            containers_running,
            queue_entries,
            longest_wait,
            instances,
            instances_price,
            vcpus,
            memory,
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

    /// The metrics in the Prometheus text format, the gauges taken from `instances` and
    /// the active `containers` as they are now (`now_ms`: Unix milliseconds).
    pub fn render(
        &self,
        instances: &[InstanceView],
        containers: &[Container],
        now_ms: i64,
    ) -> String {
        self.containers_running.set(
            containers
                .iter()
                .filter(|c| c.state == ContainerState::Running)
                .count() as i64,
        );
        self.queue_entries.clear();
        for state in [
            ContainerState::Queued,
            ContainerState::Locked,
            ContainerState::Running,
        ] {
            let n = containers.iter().filter(|c| c.state == state).count();
            self.queue_entries
                .get_or_create(&labels(&[("state", state.as_str())]))
                .set(n as i64);
        }
        let oldest = containers
            .iter()
            .filter(|c| c.priority > 0 && c.instance_id.is_none() && !c.state.is_final())
            .map(|c| c.created_at_ms)
            .min();
        self.longest_wait.set(
            oldest
                .map(|t| (now_ms - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
        for family in [&self.instances, &self.vcpus, &self.memory] {
            family.clear();
        }
        self.instances_price.clear();
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
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The `Content-Type` of `render`'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;
