//! Why a container waits, in words an operator can act on.

use driver_abi::InstanceType;
use serde::{Deserialize, Serialize};

use super::plan::{eligible_types, unsatisfiable_reason};
use crate::queue::Container;

/// What stands between waiting containers and a VM, as seen at one pass.
pub struct Pressure<'a> {
    pub types: &'a [InstanceType],
    pub maximum_price_factor: f64,
    pub quota_headroom: usize,
    pub creates_allowed: usize,
    /// See `PlanInput::spend_left`.
    pub spend_left: f64,
    /// Provider types in a capacity hold-off.
    pub at_capacity: &'a dyn Fn(&InstanceType) -> bool,
    /// A hold-off after failing creates of this (config) type, in words.
    pub create_trouble: &'a dyn Fn(&InstanceType) -> Option<String>,
}

/// What a container waits for, as a word a program can count by (metrics, the page).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// Priority 0.
    Held,
    Unsatisfiable,
    /// Creates of its type fail and are held off.
    CreateFailing,
    OverQuota,
    OverSpendCap,
    AtCapacity,
    RateLimited,
    /// For a VM being created or booting.
    Boot,
}

/// The first thing that keeps `c` (queued, not started) from running.
pub fn waiting_reason(c: &Container, p: &Pressure<'_>) -> (Waiting, String) {
    if c.priority < 1 {
        return (Waiting::Held, "priority 0: held".into());
    }
    let eligible = eligible_types(&c.runtime_constraints, p.types, p.maximum_price_factor);
    let Some(cheapest) = eligible.first() else {
        return (
            Waiting::Unsatisfiable,
            unsatisfiable_reason(&c.runtime_constraints),
        );
    };
    if let Some(trouble) = eligible.iter().find_map(|t| (p.create_trouble)(t)) {
        return (Waiting::CreateFailing, trouble);
    }
    if p.quota_headroom == 0 {
        return (
            Waiting::OverQuota,
            "over quota: waiting for an instance to be freed".into(),
        );
    }
    if cheapest.price > p.spend_left + 1e-9 {
        return (
            Waiting::OverSpendCap,
            format!(
                "over the spending cap: a {} costs ${}/h and limits.max_hourly_spend leaves ${}/h",
                cheapest.name,
                dollars(cheapest.price),
                dollars(p.spend_left)
            ),
        );
    }
    if eligible.iter().all(|t| (p.at_capacity)(t)) {
        return (
            Waiting::AtCapacity,
            format!("no cloud capacity for type {} (held off)", cheapest.name),
        );
    }
    if p.creates_allowed == 0 {
        return (Waiting::RateLimited, "creates are rate limited".into());
    }
    (
        Waiting::Boot,
        format!("waiting for a VM of type {} to boot", cheapest.name),
    )
}

/// A price as an operator reads it: cents for most, more digits for fractions of a cent.
pub fn dollars(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.1 {
        format!("{v:.4}")
    } else {
        format!("{v:.2}")
    }
}
