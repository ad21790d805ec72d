//! The host side of the boundary: a loaded plugin's FFI objects wrapped back into the safe
//! traits, so the host's code (and its tests) work on `dyn InstanceSet` whatever is behind it.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::RStr;

use crate::ffi::{
    tags_to_ffi, DriverModuleRef, FfiHost, FfiHost_TO, FfiInstanceBox, FfiInstanceSetBox,
    FfiInstanceType,
};
use crate::{CreateRequest, DriverError, Instance, InstancePrice, InstanceSet, InstanceType, Tags};

/// A loaded driver library, seen through safe calls.
#[derive(Clone, Copy)]
pub struct ImportedDriver {
    module: DriverModuleRef,
}

impl ImportedDriver {
    pub fn new(module: DriverModuleRef) -> Self {
        ImportedDriver { module }
    }

    pub fn name(&self) -> String {
        (self.module.driver_name())().to_string()
    }

    pub fn version(&self) -> String {
        (self.module.driver_version())().to_string()
    }

    /// Sends this plugin's log lines to the host's `log` under the target `target`.
    pub fn attach_logger(&self, target: &str) {
        let host = FfiHost_TO::from_value(
            HostLogger {
                target: target.to_string(),
            },
            TD_Opaque,
        );
        (self.module.attach_host())(host);
    }

    pub fn new_instance_set(
        &self,
        params: &serde_json::Value,
        set_id: &crate::InstanceSetId,
        shared_tags: &Tags,
    ) -> Result<Box<dyn InstanceSet>, DriverError> {
        let params_json = params.to_string();
        let result = (self.module.new_instance_set())(
            RStr::from_str(&params_json),
            RStr::from_str(set_id.as_str()),
            tags_to_ffi(shared_tags),
        );
        match result.into_result() {
            Ok(set) => Ok(Box::new(ImportedInstanceSet(set))),
            Err(e) => Err(e.into()),
        }
    }
}

struct HostLogger {
    target: String,
}

impl FfiHost for HostLogger {
    fn log(&self, level: u8, module: RStr<'_>, message: RStr<'_>) {
        let level = match level {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        let module = module.as_str();
        log::logger().log(
            &log::Record::builder()
                .target(&self.target)
                .level(level)
                .module_path(if module.is_empty() {
                    None
                } else {
                    Some(module)
                })
                .args(format_args!("{}", message.as_str()))
                .build(),
        );
    }

    fn max_level(&self) -> u8 {
        log::max_level() as u8
    }
}

struct ImportedInstanceSet(FfiInstanceSetBox);

impl InstanceSet for ImportedInstanceSet {
    fn create(&self, request: &CreateRequest) -> Result<Box<dyn Instance>, DriverError> {
        match self.0.create(request.into()).into_result() {
            Ok(i) => Ok(Box::new(ImportedInstance(i))),
            Err(e) => Err(e.into()),
        }
    }

    fn instances(&self, tag_filter: &Tags) -> Result<Vec<Box<dyn Instance>>, DriverError> {
        match self.0.instances(tags_to_ffi(tag_filter)).into_result() {
            Ok(list) => Ok(list
                .into_iter()
                .map(|i| Box::new(ImportedInstance(i)) as Box<dyn Instance>)
                .collect()),
            Err(e) => Err(e.into()),
        }
    }

    fn quota_group(&self, instance_type: &InstanceType) -> String {
        self.0
            .quota_group(FfiInstanceType::from(instance_type))
            .into_string()
    }

    fn stop(&self) {
        self.0.stop()
    }
}

struct ImportedInstance(FfiInstanceBox);

impl Instance for ImportedInstance {
    fn id(&self) -> String {
        self.0.id().into_string()
    }

    fn provider_type(&self) -> String {
        self.0.provider_type().into_string()
    }

    fn tags(&self) -> Tags {
        crate::ffi::tags_from_ffi(self.0.tags())
    }

    fn set_tags(&self, tags: &Tags) -> Result<(), DriverError> {
        self.0
            .set_tags(tags_to_ffi(tags))
            .into_result()
            .map_err(Into::into)
    }

    fn destroy(&self) -> Result<(), DriverError> {
        self.0.destroy().into_result().map_err(Into::into)
    }

    fn address(&self) -> String {
        self.0.address().into_string()
    }

    fn remote_user(&self) -> String {
        self.0.remote_user().into_string()
    }

    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        self.0
            .verify_host_key(RStr::from_str(host_key))
            .into_result()
            .map_err(Into::into)
    }

    fn price_history(
        &self,
        instance_type: &InstanceType,
    ) -> Result<Vec<InstancePrice>, DriverError> {
        match self
            .0
            .price_history(FfiInstanceType::from(instance_type))
            .into_result()
        {
            Ok(prices) => Ok(prices.into_iter().map(InstancePrice::from).collect()),
            Err(e) => Err(e.into()),
        }
    }
}
