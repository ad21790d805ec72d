//! EC2 error codes → typed driver errors, and the throttling back-off.

use std::time::SystemTime;

pub use driver_abi::backoff::Backoff;
use driver_abi::{CapacityScope, DriverError};

use crate::ec2::ApiError;

/// Codes that mean "slow down" (the AWS SDKs' default throttling set).
const THROTTLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// Account limits: nothing more can be created until something goes away.
const QUOTA_CODES: &[&str] = &[
    "InstanceLimitExceeded",
    "InsufficientAddressCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InsufficientVolumeCapacity",
    "MaxSpotInstanceCountExceeded",
];

/// Codes where the driver names a parameter the operator got wrong.
const CONFIG_CODES: &[(&str, &str)] = &[
    ("AuthFailure", "access_key_id / secret_access_key"),
    (
        "UnauthorizedOperation",
        "access_key_id / secret_access_key (the IAM policy)",
    ),
    ("InvalidClientTokenId", "access_key_id"),
    ("SignatureDoesNotMatch", "secret_access_key"),
    ("InvalidAMIID.Malformed", "image"),
    ("InvalidAMIID.NotFound", "image"),
    ("InvalidSubnetID.NotFound", "subnet_ids"),
    ("InvalidGroup.NotFound", "security_group_ids"),
    ("InvalidParameterValue", "a parameter"),
];

pub fn is_throttle(code: &str) -> bool {
    THROTTLE_CODES.contains(&code)
}

/// Errors worth trying on the next subnet.
pub fn is_subnet_specific(e: &ApiError) -> bool {
    let message = e.message.to_lowercase();
    e.code.contains("Subnet")
        || e.code == "InsufficientInstanceCapacity"
        || e.code == "InsufficientVolumeCapacity"
        || e.code == "Unsupported"
        || (e.code.starts_with("InvalidParameter")
            && (message.contains(" subnet ") || message.contains("sufficient free ipv")))
}

/// Classifies `e` from `action`; `instance_type` and `quota_group` name the capacity scope.
pub fn classify(
    action: &str,
    e: &ApiError,
    backoff: &Backoff,
    instance_type: &str,
    quota_group: &str,
) -> DriverError {
    let text = format!("{action}: {e}");
    if is_throttle(&e.code) {
        let wait = backoff.throttled();
        return DriverError::rate_limit(SystemTime::now() + wait, text);
    }
    backoff.reset();
    if QUOTA_CODES.contains(&e.code.as_str()) {
        return DriverError::quota(text);
    }
    let unsupported_type =
        e.code == "Unsupported" && e.message.to_lowercase().contains("requested instance type");
    if e.code == "InsufficientInstanceCapacity" || unsupported_type {
        return DriverError::capacity(CapacityScope::InstanceType(instance_type.to_string()), text);
    }
    if e.code == "VcpuLimitExceeded" {
        return DriverError::capacity(CapacityScope::QuotaGroup(quota_group.to_string()), text);
    }
    if let Some((_, param)) = CONFIG_CODES.iter().find(|(c, _)| *c == e.code) {
        return DriverError::invalid_config(format!("{text} (check {param})"));
    }
    DriverError::other(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::parse_error;
    use std::time::Duration;

    /// A real EC2 error body, as the Query API returns it.
    fn body(code: &str, message: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>5ed3a2b2-7b49-4c21-8a9a-4f6c1a2b3c4d</RequestID></Response>"
        )
    }

    fn kind_of(code: &str, message: &str) -> DriverError {
        let e = parse_error(400, &body(code, message));
        assert_eq!(e.code, code);
        assert_eq!(e.message, message);
        classify("RunInstances", &e, &Backoff::default(), "m5.large", "m")
    }

    #[test]
    fn every_documented_code_maps_to_its_kind() {
        for code in THROTTLE_CODES {
            assert_eq!(
                kind_of(code, "Rate exceeded.").kind(),
                "rate_limit",
                "{code}"
            );
        }
        for code in QUOTA_CODES {
            assert_eq!(
                kind_of(
                    code,
                    "You have requested more instances than your current instance limit allows."
                )
                .kind(),
                "quota",
                "{code}"
            );
        }
        assert_eq!(
            kind_of("InsufficientInstanceCapacity", "We currently do not have sufficient m5.large capacity in the Availability Zone you requested (us-east-1a)."),
            DriverError::capacity(
                CapacityScope::InstanceType("m5.large".into()),
                "RunInstances: InsufficientInstanceCapacity: We currently do not have sufficient m5.large capacity in the Availability Zone you requested (us-east-1a)."
            )
        );
        assert!(matches!(
            kind_of("Unsupported", "Your requested instance type (m5.large) is not supported in your requested Availability Zone (us-east-1e)."),
            DriverError::Capacity { scope: CapacityScope::InstanceType(_), .. }
        ));
        assert!(matches!(
            kind_of("VcpuLimitExceeded", "You have requested more vCPU capacity than your current vCPU limit of 32 allows."),
            DriverError::Capacity { scope: CapacityScope::QuotaGroup(g), .. } if g == "m"
        ));
        for (code, param) in CONFIG_CODES {
            let e = kind_of(code, "Not valid.");
            assert_eq!(e.kind(), "invalid_config", "{code}");
            assert!(e.to_string().contains(param), "{e}");
        }
        assert_eq!(
            kind_of("InternalError", "An internal error has occurred.").kind(),
            "other"
        );
    }

    #[test]
    fn throttling_backs_off_more_each_time_and_resets() {
        let b = Backoff::default();
        let waits: Vec<u64> = (0..12).map(|_| b.throttled().as_millis() as u64).collect();
        assert_eq!(&waits[..3], &[1000, 2500, 4750]);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().expect("some"), 60_000);
        let e = parse_error(400, &body("InternalError", "x"));
        let _ = classify("DescribeInstances", &e, &b, "", "");
        assert_eq!(
            b.throttled(),
            Duration::from_secs(1),
            "a non-throttle answer resets it"
        );
    }

    #[test]
    fn subnet_specific_errors_fail_over() {
        let e = |code: &str, message: &str| parse_error(400, &body(code, message));
        assert!(is_subnet_specific(&e(
            "InvalidSubnetID.NotFound",
            "The subnet ID 'subnet-1' does not exist"
        )));
        assert!(is_subnet_specific(&e(
            "InsufficientInstanceCapacity",
            "no capacity"
        )));
        assert!(is_subnet_specific(&e(
            "InvalidParameterValue",
            "No sufficient free IPv4 addresses in subnet"
        )));
        assert!(is_subnet_specific(&e(
            "InvalidParameterValue",
            "Value for parameter is invalid for the subnet subnet-1 abc"
        )));
        assert!(!is_subnet_specific(&e(
            "InvalidAMIID.NotFound",
            "The image id '[ami-1]' does not exist"
        )));
        assert!(!is_subnet_specific(&e(
            "RequestLimitExceeded",
            "Request limit exceeded."
        )));
    }

    #[test]
    fn non_xml_error_bodies_keep_the_status() {
        let e = parse_error(503, "Service Unavailable");
        assert_eq!(e.code, "");
        assert!(e.message.contains("HTTP 503"));
    }
}
