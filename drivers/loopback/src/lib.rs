//! The loopback driver: a dispatch-cloud plugin for a local "cloud" whose VMs are SSH servers on
//! 127.0.0.1. The cloud itself is the `loopback-cloud` daemon (a binary of this crate); the plugin
//! starts it when its socket does not answer and talks to it over that socket. VMs live in the
//! daemon, so they survive restarts of the host process exactly as cloud VMs would.

pub mod client;
pub mod protocol;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use driver_abi::{
    CapacityScope, CreateRequest, Driver, DriverError, HostServices, Instance, InstancePrice,
    InstanceSet, InstanceSetId, InstanceType, Tags,
};
use serde::Deserialize;

use crate::client::CloudClient;
use crate::protocol::{ErrorKind, Faults, Request, Response, VmInfo, WireError};

/// Kills every process whose `DISPATCH_CLOUD_VM_ROOT` is `root` (or, with `below`, anywhere
/// under it): everything a VM started dies with it, as on a real machine. Processes are found by
/// the variable every command of a loopback VM inherits.
pub fn kill_vm_processes(root: &std::path::Path, below: bool) {
    // A process caught mid-fork can leave a child the sweep did not see: sweep again until one
    // finds nothing (bounded, in case something keeps respawning).
    for _ in 0..20 {
        if kill_sweep(root, below) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// One pass over /proc; returns how many processes it signalled.
fn kill_sweep(root: &std::path::Path, below: bool) -> usize {
    let marker = format!("{}={}", protocol::VM_ROOT_ENV, root.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut signalled = 0;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A zombie's environ reads empty, so the already-killed are not counted again.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let matches = |var: &[u8]| {
            if below {
                var.starts_with(marker.as_bytes())
            } else {
                var == marker.as_bytes()
            }
        };
        if environ.split(|b| *b == 0).any(matches) {
            // SAFETY: kill(2) with a PID read from /proc; at worst the process is already gone.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            signalled += 1;
        }
    }
    signalled
}

/// The tag holding the set ID on every VM the dispatcher creates.
const SET_ID_TAG: &str = "dispatch-cloud-instance-set";

/// The instance set's `parameters` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// Where the cloud keeps its socket and VMs; one daemon per directory.
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// The `loopback-cloud` binary; by default the one beside this plugin's `.so`.
    daemon_path: Option<PathBuf>,
    /// The daemon exits after this long without a request (its VMs wait on disk).
    #[serde(default = "default_idle_exit_seconds")]
    idle_exit_seconds: u64,
    /// With `false`, `verify_host_key` says NotImplemented so the host checks the instance
    /// secret instead, as it must for EC2 or Azure.
    #[serde(default = "default_true")]
    verify_host_key: bool,
    #[serde(default)]
    faults: Faults,
}

fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("dispatch-cloud-loopback")
}

fn default_idle_exit_seconds() -> u64 {
    600
}

fn default_true() -> bool {
    true
}

pub struct LoopbackDriver;

impl Driver for LoopbackDriver {
    const NAME: &'static str = "loopback";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn new_instance_set(
        params: &serde_json::Value,
        set_id: &InstanceSetId,
        shared_tags: &Tags,
        _host: &HostServices,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        let params: Params = driver_abi::parse_params(params)?;
        for (name, rate) in [
            ("faults.create_error_rate", params.faults.create_error_rate),
            (
                "faults.destroy_error_rate",
                params.faults.destroy_error_rate,
            ),
            ("faults.crash_rate", params.faults.crash_rate.unwrap_or(0.0)),
            (
                "faults.broken_rate",
                params.faults.broken_rate.unwrap_or(0.0),
            ),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(DriverError::invalid_config(format!(
                    "{name} = {rate}: must be between 0 and 1"
                )));
            }
        }
        let daemon_path = match params.daemon_path {
            Some(p) => p,
            None => client::daemon_beside_plugin().ok_or_else(|| {
                DriverError::invalid_config(
                    "daemon_path: not set, and no loopback-cloud binary beside the plugin",
                )
            })?,
        };
        let client = CloudClient::new(params.state_dir, daemon_path, params.idle_exit_seconds);
        client.ensure_running()?;
        log::info!(
            "Loopback instance set {set_id} uses the cloud in {}.",
            client.state_dir().display()
        );
        Ok(Box::new(LoopbackSet {
            inner: Arc::new(SetInner {
                client,
                set_id: set_id.clone(),
                shared_tags: shared_tags.clone(),
                faults: params.faults,
                verify_host_key: params.verify_host_key,
            }),
        }))
    }
}

#[cfg(feature = "export")]
driver_abi::export_driver!(LoopbackDriver);

struct SetInner {
    client: CloudClient,
    set_id: InstanceSetId,
    shared_tags: Tags,
    faults: Faults,
    verify_host_key: bool,
}

struct LoopbackSet {
    inner: Arc<SetInner>,
}

fn to_driver_error(e: WireError) -> DriverError {
    match e.kind {
        ErrorKind::RateLimit => DriverError::rate_limit(
            UNIX_EPOCH
                + Duration::from_millis(
                    e.earliest_retry_unix_ms
                        .and_then(|ms| u64::try_from(ms).ok())
                        .unwrap_or(0),
                ),
            e.message,
        ),
        ErrorKind::Quota => DriverError::quota(e.message),
        ErrorKind::CapacityType => DriverError::capacity(
            CapacityScope::InstanceType(e.scope.unwrap_or_default()),
            e.message,
        ),
        ErrorKind::CapacityGroup => DriverError::capacity(
            CapacityScope::QuotaGroup(e.scope.unwrap_or_default()),
            e.message,
        ),
        ErrorKind::NotFound | ErrorKind::BadRequest | ErrorKind::Other => {
            DriverError::other(e.message)
        }
    }
}

impl SetInner {
    fn call(&self, request: &Request) -> Result<Response, DriverError> {
        match self.client.call(request)? {
            Response::Error(e) => Err(to_driver_error(e)),
            other => Ok(other),
        }
    }

    fn instance(self: &Arc<Self>, info: VmInfo) -> Box<dyn Instance> {
        Box::new(LoopbackInstance {
            set: Arc::clone(self),
            info,
        })
    }
}

fn unexpected(response: Response) -> DriverError {
    DriverError::other(format!(
        "loopback cloud sent an unexpected response: {response:?}"
    ))
}

/// Quota group: the provider type's family (the part before the first dot), with spot
/// capacity counted apart, as on EC2.
pub fn quota_group_of(instance_type: &InstanceType) -> String {
    let family = instance_type
        .provider_type
        .split('.')
        .next()
        .unwrap_or_default();
    if instance_type.preemptible {
        format!("{family}-spot")
    } else {
        family.to_string()
    }
}

impl InstanceSet for LoopbackSet {
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError> {
        let mut tags = self.inner.shared_tags.clone();
        tags.extend(request.tags.clone());
        tags.insert(SET_ID_TAG.into(), self.inner.set_id.to_string());
        let response = self.inner.call(&Request::Create {
            provider_type: request.instance_type.provider_type.clone(),
            image_id: request.image_id.clone(),
            quota_group: quota_group_of(&request.instance_type),
            tags,
            init_command: request.init_command.clone(),
            public_key: request.public_key.clone(),
            faults: self.inner.faults.clone(),
        })?;
        match response {
            Response::Vm(info) => Ok(self.inner.instance(info)),
            other => Err(unexpected(other)),
        }
    }

    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError> {
        let response = self.inner.call(&Request::List {
            faults: self.inner.faults.clone(),
        })?;
        let Response::Vms(vms) = response else {
            return Err(unexpected(response));
        };
        Ok(vms
            .into_iter()
            .filter(|vm| {
                vm.tags.get(SET_ID_TAG).map(String::as_str) == Some(self.inner.set_id.as_str())
            })
            .filter(|vm| tag_filter.iter().all(|(k, v)| vm.tags.get(k) == Some(v)))
            .map(|vm| self.inner.instance(vm))
            .collect())
    }

    fn quota_group(&self, instance_type: &InstanceType) -> String {
        quota_group_of(instance_type)
    }

    fn stop(&self) {}
}

struct LoopbackInstance {
    set: Arc<SetInner>,
    info: VmInfo,
}

impl Instance for LoopbackInstance {
    fn id(&self) -> String {
        self.info.id.clone()
    }

    fn provider_type(&self) -> String {
        self.info.provider_type.clone()
    }

    fn tags(&self) -> Tags {
        self.info.tags.clone()
    }

    fn set_tags(&self, tags: &Tags) -> Result<(), DriverError> {
        let mut tags = tags.clone();
        // The set ID tag is how this set finds its VMs again; replacing tags must not orphan it.
        tags.insert(SET_ID_TAG.into(), self.set.set_id.to_string());
        match self.set.call(&Request::SetTags {
            id: self.info.id.clone(),
            tags,
        })? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn destroy(&self) -> Result<(), DriverError> {
        match self.set.call(&Request::Destroy {
            id: self.info.id.clone(),
            faults: self.set.faults.clone(),
        })? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn address(&self) -> String {
        self.info.address.clone()
    }

    fn remote_user(&self) -> String {
        std::env::var("USER").unwrap_or_else(|_| "root".to_string())
    }

    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        if !self.set.verify_host_key {
            return Err(DriverError::not_implemented(
                "host key verification is switched off (verify_host_key = false)",
            ));
        }
        if key_material(host_key) == key_material(&self.info.host_key) && !host_key.is_empty() {
            Ok(())
        } else {
            Err(DriverError::other(format!(
                "host key of {} does not match: presented {}, expected {}",
                self.info.id,
                key_material(host_key),
                key_material(&self.info.host_key)
            )))
        }
    }

    fn price_history(
        &self,
        _instance_type: &InstanceType,
    ) -> Result<Vec<InstancePrice>, DriverError> {
        Ok(Vec::new())
    }
}

/// `type base64` of an OpenSSH public key line, without its comment.
fn key_material(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(provider_type: &str, preemptible: bool) -> InstanceType {
        InstanceType {
            preemptible,
            ..InstanceType::minimal(provider_type)
        }
    }

    #[test]
    fn quota_groups_split_families_and_spot() {
        assert_eq!(quota_group_of(&it("lb.small", false)), "lb");
        assert_eq!(quota_group_of(&it("lb.small", true)), "lb-spot");
        assert_eq!(quota_group_of(&it("gpu.large", false)), "gpu");
    }

    #[test]
    fn key_comparison_ignores_comments() {
        assert_eq!(key_material("ssh-ed25519 AAAA host@x"), "ssh-ed25519 AAAA");
        assert_ne!(
            key_material("ssh-ed25519 AAAB"),
            key_material("ssh-ed25519 AAAA")
        );
    }

    #[test]
    fn wire_errors_map_to_typed_driver_errors() {
        let mut e = WireError::new(ErrorKind::RateLimit, "slow");
        e.earliest_retry_unix_ms = Some(5_000);
        assert_eq!(
            to_driver_error(e),
            DriverError::rate_limit(UNIX_EPOCH + Duration::from_secs(5), "slow")
        );
        let mut e = WireError::new(ErrorKind::CapacityGroup, "full");
        e.scope = Some("lb".into());
        assert_eq!(
            to_driver_error(e),
            DriverError::capacity(CapacityScope::QuotaGroup("lb".into()), "full")
        );
        assert_eq!(
            to_driver_error(WireError::new(ErrorKind::Quota, "max")).kind(),
            "quota"
        );
    }
}
