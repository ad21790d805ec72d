//! The plugin side of the boundary: adapters from the safe traits to the FFI trait objects.
//! Every call is wrapped in `catch_unwind`, so a panicking driver returns
//! `Other("driver panicked: …")` instead of unwinding into (and aborting) the host.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::RwLock;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec};

use crate::ffi::{
    tags_from_ffi, tags_to_ffi, DriverModule, DriverModuleRef, FfiCreateRequest, FfiError,
    FfiHostBox, FfiInstance, FfiInstanceBox, FfiInstanceSet, FfiInstanceSetBox, FfiInstanceSet_TO,
    FfiInstanceType, FfiInstance_TO, FfiPrice, FfiTag,
};
use crate::{Driver, DriverError, HostServices, Instance, InstanceSet, InstanceSetId};

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs `f`, turning a panic into `DriverError::Other`.
fn guarded<T>(f: impl FnOnce() -> Result<T, DriverError>) -> RResult<T, FfiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => RResult::RErr(
            DriverError::other(format!("driver panicked: {}", panic_message(&*payload))).into(),
        ),
    }
}

/// For calls without an error channel: a panic yields `fallback`.
fn guarded_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

struct ExportedInstanceSet(Box<dyn InstanceSet>);

impl FfiInstanceSet for ExportedInstanceSet {
    fn create(&self, request: FfiCreateRequest) -> RResult<FfiInstanceBox, FfiError> {
        guarded(|| self.0.create(&request.into()).map(export_instance))
    }

    fn instances(&self, tag_filter: RVec<FfiTag>) -> RResult<RVec<FfiInstanceBox>, FfiError> {
        guarded(|| {
            let filter = tags_from_ffi(tag_filter);
            let list = self.0.instances(&filter)?;
            Ok(list.into_iter().map(export_instance).collect())
        })
    }

    fn quota_group(&self, instance_type: FfiInstanceType) -> RString {
        guarded_or(RString::new(), || {
            self.0.quota_group(&instance_type.into()).into()
        })
    }

    fn stop(&self) {
        guarded_or((), || self.0.stop())
    }
}

struct ExportedInstance(Box<dyn Instance>);

fn export_instance(instance: Box<dyn Instance>) -> FfiInstanceBox {
    FfiInstance_TO::from_value(ExportedInstance(instance), TD_Opaque)
}

impl FfiInstance for ExportedInstance {
    fn id(&self) -> RString {
        guarded_or(RString::new(), || self.0.id().into())
    }

    fn provider_type(&self) -> RString {
        guarded_or(RString::new(), || self.0.provider_type().into())
    }

    fn tags(&self) -> RVec<FfiTag> {
        guarded_or(RVec::new(), || tags_to_ffi(&self.0.tags()))
    }

    fn set_tags(&self, tags: RVec<FfiTag>) -> RResult<(), FfiError> {
        guarded(|| self.0.set_tags(&tags_from_ffi(tags)))
    }

    fn destroy(&self) -> RResult<(), FfiError> {
        guarded(|| self.0.destroy())
    }

    fn address(&self) -> RString {
        guarded_or(RString::new(), || self.0.address().into())
    }

    fn remote_user(&self) -> RString {
        guarded_or(RString::new(), || self.0.remote_user().into())
    }

    fn verify_host_key(&self, host_key: RStr<'_>) -> RResult<(), FfiError> {
        guarded(|| self.0.verify_host_key(host_key.as_str()))
    }

    fn price_history(&self, instance_type: FfiInstanceType) -> RResult<RVec<FfiPrice>, FfiError> {
        guarded(|| {
            let prices = self.0.price_history(&instance_type.into())?;
            Ok(prices.iter().map(FfiPrice::from).collect())
        })
    }
}

/// The host's services, once attached. One per plugin library (each cdylib has its own copy of
/// this static), shared by all its instance sets.
static HOST: RwLock<Option<FfiHostBox>> = RwLock::new(None);

/// Forwards the plugin's `log` records to the host.
struct ForwardingLogger;

impl log::Log for ForwardingLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Ok(guard) = HOST.read() {
            if let Some(host) = guard.as_ref() {
                let message = record.args().to_string();
                host.log(
                    record.level() as u8,
                    record.module_path().unwrap_or("").into(),
                    message.as_str().into(),
                );
            }
        }
    }

    fn flush(&self) {}
}

fn level_filter_from(level: u8) -> log::LevelFilter {
    match level {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

#[doc(hidden)]
pub extern "C" fn attach_host_impl(host: FfiHostBox) {
    let level = host.max_level();
    if let Ok(mut slot) = HOST.write() {
        *slot = Some(host);
    }
    // Fails only when this library already installed it: the new host is in HOST either way.
    let _ = log::set_logger(&ForwardingLogger);
    log::set_max_level(level_filter_from(level));
}

#[doc(hidden)]
pub extern "C" fn driver_name_impl<D: Driver>() -> RStr<'static> {
    RStr::from_str(D::NAME)
}

#[doc(hidden)]
pub extern "C" fn driver_version_impl<D: Driver>() -> RStr<'static> {
    RStr::from_str(D::VERSION)
}

#[doc(hidden)]
pub extern "C" fn new_instance_set_impl<D: Driver>(
    params_json: RStr<'_>,
    set_id: RStr<'_>,
    shared_tags: RVec<FfiTag>,
) -> RResult<FfiInstanceSetBox, FfiError> {
    guarded(|| {
        let params: serde_json::Value = if params_json.as_str().trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(params_json.as_str())
                .map_err(|e| DriverError::invalid_config(format!("parameters: {e}")))?
        };
        let set_id = InstanceSetId::parse(set_id.as_str()).map_err(DriverError::invalid_config)?;
        let host = HostServices::new(D::NAME);
        let set = D::new_instance_set(&params, &set_id, &tags_from_ffi(shared_tags), &host)?;
        Ok(FfiInstanceSet_TO::from_value(
            ExportedInstanceSet(set),
            TD_Opaque,
        ))
    })
}

/// Builds the root module for driver `D`. Called by [`export_driver!`](crate::export_driver).
#[doc(hidden)]
pub fn root_module<D: Driver>() -> DriverModuleRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    DriverModule {
        driver_name: driver_name_impl::<D>,
        driver_version: driver_version_impl::<D>,
        attach_host: attach_host_impl,
        new_instance_set: new_instance_set_impl::<D>,
    }
    .leak_into_prefix()
}

/// Logs through the host, as the plugin's `log` macros do; handy where a driver wants to name
/// its service explicitly.
pub(crate) fn host_log(level: log::Level, message: &str) {
    if let Ok(guard) = HOST.read() {
        if let Some(host) = guard.as_ref() {
            host.log(level as u8, "".into(), message.into());
        }
    }
}

/// Exports `$driver` (a type implementing [`Driver`](crate::Driver)) as this cdylib's root
/// module. Use it once per plugin crate.
#[macro_export]
macro_rules! export_driver {
    ($driver:ty) => {
        #[$crate::abi_stable::export_root_module]
        pub fn dispatch_cloud_driver_root_module() -> $crate::ffi::DriverModuleRef {
            $crate::export::root_module::<$driver>()
        }
    };
}
