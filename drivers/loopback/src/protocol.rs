//! What the plugin and the `loopback-cloud` daemon say to each other: one JSON request per line
//! on the daemon's Unix socket, one JSON response line back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The socket's file name inside the cloud's state directory.
pub const SOCKET_NAME: &str = "cloud.sock";
/// Environment variable naming a VM's root directory inside every command it runs. On a real VM
/// it is unset, so `${DISPATCH_CLOUD_VM_ROOT}/var/lock` is simply `/var/lock`.
pub const VM_ROOT_ENV: &str = "DISPATCH_CLOUD_VM_ROOT";

/// Faults the loopback cloud injects, per instance set (the `faults` table of its parameters).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Time from create until the VM answers SSH.
    pub boot_delay_ms: u64,
    /// Probability that a create fails with a generic error (nothing is created).
    pub create_error_rate: f64,
    /// Probability that a destroy fails with a generic error (the VM stays).
    pub destroy_error_rate: f64,
    /// Creates closer together than this fail with `RateLimit` naming the earliest retry.
    pub create_rate_limit_ms: u64,
    /// Listings closer together than this fail with `RateLimit`.
    pub list_rate_limit_ms: u64,
    /// Quota: creating beyond this many VMs in the cloud fails with `Quota`.
    pub max_instances: Option<usize>,
    /// Provider types that fail with `Capacity{InstanceType}`.
    pub capacity_error_types: Vec<String>,
    /// Quota groups that fail with `Capacity{QuotaGroup}`.
    pub capacity_error_groups: Vec<String>,
    /// VMs stop answering (crash) this long after boot…
    pub crash_after_ms: Option<u64>,
    /// …with this probability per VM (default 1 when `crash_after_ms` is set).
    pub crash_rate: Option<f64>,
    /// VMs report themselves broken (the runner's broken flag appears) this long after boot…
    pub broken_after_ms: Option<u64>,
    /// …with this probability per VM (default 1 when `broken_after_ms` is set).
    pub broken_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Create {
        provider_type: String,
        image_id: String,
        quota_group: String,
        tags: BTreeMap<String, String>,
        init_command: String,
        public_key: Option<String>,
        faults: Faults,
    },
    List {
        faults: Faults,
    },
    SetTags {
        id: String,
        tags: BTreeMap<String, String>,
    },
    Destroy {
        id: String,
        faults: Faults,
    },
    /// Stops the daemon; VMs stay on disk and come back when it restarts.
    Shutdown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Booting,
    Running,
    Crashed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub provider_type: String,
    pub image_id: String,
    pub tags: BTreeMap<String, String>,
    /// `127.0.0.1:port`.
    pub address: String,
    /// The VM's SSH host key, `ssh-ed25519 AAAA…`.
    pub host_key: String,
    pub state: VmState,
    /// The VM's root directory on the machine running the daemon.
    pub root: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    RateLimit,
    Quota,
    CapacityType,
    CapacityGroup,
    NotFound,
    BadRequest,
    Other,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
    /// For `RateLimit`: milliseconds since the Unix epoch.
    pub earliest_retry_unix_ms: Option<i64>,
    /// For capacity errors: the type or group.
    pub scope: Option<String>,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError {
            kind,
            message: message.into(),
            earliest_retry_unix_ms: None,
            scope: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok,
    Pong { pid: u32, vms: usize },
    Vm(VmInfo),
    Vms(Vec<VmInfo>),
    Error(WireError),
}
