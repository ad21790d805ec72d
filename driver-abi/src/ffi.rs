//! The FFI-safe form of the interface: the root module every plugin exports, the trait objects
//! behind it, and conversions to and from the safe types.
//!
//! Everything here is part of the ABI. Read the evolution rules in the crate docs before
//! changing anything: fields and methods are only appended after the `last_prefix_field`
//! markers, never removed, renamed or reordered.

// abi_stable 0.11's `sabi_trait` expands to impls inside a const block, which rustc now warns
// about; the expansion is the crate's, not ours.
#![allow(non_local_definitions)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

use crate::{CapacityScope, CreateRequest, DriverError, InstancePrice, InstanceType, Tags};

/// The root module of a driver plugin. A prefix type: a host built against a newer
/// `driver-abi` can load a plugin built against an older one with the same prefix.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = DriverModuleRef)))]
#[sabi(missing_field(panic))]
pub struct DriverModule {
    /// The driver's name, e.g. `loopback`; the log target of its lines.
    pub driver_name: extern "C" fn() -> RStr<'static>,
    /// The driver crate's own version.
    pub driver_version: extern "C" fn() -> RStr<'static>,
    /// Hands the host's services to the plugin; called once, right after loading.
    pub attach_host: extern "C" fn(host: FfiHostBox),
    /// `params_json` is the instance set's parameters table from `plugins.toml`, as JSON.
    #[sabi(last_prefix_field)]
    pub new_instance_set: extern "C" fn(
        params_json: RStr<'_>,
        set_id: RStr<'_>,
        shared_tags: RVec<FfiTag>,
    ) -> RResult<FfiInstanceSetBox, FfiError>,
}

impl RootModule for DriverModuleRef {
    declare_root_module_statics! {DriverModuleRef}
    const BASE_NAME: &'static str = "dispatch_cloud_driver";
    const NAME: &'static str = "dispatch-cloud driver";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The `driver-abi` version this build exposes, as the loader compares it.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Services the host offers a plugin.
#[sabi_trait]
pub trait FfiHost: Send + Sync {
    /// `level` is `log::Level as u8` (1 = error … 5 = trace).
    fn log(&self, level: u8, module: RStr<'_>, message: RStr<'_>);
    /// The most verbose level the host records, in the same numbering (0 = off).
    #[sabi(last_prefix_field)]
    fn max_level(&self) -> u8;
}
pub type FfiHostBox = FfiHost_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiInstanceSet: Send + Sync {
    fn create(&self, request: FfiCreateRequest) -> RResult<FfiInstanceBox, FfiError>;
    fn instances(&self, tag_filter: RVec<FfiTag>) -> RResult<RVec<FfiInstanceBox>, FfiError>;
    fn quota_group(&self, instance_type: FfiInstanceType) -> RString;
    #[sabi(last_prefix_field)]
    fn stop(&self);
}
pub type FfiInstanceSetBox = FfiInstanceSet_TO<'static, RBox<()>>;

#[sabi_trait]
pub trait FfiInstance: Send + Sync {
    fn id(&self) -> RString;
    fn provider_type(&self) -> RString;
    fn tags(&self) -> RVec<FfiTag>;
    fn set_tags(&self, tags: RVec<FfiTag>) -> RResult<(), FfiError>;
    fn destroy(&self) -> RResult<(), FfiError>;
    fn address(&self) -> RString;
    fn remote_user(&self) -> RString;
    /// `host_key` is the OpenSSH form, `ssh-ed25519 AAAA…`.
    fn verify_host_key(&self, host_key: RStr<'_>) -> RResult<(), FfiError>;
    #[sabi(last_prefix_field)]
    fn price_history(&self, instance_type: FfiInstanceType) -> RResult<RVec<FfiPrice>, FfiError>;
}
pub type FfiInstanceBox = FfiInstance_TO<'static, RBox<()>>;

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiTag {
    pub key: RString,
    pub value: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiInstanceType {
    pub name: RString,
    pub provider_type: RString,
    pub vcpus: u32,
    /// Present only in the ABI-drift test fixture, so the host sees a layout it must refuse.
    #[cfg(feature = "abi-drift-fixture")]
    pub gpu_vram_bytes: u64,
    pub ram_bytes: u64,
    pub included_scratch_bytes: u64,
    pub added_scratch_bytes: u64,
    pub gpu_count: u32,
    pub gpu_kind: RString,
    pub price: f64,
    pub preemptible: bool,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiCreateRequest {
    pub instance_type: FfiInstanceType,
    pub image_id: RString,
    pub tags: RVec<FfiTag>,
    pub init_command: RString,
    pub public_key: ROption<RString>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiPrice {
    pub start_unix_ms: i64,
    pub price: f64,
}

/// A `DriverError` on the wire. `kind` is a plain number rather than an enum so new kinds can be
/// added without breaking the layout; a host that does not know a kind treats it as `Other`.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct FfiError {
    pub kind: u32,
    pub message: RString,
    /// For `RateLimit`: earliest retry, milliseconds since the Unix epoch.
    pub earliest_retry_unix_ms: i64,
    /// For `Capacity`: 0 = all, 1 = instance type, 2 = quota group.
    pub scope_kind: u32,
    pub scope_name: RString,
}

const KIND_OTHER: u32 = 0;
const KIND_RATE_LIMIT: u32 = 1;
const KIND_QUOTA: u32 = 2;
const KIND_CAPACITY: u32 = 3;
const KIND_NOT_IMPLEMENTED: u32 = 4;
const KIND_INVALID_CONFIG: u32 = 5;

const SCOPE_ALL: u32 = 0;
const SCOPE_TYPE: u32 = 1;
const SCOPE_GROUP: u32 = 2;

pub(crate) fn to_unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

impl From<DriverError> for FfiError {
    fn from(e: DriverError) -> Self {
        let mut out = FfiError {
            kind: KIND_OTHER,
            message: RString::new(),
            earliest_retry_unix_ms: 0,
            scope_kind: SCOPE_ALL,
            scope_name: RString::new(),
        };
        let message = match e {
            DriverError::RateLimit {
                earliest_retry,
                message,
            } => {
                out.kind = KIND_RATE_LIMIT;
                out.earliest_retry_unix_ms = to_unix_ms(earliest_retry);
                message
            }
            DriverError::Quota { message } => {
                out.kind = KIND_QUOTA;
                message
            }
            DriverError::Capacity { scope, message } => {
                out.kind = KIND_CAPACITY;
                match scope {
                    CapacityScope::All => {}
                    CapacityScope::InstanceType(t) => {
                        out.scope_kind = SCOPE_TYPE;
                        out.scope_name = t.into();
                    }
                    CapacityScope::QuotaGroup(g) => {
                        out.scope_kind = SCOPE_GROUP;
                        out.scope_name = g.into();
                    }
                }
                message
            }
            DriverError::NotImplemented { message } => {
                out.kind = KIND_NOT_IMPLEMENTED;
                message
            }
            DriverError::InvalidConfig { message } => {
                out.kind = KIND_INVALID_CONFIG;
                message
            }
            DriverError::Other { message } => message,
        };
        out.message = message.into();
        out
    }
}

impl From<FfiError> for DriverError {
    fn from(e: FfiError) -> Self {
        let message = e.message.into_string();
        match e.kind {
            KIND_RATE_LIMIT => DriverError::RateLimit {
                earliest_retry: from_unix_ms(e.earliest_retry_unix_ms),
                message,
            },
            KIND_QUOTA => DriverError::Quota { message },
            KIND_CAPACITY => DriverError::Capacity {
                scope: match e.scope_kind {
                    SCOPE_TYPE => CapacityScope::InstanceType(e.scope_name.into_string()),
                    SCOPE_GROUP => CapacityScope::QuotaGroup(e.scope_name.into_string()),
                    _ => CapacityScope::All,
                },
                message,
            },
            KIND_NOT_IMPLEMENTED => DriverError::NotImplemented { message },
            KIND_INVALID_CONFIG => DriverError::InvalidConfig { message },
            _ => DriverError::Other { message },
        }
    }
}

pub(crate) fn tags_to_ffi(tags: &Tags) -> RVec<FfiTag> {
    tags.iter()
        .map(|(k, v)| FfiTag {
            key: k.as_str().into(),
            value: v.as_str().into(),
        })
        .collect()
}

pub(crate) fn tags_from_ffi(tags: RVec<FfiTag>) -> Tags {
    tags.into_iter()
        .map(|t| (t.key.into_string(), t.value.into_string()))
        .collect()
}

impl From<&InstanceType> for FfiInstanceType {
    fn from(t: &InstanceType) -> Self {
        FfiInstanceType {
            name: t.name.as_str().into(),
            provider_type: t.provider_type.as_str().into(),
            vcpus: t.vcpus,
            #[cfg(feature = "abi-drift-fixture")]
            gpu_vram_bytes: 0,
            ram_bytes: t.ram_bytes,
            included_scratch_bytes: t.included_scratch_bytes,
            added_scratch_bytes: t.added_scratch_bytes,
            gpu_count: t.gpu_count,
            gpu_kind: t.gpu_kind.as_str().into(),
            price: t.price,
            preemptible: t.preemptible,
        }
    }
}

impl From<FfiInstanceType> for InstanceType {
    fn from(t: FfiInstanceType) -> Self {
        InstanceType {
            name: t.name.into_string(),
            provider_type: t.provider_type.into_string(),
            vcpus: t.vcpus,
            ram_bytes: t.ram_bytes,
            included_scratch_bytes: t.included_scratch_bytes,
            added_scratch_bytes: t.added_scratch_bytes,
            gpu_count: t.gpu_count,
            gpu_kind: t.gpu_kind.into_string(),
            price: t.price,
            preemptible: t.preemptible,
        }
    }
}

impl From<&CreateRequest> for FfiCreateRequest {
    fn from(r: &CreateRequest) -> Self {
        FfiCreateRequest {
            instance_type: (&r.instance_type).into(),
            image_id: r.image_id.as_str().into(),
            tags: tags_to_ffi(&r.tags),
            init_command: r.init_command.as_str().into(),
            public_key: r.public_key.as_deref().map(RString::from).into(),
        }
    }
}

impl From<FfiCreateRequest> for CreateRequest {
    fn from(r: FfiCreateRequest) -> Self {
        CreateRequest {
            instance_type: r.instance_type.into(),
            image_id: r.image_id.into_string(),
            tags: tags_from_ffi(r.tags),
            init_command: r.init_command.into_string(),
            public_key: r.public_key.into_option().map(RString::into_string),
        }
    }
}

impl From<&InstancePrice> for FfiPrice {
    fn from(p: &InstancePrice) -> Self {
        FfiPrice {
            start_unix_ms: to_unix_ms(p.start),
            price: p.price,
        }
    }
}

impl From<FfiPrice> for InstancePrice {
    fn from(p: FfiPrice) -> Self {
        InstancePrice {
            start: from_unix_ms(p.start_unix_ms),
            price: p.price,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: DriverError) -> DriverError {
        DriverError::from(FfiError::from(e))
    }

    #[test]
    fn every_error_kind_survives_the_boundary() {
        let retry = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let cases = vec![
            DriverError::rate_limit(retry, "slow down"),
            DriverError::quota("too many"),
            DriverError::capacity(CapacityScope::InstanceType("m5.large".into()), "none"),
            DriverError::capacity(CapacityScope::QuotaGroup("m-spot".into()), "none"),
            DriverError::capacity(CapacityScope::All, "none"),
            DriverError::not_implemented("no host keys"),
            DriverError::invalid_config("region: missing"),
            DriverError::other("boom"),
        ];
        for case in cases {
            assert_eq!(round_trip(case.clone()), case);
        }
    }

    #[test]
    fn unknown_error_kind_from_a_newer_plugin_becomes_other() {
        let e = FfiError {
            kind: 99,
            message: "from the future".into(),
            earliest_retry_unix_ms: 0,
            scope_kind: 0,
            scope_name: RString::new(),
        };
        assert_eq!(DriverError::from(e), DriverError::other("from the future"));
    }

    #[test]
    fn times_before_the_epoch_round_trip() {
        let t = UNIX_EPOCH - Duration::from_millis(5_000);
        assert_eq!(from_unix_ms(to_unix_ms(t)), t);
    }
}
