//! The Azure driver: Azure Resource Manager's REST API over reqwest (rustls with ring), with
//! tokens from the official `azure_identity` (client secret, managed identity, workload
//! identity). There is no maintained Rust crate for Azure Compute that builds beside
//! `azure_identity` 1.x, and about ten ARM calls are all a dispatcher needs.
//!
//! A VM is `dc-<set ID>-<15 random>` with a NIC `<vm>-nic` (dynamic private IP, no public IP)
//! and an OS disk `<vm>-os`; NIC and disks go with the VM (`deleteOption: Delete`), and a
//! sweeper deletes what a crash or a failed create left behind.

mod arm;
pub mod errors;
pub mod family;
mod sweep;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use base64::Engine;
use driver_abi::{
    CreateRequest, Driver, DriverError, HostServices, Instance, InstancePrice, InstanceSet,
    InstanceSetId, InstanceType, Tags,
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::arm::{block_on, Arm};
use crate::errors::{classify, ArmFailure, SPOT_QUOTA_GROUP};

/// The tag holding the set ID on every VM, NIC and disk this driver creates.
pub const SET_ID_TAG: &str = "dispatch-cloud-instance-set";
/// When the resource was created (Unix seconds), for the sweeper.
pub const CREATED_AT_TAG: &str = "dispatch-cloud-created-at";
pub const NETWORK_API: &str = "2024-05-01";
pub const COMPUTE_API: &str = "2024-07-01";
pub const DISK_API: &str = "2024-03-02";

fn default_location() -> String {
    "centralus".into()
}
fn default_admin_username() -> String {
    "dispatch".into()
}
fn default_dangling_after() -> u64 {
    20
}
fn default_sweep_interval() -> u64 {
    300
}
fn default_endpoint() -> String {
    "https://management.azure.com".into()
}
fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_disk_type() -> String {
    "StandardSSD_LRS".into()
}
fn default_timeout() -> u64 {
    60
}
fn default_operation_timeout() -> u64 {
    900
}

/// A secret that never prints.
#[derive(Deserialize)]
#[serde(transparent)]
struct SecretText(String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription_id: String,
    /// Service principal: all three of tenant_id, client_id, client_secret.
    tenant_id: Option<String>,
    /// The service principal's, or a user-assigned managed identity's client ID.
    client_id: Option<String>,
    client_secret: Option<SecretText>,
    /// Use the VM's (or App Service's) managed identity.
    #[serde(default)]
    managed_identity: bool,
    /// Use workload identity federation (`AZURE_FEDERATED_TOKEN_FILE` and friends).
    #[serde(default)]
    workload_identity: bool,
    resource_group: String,
    image_resource_group: Option<String>,
    #[serde(default = "default_location")]
    location: String,
    network: String,
    network_resource_group: Option<String>,
    subnet: String,
    /// With `shared_image_gallery_image_version`: the image ID names a gallery image.
    shared_image_gallery_name: Option<String>,
    shared_image_gallery_image_version: Option<String>,
    #[serde(default = "default_admin_username")]
    admin_username: String,
    /// NICs and disks of the set with no VM are deleted once this old.
    #[serde(default = "default_dangling_after")]
    delete_dangling_resources_after_seconds: u64,
    /// How often at most the sweeper looks for them.
    #[serde(default = "default_sweep_interval")]
    sweep_interval_seconds: u64,
    #[serde(default = "default_endpoint")]
    endpoint: String,
    /// Entra ID's authority (`https://login.microsoftonline.us` for Azure Government, …).
    #[serde(default = "default_authority")]
    authority: String,
    /// Extra trusted CA certificates (PEM), for private clouds and emulators.
    ca_certificate_file: Option<PathBuf>,
    #[serde(default = "default_disk_type")]
    scratch_disk_type: String,
    /// VM size prefix → quota group (spot sizes get `-spot` appended).
    #[serde(default)]
    quota_groups: BTreeMap<String, String>,
    #[serde(default = "default_timeout")]
    request_timeout_seconds: u64,
    /// How long create and set_tags follow their long-running operations.
    #[serde(default = "default_operation_timeout")]
    operation_timeout_seconds: u64,
}

fn bad<T>(message: impl Into<String>) -> Result<T, DriverError> {
    Err(DriverError::invalid_config(message))
}

impl Params {
    fn validate(&mut self) -> Result<(), DriverError> {
        for (name, value) in [
            ("subscription_id", &self.subscription_id),
            ("resource_group", &self.resource_group),
            ("location", &self.location),
            ("network", &self.network),
            ("subnet", &self.subnet),
        ] {
            // Each becomes a path segment of every request.
            if value.trim().is_empty() || value.contains(['/', '?', '#']) {
                return bad(format!("{name} = {value:?}: must be a plain name"));
            }
        }
        match (
            &self.shared_image_gallery_name,
            &self.shared_image_gallery_image_version,
        ) {
            (Some(_), None) | (None, Some(_)) => {
                return bad("shared_image_gallery_name and shared_image_gallery_image_version: give both or neither")
            }
            _ => {}
        }
        let secret = self.client_secret.is_some();
        let modes = [secret, self.managed_identity, self.workload_identity]
            .iter()
            .filter(|m| **m)
            .count();
        if modes > 1 {
            return bad("client_secret, managed_identity and workload_identity: choose one");
        }
        if modes == 0 {
            return bad("client_secret: give tenant_id, client_id and client_secret, or set managed_identity = true or workload_identity = true");
        }
        if secret && (self.tenant_id.is_none() || self.client_id.is_none()) {
            return bad("tenant_id / client_id: a client_secret needs both");
        }
        let id_ok = |v: &str| {
            !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        };
        for (name, value) in [
            ("tenant_id", &self.tenant_id),
            ("client_id", &self.client_id),
        ] {
            if let Some(v) = value {
                if !id_ok(v) {
                    return bad(format!("{name} = {v:?}: a GUID or a domain name"));
                }
            }
        }
        if self.request_timeout_seconds == 0 || self.operation_timeout_seconds == 0 {
            return bad("request_timeout_seconds / operation_timeout_seconds: must be at least 1");
        }
        if self.managed_identity && self.tenant_id.is_some() {
            return bad("tenant_id: not used with managed_identity");
        }
        for (name, url) in [
            ("endpoint", &mut self.endpoint),
            ("authority", &mut self.authority),
        ] {
            if !url.starts_with("https://") {
                return bad(format!("{name} = {url:?}: must be an https:// URL"));
            }
            *url = url.trim_end_matches('/').to_string();
        }
        let user_ok = (1..=32).contains(&self.admin_username.len())
            && self.admin_username.chars().enumerate().all(|(i, c)| {
                c.is_ascii_lowercase() || c == '_' || (i > 0 && (c.is_ascii_digit() || c == '-'))
            });
        if !user_ok || ["root", "admin", "administrator"].contains(&self.admin_username.as_str()) {
            return bad(format!(
                "admin_username {:?}: a Linux user name Azure allows (lowercase, not root/admin)",
                self.admin_username
            ));
        }
        Ok(())
    }

    fn credential(&self, options: ClientOptions) -> Result<Arc<dyn TokenCredential>, DriverError> {
        let named =
            |what: &str, e: azure_core::Error| DriverError::invalid_config(format!("{what}: {e}"));
        if let Some(secret) = &self.client_secret {
            let o = ClientSecretCredentialOptions {
                client_options: options,
            };
            let c = ClientSecretCredential::new(
                self.tenant_id.as_deref().unwrap_or_default(),
                self.client_id.clone().unwrap_or_default(),
                Secret::new(secret.0.clone()),
                Some(o),
            )
            .map_err(|e| named("tenant_id / client_id / client_secret", e))?;
            return Ok(c);
        }
        if self.managed_identity {
            let o = ManagedIdentityCredentialOptions {
                user_assigned_id: self.client_id.clone().map(UserAssignedId::ClientId),
                client_options: options,
            };
            let c = ManagedIdentityCredential::new(Some(o))
                .map_err(|e| named("managed_identity", e))?;
            return Ok(c);
        }
        let mut o = WorkloadIdentityCredentialOptions::default();
        o.credential_options.client_options = options;
        o.client_id = self.client_id.clone();
        o.tenant_id = self.tenant_id.clone();
        let c = WorkloadIdentityCredential::new(Some(o)).map_err(|e| {
            named(
                "workload_identity (AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID, AZURE_TENANT_ID)",
                e,
            )
        })?;
        Ok(c)
    }
}

/// The HTTP client for ARM and for the credential: rustls (ring), the system's roots plus
/// `ca_certificate_file`.
fn http_client(p: &Params) -> Result<reqwest::Client, DriverError> {
    let _ = arm::runtime().map_err(DriverError::other)?;
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(p.request_timeout_seconds))
        .connect_timeout(Duration::from_secs(p.request_timeout_seconds.min(15)));
    if let Some(path) = &p.ca_certificate_file {
        let pem = std::fs::read(path).map_err(|e| {
            DriverError::invalid_config(format!("ca_certificate_file {}: {e}", path.display()))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            DriverError::invalid_config(format!("ca_certificate_file {}: {e}", path.display()))
        })?;
        if certs.is_empty() {
            return bad(format!(
                "ca_certificate_file {}: no PEM certificate in it",
                path.display()
            ));
        }
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    builder
        .build()
        .map_err(|e| DriverError::other(format!("HTTP client: {e}")))
}

pub struct AzureDriver;

impl Driver for AzureDriver {
    const NAME: &'static str = "azure";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new_instance_set(
        params: &serde_json::Value,
        set_id: &InstanceSetId,
        shared_tags: &Tags,
        _host: &HostServices,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        let mut p: Params = driver_abi::parse_params(params)?;
        p.validate()?;
        let http = http_client(&p)?;
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = p.authority.clone();
        let options = ClientOptions {
            transport: Some(Transport::new(Arc::new(http.clone()))),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        };
        let credential = p.credential(options)?;
        let arm = Arm::new(
            http,
            credential,
            &p.endpoint,
            Duration::from_secs(p.request_timeout_seconds),
        );
        log::info!(
            "Azure instance set {set_id} in {}/{} ({}) via {}",
            p.subscription_id,
            p.resource_group,
            p.location,
            p.endpoint
        );
        let rg_path = format!(
            "/subscriptions/{}/resourceGroups/{}",
            p.subscription_id, p.resource_group
        );
        Ok(Box::new(AzureSet {
            inner: Arc::new(SetInner {
                arm,
                set_id: set_id.clone(),
                shared_tags: shared_tags.clone(),
                rg_path,
                params: p,
                in_flight: Mutex::new(HashSet::new()),
                sweeper: sweep::Sweeper::default(),
            }),
        }))
    }
}

#[cfg(feature = "export")]
driver_abi::export_driver!(AzureDriver);

pub(crate) struct SetInner {
    arm: Arm,
    set_id: InstanceSetId,
    shared_tags: Tags,
    params: Params,
    /// `/subscriptions/…/resourceGroups/…`
    rg_path: String,
    /// VMs being created by this process: their NICs are not dangling yet.
    in_flight: Mutex<HashSet<String>>,
    sweeper: sweep::Sweeper,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl SetInner {
    fn path(&self, provider: &str, name: &str) -> String {
        format!("{}/providers/{provider}/{name}", self.rg_path)
    }

    fn vm_path(&self, name: &str) -> String {
        self.path("Microsoft.Compute/virtualMachines", name)
    }

    fn nic_path(&self, name: &str) -> String {
        self.path("Microsoft.Network/networkInterfaces", name)
    }

    fn disk_path(&self, name: &str) -> String {
        self.path("Microsoft.Compute/disks", name)
    }

    /// Every VM name of this set starts so; so do its NICs and disks.
    fn name_prefix(&self) -> String {
        format!("dc-{}-", self.set_id)
    }

    fn operation_timeout(&self) -> Duration {
        Duration::from_secs(self.params.operation_timeout_seconds)
    }

    /// PUT/PATCH `body` at `path` and follow the operation to its end.
    async fn write(
        &self,
        method: Method,
        path: &str,
        api: &str,
        body: &Value,
    ) -> Result<Value, ArmFailure> {
        let reply = self.arm.send(method, path, Some(api), Some(body)).await?;
        let first = reply.body.clone();
        self.arm
            .finish(path, api, reply, self.operation_timeout())
            .await?;
        Ok(first)
    }

    async fn delete(&self, path: &str, api: &str) -> Result<(), ArmFailure> {
        match self.arm.send(Method::DELETE, path, Some(api), None).await {
            Ok(_) => Ok(()),
            Err(f) if f.http_status == Some(404) => Ok(()),
            Err(f) => Err(f),
        }
    }

    /// Every item of a list, following `nextLink` (a link seen before, or more pages than
    /// any resource group holds, is an error rather than a loop).
    async fn list(&self, path: &str, api: &str) -> Result<Vec<Value>, ArmFailure> {
        const MOST_PAGES: usize = 10_000;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut reply = self.arm.send(Method::GET, path, Some(api), None).await?;
        loop {
            if let Some(items) = reply.body.get("value").and_then(Value::as_array) {
                out.extend(items.iter().cloned());
            }
            match reply.body.get("nextLink").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => {
                    if !seen.insert(next.to_string()) || seen.len() > MOST_PAGES {
                        return Err(ArmFailure::local(format!(
                            "listing {path}: nextLink repeats or never ends"
                        )));
                    }
                    let next = next.to_string();
                    reply = self.arm.send(Method::GET, &next, None, None).await?;
                }
                _ => return Ok(out),
            }
        }
    }

    fn image_reference(&self, image_id: &str) -> Result<Value, DriverError> {
        let p = &self.params;
        if image_id.is_empty() {
            return bad("image: the instance type names no image");
        }
        if image_id.starts_with("/subscriptions/") {
            return Ok(json!({ "id": image_id }));
        }
        // A Marketplace URN, publisher:offer:sku:version.
        let urn: Vec<&str> = image_id.split(':').collect();
        if urn.len() == 4 && urn.iter().all(|part| !part.is_empty()) {
            return Ok(
                json!({"publisher": urn[0], "offer": urn[1], "sku": urn[2], "version": urn[3]}),
            );
        }
        if image_id.contains(['/', '?', '#']) {
            return bad(format!(
                "image {image_id:?}: a name, a resource ID or a publisher:offer:sku:version URN"
            ));
        }
        let image_rg = p
            .image_resource_group
            .as_deref()
            .unwrap_or(&p.resource_group);
        let id = match (&p.shared_image_gallery_name, &p.shared_image_gallery_image_version) {
            (Some(gallery), Some(version)) => format!(
                "/subscriptions/{}/resourceGroups/{image_rg}/providers/Microsoft.Compute/galleries/{gallery}/images/{image_id}/versions/{version}",
                p.subscription_id
            ),
            _ => format!(
                "/subscriptions/{}/resourceGroups/{image_rg}/providers/Microsoft.Compute/images/{image_id}",
                p.subscription_id
            ),
        };
        Ok(json!({ "id": id }))
    }

    fn subnet_id(&self) -> String {
        let p = &self.params;
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/virtualNetworks/{}/subnets/{}",
            p.subscription_id,
            p.network_resource_group.as_deref().unwrap_or(&p.resource_group),
            p.network,
            p.subnet
        )
    }

    fn vm_body(
        &self,
        r: &CreateRequest,
        name: &str,
        nic_id: &str,
        tags: &Tags,
        key: &str,
    ) -> Result<Value, DriverError> {
        let p = &self.params;
        let t = &r.instance_type;
        let custom_data = base64::engine::general_purpose::STANDARD
            .encode(format!("#!/bin/sh\n{}\n", r.init_command));
        let mut storage = json!({
            "imageReference": self.image_reference(&r.image_id)?,
            "osDisk": {
                "name": format!("{name}-os"),
                "createOption": "FromImage",
                "deleteOption": "Delete",
                "caching": "ReadWrite",
            },
        });
        // Added scratch is a managed data disk (the original dispatcher refused such types);
        // it goes with the VM, like the OS disk.
        if t.added_scratch_bytes > 0 {
            storage["dataDisks"] = json!([{
                "lun": 0,
                "name": format!("{name}-scratch"),
                "createOption": "Empty",
                "diskSizeGB": t.added_scratch_bytes.div_ceil(1 << 30),
                "deleteOption": "Delete",
                "managedDisk": {"storageAccountType": p.scratch_disk_type},
            }]);
        }
        let mut properties = json!({
            "hardwareProfile": {"vmSize": t.provider_type},
            "storageProfile": storage,
            "osProfile": {
                "computerName": name,
                "adminUsername": p.admin_username,
                "customData": custom_data,
                "linuxConfiguration": {
                    "disablePasswordAuthentication": true,
                    "ssh": {"publicKeys": [{
                        "path": format!("/home/{}/.ssh/authorized_keys", p.admin_username),
                        "keyData": key.trim(),
                    }]},
                },
            },
            "networkProfile": {"networkInterfaces": [{
                "id": nic_id,
                "properties": {"primary": true, "deleteOption": "Delete"},
            }]},
        });
        if t.preemptible {
            properties["priority"] = json!("Spot");
            properties["evictionPolicy"] = json!("Delete");
            // -1: pay up to the on-demand price, evicted only for capacity.
            let max = if t.price > 0.0 { t.price } else { -1.0 };
            properties["billingProfile"] = json!({ "maxPrice": max });
        }
        Ok(json!({"location": p.location, "tags": tags, "properties": properties}))
    }

    /// After a failed VM create: the VM (if ARM kept a failed one) and the NIC, at once;
    /// whatever refuses now is the sweeper's.
    async fn clean_up_failed(&self, name: &str, nic: &str) {
        if let Err(f) = self.delete(&self.vm_path(name), COMPUTE_API).await {
            log::warn!("instance={name}: deleting the failed VM: {f}");
        }
        match self.delete(&self.nic_path(nic), NETWORK_API).await {
            Ok(()) => log::info!("instance={name}: deleted NIC {nic} after the failed create"),
            Err(f) => {
                log::warn!("instance={name}: deleting NIC {nic}: {f} (the sweeper will retry)")
            }
        }
    }

    async fn create(
        self: &Arc<Self>,
        r: &CreateRequest,
        name: &str,
    ) -> Result<Box<dyn Instance>, (String, ArmFailure)> {
        let p = &self.params;
        let key = r.public_key.as_deref().unwrap_or_default();
        let mut tags = self.shared_tags.clone();
        tags.extend(r.tags.clone());
        tags.insert(SET_ID_TAG.into(), self.set_id.to_string());
        tags.insert(CREATED_AT_TAG.into(), now_unix().to_string());

        let nic = format!("{name}-nic");
        let nic_path = self.nic_path(&nic);
        let nic_body = json!({
            "location": p.location,
            "tags": tags,
            "properties": {"ipConfigurations": [{
                "name": "ipconfig1",
                "properties": {
                    "privateIPAllocationMethod": "Dynamic",
                    "subnet": {"id": self.subnet_id()},
                },
            }]},
        });
        let nic_reply = match self
            .write(Method::PUT, &nic_path, NETWORK_API, &nic_body)
            .await
        {
            Ok(b) => b,
            Err(f) => {
                if f.http_status.is_none_or(|s| s < 400) {
                    // Accepted, then failed: do not leave it behind.
                    let _ = self.delete(&nic_path, NETWORK_API).await;
                }
                return Err(("PUT networkInterfaces".into(), f));
            }
        };
        let nic_id = nic_reply
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| nic_path.clone());
        let vm_body = self
            .vm_body(r, name, &nic_id, &tags, key)
            .map_err(|e| ("image".to_string(), ArmFailure::local(e.to_string())))?;
        let vm_path = self.vm_path(name);
        let vm_reply = match self
            .write(Method::PUT, &vm_path, COMPUTE_API, &vm_body)
            .await
        {
            Ok(b) => b,
            Err(f) => {
                self.clean_up_failed(name, &nic).await;
                return Err(("PUT virtualMachines".into(), f));
            }
        };
        // Disks created with a VM carry no tags: tag them so the sweeper knows whose they
        // are (their names say so too, should this fail).
        let mut disks = vec![format!("{name}-os")];
        if r.instance_type.added_scratch_bytes > 0 {
            disks.push(format!("{name}-scratch"));
        }
        for disk in disks {
            let patch = json!({ "tags": tags });
            if let Err(f) = self
                .write(Method::PATCH, &self.disk_path(&disk), DISK_API, &patch)
                .await
            {
                log::warn!("instance={name}: tagging disk {disk}: {f}");
            }
        }
        let address = ip_of(&nic_reply);
        Ok(self.instance(&vm_reply, address, tags))
    }

    fn instance(self: &Arc<Self>, vm: &Value, address: String, tags: Tags) -> Box<dyn Instance> {
        Box::new(AzureInstance {
            set: Arc::clone(self),
            name: vm
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            size: vm
                .pointer("/properties/hardwareProfile/vmSize")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            address,
            tags: Mutex::new(tags),
        })
    }

    async fn instances(
        self: &Arc<Self>,
        tag_filter: &Tags,
    ) -> Result<Vec<Box<dyn Instance>>, (String, ArmFailure)> {
        let vms = self
            .list(
                &format!(
                    "{}/providers/Microsoft.Compute/virtualMachines",
                    self.rg_path
                ),
                COMPUTE_API,
            )
            .await
            .map_err(|f| ("list virtualMachines".to_string(), f))?;
        let nics = self
            .list(
                &format!(
                    "{}/providers/Microsoft.Network/networkInterfaces",
                    self.rg_path
                ),
                NETWORK_API,
            )
            .await
            .map_err(|f| ("list networkInterfaces".to_string(), f))?;
        let ips: HashMap<String, String> = nics
            .iter()
            .filter_map(|n| Some((n.get("id")?.as_str()?.to_lowercase(), ip_of(n))))
            .collect();
        let mut out = Vec::new();
        for vm in &vms {
            let name = vm.get("name").and_then(Value::as_str).unwrap_or_default();
            if !safe_name(name) {
                continue;
            }
            let tags = tags_of(vm);
            if tags.get(SET_ID_TAG).map(String::as_str) != Some(self.set_id.as_str()) {
                continue;
            }
            if vm
                .pointer("/properties/provisioningState")
                .and_then(Value::as_str)
                == Some("Deleting")
            {
                continue;
            }
            if !tag_filter.iter().all(|(k, v)| tags.get(k) == Some(v)) {
                continue;
            }
            // The NIC's IP can come after the VM: an empty address now, the IP at a later
            // listing.
            let address = vm
                .pointer("/properties/networkProfile/networkInterfaces/0/id")
                .and_then(Value::as_str)
                .and_then(|id| ips.get(&id.to_lowercase()).cloned())
                .unwrap_or_default();
            out.push(self.instance(vm, address, tags));
        }
        sweep::maybe_start(self, nics);
        Ok(out)
    }
}

fn ip_of(nic: &Value) -> String {
    nic.pointer("/properties/ipConfigurations/0/properties/privateIPAddress")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn tags_of(resource: &Value) -> Tags {
    resource
        .get("tags")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A VM name: `dc-<set ID>-<15 of [a-z0-9]>`, 46 characters (Azure allows 64).
fn new_vm_name(set_id: &InstanceSetId) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..15)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("dc-{set_id}-{suffix}")
}

/// The quota group of `t`: the longest configured prefix of its size (with `-spot` for Spot
/// VMs), else Azure's vCPU quota family (`Standard_D4s_v5` → `standardDSv5Family`) on demand
/// and `lowPriorityCores` for every Spot size, since Azure counts all Spot vCPUs of a region
/// against that one limit.
pub fn quota_group(groups: &BTreeMap<String, String>, t: &InstanceType) -> String {
    let configured = groups
        .iter()
        .filter(|(prefix, _)| t.provider_type.starts_with(prefix.as_str()))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, g)| g.clone());
    match (configured, t.preemptible) {
        (Some(g), true) => format!("{g}-spot"),
        (Some(g), false) => g,
        (None, true) => SPOT_QUOTA_GROUP.to_string(),
        (None, false) => family::vm_family(&t.provider_type),
    }
}

/// Whether a name from ARM can go into a request path as it is.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Marks a VM name as being created for as long as it lives, panics included: the sweeper
/// leaves its NIC and disks alone meanwhile.
struct InFlight<'a> {
    set: &'a SetInner,
    name: String,
}

impl<'a> InFlight<'a> {
    fn new(set: &'a SetInner, name: &str) -> Self {
        if let Ok(mut f) = set.in_flight.lock() {
            f.insert(name.to_string());
        }
        InFlight {
            set,
            name: name.to_string(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut f = self.set.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&self.name);
    }
}

struct AzureSet {
    inner: Arc<SetInner>,
}

impl InstanceSet for AzureSet {
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError> {
        let s = &self.inner;
        let t = &request.instance_type;
        let group = quota_group(&s.params.quota_groups, t);
        if request.public_key.is_none() {
            return bad("the host sent no SSH key: Azure VMs here are reached with the dispatcher's key only");
        }
        s.image_reference(&request.image_id)?;
        let name = new_vm_name(&s.set_id);
        let result = {
            let _creating = InFlight::new(s, &name);
            block_on(s.create(request, &name)).map_err(DriverError::other)
        };
        match result? {
            Ok(vm) => {
                log::info!("instance={name}: created ({})", t.provider_type);
                Ok(vm)
            }
            Err((call, f)) => Err(classify(&call, &f, &t.provider_type, &group)),
        }
    }

    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError> {
        match block_on(self.inner.instances(tag_filter)).map_err(DriverError::other)? {
            Ok(list) => Ok(list),
            Err((call, f)) => Err(classify(&call, &f, "", "")),
        }
    }

    fn quota_group(&self, instance_type: &InstanceType) -> String {
        quota_group(&self.inner.params.quota_groups, instance_type)
    }

    fn stop(&self) {}
}

struct AzureInstance {
    set: Arc<SetInner>,
    name: String,
    size: String,
    address: String,
    tags: Mutex<Tags>,
}

impl AzureInstance {
    fn run<T>(
        &self,
        call: &str,
        f: impl std::future::Future<Output = Result<T, ArmFailure>>,
    ) -> Result<T, DriverError> {
        match block_on(f).map_err(DriverError::other)? {
            Ok(v) => Ok(v),
            Err(failure) => Err(classify(&format!("{call} {}", self.name), &failure, "", "")),
        }
    }
}

impl Instance for AzureInstance {
    fn id(&self) -> String {
        self.name.clone()
    }

    fn provider_type(&self) -> String {
        self.size.clone()
    }

    fn tags(&self) -> Tags {
        self.tags.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn set_tags(&self, wanted: &Tags) -> Result<(), DriverError> {
        let s = &self.set;
        let mut tags = wanted.clone();
        // The set ID and the creation time are the driver's own: never dropped.
        tags.insert(SET_ID_TAG.into(), s.set_id.to_string());
        if let Some(created) = self.tags().get(CREATED_AT_TAG) {
            tags.insert(CREATED_AT_TAG.into(), created.clone());
        }
        let body = json!({ "tags": tags });
        let path = s.vm_path(&self.name);
        self.run("PATCH virtualMachines", async {
            s.write(Method::PATCH, &path, COMPUTE_API, &body)
                .await
                .map(|_| ())
        })?;
        if let Ok(mut t) = self.tags.lock() {
            *t = tags;
        }
        Ok(())
    }

    fn destroy(&self) -> Result<(), DriverError> {
        let s = &self.set;
        let path = s.vm_path(&self.name);
        // The NIC and disks go with the VM (deleteOption); the sweeper is the safety net.
        self.run("DELETE virtualMachines", s.delete(&path, COMPUTE_API))
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn remote_user(&self) -> String {
        self.set.params.admin_username.clone()
    }

    fn verify_host_key(&self, _host_key: &str) -> Result<(), DriverError> {
        Err(DriverError::not_implemented(
            "Azure does not publish host keys; the host checks the instance secret",
        ))
    }

    fn price_history(&self, _: &InstanceType) -> Result<Vec<InstancePrice>, DriverError> {
        // ARM has no price history; the configured price stands.
        Ok(Vec::new())
    }
}

/// How long ago `unix` was.
pub(crate) fn age_of(unix: u64) -> Duration {
    Duration::from_secs(now_unix().saturating_sub(unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> Result<Params, DriverError> {
        driver_abi::parse_params::<Params>(&v).and_then(|mut p| p.validate().map(|()| p))
    }

    fn minimal() -> serde_json::Value {
        json!({
            "subscription_id": "00000000-0000-0000-0000-000000000000",
            "tenant_id": "11111111-1111-1111-1111-111111111111",
            "client_id": "22222222-2222-2222-2222-222222222222",
            "client_secret": "s3cr3t",
            "resource_group": "batch",
            "network": "vnet",
            "subnet": "workers",
        })
    }

    #[test]
    fn parameters_are_checked_and_named() {
        let p = parse(minimal()).expect("minimal");
        assert_eq!(p.location, "centralus");
        assert!(
            !format!("{p:?}").contains("s3cr3t"),
            "the secret never prints"
        );
        let with = |k: &str, v: Value| {
            let mut m = minimal();
            m[k] = v;
            m
        };
        let without = |k: &str| {
            let mut m = minimal();
            m.as_object_mut().map(|o| o.remove(k));
            m
        };
        for (bad, named) in [
            (with("resourse_group", json!("x")), "resourse_group"),
            (without("client_secret"), "client_secret"),
            (without("tenant_id"), "tenant_id"),
            (with("managed_identity", json!(true)), "choose one"),
            (
                with("shared_image_gallery_name", json!("g")),
                "shared_image_gallery_image_version",
            ),
            (
                with("endpoint", json!("http://management.azure.com")),
                "endpoint",
            ),
            (with("subnet", json!("a/b")), "subnet"),
            (with("admin_username", json!("root")), "admin_username"),
        ] {
            let err = match parse(bad) {
                Err(e) => e,
                Ok(_) => panic!("{named} accepted"),
            };
            assert_eq!(err.kind(), "invalid_config");
            assert!(err.to_string().contains(named), "{named}: {err}");
            assert!(!err.to_string().contains("s3cr3t"));
        }
    }

    #[test]
    fn quota_groups_follow_azure_families_and_overrides() {
        let none = BTreeMap::new();
        let t = |size: &str, spot: bool| InstanceType {
            preemptible: spot,
            ..InstanceType::minimal(size)
        };
        assert_eq!(
            quota_group(&none, &t("Standard_D4s_v5", false)),
            "standardDSv5Family"
        );
        assert_eq!(
            quota_group(&none, &t("Standard_D4s_v5", true)),
            "lowPriorityCores"
        );
        let mut groups = BTreeMap::new();
        groups.insert("Standard_NC".to_string(), "gpu".to_string());
        assert_eq!(quota_group(&groups, &t("Standard_NC6s_v3", false)), "gpu");
        assert_eq!(
            quota_group(&groups, &t("Standard_NC6s_v3", true)),
            "gpu-spot"
        );
        assert_eq!(
            quota_group(&none, &t("Standard_E8s_v3", true)),
            "lowPriorityCores",
            "one Spot limit for every family"
        );
    }

    #[test]
    fn vm_names_carry_the_set_and_fit_azure() {
        let id = InstanceSetId::parse("zzzzz-zzzzz-azureset0000000").expect("id");
        let name = new_vm_name(&id);
        assert!(
            name.starts_with("dc-zzzzz-zzzzz-azureset0000000-"),
            "{name}"
        );
        assert_eq!(name.len(), 46);
        assert_ne!(name, new_vm_name(&id));
    }
}
