//! Compute Engine failures → typed driver errors.
//!
//! A failure reaches the driver two ways: as an HTTP error on the call (rate limits, bad
//! requests, missing resources, credentials) or inside a finished zone operation (quota, zone
//! capacity). Both are flattened into a [`Failure`] first, so one classifier serves both.

use std::time::{Duration, SystemTime};

use driver_abi::backoff::Backoff;
use driver_abi::{CapacityScope, DriverError};
use google_cloud_compute_v1::model::Operation;
use google_cloud_gax::error::rpc::StatusDetails;
use google_cloud_gax::error::CredentialsError;

/// Our reasons for a token that could not be had: for good (a revoked refresh token, a
/// deleted key) or for now (the token endpoint did not answer).
const CREDENTIALS_REJECTED: &str = "CREDENTIALS_REJECTED";
const CREDENTIALS_UNAVAILABLE: &str = "CREDENTIALS_UNAVAILABLE";

/// What went wrong, in the terms the classifier needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Failure {
    pub http_status: Option<u16>,
    /// Machine-readable reasons: operation error codes (`ZONE_RESOURCE_POOL_EXHAUSTED`), legacy
    /// `errors[].reason` and `ErrorInfo` reasons (`rateLimitExceeded`), the status name
    /// (`RESOURCE_EXHAUSTED`).
    pub reasons: Vec<String>,
    pub message: String,
    /// Quota metric and limit names (`compute.googleapis.com/n2_cpus`, `N2-CPUS-per-project-region`).
    pub quota_metrics: Vec<String>,
    /// The server's own hint (`RetryInfo` or `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.http_status {
            Some(code) => write!(f, "HTTP {code}")?,
            None => f.write_str("operation failed")?,
        }
        if !self.reasons.is_empty() {
            write!(f, " [{}]", self.reasons.join(", "))?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl Failure {
    /// A failure on this side: a timeout, a runtime that would not start.
    pub fn local(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            ..Failure::default()
        }
    }

    pub fn from_gax(e: &google_cloud_gax::error::Error) -> Failure {
        let mut f = Failure {
            http_status: e.http_status_code(),
            ..Failure::default()
        };
        if let Some(status) = e.status() {
            f.message = status.message.clone();
            let name = status.code.name();
            if name != "UNKNOWN" && name != "OK" {
                f.reasons.push(name.to_string());
            }
            for detail in &status.details {
                match detail {
                    StatusDetails::ErrorInfo(info) => {
                        f.reasons.push(info.reason.clone());
                        for key in ["quota_metric", "quota_limit", "quotaMetric", "limitName"] {
                            if let Some(m) = info.metadata.get(key) {
                                f.quota_metrics.push(m.clone());
                            }
                        }
                    }
                    StatusDetails::QuotaFailure(q) => {
                        for v in &q.violations {
                            f.quota_metrics.push(v.subject.clone());
                            f.quota_metrics.push(v.description.clone());
                        }
                    }
                    StatusDetails::RetryInfo(r) => {
                        f.retry_after = r
                            .retry_delay
                            .as_ref()
                            .and_then(|d| u64::try_from(d.seconds()).ok())
                            .map(Duration::from_secs);
                    }
                    _ => {}
                }
            }
        } else if let Some(body) = e.http_payload() {
            f.message = String::from_utf8_lossy(body).chars().take(500).collect();
        } else {
            // The whole chain: the top message alone rarely says what failed.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                message.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            f.message = message;
        }
        if e.is_authentication() {
            let transient = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<CredentialsError>())
                .is_some_and(|c| c.is_transient());
            f.reasons.push(
                if transient {
                    CREDENTIALS_UNAVAILABLE
                } else {
                    CREDENTIALS_REJECTED
                }
                .into(),
            );
        }
        if f.retry_after.is_none() {
            f.retry_after = e
                .http_headers()
                .and_then(|h| h.get("retry-after"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
        }
        f.reasons.retain(|r| !r.is_empty());
        f
    }

    /// The failure recorded in a finished operation, if any.
    pub fn from_operation(op: &Operation) -> Option<Failure> {
        let errors = op
            .error
            .as_ref()
            .map(|e| e.errors.as_slice())
            .unwrap_or(&[]);
        if errors.is_empty() && op.http_error_status_code.is_none() {
            return None;
        }
        let mut f = Failure {
            http_status: op
                .http_error_status_code
                .and_then(|c| u16::try_from(c).ok()),
            ..Failure::default()
        };
        let mut messages = Vec::new();
        for e in errors {
            f.reasons.extend(e.code.clone());
            messages.extend(e.message.clone());
            for d in &e.error_details {
                if let Some(q) = &d.quota_info {
                    f.quota_metrics.extend(q.metric_name.clone());
                    f.quota_metrics.extend(q.limit_name.clone());
                }
                if let Some(info) = &d.error_info {
                    f.reasons.extend(info.reason.clone());
                }
            }
        }
        if messages.is_empty() {
            messages.extend(op.http_error_message.clone());
        }
        f.message = messages.join("; ");
        Some(f)
    }

    fn has_reason(&self, wanted: &[&str]) -> bool {
        self.reasons.iter().any(|r| wanted.contains(&r.as_str()))
    }

    /// Whether the exceeded quota covers only some machine types: a family's CPUs (`N2_CPUS`,
    /// `compute.googleapis.com/n2_cpus`), Spot CPUs (`PREEMPTIBLE_CPUS`), GPUs
    /// (`NVIDIA_T4_GPUS`). The region's `CPUS`, `INSTANCES` and addresses cover everything.
    fn is_scoped_quota(&self) -> bool {
        let mut names: Vec<String> = self.quota_metrics.clone();
        // "Quota 'N2_CPUS' exceeded.  Limit: 24.0 in region us-central1."
        names.extend(
            self.message
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(String::from),
        );
        names.iter().any(|name| {
            let base = name
                .rsplit('/')
                .next()
                .unwrap_or(name)
                .to_lowercase()
                .replace('-', "_");
            let family_cpus = base.ends_with("_cpus") || base.contains("_cpus_per_");
            let shared_cpus = base == "cpus" || base.starts_with("cpus_");
            (family_cpus && !shared_cpus) || base.contains("_gpus")
        })
    }

    /// Errors worth trying in the next zone: the zone is out of this machine type.
    pub fn is_zone_specific(&self) -> bool {
        self.has_reason(&[
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        ]) || self.is_machine_type_missing()
    }

    fn is_machine_type_missing(&self) -> bool {
        let missing = self.has_reason(&["RESOURCE_NOT_FOUND", "notFound", "NOT_FOUND"])
            || self.http_status == Some(404);
        // GCE also answers 400 invalid: "… Machine type with name 'T' does not exist in zone 'Z'."
        (missing && self.message.contains("machineTypes/"))
            || self.message.contains("does not exist in zone")
    }

    // The client library keeps the legacy `errors[].reason` only when the body has no
    // `details`, so the message is checked too.
    fn is_rate_limit(&self) -> bool {
        self.http_status == Some(429)
            || self.has_reason(&[
                "rateLimitExceeded",
                "userRateLimitExceeded",
                "RATE_LIMIT_EXCEEDED",
            ])
            || self.message.to_lowercase().contains("rate limit exceeded")
    }

    fn is_quota(&self) -> bool {
        let named = self.message.contains("Quota '") && self.message.contains("exceeded");
        self.has_reason(&["QUOTA_EXCEEDED", "quotaExceeded"])
            || ((self.has_reason(&["RESOURCE_EXHAUSTED"]) || self.http_status == Some(403))
                && named)
    }

    fn is_permission(&self) -> bool {
        self.has_reason(&["PERMISSION_DENIED", "forbidden", "insufficientPermissions"])
            || self.message.contains("permission")
    }
}

/// What an `instances.insert` refused for a 400/404 names, most specific first, and the
/// parameter that names it.
const CONFIG_RESOURCES: &[(&str, &str)] = &[
    ("/subnetworks/", "subnetwork"),
    ("/networks/", "network"),
    (
        "/images/",
        "image (the instance type's image or the `image` parameter)",
    ),
    ("/diskTypes/", "boot_disk_type / scratch_disk_type"),
    ("serviceAccount", "service_account"),
    ("service account", "service_account"),
    ("Unknown zone", "zones"),
];

/// The parameter an insert's 400/404 points at; `project` for a project that is not there.
fn config_parameter(message: &str) -> Option<&'static str> {
    if let Some((_, param)) = CONFIG_RESOURCES.iter().find(|(m, _)| message.contains(m)) {
        return Some(param);
    }
    // "The resource 'projects/nope' was not found": the project alone.
    let project_only = message
        .split('\'')
        .nth(1)
        .is_some_and(|r| r.starts_with("projects/") && r.matches('/').count() == 1);
    if project_only {
        return Some("project");
    }
    if message.contains("/zones/")
        && message.contains("was not found")
        && !message.contains("/instances/")
    {
        return Some("zones");
    }
    None
}

/// Classifies a failure of `call`; `instance_type` and `quota_group` name the capacity scope.
pub fn classify(
    call: &str,
    f: &Failure,
    backoff: &Backoff,
    instance_type: &str,
    quota_group: &str,
) -> DriverError {
    let text = format!("{call}: {f}");
    if f.is_rate_limit() {
        let wait = backoff.throttled().max(f.retry_after.unwrap_or_default());
        return DriverError::rate_limit(SystemTime::now() + wait, text);
    }
    backoff.reset();
    if f.is_quota() {
        return if f.is_scoped_quota() && !quota_group.is_empty() {
            DriverError::capacity(CapacityScope::QuotaGroup(quota_group.to_string()), text)
        } else {
            DriverError::quota(text)
        };
    }
    if f.is_zone_specific() {
        return DriverError::capacity(CapacityScope::InstanceType(instance_type.to_string()), text);
    }
    if f.has_reason(&[CREDENTIALS_REJECTED]) || f.http_status == Some(401) {
        return DriverError::invalid_config(format!(
            "{text} (check credentials_file, or the application-default credentials)"
        ));
    }
    if f.http_status == Some(403) && f.is_permission() {
        return DriverError::invalid_config(format!(
            "{text} (check the credentials' roles in project)"
        ));
    }
    if call.starts_with("instances.insert") && matches!(f.http_status, Some(400 | 404)) {
        if let Some(param) = config_parameter(&f.message) {
            return DriverError::invalid_config(format!("{text} (check {param})"));
        }
    }
    DriverError::other(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_gax::error::rpc::Status;

    /// An HTTP error as Compute returns it, parsed by the client library's own code.
    fn http(code: u16, body: &str) -> Failure {
        let bytes = bytes::Bytes::from(body.to_string());
        let status = Status::try_from(&bytes).expect("an error body");
        let e =
            google_cloud_gax::error::Error::service_with_http_metadata(status, Some(code), None);
        Failure::from_gax(&e)
    }

    /// A finished operation that failed, as `zoneOperations.get` returns it.
    fn op(body: &str) -> Failure {
        let op: Operation = serde_json::from_str(body).expect("an operation");
        Failure::from_operation(&op).expect("a failure")
    }

    fn kind_of(f: &Failure) -> DriverError {
        classify(
            "instances.insert",
            f,
            &Backoff::default(),
            "n2-standard-8",
            "n2",
        )
    }

    #[test]
    fn rate_limits_from_every_documented_shape() {
        let legacy = http(
            403,
            r#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"message":"Rate Limit Exceeded","domain":"usageLimits","reason":"rateLimitExceeded"}]}}"#,
        );
        let user = http(
            403,
            r#"{"error":{"code":403,"message":"User Rate Limit Exceeded","errors":[{"message":"User Rate Limit Exceeded","domain":"usageLimits","reason":"userRateLimitExceeded"}]}}"#,
        );
        let modern = http(
            429,
            r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED","domain":"googleapis.com","metadata":{"quota_metric":"compute.googleapis.com/default","service":"compute.googleapis.com"}},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#,
        );
        for f in [&legacy, &user, &modern] {
            assert_eq!(kind_of(f).kind(), "rate_limit", "{f:?}");
        }
        assert_eq!(modern.retry_after, Some(Duration::from_secs(30)));
        let DriverError::RateLimit { earliest_retry, .. } = kind_of(&modern) else {
            panic!("not a rate limit");
        };
        let wait = earliest_retry
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        assert!(
            wait > Duration::from_secs(25),
            "the hint is honoured: {wait:?}"
        );
    }

    #[test]
    fn throttles_back_off_more_each_time_and_reset_on_another_answer() {
        let b = Backoff::default();
        let f = http(
            429,
            r#"{"error":{"code":429,"message":"Too Many Requests","status":"RESOURCE_EXHAUSTED"}}"#,
        );
        let wait = |e: DriverError| match e {
            DriverError::RateLimit { earliest_retry, .. } => earliest_retry
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        let first = wait(classify("instances.list", &f, &b, "", ""));
        let second = wait(classify("instances.list", &f, &b, "", ""));
        assert!(second > first, "{first:?} then {second:?}");
        let other = http(
            500,
            r#"{"error":{"code":500,"message":"Internal error","status":"INTERNAL"}}"#,
        );
        assert_eq!(
            classify("instances.list", &other, &b, "", "").kind(),
            "other"
        );
        let after_reset = wait(classify("instances.list", &f, &b, "", ""));
        assert!(after_reset < second, "reset by a non-throttle answer");
    }

    #[test]
    fn quotas_shared_and_per_family() {
        let shared = op(
            r#"{"name":"operation-1","status":"DONE","httpErrorStatusCode":403,"httpErrorMessage":"FORBIDDEN","error":{"errors":[{"code":"QUOTA_EXCEEDED","message":"Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.","errorDetails":[{"quotaInfo":{"metricName":"compute.googleapis.com/cpus","limitName":"CPUS-per-project-region","dimensions":{"region":"us-central1"},"limit":24}}]}]}}"#,
        );
        assert_eq!(kind_of(&shared).kind(), "quota");
        let family = op(
            r#"{"name":"operation-2","status":"DONE","httpErrorStatusCode":403,"error":{"errors":[{"code":"QUOTA_EXCEEDED","message":"Quota 'N2_CPUS' exceeded.  Limit: 8.0 in region us-central1.","errorDetails":[{"quotaInfo":{"metricName":"compute.googleapis.com/n2_cpus","limitName":"N2-CPUS-per-project-region","limit":8}}]}]}}"#,
        );
        match kind_of(&family) {
            DriverError::Capacity {
                scope: CapacityScope::QuotaGroup(g),
                ..
            } => assert_eq!(g, "n2"),
            other => panic!("{other:?}"),
        }
        // The message alone is enough when the details are missing.
        let bare = op(
            r#"{"name":"operation-3","status":"DONE","error":{"errors":[{"code":"QUOTA_EXCEEDED","message":"Quota 'C2_CPUS' exceeded.  Limit: 0.0 in region europe-west4."}]}}"#,
        );
        assert!(bare.is_scoped_quota());
        // Spot CPUs and GPUs limit only the types that use them.
        for name in ["PREEMPTIBLE_CPUS", "NVIDIA_T4_GPUS"] {
            let scoped = op(&format!(
                r#"{{"name":"operation-9","status":"DONE","error":{{"errors":[{{"code":"QUOTA_EXCEEDED","message":"Quota '{name}' exceeded.  Limit: 0.0 in region us-east1."}}]}}}}"#
            ));
            assert_eq!(kind_of(&scoped).kind(), "capacity", "{name}");
        }
        let instances = op(
            r#"{"name":"operation-4","status":"DONE","error":{"errors":[{"code":"QUOTA_EXCEEDED","message":"Quota 'INSTANCES' exceeded.  Limit: 100.0 in region us-central1."}]}}"#,
        );
        assert_eq!(kind_of(&instances).kind(), "quota");
        let http_quota = http(
            403,
            r#"{"error":{"code":403,"message":"Quota 'PREEMPTIBLE_CPUS' exceeded.  Limit: 0.0 in region us-east1.","errors":[{"message":"Quota 'PREEMPTIBLE_CPUS' exceeded.","domain":"usageLimits","reason":"quotaExceeded"}]}}"#,
        );
        assert_eq!(
            kind_of(&http_quota).kind(),
            "capacity",
            "Spot CPUs: the group"
        );
    }

    #[test]
    fn zone_exhaustion_and_missing_machine_types_are_the_types_capacity() {
        let exhausted = op(
            r#"{"name":"operation-5","status":"DONE","httpErrorStatusCode":503,"error":{"errors":[{"code":"ZONE_RESOURCE_POOL_EXHAUSTED","message":"The zone 'projects/p/zones/us-central1-a' does not have enough resources available to fulfill the request.  Try a different zone, or try again later."}]}}"#,
        );
        let with_details = op(
            r#"{"name":"operation-6","status":"DONE","error":{"errors":[{"code":"ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS","message":"The zone 'projects/p/zones/us-central1-a' does not have enough resources available to fulfill the request.  '(resource type:compute)'."}]}}"#,
        );
        let missing_type = http(
            404,
            r#"{"error":{"code":404,"message":"The resource 'projects/p/zones/us-central1-f/machineTypes/a3-highgpu-8g' was not found","errors":[{"message":"The resource 'projects/p/zones/us-central1-f/machineTypes/a3-highgpu-8g' was not found","domain":"global","reason":"notFound"}]}}"#,
        );
        let missing_type_op = op(
            r#"{"name":"operation-7","status":"DONE","error":{"errors":[{"code":"RESOURCE_NOT_FOUND","message":"The resource 'projects/p/zones/us-central1-f/machineTypes/a3-highgpu-8g' was not found"}]}}"#,
        );
        for f in [&exhausted, &with_details, &missing_type, &missing_type_op] {
            assert!(f.is_zone_specific(), "{f:?}");
            match kind_of(f) {
                DriverError::Capacity {
                    scope: CapacityScope::InstanceType(t),
                    ..
                } => assert_eq!(t, "n2-standard-8"),
                other => panic!("{f:?} → {other:?}"),
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_parameter() {
        let cases = [
            (401, "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.", "UNAUTHENTICATED", "(check credentials_file"),
            (404, "The resource 'projects/no-such-project' was not found", "NOT_FOUND", "(check project)"),
            (403, "Required 'compute.instances.create' permission for 'projects/p/zones/us-central1-a/instances/dc-1'", "PERMISSION_DENIED", "(check the credentials' roles in project)"),
            (404, "The resource 'projects/debian-cloud/global/images/family/debain-12' was not found", "NOT_FOUND", "(check image"),
            (404, "The resource 'projects/p/global/networks/no-such-net' was not found", "NOT_FOUND", "(check network)"),
            (400, "Invalid value for field 'resource.networkInterfaces[0].subnetwork': 'regions/us-central1/subnetworks/nope'. The referenced subnetwork resource cannot be found.", "INVALID_ARGUMENT", "(check subnetwork)"),
            (400, "The user does not have access to service account 'vm@p.iam.gserviceaccount.com'.  User: 'dispatcher@p.iam.gserviceaccount.com'.  Ask a project owner to grant you the iam.serviceAccountUser role on the service account", "INVALID_ARGUMENT", "(check service_account)"),
            (400, "Invalid value for field 'resource.disks[0].initializeParams.diskType': 'zones/us-central1-a/diskTypes/pd-fastest'.", "INVALID_ARGUMENT", "(check boot_disk_type"),
            (400, "Invalid value for field 'zone': 'us-central1-q'. Unknown zone.", "INVALID_ARGUMENT", "(check zones)"),
        ];
        for (code, message, status, param) in cases {
            let body = format!(
                r#"{{"error":{{"code":{code},"message":{},"status":"{status}"}}}}"#,
                serde_json::Value::String(message.into())
            );
            let e = kind_of(&http(code, &body));
            assert_eq!(e.kind(), "invalid_config", "{message}");
            assert!(e.to_string().contains(param), "{param}: {e}");
        }
    }

    #[test]
    fn a_machine_type_the_zone_lacks_is_the_types_capacity_whatever_the_status() {
        let invalid = http(
            400,
            r#"{"error":{"code":400,"message":"Invalid value for field 'resource.machineType': 'zones/us-central1-f/machineTypes/c3-standard-4'. Machine type with name 'c3-standard-4' does not exist in zone 'us-central1-f'.","errors":[{"message":"Invalid value for field 'resource.machineType': 'zones/us-central1-f/machineTypes/c3-standard-4'. Machine type with name 'c3-standard-4' does not exist in zone 'us-central1-f'.","domain":"global","reason":"invalid"}]}}"#,
        );
        assert!(invalid.is_zone_specific());
        assert_eq!(kind_of(&invalid).kind(), "capacity");
    }

    #[test]
    fn reasons_lost_beside_details_are_found_in_the_message() {
        // With `details` present the client library drops `errors[]`: the message still says.
        let both = http(
            403,
            r#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"message":"Rate Limit Exceeded","domain":"usageLimits","reason":"rateLimitExceeded"}],"details":[{"@type":"type.googleapis.com/google.rpc.Help","links":[]}]}}"#,
        );
        assert_eq!(kind_of(&both).kind(), "rate_limit");
        let quota = http(
            403,
            r#"{"error":{"code":403,"message":"Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.","errors":[{"message":"Quota 'CPUS' exceeded.","domain":"usageLimits","reason":"quotaExceeded"}],"details":[{"@type":"type.googleapis.com/google.rpc.Help","links":[]}]}}"#,
        );
        assert_eq!(kind_of(&quota).kind(), "quota");
    }

    #[test]
    fn instance_level_refusals_are_not_configuration() {
        let gone = http(
            404,
            r#"{"error":{"code":404,"message":"The resource 'projects/p/zones/us-central1-a/instances/dc-0123' was not found","errors":[{"message":"The resource 'projects/p/zones/us-central1-a/instances/dc-0123' was not found","domain":"global","reason":"notFound"}]}}"#,
        );
        let e = classify(
            "instances.setMetadata dc-0123",
            &gone,
            &Backoff::default(),
            "",
            "",
        );
        assert_eq!(e.kind(), "other", "{e}");
        let odd_403 = http(
            403,
            r#"{"error":{"code":403,"message":"The instance is being deleted.","errors":[{"message":"The instance is being deleted.","domain":"global","reason":"resourceNotReady"}]}}"#,
        );
        let e = classify(
            "instances.delete dc-0123",
            &odd_403,
            &Backoff::default(),
            "",
            "",
        );
        assert_eq!(e.kind(), "other", "{e}");
    }

    #[test]
    fn other_failures_stay_other() {
        let internal = http(
            503,
            r#"{"error":{"code":503,"message":"The service is currently unavailable.","status":"UNAVAILABLE"}}"#,
        );
        assert_eq!(kind_of(&internal).kind(), "other");
        let done: Operation =
            serde_json::from_str(r#"{"name":"operation-8","status":"DONE"}"#).expect("op");
        assert!(Failure::from_operation(&done).is_none());
    }
}
