//! Costs and the spending cap: each finished container's share of its VM, the fleet's price
//! and spend today, and `limits.max_hourly_spend` keeping the fleet under a price.

use std::time::Duration;

use dispatch_cloud::queue::{ContainerState, NewContainer};
use system_tests::*;

/// Price of `small` in `ONE_SMALL_TYPE`.
const SMALL_PRICE: f64 = 0.25;

fn whole_vm_sleeper(seconds: u32) -> NewContainer {
    NewContainer {
        command: vec!["sleep".into(), seconds.to_string()],
        priority: 1,
        runtime_constraints: dispatch_cloud::queue::RuntimeConstraints {
            vcpus: 2,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn get_json(h: &ServeHarness, path: &str) -> serde_json::Value {
    system_tests::get_json(&h.url, path, &h.token)
}

#[test]
fn the_spending_cap_keeps_a_second_vm_from_being_created_and_says_why() {
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        limits_extra: "max_hourly_spend = 0.3".into(),
        ..HarnessOptions::default()
    });
    let first = h.client().submit(&whole_vm_sleeper(3)).expect("submit").id;
    h.wait_for_state(&first, ContainerState::Running, Duration::from_secs(60));
    let second = h.client().submit(&whole_vm_sleeper(1)).expect("submit").id;
    let mut why = String::new();
    h.wait_for(
        "the second to say why it waits",
        Duration::from_secs(30),
        || {
            why = h
                .client()
                .get(&second)
                .ok()
                .and_then(|c| c.scheduling_status)
                .unwrap_or_default();
            why.starts_with("over the spending cap")
        },
    );
    assert_eq!(
        why,
        "over the spending cap: a small costs $0.25/h and limits.max_hourly_spend leaves $0.0500/h"
    );
    let costs = get_json(&h, "/costs");
    assert_eq!(costs["hourly_price"], SMALL_PRICE, "{costs}");
    assert_eq!(costs["max_hourly_spend"], 0.3, "{costs}");
    // The second runs once the first is done, on the same VM: no second VM, ever.
    h.wait_for_state(&second, ContainerState::Complete, Duration::from_secs(60));
    let vms: std::collections::BTreeSet<String> = [&first, &second]
        .iter()
        .filter_map(|id| h.client().get(id).ok().and_then(|c| c.instance_id))
        .collect();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let creates = h.log().matches("type=small creating an instance").count();
    assert_eq!(creates, 1, "{}", h.log());

    // Each paid its VM for its own run, alone on it.
    for id in [&first, &second] {
        let c = h.client().get(id).expect("get");
        let (start, end) = (
            c.started_at_ms.expect("started"),
            c.finished_at_ms.expect("finished"),
        );
        let expected = SMALL_PRICE * (end - start) as f64 / 3_600_000.0;
        let cost = c.cost.expect("a cost once finished");
        assert!((cost - expected).abs() < 1e-9, "{cost} vs {expected}");
        assert!(cost > 0.0);
    }
    let spent = get_json(&h, "/costs")["spent_today"]
        .as_f64()
        .expect("spent");
    assert!(spent > 0.0, "the fleet's spend today counts the VM's time");
    let listed = cli(&["ps", "--json", "--url", &h.url, "--token", &h.token]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("ps --json");
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .all(|c| c["cost"].is_f64()),
        "{listed}"
    );
}
