//! The blocking face of Google's async Compute client: the plugin's own tokio runtime, the
//! two clients the driver uses, credentials, and the per-call timeout.

use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use google_cloud_auth::credentials::{self, service_account, user_account, Credentials};
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model::{operation, Operation};
use google_cloud_gax::retry_policy::NeverRetry;

use crate::errors::Failure;

/// What the VMs' API calls may do: only Compute.
const COMPUTE_SCOPE: &str = "https://www.googleapis.com/auth/compute";

/// One runtime for the plugin's whole life: never dropped, so no set can be dropped inside
/// some other runtime's async context (which would panic). The host's runtime is a different
/// copy of tokio (each cdylib links its own) and cannot drive these futures.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // The client library leaves the TLS provider to the application (see Cargo.toml),
            // and HTTP clients are built as early as the credentials: install it first.
            let _ = rustls::crypto::ring::default_provider().install_default();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("gce-driver")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the driver's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Where credentials come from, and why they failed.
#[derive(Debug)]
pub enum CredentialsError {
    /// `credentials_file` is unreadable or not a key the driver knows.
    File(String),
    /// Application-default credentials could not be built or do not yield a token.
    Default(String),
}

/// Credentials from `file` (a service-account key or an `authorized_user` file, as
/// `gcloud auth application-default login` writes), else application-default credentials
/// (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file, then the metadata server on GCE).
pub fn credentials(file: Option<&Path>) -> Result<Credentials, CredentialsError> {
    // Building credentials starts background token refresh, which needs a runtime.
    let _runtime = runtime().map_err(CredentialsError::Default)?.enter();
    let Some(path) = file else {
        return credentials::Builder::default()
            .with_scopes([COMPUTE_SCOPE])
            .build()
            .map_err(|e| CredentialsError::Default(e.to_string()));
    };
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CredentialsError::File(format!("{shown}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CredentialsError::File(format!("{shown}: not JSON: {e}")))?;
    let kind = json.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let built = match kind {
        "service_account" => service_account::Builder::new(json)
            .with_access_specifier(service_account::AccessSpecifier::from_scopes([
                COMPUTE_SCOPE,
            ]))
            .build(),
        "authorized_user" => user_account::Builder::new(json)
            .with_scopes([COMPUTE_SCOPE])
            .build(),
        other => {
            return Err(CredentialsError::File(format!(
                "{shown}: credential type {other:?} is not supported here (use \"service_account\" or \"authorized_user\", or point GOOGLE_APPLICATION_CREDENTIALS at it and leave credentials_file out)"
            )))
        }
    };
    built.map_err(|e| CredentialsError::File(format!("{shown}: {e}")))
}

/// The two Compute clients of one instance set.
pub struct Compute {
    pub instances: Instances,
    pub operations: ZoneOperations,
    pub project: String,
    request_timeout: Duration,
}

impl Compute {
    pub fn connect(
        endpoint: &str,
        credentials: Credentials,
        project: &str,
        request_timeout: Duration,
    ) -> Result<Compute, String> {
        let rt = runtime()?;
        let (instances, operations) = rt.block_on(async {
            // The host paces and retries failed calls itself, with its own back-off; a client
            // retrying underneath would hide throttles from it and double the wait.
            let instances = Instances::builder()
                .with_endpoint(endpoint)
                .with_credentials(credentials.clone())
                .with_retry_policy(NeverRetry)
                .build()
                .await
                .map_err(|e| format!("Compute client for {endpoint}: {e}"))?;
            let operations = ZoneOperations::builder()
                .with_endpoint(endpoint)
                .with_credentials(credentials)
                .with_retry_policy(NeverRetry)
                .build()
                .await
                .map_err(|e| format!("Compute operations client for {endpoint}: {e}"))?;
            Ok::<_, String>((instances, operations))
        })?;
        Ok(Compute {
            instances,
            operations,
            project: project.to_string(),
            request_timeout,
        })
    }

    /// Runs one API call to completion on the plugin's runtime, within the request timeout.
    pub fn call<T>(
        &self,
        call: impl Future<Output = google_cloud_gax::Result<T>>,
    ) -> Result<T, Failure> {
        self.call_within(self.request_timeout, call)
            .map_err(|timeout| timeout.unwrap_or_else(|| self.timed_out(self.request_timeout)))
    }

    fn timed_out(&self, limit: Duration) -> Failure {
        Failure::local(format!(
            "no answer within {limit:?} (request_timeout_seconds)"
        ))
    }

    /// `Err(None)` when `limit` passed first.
    fn call_within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = google_cloud_gax::Result<T>>,
    ) -> Result<T, Option<Failure>> {
        let rt = runtime().map_err(|e| Some(Failure::local(e)))?;
        rt.block_on(async {
            match tokio::time::timeout(limit, call).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Some(Failure::from_gax(&e))),
                Err(_) => Err(None),
            }
        })
    }

    /// Waits for `op` in `zone` to finish, and returns its failure if it failed.
    /// `zoneOperations.wait` answers when the operation is done or after up to two minutes;
    /// a wait that takes longer than that is asked again, one that answers early and undone
    /// is followed by a pause, so a slow operation is neither cut short nor hammered.
    pub fn wait(&self, zone: &str, mut op: Operation, limit: Duration) -> Result<(), Failure> {
        const LONGEST_WAIT: Duration = Duration::from_secs(130);
        const POLL_GAP: Duration = Duration::from_secs(1);
        let deadline = Instant::now() + limit;
        while op.status != Some(operation::Status::Done) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::local(format!(
                    "operation {} in {zone} not done after {limit:?} (operation_timeout_seconds)",
                    op.name.as_deref().unwrap_or("?")
                )));
            }
            let name = op
                .name
                .clone()
                .ok_or_else(|| Failure::local("the operation has no name"))?;
            let asked = Instant::now();
            let answer = self.call_within(
                LONGEST_WAIT.max(self.request_timeout).min(left),
                self.operations
                    .wait()
                    .set_project(&self.project)
                    .set_zone(zone)
                    .set_operation(name)
                    .send(),
            );
            match answer {
                Ok(next) => op = next,
                Err(None) => continue,
                Err(Some(f)) => return Err(f),
            }
            let early = asked.elapsed() < POLL_GAP;
            if op.status != Some(operation::Status::Done) && early {
                if let Ok(rt) = runtime() {
                    rt.block_on(tokio::time::sleep(POLL_GAP.min(left)));
                }
            }
        }
        match Failure::from_operation(&op) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}
