//! Policy around a driver's instance set: pacing (max cloud ops per second), a cap on
//! concurrent creates, hold-offs after rate-limit, quota and capacity errors, default tags and
//! tag filtering. Drivers stay simple; the host owns policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use driver_abi::{
    CapacityScope, CreateRequest, DriverError, Instance, InstanceSet, InstanceType, Tags,
};
use tokio::time::Instant;

pub use crate::pool::CreateError;
use crate::pool::{BoxFuture, Cloud, Listed};

#[derive(Clone, Debug)]
pub struct Policy {
    pub max_instances: usize,
    pub ops_interval: Option<Duration>,
    pub max_concurrent_creates: usize,
    pub quota_holdoff: Duration,
    pub capacity_holdoff: Duration,
    /// Hold-off after the concurrency cap was hit.
    pub create_cap_holdoff: Duration,
    pub default_tags: Tags,
}

#[derive(Default)]
struct State {
    next_op_at: Option<Instant>,
    creates_in_flight: usize,
    create_held_until: Option<Instant>,
    list_held_until: Option<Instant>,
    /// At quota until this time (quota error with few instances)…
    quota_until: Option<Instant>,
    /// …or while the instance count is at least this.
    quota_instances: Option<usize>,
    /// Capacity hold-offs keyed by provider type (+"-preemptible"), quota group, or "".
    capacity_until: HashMap<String, Instant>,
}

/// The wrapped instance set. Cheap to share; all methods may run concurrently.
pub struct CloudOps {
    set: Arc<dyn InstanceSet>,
    policy: Policy,
    /// Quota group per provider type, asked of the driver once at start (a driver call must
    /// not run on the event loop).
    quota_groups: HashMap<String, String>,
    /// std mutex: held only to read or update the bookkeeping, never across a driver call.
    state: Mutex<State>,
    /// Where driver calls are counted, when serving.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// The shortest hold-off after a rate limit or capacity error: a retry time already past (or
/// a zero hold-off in the config) must not let the next pass call the cloud at once again.
const MIN_HOLDOFF: Duration = Duration::from_secs(1);

/// A configured hold-off of zero would retry at once, in a loop.
fn nonzero(d: Duration) -> Duration {
    if d.is_zero() {
        MIN_HOLDOFF
    } else {
        d
    }
}

fn until(t: SystemTime) -> Instant {
    // The cloud's own retry time is kept as given (hold-offs of different lengths keep
    // different kinds of create from retrying in lock-step); only one already past, which
    // would mean no hold-off at all, becomes the minimum.
    let wait = t
        .duration_since(SystemTime::now())
        .ok()
        .filter(|w| !w.is_zero())
        .unwrap_or(MIN_HOLDOFF);
    Instant::now() + wait
}

fn type_key(t: &InstanceType) -> String {
    if t.preemptible {
        format!("{}-preemptible", t.provider_type)
    } else {
        t.provider_type.clone()
    }
}

impl CloudOps {
    /// Blocking: asks the driver for the quota group of each of `types`.
    pub fn new(set: Arc<dyn InstanceSet>, policy: Policy, types: &[InstanceType]) -> Self {
        let quota_groups = types
            .iter()
            .map(|t| (type_key(t), set.quota_group(t)))
            .collect();
        CloudOps {
            set,
            policy,
            quota_groups,
            state: Mutex::new(State::default()),
            metrics: None,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this operation's slot: one cloud op per interval, no bursts.
    async fn pace(&self) {
        let Some(interval) = self.policy.ops_interval else {
            return;
        };
        let slot = {
            let mut st = self.state();
            let now = Instant::now();
            let slot = st.next_op_at.map_or(now, |t| t.max(now));
            st.next_op_at = Some(slot + interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Counts this wrapper's driver calls in `metrics`.
    pub fn observed(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs driver call `operation` on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        operation: &str,
        f: impl FnOnce(Arc<dyn InstanceSet>) -> Result<T, DriverError> + Send + 'static,
    ) -> Result<T, DriverError> {
        let set = Arc::clone(&self.set);
        let result = tokio::task::spawn_blocking(move || f(set))
            .await
            .map_err(|e| DriverError::other(format!("driver call did not finish: {e}")))
            .and_then(|r| r);
        if let Some(m) = &self.metrics {
            m.driver_operation(operation, result.as_ref().err());
        }
        result
    }

    /// How many instances may still be added to `instances_incl_pending`.
    pub fn quota_headroom(&self, instances_incl_pending: usize) -> usize {
        let mut headroom = usize::MAX;
        if self.policy.max_instances > 0 {
            headroom = self
                .policy
                .max_instances
                .saturating_sub(instances_incl_pending);
        }
        let st = self.state();
        if st.quota_until.is_some_and(|t| Instant::now() < t) {
            return 0;
        }
        if let Some(n) = st.quota_instances {
            headroom = headroom.min(n.saturating_sub(instances_incl_pending));
        }
        headroom
    }

    /// Forget a quota learned from errors once the instance count dropped below it.
    pub fn observe_instance_count(&self, instances: usize) {
        let mut st = self.state();
        if st.quota_instances.is_some_and(|n| instances < n) {
            st.quota_instances = None;
        }
    }

    pub fn at_capacity(&self, t: &InstanceType) -> bool {
        let now = Instant::now();
        let st = self.state();
        let group = self
            .quota_groups
            .get(&type_key(t))
            .cloned()
            .unwrap_or_default();
        [type_key(t), format!("group:{group}"), String::new()]
            .iter()
            .any(|k| st.capacity_until.get(k).is_some_and(|until| now < *until))
    }

    /// Creates that may start now: none while rate limited, else what the cap leaves.
    pub fn creates_allowed(&self) -> usize {
        let st = self.state();
        if st.create_held_until.is_some_and(|t| Instant::now() < t) {
            return 0;
        }
        match self.policy.max_concurrent_creates {
            0 => usize::MAX,
            cap => cap.saturating_sub(st.creates_in_flight),
        }
    }

    /// The earliest moment a hold-off ends, so the scheduler can wake then.
    pub fn next_holdoff_end(&self) -> Option<Instant> {
        let st = self.state();
        let now = Instant::now();
        [st.create_held_until, st.list_held_until, st.quota_until]
            .into_iter()
            .flatten()
            .chain(st.capacity_until.values().copied())
            .filter(|t| *t > now)
            .min()
    }

    pub async fn create(
        &self,
        mut request: CreateRequest,
        instances_incl_pending: usize,
    ) -> Result<Listed, CreateError> {
        {
            let mut st = self.state();
            let now = Instant::now();
            if st.create_held_until.is_some_and(|t| now < t) {
                return Err(CreateError::HeldOff("rate limited"));
            }
            if self.policy.max_concurrent_creates > 0
                && st.creates_in_flight >= self.policy.max_concurrent_creates
            {
                st.create_held_until = Some(now + self.policy.create_cap_holdoff);
                return Err(CreateError::HeldOff("too many creates in flight"));
            }
            st.creates_in_flight += 1;
        }
        let mut tags = self.policy.default_tags.clone();
        tags.extend(std::mem::take(&mut request.tags));
        request.tags = tags;
        self.pace().await;
        let instance_type = request.instance_type.clone();
        let result = self
            .blocking("create", move |set| {
                set.create(&request).map(|i| Listed::read(Arc::from(i)))
            })
            .await;
        let mut st = self.state();
        st.creates_in_flight = st.creates_in_flight.saturating_sub(1);
        match result {
            Ok(i) => Ok(i),
            Err(e) => {
                let now = Instant::now();
                match &e {
                    DriverError::RateLimit { earliest_retry, .. } => {
                        st.create_held_until = Some(until(*earliest_retry));
                    }
                    DriverError::Quota { .. } => {
                        // With (almost) nothing running the quota may free up any time; with
                        // instances running, wait until there are fewer of them.
                        let n = instances_incl_pending.saturating_sub(1);
                        if n < 1 {
                            st.quota_until = Some(now + nonzero(self.policy.quota_holdoff));
                        } else {
                            st.quota_instances = Some(n);
                        }
                    }
                    DriverError::Capacity { scope, .. } => {
                        let key = match scope {
                            CapacityScope::InstanceType(_) => type_key(&instance_type),
                            CapacityScope::QuotaGroup(g) => format!("group:{g}"),
                            CapacityScope::All => String::new(),
                        };
                        st.capacity_until
                            .insert(key, now + nonzero(self.policy.capacity_holdoff));
                    }
                    _ => {}
                }
                Err(e.into())
            }
        }
    }

    /// The set's instances carrying every default tag; `Ok(None)` while listing is held off.
    pub async fn instances(&self) -> Result<Option<Vec<Listed>>, DriverError> {
        if self
            .state()
            .list_held_until
            .is_some_and(|t| Instant::now() < t)
        {
            return Ok(None);
        }
        self.pace().await;
        let filter = self.policy.default_tags.clone();
        let listing = self.blocking("list", move |set| {
            // Drivers may ignore the filter; the host does not rely on them.
            Ok(set
                .instances(&filter)?
                .into_iter()
                .map(|i| Listed::read(Arc::from(i)))
                .filter(|l| filter.iter().all(|(k, v)| l.tags.get(k) == Some(v)))
                .collect())
        });
        match listing.await {
            Ok(list) => Ok(Some(list)),
            Err(DriverError::RateLimit {
                earliest_retry,
                message,
            }) => {
                self.state().list_held_until = Some(until(earliest_retry));
                Err(DriverError::RateLimit {
                    earliest_retry,
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    pub async fn destroy(&self, instance: Arc<dyn Instance>) -> Result<(), DriverError> {
        self.pace().await;
        self.blocking("destroy", move |_| instance.destroy()).await
    }

    pub async fn set_tags(
        &self,
        instance: Arc<dyn Instance>,
        tags: Tags,
    ) -> Result<(), DriverError> {
        self.pace().await;
        self.blocking("set_tags", move |_| instance.set_tags(&tags))
            .await
    }

    pub fn stop(&self) {
        self.set.stop()
    }
}

impl Cloud for CloudOps {
    fn instances(&self) -> BoxFuture<'_, Result<Option<Vec<Listed>>, DriverError>> {
        Box::pin(CloudOps::instances(self))
    }

    fn create(
        &self,
        request: CreateRequest,
        instances: usize,
    ) -> BoxFuture<'_, Result<Listed, CreateError>> {
        Box::pin(CloudOps::create(self, request, instances))
    }

    fn destroy(&self, instance: Arc<dyn Instance>) -> BoxFuture<'_, Result<(), DriverError>> {
        Box::pin(CloudOps::destroy(self, instance))
    }

    fn set_tags(
        &self,
        instance: Arc<dyn Instance>,
        tags: Tags,
    ) -> BoxFuture<'_, Result<(), DriverError>> {
        Box::pin(CloudOps::set_tags(self, instance, tags))
    }

    fn quota_headroom(&self, instances: usize) -> usize {
        CloudOps::quota_headroom(self, instances)
    }

    fn creates_allowed(&self) -> usize {
        CloudOps::creates_allowed(self)
    }

    fn at_capacity(&self, t: &InstanceType) -> bool {
        CloudOps::at_capacity(self, t)
    }

    fn observe_instance_count(&self, instances: usize) {
        CloudOps::observe_instance_count(self, instances)
    }

    fn next_holdoff_end(&self) -> Option<Instant> {
        CloudOps::next_holdoff_end(self)
    }

    fn stop(&self) {
        CloudOps::stop(self)
    }
}
