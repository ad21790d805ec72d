//! Typed driver errors: the host's policy (hold-offs, back-off) keys on the variant.

use std::time::SystemTime;

/// What a capacity shortage applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CapacityScope {
    /// Only this provider instance type is unavailable.
    InstanceType(String),
    /// Every type in this quota group (see `InstanceSet::quota_group`) is unavailable.
    QuotaGroup(String),
    /// Nothing can be created at the moment.
    All,
}

impl std::fmt::Display for CapacityScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CapacityScope::InstanceType(t) => write!(f, "instance type {t}"),
            CapacityScope::QuotaGroup(g) => write!(f, "quota group {g}"),
            CapacityScope::All => f.write_str("all instance types"),
        }
    }
}

/// Every error a driver returns is one of these; each carries a message for operators.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DriverError {
    /// The cloud throttled us; do not repeat this kind of call before `earliest_retry`.
    #[error("rate limited: {message}")]
    RateLimit {
        earliest_retry: SystemTime,
        message: String,
    },
    /// An account limit (instances, vCPUs, addresses) was reached.
    #[error("quota exceeded: {message}")]
    Quota { message: String },
    /// The cloud has no capacity for `scope` right now.
    #[error("no capacity for {scope}: {message}")]
    Capacity {
        scope: CapacityScope,
        message: String,
    },
    /// The driver does not offer this operation (e.g. host key verification).
    #[error("not implemented: {message}")]
    NotImplemented { message: String },
    /// The driver's parameters or credentials are wrong; the message names the parameter.
    #[error("invalid configuration: {message}")]
    InvalidConfig { message: String },
    /// Anything else, including a driver that panicked.
    #[error("{message}")]
    Other { message: String },
}

impl DriverError {
    pub fn other(message: impl Into<String>) -> Self {
        DriverError::Other {
            message: message.into(),
        }
    }

    pub fn invalid_config(message: impl Into<String>) -> Self {
        DriverError::InvalidConfig {
            message: message.into(),
        }
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        DriverError::NotImplemented {
            message: message.into(),
        }
    }

    pub fn quota(message: impl Into<String>) -> Self {
        DriverError::Quota {
            message: message.into(),
        }
    }

    pub fn capacity(scope: CapacityScope, message: impl Into<String>) -> Self {
        DriverError::Capacity {
            scope,
            message: message.into(),
        }
    }

    pub fn rate_limit(earliest_retry: SystemTime, message: impl Into<String>) -> Self {
        DriverError::RateLimit {
            earliest_retry,
            message: message.into(),
        }
    }

    /// A short, stable name for the variant, for metric labels and conformance checks.
    pub fn kind(&self) -> &'static str {
        match self {
            DriverError::RateLimit { .. } => "rate_limit",
            DriverError::Quota { .. } => "quota",
            DriverError::Capacity { .. } => "capacity",
            DriverError::NotImplemented { .. } => "not_implemented",
            DriverError::InvalidConfig { .. } => "invalid_config",
            DriverError::Other { .. } => "other",
        }
    }
}
