//! The Google Compute Engine driver, on Google's official Rust client
//! (`google-cloud-compute-v1`, with `google-cloud-auth` for credentials).
//!
//! How the host's notions map onto GCE:
//! * a VM is an instance named `dc-<20 hex>` in one of the configured zones; its ID for the
//!   host is that name (unique in the project for the driver's purposes, and what `gcloud` and
//!   the console show);
//! * the set ID is the label `dispatch_cloud_set`, so listings filter server-side; every tag
//!   is a metadata item (see [`tags`]);
//! * the init command is the `startup-script` item, the dispatcher's key the `ssh-keys` item;
//! * host keys are checked against the `hostkeys/` guest attributes that Google's guest agent
//!   publishes, so GCE VMs need no instance secret.

mod compute;
pub mod errors;
pub mod tags;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driver_abi::backoff::Backoff;
use driver_abi::{
    CreateRequest, Driver, DriverError, HostServices, Instance, InstancePrice, InstanceSet,
    InstanceSetId, InstanceType, Tags,
};
use google_cloud_compute_v1::model::{
    instance, metadata, scheduling, AttachedDisk, AttachedDiskInitializeParams,
    Instance as GceModel, Metadata, NetworkInterface, Scheduling, ServiceAccount,
};
use serde::Deserialize;

use crate::compute::{Compute, CredentialsError};
use crate::errors::{classify, Failure};

/// The label holding the set ID on every instance this driver creates.
/// An underscore, not a hyphen: the key appears bare in list filters, where `-` is an operator.
pub const SET_LABEL: &str = "dispatch_cloud_set";
/// The device name of an added scratch disk (`/dev/disk/by-id/google-scratch` on the VM).
pub const SCRATCH_DEVICE: &str = "scratch";
/// How often `setMetadata` is retried when another writer changed the metadata in between.
const METADATA_ATTEMPTS: usize = 5;

fn default_admin_username() -> String {
    "dispatch".into()
}

fn default_disk_type() -> String {
    "pd-balanced".into()
}

fn default_boot_disk_size_gb() -> u64 {
    20
}

fn default_timeout() -> u64 {
    60
}

fn default_operation_timeout() -> u64 {
    300
}

fn default_endpoint() -> String {
    "https://compute.googleapis.com".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    project: String,
    /// Tried in turn when a zone is out of the machine type; the one that worked is tried
    /// first next time.
    zones: Vec<String>,
    /// `global/networks/NAME` or a full URL; GCE's default network when neither this nor
    /// `subnetwork` is given.
    network: Option<String>,
    /// `regions/REGION/subnetworks/NAME` or a full URL.
    subnetwork: Option<String>,
    /// The VMs' service account (email); without it the VMs get none.
    service_account: Option<String>,
    /// The service account's OAuth scopes; only with `service_account`.
    scopes: Option<Vec<String>>,
    /// Boot image when the instance type names none, e.g.
    /// `projects/debian-cloud/global/images/family/debian-12`.
    image: Option<String>,
    #[serde(default = "default_boot_disk_size_gb")]
    boot_disk_size_gb: u64,
    #[serde(default = "default_disk_type")]
    boot_disk_type: String,
    #[serde(default = "default_disk_type")]
    scratch_disk_type: String,
    /// Labels put on every instance (GCE label rules).
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// For emulators and private endpoints; no trailing slash needed.
    #[serde(default = "default_endpoint")]
    endpoint: String,
    /// A service-account key or `authorized_user` JSON file; without it, application-default
    /// credentials.
    credentials_file: Option<PathBuf>,
    #[serde(default = "default_admin_username")]
    admin_username: String,
    #[serde(default = "default_timeout")]
    request_timeout_seconds: u64,
    /// How long to wait for an insert or setMetadata operation to finish.
    #[serde(default = "default_operation_timeout")]
    operation_timeout_seconds: u64,
    /// Machine type prefix → quota group (spot types get `-spot` appended).
    #[serde(default)]
    quota_groups: BTreeMap<String, String>,
    /// `instances.list` page size (1–500).
    page_size: Option<u32>,
}

impl Params {
    fn validate(&mut self) -> Result<(), DriverError> {
        let bad = |m: String| Err(DriverError::invalid_config(m));
        if self.project.trim().is_empty() {
            return bad("project: must not be empty".into());
        }
        if self.zones.is_empty() || self.zones.iter().any(|z| z.trim().is_empty()) {
            return bad("zones: give at least one zone, e.g. [\"us-central1-a\"]".into());
        }
        if self.scopes.is_some() && self.service_account.is_none() {
            return bad("scopes: given without service_account".into());
        }
        for (k, v) in &self.labels {
            tags::check_label("labels key", k, true)
                .and_then(|()| tags::check_label(&format!("labels.{k}"), v, false))
                .map_err(DriverError::invalid_config)?;
        }
        if self.labels.contains_key(SET_LABEL) {
            return bad(format!("labels: {SET_LABEL} is the driver's own label"));
        }
        let user_ok = self.admin_username.chars().enumerate().all(|(i, c)| {
            c.is_ascii_lowercase() || c == '_' || (i > 0 && (c.is_ascii_digit() || c == '-'))
        }) && (1..=32).contains(&self.admin_username.len());
        if !user_ok {
            return bad(format!(
                "admin_username {:?}: a Linux user name of 1 to 32 lowercase letters, digits, '-' and '_'",
                self.admin_username
            ));
        }
        if let Some(size) = self.page_size {
            if !(1..=500).contains(&size) {
                return bad(format!("page_size = {size}: must be 1 to 500"));
            }
        }
        if self.boot_disk_size_gb < 10 {
            return bad(format!(
                "boot_disk_size_gb = {}: GCE disks are at least 10 GB",
                self.boot_disk_size_gb
            ));
        }
        // Bearer tokens travel with every call: plain HTTP only to this machine (emulators).
        let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| {
                self.endpoint
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
            });
        if !(self.endpoint.starts_with("https://") || loopback) {
            return bad(format!(
                "endpoint {:?}: must be https:// (http:// only to 127.0.0.1 or localhost)",
                self.endpoint
            ));
        }
        // The client joins endpoint and path as strings.
        self.endpoint = self.endpoint.trim_end_matches('/').to_string();
        Ok(())
    }
}

pub struct GceDriver;

impl Driver for GceDriver {
    const NAME: &'static str = "gce";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new_instance_set(
        params: &serde_json::Value,
        set_id: &InstanceSetId,
        shared_tags: &Tags,
        _host: &HostServices,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        let mut p: Params = driver_abi::parse_params(params)?;
        p.validate()?;
        let credentials = compute::credentials(p.credentials_file.as_deref()).map_err(|e| {
            DriverError::invalid_config(match e {
                CredentialsError::File(m) => format!("credentials_file: {m}"),
                CredentialsError::Default(m) => format!(
                    "credentials_file: not given, and application-default credentials are not usable: {m}"
                ),
            })
        })?;
        let client = Compute::connect(
            &p.endpoint,
            credentials,
            &p.project,
            Duration::from_secs(p.request_timeout_seconds),
        )
        .map_err(DriverError::other)?;
        log::info!(
            "GCE instance set {set_id} in project {} (zones {}) via {}",
            p.project,
            p.zones.join(", "),
            p.endpoint
        );
        Ok(Box::new(GceSet {
            inner: Arc::new(SetInner {
                client,
                set_id: set_id.clone(),
                shared_tags: shared_tags.clone(),
                params: p,
                next_zone: AtomicUsize::new(0),
                create_backoff: Backoff::default(),
                list_backoff: Backoff::default(),
                other_backoff: Backoff::default(),
            }),
        }))
    }
}

#[cfg(feature = "export")]
driver_abi::export_driver!(GceDriver);

struct SetInner {
    client: Compute,
    set_id: InstanceSetId,
    shared_tags: Tags,
    params: Params,
    /// Index of the zone that worked last.
    next_zone: AtomicUsize,
    create_backoff: Backoff,
    list_backoff: Backoff,
    other_backoff: Backoff,
}

/// The quota group of `t`: the longest configured prefix of its machine type, else its family
/// (`n2-standard-8` → `n2`; N1 custom types `custom-4-8192` → `n1`); `-spot` for Spot VMs.
pub fn quota_group(groups: &BTreeMap<String, String>, t: &InstanceType) -> String {
    let lower = t.provider_type.to_lowercase();
    let family = match lower.split('-').next().unwrap_or("") {
        "custom" => "n1".to_string(),
        f => f.to_string(),
    };
    let group = groups
        .iter()
        .filter(|(prefix, _)| lower.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, g)| g.clone())
        .unwrap_or(family);
    if t.preemptible {
        format!("{group}-spot")
    } else {
        group
    }
}

/// The last path segment of a GCE resource URL (`…/machineTypes/n2-standard-8` → `n2-standard-8`).
fn last_segment(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}

/// A random instance name: GCE wants `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
fn new_instance_name() -> String {
    format!("dc-{:020x}", rand::random::<u128>() >> 48)
}

impl SetInner {
    fn failure(
        &self,
        call: &str,
        f: &Failure,
        backoff: &Backoff,
        t: Option<&InstanceType>,
    ) -> DriverError {
        let (type_name, group) = match t {
            Some(t) => (
                t.provider_type.clone(),
                quota_group(&self.params.quota_groups, t),
            ),
            None => (String::new(), String::new()),
        };
        classify(call, f, backoff, &type_name, &group)
    }

    fn item(key: &str, value: impl Into<String>) -> metadata::Items {
        metadata::Items::new().set_key(key).set_value(value.into())
    }

    /// The instance to insert in `zone` for `r`.
    fn instance_body(&self, r: &CreateRequest, tags: &Tags, name: &str, zone: &str) -> GceModel {
        let p = &self.params;
        let t = &r.instance_type;
        let mut items = vec![
            Self::item("startup-script", format!("#!/bin/sh\n{}\n", r.init_command)),
            // The guest agent publishes the SSH host keys here, for verify_host_key.
            Self::item("enable-guest-attributes", "TRUE"),
            // With OS Login on, GCE ignores `ssh-keys`; these VMs are reached with that key.
            Self::item("enable-oslogin", "FALSE"),
        ];
        if let Some(key) = &r.public_key {
            items.push(Self::item(
                "ssh-keys",
                format!("{}:{}", p.admin_username, key.trim()),
            ));
        }
        items.extend(
            tags.iter()
                .map(|(k, v)| Self::item(&tags::metadata_key(k), v.clone())),
        );
        let mut labels: HashMap<String, String> = p.labels.clone().into_iter().collect();
        labels.insert(SET_LABEL.into(), self.set_id.to_string());

        let image = if r.image_id.is_empty() {
            p.image.clone().unwrap_or_default()
        } else {
            r.image_id.clone()
        };
        let mut disks = vec![AttachedDisk::new()
            .set_boot(true)
            .set_auto_delete(true)
            .set_initialize_params(
                AttachedDiskInitializeParams::new()
                    .set_source_image(image)
                    .set_disk_size_gb(p.boot_disk_size_gb as i64)
                    .set_disk_type(format!("zones/{zone}/diskTypes/{}", p.boot_disk_type)),
            )];
        // Added scratch is a persistent disk, not local SSD: local SSD comes in 375 GiB
        // partitions, in counts each machine type fixes, so an arbitrary size cannot be had;
        // types with local SSD built in (`-lssd`) declare it as included scratch instead.
        if t.added_scratch_bytes > 0 {
            let gb = t.added_scratch_bytes.div_ceil(1 << 30).max(10);
            disks.push(
                AttachedDisk::new()
                    .set_auto_delete(true)
                    .set_device_name(SCRATCH_DEVICE)
                    .set_initialize_params(
                        AttachedDiskInitializeParams::new()
                            .set_disk_size_gb(gb as i64)
                            .set_disk_type(format!(
                                "zones/{zone}/diskTypes/{}",
                                p.scratch_disk_type
                            )),
                    ),
            );
        }
        // No access configs: no external IP. The dispatcher reaches VMs on the VPC.
        let mut nic = NetworkInterface::new();
        if let Some(n) = &p.network {
            nic = nic.set_network(n);
        }
        if let Some(s) = &p.subnetwork {
            nic = nic.set_subnetwork(s);
        }
        let mut body = GceModel::new()
            .set_name(name)
            .set_machine_type(format!("zones/{zone}/machineTypes/{}", t.provider_type))
            .set_labels(labels)
            .set_metadata(Metadata::new().set_items(items))
            .set_network_interfaces([nic])
            .set_disks(disks);
        if t.preemptible {
            body = body.set_scheduling(
                Scheduling::new()
                    .set_provisioning_model(scheduling::ProvisioningModel::Spot)
                    .set_instance_termination_action(scheduling::InstanceTerminationAction::Delete)
                    .set_automatic_restart(false)
                    .set_on_host_maintenance(scheduling::OnHostMaintenance::Terminate),
            );
        }
        if let Some(sa) = &p.service_account {
            let scopes = p.scopes.clone().unwrap_or_else(|| {
                vec!["https://www.googleapis.com/auth/cloud-platform".to_string()]
            });
            body =
                body.set_service_accounts([ServiceAccount::new().set_email(sa).set_scopes(scopes)]);
        }
        body
    }

    /// Inserts `body` in `zone` and waits for the operation.
    fn insert(&self, zone: &str, body: GceModel) -> Result<(), Failure> {
        let c = &self.client;
        let op = c.call(
            c.instances
                .insert()
                .set_project(&c.project)
                .set_zone(zone)
                .set_request_id(request_id())
                .set_body(body)
                .send(),
        )?;
        c.wait(
            zone,
            op,
            Duration::from_secs(self.params.operation_timeout_seconds),
        )
    }

    fn get(&self, zone: &str, name: &str) -> Result<GceModel, Failure> {
        let c = &self.client;
        c.call(
            c.instances
                .get()
                .set_project(&c.project)
                .set_zone(zone)
                .set_instance(name)
                .send(),
        )
    }

    /// The instance just inserted, as GCE reports it; if that read fails, as it was asked
    /// for (its address comes with the next listing): the VM exists either way.
    fn created(
        self: &Arc<Self>,
        zone: &str,
        name: &str,
        request: &CreateRequest,
        tags: &Tags,
    ) -> Box<dyn Instance> {
        match self.get(zone, name) {
            Ok(model) => self.instance(zone, model),
            Err(f) => {
                log::warn!("instance={name}: created, but reading it back failed ({f})");
                Box::new(GceInstance {
                    set: Arc::clone(self),
                    zone: zone.to_string(),
                    name: name.to_string(),
                    machine_type: request.instance_type.provider_type.clone(),
                    address: String::new(),
                    tags: Mutex::new(tags.clone()),
                })
            }
        }
    }

    fn instance(self: &Arc<Self>, zone: &str, model: GceModel) -> Box<dyn Instance> {
        let items = model
            .metadata
            .as_ref()
            .map(|m| m.items.as_slice())
            .unwrap_or(&[]);
        let tags = tags::from_items(
            items
                .iter()
                .filter_map(|i| Some((i.key.as_deref()?, i.value.as_deref().unwrap_or("")))),
        );
        Box::new(GceInstance {
            set: Arc::clone(self),
            zone: zone.to_string(),
            name: model.name.clone().unwrap_or_default(),
            machine_type: last_segment(model.machine_type.as_deref().unwrap_or("")),
            address: model
                .network_interfaces
                .first()
                .and_then(|n| n.network_ip.clone())
                .unwrap_or_default(),
            tags: Mutex::new(tags),
        })
    }
}

/// An idempotency token for `instances.insert`, in the UUID form GCE requires.
fn request_id() -> String {
    let v = rand::random::<u128>();
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

struct GceSet {
    inner: Arc<SetInner>,
}

impl InstanceSet for GceSet {
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError> {
        let s = &self.inner;
        let t = &request.instance_type;
        if request.image_id.is_empty() && s.params.image.is_none() {
            return Err(DriverError::invalid_config(
                "image: the instance type names no image and the `image` parameter is not set",
            ));
        }
        let mut tags = s.shared_tags.clone();
        tags.extend(request.tags.clone());
        let zones = &s.params.zones;
        let name = new_instance_name();
        let start = s.next_zone.load(Ordering::Relaxed) % zones.len();
        let mut last: Option<Failure> = None;
        let mut last_capacity: Option<Failure> = None;
        for n in 0..zones.len() {
            let index = (start + n) % zones.len();
            let zone = &zones[index];
            let body = s.instance_body(request, &tags, &name, zone);
            match s.insert(zone, body) {
                Ok(()) => {
                    s.next_zone.store(index, Ordering::Relaxed);
                    s.create_backoff.reset();
                    return Ok(s.created(zone, &name, request, &tags));
                }
                Err(f) if f.is_zone_specific() && n + 1 < zones.len() => {
                    log::info!(
                        "instances.insert of {} in {zone} failed ({f}); trying the next zone",
                        t.provider_type
                    );
                    last_capacity = Some(f);
                }
                Err(f) => {
                    last = Some(f);
                    break;
                }
            }
        }
        // Every zone out of the type says more than a last transient error.
        let f = match (last_capacity, last) {
            (Some(capacity), Some(l))
                if !l.is_zone_specific() && l.http_status.is_none_or(|c| c >= 500) =>
            {
                capacity
            }
            (capacity, l) => l
                .or(capacity)
                .unwrap_or_else(|| Failure::local("no zone tried")),
        };
        Err(s.failure("instances.insert", &f, &s.create_backoff, Some(t)))
    }

    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError> {
        let s = &self.inner;
        let c = &s.client;
        let filter = format!("labels.{SET_LABEL} = \"{}\"", s.set_id);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // Aggregated over all zones, not just the configured ones: a zone dropped from the
        // config must not hide (and so leak) the VMs still running there.
        loop {
            let page = c
                .call(
                    c.instances
                        .aggregated_list()
                        .set_project(&c.project)
                        .set_filter(&filter)
                        .set_max_results(s.params.page_size.unwrap_or(500))
                        .set_or_clear_page_token(token.clone())
                        .send(),
                )
                .map_err(|f| s.failure("instances.aggregatedList", &f, &s.list_backoff, None))?;
            if !page.unreachables.is_empty() {
                // A partial listing would make the host think those VMs are gone.
                return Err(DriverError::other(format!(
                    "instances.aggregatedList: unreachable: {}",
                    page.unreachables.join(", ")
                )));
            }
            for (scope, list) in page.items {
                let Some(zone) = scope.strip_prefix("zones/") else {
                    continue;
                };
                for model in list.instances {
                    // STOPPING is how a deleted instance looks until it is gone. A TERMINATED
                    // (stopped) one is kept: it still holds its disks, and the host destroys
                    // what it cannot reach.
                    if model.status == Some(instance::Status::Stopping) {
                        continue;
                    }
                    let vm = s.instance(zone, model);
                    let vm_tags = vm.tags();
                    if tag_filter.iter().all(|(k, v)| vm_tags.get(k) == Some(v)) {
                        out.push(vm);
                    }
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        s.list_backoff.reset();
        Ok(out)
    }

    fn quota_group(&self, instance_type: &InstanceType) -> String {
        quota_group(&self.inner.params.quota_groups, instance_type)
    }

    fn stop(&self) {}
}

struct GceInstance {
    set: Arc<SetInner>,
    zone: String,
    name: String,
    machine_type: String,
    address: String,
    /// What GCE last reported (or we last set).
    tags: Mutex<Tags>,
}

impl GceInstance {
    fn other_failure(&self, call: &str, f: &Failure) -> DriverError {
        let s = &self.set;
        s.failure(&format!("{call} {}", self.name), f, &s.other_backoff, None)
    }

    /// One read-modify-write of the metadata: the tag items replaced, the others kept, under
    /// the fingerprint just read.
    fn write_tags(&self, wanted: &Tags) -> Result<(), Failure> {
        let s = &self.set;
        let c = &s.client;
        let current = s.get(&self.zone, &self.name)?;
        let metadata = current.metadata.unwrap_or_default();
        let mut items: Vec<metadata::Items> = metadata
            .items
            .into_iter()
            .filter(|i| i.key.as_deref().and_then(tags::tag_key).is_none())
            .collect();
        items.extend(
            wanted
                .iter()
                .map(|(k, v)| SetInner::item(&tags::metadata_key(k), v.clone())),
        );
        let mut body = Metadata::new().set_items(items);
        if let Some(fp) = metadata.fingerprint {
            body = body.set_fingerprint(fp);
        }
        let op = c.call(
            c.instances
                .set_metadata()
                .set_project(&c.project)
                .set_zone(&self.zone)
                .set_instance(&self.name)
                .set_body(body)
                .send(),
        )?;
        c.wait(
            &self.zone,
            op,
            Duration::from_secs(s.params.operation_timeout_seconds),
        )
    }
}

impl Instance for GceInstance {
    fn id(&self) -> String {
        self.name.clone()
    }

    fn provider_type(&self) -> String {
        self.machine_type.clone()
    }

    fn tags(&self) -> Tags {
        self.tags.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn set_tags(&self, wanted: &Tags) -> Result<(), DriverError> {
        let mut attempt = 1;
        loop {
            match self.write_tags(wanted) {
                Ok(()) => break,
                // 412 conditionNotMet: someone else wrote the metadata since our read.
                Err(f) if f.http_status == Some(412) && attempt < METADATA_ATTEMPTS => {
                    log::debug!(
                        "instance={}: metadata changed under us ({f}); reading it again",
                        self.name
                    );
                    attempt += 1;
                }
                Err(f) => return Err(self.other_failure("instances.setMetadata", &f)),
            }
        }
        if let Ok(mut t) = self.tags.lock() {
            *t = wanted.clone();
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), DriverError> {
        let s = &self.set;
        let c = &s.client;
        let result = c.call(
            c.instances
                .delete()
                .set_project(&c.project)
                .set_zone(&self.zone)
                .set_instance(&self.name)
                .send(),
        );
        match result {
            Ok(_) => Ok(()),
            // Already gone: what destroy wanted.
            Err(f) if f.http_status == Some(404) => Ok(()),
            Err(f) => Err(self.other_failure("instances.delete", &f)),
        }
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn remote_user(&self) -> String {
        self.set.params.admin_username.clone()
    }

    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        let mut parts = host_key.split_whitespace();
        let (Some(algorithm), Some(blob)) = (parts.next(), parts.next()) else {
            return Err(DriverError::other(format!(
                "instance={}: the presented host key is not an OpenSSH key line",
                self.name
            )));
        };
        let s = &self.set;
        let c = &s.client;
        let attributes = c.call(
            c.instances
                .get_guest_attributes()
                .set_project(&c.project)
                .set_zone(&self.zone)
                .set_instance(&self.name)
                .set_query_path("hostkeys/")
                .send(),
        );
        let published: Vec<(String, String)> = match attributes {
            Ok(a) => a
                .query_value
                .map(|v| v.items)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| Some((e.key?, e.value?)))
                .collect(),
            // GCE answers 404 until the guest has written any attribute.
            Err(f) if f.http_status == Some(404) => Vec::new(),
            Err(f) => return Err(self.other_failure("instances.getGuestAttributes", &f)),
        };
        if published.is_empty() {
            // Not an acceptance: the host tries again at the next probe.
            return Err(DriverError::other(format!(
                "instance={}: the guest has not published its SSH host keys (guest attributes hostkeys/) yet",
                self.name
            )));
        }
        if published
            .iter()
            .any(|(k, v)| k == algorithm && v.trim() == blob)
        {
            return Ok(());
        }
        Err(DriverError::other(format!(
            "instance={}: the SSH server's {algorithm} host key is not the one the guest published",
            self.name
        )))
    }

    fn price_history(&self, _: &InstanceType) -> Result<Vec<InstancePrice>, DriverError> {
        // Compute publishes no price history (Spot prices live in the Cloud Billing
        // catalogue); the configured price stands.
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(provider_type: &str, preemptible: bool) -> InstanceType {
        InstanceType {
            preemptible,
            ..InstanceType::minimal(provider_type)
        }
    }

    #[test]
    fn quota_groups_follow_the_family_and_configured_prefixes() {
        let none = BTreeMap::new();
        assert_eq!(quota_group(&none, &t("n2-standard-8", false)), "n2");
        assert_eq!(quota_group(&none, &t("n2-standard-8", true)), "n2-spot");
        assert_eq!(quota_group(&none, &t("n2d-highmem-4", false)), "n2d");
        assert_eq!(quota_group(&none, &t("custom-4-8192", false)), "n1");
        let mut groups = BTreeMap::new();
        groups.insert("e2".to_string(), "general".to_string());
        groups.insert("a2-ultragpu".to_string(), "a2-ultra".to_string());
        assert_eq!(quota_group(&groups, &t("e2-medium", false)), "general");
        assert_eq!(
            quota_group(&groups, &t("a2-ultragpu-1g", true)),
            "a2-ultra-spot"
        );
        assert_eq!(quota_group(&groups, &t("a2-highgpu-1g", false)), "a2");
    }

    #[test]
    fn names_and_request_ids_have_the_forms_gce_requires() {
        let name = new_instance_name();
        assert_eq!(name.len(), 23, "{name}");
        assert!(name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_ne!(name, new_instance_name());
        let id = request_id();
        let lengths: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
    }

    #[test]
    fn parameters_are_checked_and_named() {
        let parse = |v: serde_json::Value| {
            driver_abi::parse_params::<Params>(&v).and_then(|mut p| p.validate().map(|()| p))
        };
        let ok = parse(serde_json::json!({"project": "p", "zones": ["z"]})).expect("minimal");
        assert_eq!(ok.endpoint, "https://compute.googleapis.com");
        for (bad, named) in [
            (
                serde_json::json!({"project": "p", "zones": ["z"], "zoens": []}),
                "zoens",
            ),
            (serde_json::json!({"zones": ["z"]}), "project"),
            (serde_json::json!({"project": "p", "zones": []}), "zones"),
            (
                serde_json::json!({"project": "p", "zones": ["z"], "scopes": ["x"]}),
                "scopes",
            ),
            (
                serde_json::json!({"project": "p", "zones": ["z"], "labels": {"Team": "a"}}),
                "labels",
            ),
            (
                serde_json::json!({"project": "p", "zones": ["z"], "admin_username": "Root"}),
                "admin_username",
            ),
            (
                serde_json::json!({"project": "p", "zones": ["z"], "page_size": 0}),
                "page_size",
            ),
            (
                serde_json::json!({"project": "p", "zones": ["z"], "endpoint": "localhost:1"}),
                "endpoint",
            ),
        ] {
            let err = parse(bad).expect_err(named);
            assert_eq!(err.kind(), "invalid_config");
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
    }
}
