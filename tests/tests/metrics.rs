//! `GET /metrics`: Prometheus's own `promtool check metrics` accepts a scrape taken while a
//! container runs, and the counters and gauges move as the fleet does.

use std::time::Duration;

use dispatch_cloud::queue::{ContainerState, NewContainer};
use system_tests::*;

fn scrape(h: &ServeHarness) -> String {
    let response = ureq::get(&format!("{}/metrics", h.url))
        .set("Authorization", &format!("Bearer {}", h.token))
        .call()
        .expect("scrape");
    assert!(
        response.content_type().starts_with("text/plain"),
        "{}",
        response.content_type()
    );
    response.into_string().expect("body")
}

/// The value of the sample line that starts with `series` (name and labels as written).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn promtool() -> std::path::PathBuf {
    let path = std::env::var("PROMTOOL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv/tools/promtool"));
    assert!(
        path.exists(),
        "{} is missing: run the README's test command, which unpacks Debian's promtool there",
        path.display()
    );
    path
}

#[test]
fn promtool_accepts_a_scrape_mid_run_and_the_counters_move() {
    let h = ServeHarness::start(ONE_SMALL_TYPE, "");
    let id = h
        .client()
        .submit(&NewContainer {
            command: vec!["sleep".into(), "5".into()],
            priority: 1,
            ..Default::default()
        })
        .expect("submit")
        .id;
    h.wait_for_state(&id, ContainerState::Running, Duration::from_secs(60));
    // The event stream can report the run before the start command's own answer, which is
    // when queue-to-start is observed: the scrape waits for both.
    let mut mid = String::new();
    h.wait_for(
        "a scrape with the start counted",
        Duration::from_secs(10),
        || {
            mid = scrape(&h);
            value(
                &mid,
                "dispatch_cloud_containers_queue_to_start_seconds_count",
            ) == Some(1.0)
        },
    );
    let file = h.dir.path().join("scrape.txt");
    std::fs::write(&file, &mid).expect("write scrape");
    let out = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{mid}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        value(&mid, "dispatch_cloud_containers_running"),
        Some(1.0),
        "{mid}"
    );
    assert_eq!(
        value(
            &mid,
            "dispatch_cloud_instances{state=\"running\",instance_type=\"small\"}"
        ),
        Some(1.0),
        "{mid}"
    );
    assert_eq!(
        value(
            &mid,
            "dispatch_cloud_instances_price_per_hour{state=\"running\"}"
        ),
        Some(0.25),
        "{mid}"
    );
    assert_eq!(
        value(&mid, "dispatch_cloud_vcpus{state=\"running\"}"),
        Some(2.0)
    );
    assert_eq!(
        value(&mid, "dispatch_cloud_memory_bytes{state=\"running\"}"),
        Some(2.0 * 1024.0 * 1024.0 * 1024.0)
    );
    for (series, expected) in [
        (
            "dispatch_cloud_boot_outcomes_total{outcome=\"success\"}",
            1.0,
        ),
        (
            "dispatch_cloud_boot_outcomes_total{outcome=\"failure\"}",
            0.0,
        ),
        (
            "dispatch_cloud_queue_entries{state=\"Running\",instance_type=\"small\"}",
            1.0,
        ),
        ("dispatch_cloud_instances_time_to_ssh_seconds_count", 1.0),
        ("dispatch_cloud_instances_time_to_ready_seconds_count", 1.0),
        (
            "dispatch_cloud_containers_queue_to_start_seconds_count",
            1.0,
        ),
        ("dispatch_cloud_at_quota", 0.0),
        ("dispatch_cloud_containers_allocated_not_started", 0.0),
    ] {
        assert_eq!(value(&mid, series), Some(expected), "{series}\n{mid}");
    }
    assert!(
        value(&mid, "dispatch_cloud_spent_today_dollars").is_some(),
        "{mid}"
    );
    let create = "dispatch_cloud_driver_operations_total{driver=\"loopback\",operation=\"create\",error=\"none\"}";
    let destroy = "dispatch_cloud_driver_operations_total{driver=\"loopback\",operation=\"destroy\",error=\"none\"}";
    assert_eq!(value(&mid, create), Some(1.0), "{mid}");
    assert_eq!(value(&mid, destroy), Some(0.0), "pre-initialized: {mid}");
    assert_eq!(
        value(
            &mid,
            "dispatch_cloud_plugin_loads_total{plugin=\"loopback\",result=\"ok\"}"
        ),
        Some(1.0)
    );
    // The container finishes, the idle VM goes: one create, one destroy, nothing running.
    h.wait_for("the idle VM destroyed", Duration::from_secs(60), || {
        value(&scrape(&h), destroy) == Some(1.0)
    });
    let after = scrape(&h);
    assert_eq!(value(&after, create), Some(1.0), "{after}");
    assert_eq!(
        value(&after, "dispatch_cloud_containers_running"),
        Some(0.0)
    );
    assert_eq!(
        value(
            &after,
            "dispatch_cloud_instances_shutdown_to_gone_seconds_count"
        ),
        Some(1.0),
        "{after}"
    );
    assert!(
        ureq::get(&format!("{}/metrics", h.url)).call().is_err(),
        "a scrape needs a token"
    );
}
