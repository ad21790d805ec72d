//! The seams the pool and the dispatcher work through: the cloud (`CloudOps` over a driver in
//! production, an in-memory cloud in tests) and a factory of executors that run commands on a
//! VM (`ssh::SshFactory` in production, a scripted VM in tests).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use driver_abi::{CreateRequest, DriverError, Instance, InstanceType, Tags};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::instance_secret;
use crate::ssh::{CommandOutput, SshError};

/// How the boot of a VM this process created ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootOutcome {
    /// Its boot probe passed and the runner is deployed.
    Success,
    /// The boot timeout passed first.
    Failure,
    /// Shut down before it booted (drained, killed, no longer needed).
    Aborted,
    /// Gone from the cloud's list before it booted.
    Disappeared,
}

impl BootOutcome {
    pub const ALL: [BootOutcome; 4] = [
        BootOutcome::Success,
        BootOutcome::Failure,
        BootOutcome::Aborted,
        BootOutcome::Disappeared,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BootOutcome::Success => "success",
            BootOutcome::Failure => "failure",
            BootOutcome::Aborted => "aborted",
            BootOutcome::Disappeared => "disappeared",
        }
    }
}

/// What the pool and the dispatcher report as it happens, for metrics (`metrics::Metrics`
/// implements it). Calls are cheap and never fail.
pub trait FleetObserver: Send + Sync {
    fn boot_outcome(&self, outcome: BootOutcome);
    /// An instance vanished from the cloud's list while in this state.
    fn instance_disappeared(&self, state: &str);
    /// From a create returning to the first SSH session that reached the VM.
    fn time_to_ssh(&self, took: Duration);
    /// From that first SSH session to booted (boot probe passed, runner deployed).
    fn time_to_ready(&self, took: Duration);
    /// From deciding to shut a VM down to the driver confirming its destroy.
    fn shutdown_to_gone(&self, took: Duration);
    /// A run probe (`runner list`) came back.
    fn probe_finished(&self, ok: bool, took: Duration);
    /// A container's start returned: how long since it was submitted.
    fn container_started(&self, waited: Duration);
    /// A worker's event stream ended (a probe reopens it).
    fn event_stream_ended(&self);
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An instance as a listing or a create returned it. The driver's answers are read once, on a
/// blocking thread (`Listed::read`), so the event loop never calls into a plugin.
#[derive(Clone)]
pub struct Listed {
    pub instance: Arc<dyn Instance>,
    pub id: String,
    pub provider_type: String,
    /// Empty while the cloud has not assigned one.
    pub address: String,
    pub remote_user: String,
    pub tags: Tags,
}

impl Listed {
    /// Reads what the host needs from the driver. Blocking: call it on a blocking thread.
    pub fn read(instance: Arc<dyn Instance>) -> Self {
        Listed {
            id: instance.id(),
            provider_type: instance.provider_type(),
            address: instance.address(),
            remote_user: instance.remote_user(),
            tags: instance.tags(),
            instance,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            address: self.address.clone(),
            user: self.remote_user.clone(),
            secret: self.tags.get(instance_secret::TAG).cloned(),
        }
    }
}

/// Where and as whom commands reach a VM, and the secret that proves its identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub user: String,
    pub secret: Option<String>,
}

/// Why a create was not attempted or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("create held off: {0}")]
    HeldOff(&'static str),
    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// The cloud as the dispatcher uses it: an instance set behind the host's policy wrappers.
/// Implemented by `cloudops::CloudOps` and by the tests' in-memory cloud. Every method may run
/// concurrently; the query methods answer from memory and never call a driver.
pub trait Cloud: Send + Sync {
    /// The set's instances; `Ok(None)` while listing is held off.
    fn instances(&self) -> BoxFuture<'_, Result<Option<Vec<Listed>>, DriverError>>;
    /// `instances` counts every instance including pending creates (for quota bookkeeping).
    fn create(
        &self,
        request: CreateRequest,
        instances: usize,
    ) -> BoxFuture<'_, Result<Listed, CreateError>>;
    fn destroy(&self, instance: Arc<dyn Instance>) -> BoxFuture<'_, Result<(), DriverError>>;
    fn set_tags(
        &self,
        instance: Arc<dyn Instance>,
        tags: Tags,
    ) -> BoxFuture<'_, Result<(), DriverError>>;
    /// How many instances may still be added to `instances`; 0 = at quota.
    fn quota_headroom(&self, instances: usize) -> usize;
    /// How many creates may start now (rate limit, concurrency cap).
    fn creates_allowed(&self) -> usize;
    /// The type (or its quota group, or the whole cloud) is in a capacity hold-off.
    fn at_capacity(&self, t: &InstanceType) -> bool;
    /// The listing's count, so a quota learned from errors is forgotten once below it.
    fn observe_instance_count(&self, instances: usize);
    /// The earliest moment a hold-off ends, so the dispatcher can wake then.
    fn next_holdoff_end(&self) -> Option<Instant>;
    fn stop(&self);
}

/// Runs commands on one VM. Implemented by `ssh::SshExec` and the tests' scripted VMs.
pub trait Exec: Send + Sync {
    fn run<'a>(
        &'a self,
        command: &'a str,
        stdin: &'a [u8],
    ) -> BoxFuture<'a, Result<CommandOutput, SshError>>;
    /// Runs `command` without input, handing its stdout to `stdout` as it arrives; the output
    /// returned holds stderr and the exit status. By default (for executors that cannot
    /// stream) the whole stdout arrives as one chunk when the command ends.
    fn stream<'a>(
        &'a self,
        command: &'a str,
        stdout: mpsc::Sender<Vec<u8>>,
    ) -> BoxFuture<'a, Result<CommandOutput, SshError>> {
        Box::pin(async move {
            let mut out = self.run(command, b"").await?;
            let bytes = std::mem::take(&mut out.stdout);
            if !bytes.is_empty() {
                // A reader that went away no longer wants it.
                let _ = stdout.send(bytes).await;
            }
            Ok(out)
        })
    }
    /// The instance's address, user or secret changed at a listing: later commands go there.
    fn retarget(&self, endpoint: &Endpoint);
    /// Drops the connection (the VM is gone).
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Makes the executor of a newly seen instance.
pub trait ExecFactory: Send + Sync {
    fn executor(&self, listed: &Listed) -> Arc<dyn Exec>;
}
