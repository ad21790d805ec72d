//! The status page in a real browser (headless Chromium, driven by selenium from
//! tests/browser/status_page.py): it signs in, shows the numbers the API shows, and a drain
//! clicked on the page drains the VM.

use std::time::Duration;

use dispatch_cloud::queue::{ContainerState, NewContainer, RuntimeConstraints};
use system_tests::*;

const MANAGEMENT_TOKEN: &str = "page-mgmt-token";

fn whole_vm_sleeper(seconds: u32) -> NewContainer {
    NewContainer {
        command: vec!["sleep".into(), seconds.to_string()],
        priority: 1,
        runtime_constraints: RuntimeConstraints {
            vcpus: 2,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn get_json(h: &ServeHarness, path: &str) -> serde_json::Value {
    system_tests::get_json(&h.url, path, MANAGEMENT_TOKEN)
}

#[test]
fn the_page_shows_what_the_api_shows_and_its_drain_button_drains() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: run the README's test command, which installs Debian's chromium and chromium-driver"
        );
    }
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run the README's test command, which installs selenium there",
        python.display()
    );
    // One VM allowed: the first container runs on it, the second waits over quota.
    let h = ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        limits_extra: "max_instances = 1".into(),
        top_extra: format!("management_tokens = [\"{MANAGEMENT_TOKEN}\"]"),
        ..HarnessOptions::default()
    });
    let running = h.client().submit(&whole_vm_sleeper(60)).expect("submit").id;
    h.wait_for_state(&running, ContainerState::Running, Duration::from_secs(60));
    let waiting = h.client().submit(&whole_vm_sleeper(1)).expect("submit").id;
    h.wait_for(
        "the second to wait over quota",
        Duration::from_secs(30),
        || {
            get_json(&h, &format!("/scheduler/queue/{waiting}"))["scheduling_status"]
                .as_str()
                .is_some_and(|s| s.starts_with("over quota"))
        },
    );
    let vm = h
        .client()
        .get(&running)
        .expect("get")
        .instance_id
        .expect("its VM");

    let out = std::process::Command::new(&python)
        .arg(workspace_root().join("tests/browser/status_page.py"))
        .args(["--url", &h.url, "--token", MANAGEMENT_TOKEN, "--drain", &vm])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the browser script");
    assert!(
        out.status.success(),
        "browser script: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    let before = &seen["before"];

    // The numbers on the page are the API's.
    let instances = get_json(&h, "/instances");
    assert_eq!(
        before["instances"],
        instances.as_array().map_or(0, Vec::len),
        "{seen}"
    );
    assert_eq!(before["instances"], 1);
    let costs = get_json(&h, "/costs");
    assert_eq!(before["hourly_price"], costs["hourly_price"], "{seen}");
    assert!(before["spent_today"].as_f64() <= costs["spent_today"].as_f64());
    let queue = get_json(&h, "/scheduler/queue");
    let waiting_in_api = queue
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["instance"].is_null())
        .count();
    assert_eq!(before["waiting"], waiting_in_api, "{seen}");
    assert_eq!(
        before["statuses"][&waiting],
        get_json(&h, &format!("/scheduler/queue/{waiting}"))["scheduling_status"],
        "{seen}"
    );
    assert_eq!(
        before["statuses"][&running],
        format!("running on {vm}"),
        "{seen}"
    );
    assert_eq!(before["idle_behavior"], "run");
    assert_eq!(before["chart_lines"], 2);

    // The drain clicked on the page reached the dispatcher: the VM drains.
    assert_eq!(seen["after"]["idle_behavior"], "drain", "{seen}");
    let drained = h
        .client()
        .instances()
        .expect("instances")
        .into_iter()
        .find(|i| i.id == vm)
        .map(|i| i.idle_behavior.as_str());
    assert_eq!(drained, Some("drain"));
    assert!(
        h.log().contains("(from the status page)"),
        "the page's action is logged as such"
    );
}
