//! ARM failures → typed driver errors.

use std::time::{Duration, SystemTime};

use driver_abi::{CapacityScope, DriverError};
use reqwest::header::HeaderMap;
use serde_json::Value;

/// The quota group of every Spot size: Azure counts all Spot vCPUs of a region against one
/// limit, whatever the family.
pub const SPOT_QUOTA_GROUP: &str = "lowPriorityCores";

/// How long to hold off after a 429 that names no time.
pub const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(20);

/// What went wrong, in the terms the classifier needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArmFailure {
    pub http_status: Option<u16>,
    /// ARM's `error.code` and the codes of its `details`.
    pub codes: Vec<String>,
    pub message: String,
    /// The server's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// The token could not be had for good (a wrong secret, an unknown client).
    pub credentials_rejected: bool,
}

impl std::fmt::Display for ArmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.http_status {
            Some(code) => write!(f, "HTTP {code}")?,
            None => f.write_str("failed")?,
        }
        if !self.codes.is_empty() {
            write!(f, " [{}]", self.codes.join(", "))?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl ArmFailure {
    /// A failure on this side (a timeout, a connection, a body that is not JSON).
    pub fn local(message: impl Into<String>) -> ArmFailure {
        ArmFailure {
            message: message.into(),
            ..ArmFailure::default()
        }
    }

    /// A token that could not be had. Entra answers for a wrong tenant, client or secret
    /// carry `AADSTS` codes or OAuth error names; anything else (a network error) may pass.
    pub fn credential(e: &azure_core::Error) -> ArmFailure {
        let message = e.to_string();
        let rejected = [
            "AADSTS",
            "invalid_client",
            "unauthorized_client",
            "invalid_request",
        ]
        .iter()
        .any(|m| message.contains(m));
        ArmFailure {
            message: format!("getting a token: {message}"),
            credentials_rejected: rejected,
            ..ArmFailure::default()
        }
    }

    /// A non-2xx answer: ARM's `{"error": {"code", "message", "details"}}` when it is one.
    pub fn from_response(status: u16, headers: &HeaderMap, text: &str) -> ArmFailure {
        let mut f = match serde_json::from_str::<Value>(text) {
            Ok(body) => ArmFailure::from_body(status, &body),
            Err(_) => ArmFailure {
                http_status: Some(status),
                message: text.chars().take(500).collect(),
                ..ArmFailure::default()
            },
        };
        f.retry_after = crate::arm::retry_after(headers);
        f
    }

    /// An error body, or a failed operation's status body (`{"status": "Failed", "error"}`).
    pub fn from_body(status: u16, body: &Value) -> ArmFailure {
        let error = body.get("error").unwrap_or(body);
        let mut codes = Vec::new();
        let mut messages = Vec::new();
        collect(error, &mut codes, &mut messages, 0);
        ArmFailure {
            http_status: Some(status),
            codes,
            message: messages.join("; "),
            ..ArmFailure::default()
        }
    }

    fn has_code(&self, wanted: &[&str]) -> bool {
        self.codes
            .iter()
            .any(|c| wanted.iter().any(|w| c.eq_ignore_ascii_case(w)))
    }

    /// Quota text: "… exceeding approved standardDSv5Family Cores quota …",
    /// "… exceeding quota limit …", "QuotaExceeded".
    fn is_quota(&self) -> bool {
        self.has_code(&["QuotaExceeded", "ResourceQuotaExceeded", "SubnetIsFull"])
            || (self.has_code(&["OperationNotAllowed"])
                && self.message.to_lowercase().contains("quota"))
    }

    /// Errors worth trying again later with the same size elsewhere or at another time.
    pub fn is_capacity(&self) -> bool {
        self.has_code(&[
            "SpotPriceGreaterThanProvidedMaxPrice",
            "AllocationFailed",
            "ZonalAllocationFailed",
            "SkuNotAvailable",
            "OverconstrainedAllocationRequest",
            "OverconstrainedZonalAllocationRequest",
        ])
    }
}

/// Codes and messages of an ARM error and its nested `details`.
fn collect(error: &Value, codes: &mut Vec<String>, messages: &mut Vec<String>, depth: usize) {
    if depth > 4 {
        return;
    }
    if let Some(c) = error.get("code").and_then(Value::as_str) {
        codes.push(c.to_string());
    }
    if let Some(m) = error.get("message").and_then(Value::as_str) {
        messages.push(m.to_string());
    }
    for d in error
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        collect(d, codes, messages, depth + 1);
    }
}

/// What a refused request points at, and the parameter that names it.
const CONFIG_HINTS: &[(&str, &str)] = &[
    ("ResourceGroupNotFound", "resource_group"),
    ("SubscriptionNotFound", "subscription_id"),
    ("InvalidSubscriptionId", "subscription_id"),
    (
        "GalleryImageNotFound",
        "shared_image_gallery_name / the image",
    ),
    ("ImageNotFound", "image_resource_group / the image"),
    ("/subnets/", "subnet"),
    ("/virtualNetworks/", "network / network_resource_group"),
    ("/galleries/", "shared_image_gallery_name / the image"),
    ("/images/", "image_resource_group / the image"),
];

/// Classifies `f` from `call`; `instance_type` and `quota_group` name the capacity scope.
pub fn classify(call: &str, f: &ArmFailure, instance_type: &str, quota_group: &str) -> DriverError {
    let text = format!("{call}: {f}");
    // Any Retry-After is ARM asking for time, whatever the status (the original read the
    // header of every 429 and crashed on one without it).
    if f.http_status == Some(429) || f.retry_after.is_some() {
        let wait = f.retry_after.unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
        let until = SystemTime::now()
            .checked_add(wait)
            .unwrap_or_else(|| SystemTime::now() + crate::arm::LONGEST_RETRY_AFTER);
        return DriverError::rate_limit(until, text);
    }
    if f.is_quota() {
        // A family's cores ("standardDSv5Family Cores quota") limit only that family; the
        // Spot cores ("LowPriorityCores", "Low Priority Cores") only Spot sizes, which share
        // one group; the region's total cores everything.
        let lower = f.message.to_lowercase();
        let spot_quota = lower.contains("lowpriority") || lower.contains("low priority");
        let spot_type = quota_group.ends_with("-spot") || quota_group == SPOT_QUOTA_GROUP;
        let scoped = !quota_group.is_empty()
            && if spot_quota {
                spot_type
            } else {
                lower.contains(&quota_group.to_lowercase())
            };
        return if scoped {
            DriverError::capacity(CapacityScope::QuotaGroup(quota_group.to_string()), text)
        } else {
            DriverError::quota(text)
        };
    }
    if f.is_capacity() {
        return DriverError::capacity(CapacityScope::InstanceType(instance_type.to_string()), text);
    }
    if f.credentials_rejected
        || f.has_code(&[
            "InvalidAuthenticationToken",
            "InvalidAuthenticationTokenTenant",
            "AuthenticationFailed",
        ])
        || f.http_status == Some(401)
    {
        return DriverError::invalid_config(format!(
            "{text} (check tenant_id / client_id / client_secret, or the managed or workload identity)"
        ));
    }
    if f.has_code(&["AuthorizationFailed", "LinkedAuthorizationFailed"])
        || f.http_status == Some(403)
    {
        return DriverError::invalid_config(format!(
            "{text} (check the identity's role assignments on subscription_id / resource_group)"
        ));
    }
    if matches!(f.http_status, Some(400 | 404)) {
        let hint = CONFIG_HINTS
            .iter()
            .find(|(needle, _)| f.has_code(&[needle]) || f.message.contains(needle));
        if let Some((_, param)) = hint {
            return DriverError::invalid_config(format!("{text} (check {param})"));
        }
    }
    DriverError::other(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    fn failure(status: u16, body: &str) -> ArmFailure {
        ArmFailure::from_response(status, &HeaderMap::new(), body)
    }

    fn kind_of(f: &ArmFailure) -> DriverError {
        classify(
            "PUT virtualMachines/dc-1",
            f,
            "Standard_D4s_v5",
            "standardDSv5Family",
        )
    }

    fn wait_of(e: &DriverError) -> Duration {
        match e {
            DriverError::RateLimit { earliest_retry, .. } => earliest_retry
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
            other => panic!("not a rate limit: {other:?}"),
        }
    }

    #[test]
    fn throttles_wait_as_long_as_arm_says_and_20_s_when_it_does_not() {
        let body =
            r#"{"error":{"code":"TooManyRequests","message":"The request is being throttled."}}"#;
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("45"));
        let with = ArmFailure::from_response(429, &headers, body);
        assert!(wait_of(&kind_of(&with)) > Duration::from_secs(40));
        let without = failure(429, body);
        let w = wait_of(&kind_of(&without));
        assert!(
            w > Duration::from_secs(15) && w <= DEFAULT_RATE_LIMIT_WAIT,
            "{w:?}"
        );
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let mut dated = HeaderMap::new();
        dated.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&in_a_minute).expect("header"),
        );
        let f = ArmFailure::from_response(
            503,
            &dated,
            r#"{"error":{"code":"ServerBusy","message":"busy"}}"#,
        );
        assert!(
            wait_of(&kind_of(&f)) > Duration::from_secs(50),
            "an HTTP date, on any status"
        );
        let not_json = failure(429, "<html>Too Many Requests</html>");
        assert_eq!(kind_of(&not_json).kind(), "rate_limit");
    }

    #[test]
    fn quotas_shared_and_per_family() {
        let family = failure(
            409,
            r#"{"error":{"code":"OperationNotAllowed","message":"Operation could not be completed as it results in exceeding approved standardDSv5Family Cores quota. Additional details - Deployment Model: Resource Manager, Location: eastus, Current Limit: 10, Current Usage: 8, Additional Required: 4, (Minimum) New Limit Required: 12."}}"#,
        );
        match kind_of(&family) {
            DriverError::Capacity {
                scope: CapacityScope::QuotaGroup(g),
                ..
            } => assert_eq!(g, "standardDSv5Family"),
            other => panic!("{other:?}"),
        }
        let regional = failure(
            409,
            r#"{"error":{"code":"OperationNotAllowed","message":"Operation could not be completed as it results in exceeding approved Total Regional Cores quota. Additional details - Deployment Model: Resource Manager, Location: eastus, Current Limit: 20, Current Usage: 20, Additional Required: 4."}}"#,
        );
        assert_eq!(kind_of(&regional).kind(), "quota");
        let exceeded = failure(
            409,
            r#"{"error":{"code":"QuotaExceeded","message":"Operation results in exceeding quota limits of Core. Maximum allowed: 10, Current in use: 10, Additional requested: 4."}}"#,
        );
        assert_eq!(kind_of(&exceeded).kind(), "quota");
        let spot = failure(
            409,
            r#"{"error":{"code":"OperationNotAllowed","message":"Operation could not be completed as it results in exceeding approved LowPriorityCores quota. Location: eastus, Current Limit: 3, Current Usage: 0, Additional Required: 4."}}"#,
        );
        let e = classify("PUT", &spot, "Standard_D4s_v5", SPOT_QUOTA_GROUP);
        assert_eq!(e.kind(), "capacity", "{e}");
        let spaced = failure(
            409,
            r#"{"error":{"code":"OperationNotAllowed","message":"Operation could not be completed as it results in exceeding approved Low Priority Cores quota."}}"#,
        );
        let e = classify("PUT", &spaced, "Standard_D4s_v5", SPOT_QUOTA_GROUP);
        assert_eq!(e.kind(), "capacity", "{e}");
        assert_eq!(
            kind_of(&spaced).kind(),
            "quota",
            "not the on-demand family's"
        );
    }

    #[test]
    fn allocation_failures_are_the_sizes_capacity() {
        for code in [
            "AllocationFailed",
            "ZonalAllocationFailed",
            "SkuNotAvailable",
            "OverconstrainedAllocationRequest",
        ] {
            // As a failed operation's status body.
            let body: Value = serde_json::from_str(&format!(
                r#"{{"status":"Failed","error":{{"code":"{code}","message":"Allocation failed. We do not have sufficient capacity for the requested VM size in this region."}}}}"#
            ))
            .expect("json");
            let f = ArmFailure::from_body(200, &body);
            match kind_of(&f) {
                DriverError::Capacity {
                    scope: CapacityScope::InstanceType(t),
                    ..
                } => assert_eq!(t, "Standard_D4s_v5", "{code}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        // Nested in `details`, as a deployment reports it.
        let nested = failure(
            409,
            r#"{"error":{"code":"Conflict","message":"The operation failed.","details":[{"code":"SkuNotAvailable","message":"The requested size for resource is currently not available in location 'eastus' zones '' for subscription."}]}}"#,
        );
        assert_eq!(kind_of(&nested).kind(), "capacity");
    }

    #[test]
    fn configuration_errors_name_the_parameter() {
        for (status, body, param) in [
            (
                401,
                r#"{"error":{"code":"InvalidAuthenticationToken","message":"The access token is invalid."}}"#,
                "client_secret",
            ),
            (
                403,
                r#"{"error":{"code":"AuthorizationFailed","message":"The client 'x' with object id 'x' does not have authorization to perform action 'Microsoft.Compute/virtualMachines/write' over scope '/subscriptions/s/resourceGroups/rg'."}}"#,
                "role assignments",
            ),
            (
                404,
                r#"{"error":{"code":"ResourceGroupNotFound","message":"Resource group 'nope' could not be found."}}"#,
                "(check resource_group)",
            ),
            (
                404,
                r#"{"error":{"code":"SubscriptionNotFound","message":"The subscription 's' could not be found."}}"#,
                "(check subscription_id)",
            ),
            (
                400,
                r#"{"error":{"code":"InvalidResourceReference","message":"Resource /subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nope referenced by resource /subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/dc-nic was not found."}}"#,
                "(check subnet)",
            ),
            (
                404,
                r#"{"error":{"code":"NotFound","message":"The Image '/subscriptions/s/resourceGroups/images/providers/Microsoft.Compute/images/nope' cannot be found in 'eastus' region."}}"#,
                "(check image_resource_group",
            ),
            (
                404,
                r#"{"error":{"code":"GalleryImageNotFound","message":"The gallery image /subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/nope is not available in eastus region."}}"#,
                "(check shared_image_gallery_name",
            ),
        ] {
            let e = kind_of(&failure(status, body));
            assert_eq!(e.kind(), "invalid_config", "{body}");
            assert!(e.to_string().contains(param), "{param}: {e}");
        }
    }

    #[test]
    fn a_vm_that_is_gone_is_not_a_configuration_error() {
        let gone = failure(
            404,
            r#"{"error":{"code":"ResourceNotFound","message":"The Resource 'Microsoft.Compute/virtualMachines/dc-x' under resource group 'batch' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"}}"#,
        );
        assert_eq!(
            classify("PATCH virtualMachines dc-x", &gone, "", "").kind(),
            "other"
        );
    }

    #[test]
    fn a_full_subnet_is_a_quota_and_an_outbid_spot_request_capacity() {
        let full = failure(
            400,
            r#"{"error":{"code":"SubnetIsFull","message":"Subnet workers with address prefix 10.0.0.0/28 does not have enough capacity for 1 IP addresses."}}"#,
        );
        assert_eq!(kind_of(&full).kind(), "quota");
        let outbid = failure(
            409,
            r#"{"error":{"code":"SpotPriceGreaterThanProvidedMaxPrice","message":"Unable to perform operation 'Create VM' since the provided MaxPrice '0.01 USD' is lower than the current spot price '0.1 USD' for Azure Spot VM size 'Standard_D4s_v5' in region 'eastus'."}}"#,
        );
        assert_eq!(kind_of(&outbid).kind(), "capacity");
    }

    #[test]
    fn server_errors_stay_other() {
        let f = failure(
            500,
            r#"{"error":{"code":"InternalServerError","message":"An unexpected error occured while processing the request."}}"#,
        );
        assert_eq!(kind_of(&f).kind(), "other");
        assert_eq!(
            kind_of(&ArmFailure::local("connection refused")).kind(),
            "other"
        );
    }
}
