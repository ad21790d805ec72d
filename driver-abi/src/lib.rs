//! # driver-abi: the contract between dispatch-cloud and its cloud driver plugins
//!
//! A driver is a `cdylib` that implements three safe traits — [`Driver`], [`InstanceSet`] and
//! [`Instance`] — and exports them with [`export_driver!`]. The host loads the library at run
//! time, checks that it was built against a compatible `driver-abi`, and calls it through the
//! FFI-safe types in [`ffi`]. Driver authors never touch those types; see `README.md` beside this
//! crate for the step-by-step guide.
//!
//! ## Calls are blocking
//! The host calls every method on a blocking thread and may call them concurrently: all
//! implementations must be `Send + Sync`. A driver that needs async I/O runs its own runtime
//! inside the plugin (each cdylib links its own tokio; no runtime object crosses the boundary,
//! and a plugin future touching tokio directly would panic under the host's runtime).
//!
//! ## Panics
//! Every call into the driver runs under `catch_unwind`; a panic comes back to the host as
//! `DriverError::Other("driver panicked: …")`. Build plugins with the default `panic = "unwind"`:
//! with `panic = "abort"` a panic ends the host process and nothing can catch it.
//!
//! ## Logging
//! Use the `log` macros. Once the host has loaded the plugin, the plugin's records are forwarded
//! to the host's logger with the driver's name as the target.
//!
//! ## Evolution rules (what keeps old plugins loading)
//! * The root module [`ffi::DriverModule`] and the trait objects are abi_stable *prefix types*.
//!   New fields and trait methods are only ever **appended** after the field or method marked
//!   `#[sabi(last_prefix_field)]`; a host reading a field an older plugin lacks gets a panic
//!   by design (`missing_field(panic)`), so new optional capabilities must be checked by the host
//!   before use.
//! * Never remove, rename or reorder a field, a method or a type: names are part of the layout.
//! * Plain structs ([`ffi::FfiInstanceType`], [`ffi::FfiCreateRequest`], …) are frozen; new
//!   information goes into new methods or new types.
//! * Error kinds are numbers in [`ffi::FfiError`], not an exhaustive enum, so kinds can be added;
//!   a host that meets an unknown kind treats it as `Other`.
//! * abi_stable compares versions by semver: in 0.x the host accepts a plugin with the same
//!   minor version (0.1.x with 0.1.y). Any change to a frozen type, or moving a
//!   `last_prefix_field` marker, is a **major** change (0.1 → 0.2) and every plugin must be
//!   rebuilt. Appending a prefix field is a minor change in 1.x and a patch change in 0.x.
//! * The loader checks all of this — the abi_stable header, the version, then the layout of
//!   every type reachable from the root module — before any plugin code runs.

pub mod backoff;
pub mod error;
pub mod export;
pub mod ffi;
pub mod import;
pub mod trust;
pub mod types;

pub use error::{CapacityScope, DriverError};
pub use types::{CreateRequest, InstancePrice, InstanceSetId, InstanceType, Tags};

/// Re-exported for [`export_driver!`]'s own paths. A plugin must still list `abi_stable` as a
/// dependency: abi_stable's export attribute names `::abi_stable` directly (see the guide).
#[doc(hidden)]
pub use abi_stable;

/// A cloud driver: a factory of instance sets. Implemented on a type with no state; the host
/// creates one instance set per `[[instance_sets]]` entry in `plugins.toml`.
pub trait Driver: 'static {
    /// The driver's name (`loopback`, `aws`, …), shown by `dispatch-cloud plugins` and used as
    /// the log target of the plugin's lines.
    const NAME: &'static str;
    /// The driver's own version; `env!("CARGO_PKG_VERSION")` is the usual choice.
    const VERSION: &'static str;

    /// Validates `params` (the instance set's `parameters` table, as JSON) and connects.
    /// `shared_tags` must be added to everything the set creates. A bad parameter is
    /// `InvalidConfig` naming it.
    fn new_instance_set(
        params: &serde_json::Value,
        set_id: &InstanceSetId,
        shared_tags: &Tags,
        host: &HostServices,
    ) -> Result<Box<dyn InstanceSet>, DriverError>;
}

/// The VMs of one instance set. All methods may be called concurrently.
pub trait InstanceSet: Send + Sync {
    /// Boots a VM. The VM carries `request.tags` plus the set ID, which the driver adds in
    /// its own way (a tag, a label, a name prefix: the host does not put it in the tags), and
    /// runs `request.init_command` at boot. With `request.public_key`, the remote user must
    /// accept that key for SSH once the VM has booted.
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError>;
    /// VMs of this set carrying every tag in `tag_filter` (all of the set's VMs for an empty
    /// filter). May include VMs that are still booting or shutting down.
    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError>;
    /// Which account limit `instance_type` counts against; must differ between preemptible and
    /// on-demand capacity. `""` means one shared limit.
    fn quota_group(&self, instance_type: &InstanceType) -> String;
    /// Releases the set's resources (connections, threads). VMs are left running.
    fn stop(&self);
}

/// One VM.
pub trait Instance: Send + Sync {
    /// The provider's ID, stable for the VM's whole life.
    fn id(&self) -> String;
    fn provider_type(&self) -> String;
    fn tags(&self) -> Tags;
    /// Replaces all tags.
    fn set_tags(&self, tags: &Tags) -> Result<(), DriverError>;
    fn destroy(&self) -> Result<(), DriverError>;
    /// `host:port` or `host` for SSH; empty while the cloud has not assigned one.
    fn address(&self) -> String;
    /// The user to log in as over SSH.
    fn remote_user(&self) -> String;
    /// Checks the SSH host key the VM presented (`ssh-ed25519 AAAA…`). Return
    /// `NotImplemented` when the driver cannot know the key: the host then checks the instance
    /// secret it wrote at boot instead.
    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError>;
    fn price_history(
        &self,
        instance_type: &InstanceType,
    ) -> Result<Vec<InstancePrice>, DriverError>;
}

/// What the host offers a driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HostServices {
    driver_name: &'static str,
}

impl HostServices {
    /// What the host hands a driver named `driver_name`; public so a driver's own unit tests
    /// can call `new_instance_set` without a host.
    pub fn new(driver_name: &'static str) -> Self {
        HostServices { driver_name }
    }

    /// Writes a line to the host's log under the driver's name (as the `log` macros do).
    pub fn log(&self, level: log::Level, message: &str) {
        export::host_log(level, message);
    }

    pub fn driver_name(&self) -> &'static str {
        self.driver_name
    }
}

/// Deserializes a driver's parameters; a failure is `InvalidConfig` naming the parameter
/// (serde's message includes the field, e.g. "unknown field `regoin`, expected one of …").
pub fn parse_params<T: serde::de::DeserializeOwned>(
    params: &serde_json::Value,
) -> Result<T, DriverError> {
    serde_json::from_value(params.clone())
        .map_err(|e| DriverError::invalid_config(format!("driver parameters: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_ids_follow_the_5_5_15_form() {
        assert!(InstanceSetId::parse("zzzzz-zzzzz-zzzzzzzzzzzzzzz").is_ok());
        assert!(InstanceSetId::parse("abc12-9zz00-0123456789abcde").is_ok());
        for bad in [
            "",
            "zzzzz-zzzzz-zzzzzzzzzzzzzz",
            "zzzzz-zzzzz-zzzzzzzzzzzzzzzz",
            "zzzzZ-zzzzz-zzzzzzzzzzzzzzz",
            "zzzzz_zzzzz-zzzzzzzzzzzzzzz",
            "zzzzz-zzzzz-zzzzzzzzzzzzzzz-",
        ] {
            let err = InstanceSetId::parse(bad).expect_err(bad);
            assert!(err.contains("zzzzz-zzzzz-zzzzzzzzzzzzzzz"), "{err}");
        }
    }

    #[test]
    fn bad_parameters_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct P {
            region: String,
        }
        let err = parse_params::<P>(&serde_json::json!({"regoin": "x"})).expect_err("typo");
        assert_eq!(err.kind(), "invalid_config");
        assert!(err.to_string().contains("regoin"), "{err}");
    }
}
