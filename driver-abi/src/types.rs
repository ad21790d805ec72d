//! Plain data that crosses between host and driver, in its safe Rust form.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

/// Tags (labels) on a VM: key → value. Ordered so listings and comparisons are deterministic.
pub type Tags = BTreeMap<String, String>;

/// Identifies the VMs one dispatcher owns, `zzzzz-zzzzz-zzzzzzzzzzzzzzz` (5-5-15 of `[a-z0-9]`).
/// A driver touches only resources tagged with its set ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceSetId(String);

impl InstanceSetId {
    /// Validates the 5-5-15 form; the error says what is wrong with the given text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('-').collect();
        let lengths_ok =
            parts.len() == 3 && parts[0].len() == 5 && parts[1].len() == 5 && parts[2].len() == 15;
        let chars_ok = parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
        if lengths_ok && chars_ok {
            Ok(InstanceSetId(text.to_string()))
        } else {
            Err(format!(
                "instance set ID {text:?} is not of the form zzzzz-zzzzz-zzzzzzzzzzzzzzz \
                 (5, 5 and 15 lowercase letters or digits)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceSetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instance type as the cluster config declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceType {
    /// The cluster's name for the type (may differ from the provider's).
    pub name: String,
    /// The provider's name for the machine size, e.g. `m5.large`.
    pub provider_type: String,
    pub vcpus: u32,
    pub ram_bytes: u64,
    /// Scratch space that comes with the machine.
    pub included_scratch_bytes: u64,
    /// Scratch space the driver must attach (e.g. an EBS volume).
    pub added_scratch_bytes: u64,
    pub gpu_count: u32,
    /// GPU stack, e.g. `cuda`; empty without GPUs.
    pub gpu_kind: String,
    /// Price per hour in the cluster's currency.
    pub price: f64,
    /// Spot / preemptible capacity.
    pub preemptible: bool,
}

impl InstanceType {
    /// 1 vCPU, 1 GiB, no scratch, no GPU, free, on demand: what conformance checks and tests
    /// boot when the cluster config does not say more.
    pub fn minimal(provider_type: &str) -> Self {
        InstanceType {
            name: provider_type.to_string(),
            provider_type: provider_type.to_string(),
            vcpus: 1,
            ram_bytes: 1 << 30,
            included_scratch_bytes: 0,
            added_scratch_bytes: 0,
            gpu_count: 0,
            gpu_kind: String::new(),
            price: 0.0,
            preemptible: false,
        }
    }
}

/// What the host asks a driver to boot.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateRequest {
    pub instance_type: InstanceType,
    pub image_id: String,
    pub tags: Tags,
    /// Shell script to run once at boot (as root on a real VM); under 1 KiB.
    pub init_command: String,
    /// OpenSSH public key (`ssh-ed25519 AAAA… comment`) of the host's own SSH key. When it is
    /// `Some`, the driver must make the VM's remote user accept it (an `authorized_keys`
    /// line through user data, the cloud's key-pair or SSH-key metadata); the host logs in
    /// with nothing else. It is public: no secret travels in it.
    pub public_key: Option<String>,
}

/// A price that applied from `start` on.
#[derive(Clone, Debug, PartialEq)]
pub struct InstancePrice {
    pub start: SystemTime,
    pub price: f64,
}
