//! Operators' instance actions: hold, drain, run and kill over the API and the CLI, behind
//! management tokens that cannot submit, while API tokens cannot manage.

use std::time::Duration;

use dispatch_cloud::client::Client;
use dispatch_cloud::queue::{ContainerState, NewContainer};
use system_tests::*;

const MANAGEMENT_TOKEN: &str = "mgmt-token";

fn harness() -> ServeHarness {
    ServeHarness::start_opts(HarnessOptions {
        cluster_extra: ONE_SMALL_TYPE.into(),
        top_extra: format!("management_tokens = [\"{MANAGEMENT_TOKEN}\"]"),
        ..HarnessOptions::default()
    })
}

fn manager(h: &ServeHarness) -> Client {
    Client::new(&h.url, MANAGEMENT_TOKEN)
}

fn sleeper(seconds: u32) -> NewContainer {
    NewContainer {
        command: vec!["sleep".into(), seconds.to_string()],
        priority: 1,
        ..Default::default()
    }
}

/// The one VM's ID once the cloud has given it one (a create in flight has none yet).
fn the_instance(h: &ServeHarness) -> String {
    let mut id = String::new();
    h.wait_for("a VM", Duration::from_secs(60), || {
        let created = h
            .client()
            .instances()
            .ok()
            .and_then(|l| l.into_iter().find(|i| !i.id.is_empty()));
        match created {
            Some(i) => {
                id = i.id;
                true
            }
            None => false,
        }
    });
    id
}

/// `(status, error text)` of a POST to the API.
fn post(h: &ServeHarness, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut request =
        ureq::post(&format!("{}{path}", h.url)).set("Content-Type", "application/json");
    if let Some(t) = token {
        request = request.set("Authorization", &format!("Bearer {t}"));
    }
    let response = match request.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    let status = response.status();
    let json: serde_json::Value =
        serde_json::from_str(&response.into_string().expect("body")).expect("JSON");
    (
        status,
        json["error"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn instance_actions_need_a_management_token_which_cannot_submit() {
    let h = harness();
    let id = h.client().submit(&sleeper(1)).expect("submit").id;
    let vm = the_instance(&h);
    let hold = format!("/instances/{vm}/hold");
    assert_eq!(post(&h, &hold, None, "").0, 401);
    let (status, error) = post(&h, &hold, Some(&h.token), "");
    assert_eq!(status, 403, "an API token does not manage: {error}");
    assert!(error.contains("management token"), "{error}");
    assert_eq!(
        post(&h, "/instances/no-such-vm/hold", Some(MANAGEMENT_TOKEN), "").0,
        404
    );
    let (status, error) = post(
        &h,
        &format!("/instances/{vm}/reboot"),
        Some(MANAGEMENT_TOKEN),
        "",
    );
    assert_eq!(status, 404, "{error}");
    assert!(error.contains("hold, drain, run or kill"), "{error}");
    let (status, error) = post(
        &h,
        &format!("/instances/{vm}/kill"),
        Some(MANAGEMENT_TOKEN),
        "{\"why\": 1}",
    );
    assert_eq!(status, 400, "{error}");
    // A management token reads, but cannot submit or change containers.
    assert!(manager(&h).list().is_ok());
    let (status, error) = post(
        &h,
        "/containers",
        Some(MANAGEMENT_TOKEN),
        "{\"command\": [\"true\"]}",
    );
    assert_eq!(status, 403, "{error}");
    let (status, _) = post(
        &h,
        &format!("/containers/{id}/cancel"),
        Some(MANAGEMENT_TOKEN),
        "",
    );
    assert_eq!(status, 403);
    assert_eq!(post(&h, &hold, Some(MANAGEMENT_TOKEN), "").0, 200);
}

#[test]
fn hold_keeps_an_idle_vm_drain_lets_it_go_and_run_restores_it() {
    let h = harness();
    let id = h.client().submit(&sleeper(2)).expect("submit").id;
    let vm = the_instance(&h);
    // Held while it works: it stays after the work is done.
    h.wait_for(
        "the container to run on it",
        Duration::from_secs(60),
        || {
            h.client().get(&id).is_ok_and(|c| {
                c.state == ContainerState::Running && c.instance_id.as_deref() == Some(vm.as_str())
            })
        },
    );
    manager(&h)
        .instance_action(&vm, "hold", Some("keep for debugging"))
        .expect("hold");
    h.wait_for_state(&id, ContainerState::Complete, Duration::from_secs(60));
    // Idle for three idle timeouts (1.5 s each): held, it stays.
    std::thread::sleep(Duration::from_millis(4500));
    let listed = h.client().instances().expect("instances");
    let held = listed.iter().find(|i| i.id == vm);
    assert_eq!(
        held.map(|i| i.idle_behavior.as_str()),
        Some("hold"),
        "{listed:?}"
    );
    assert!(
        h.log().contains("reason=\"keep for debugging\""),
        "{}",
        h.log()
    );
    // Held VMs take no new work: a new container waits for another VM.
    let second = h.client().submit(&sleeper(1)).expect("submit").id;
    h.wait_for(
        "the second container to run elsewhere",
        Duration::from_secs(60),
        || {
            h.client()
                .get(&second)
                .is_ok_and(|c| c.instance_id.as_deref().is_some_and(|i| i != vm))
        },
    );
    manager(&h)
        .instance_action(&vm, "drain", None)
        .expect("drain");
    h.wait_for("the drained idle VM to go", Duration::from_secs(60), || {
        h.client()
            .instances()
            .is_ok_and(|l| !l.iter().any(|i| i.id == vm))
    });
}

#[test]
fn kill_destroys_at_once_and_the_container_runs_again() {
    let h = harness();
    let id = h.client().submit(&sleeper(30)).expect("submit").id;
    let vm = the_instance(&h);
    h.wait_for_state(&id, ContainerState::Running, Duration::from_secs(60));
    manager(&h)
        .instance_action(&vm, "kill", Some("disk failing"))
        .expect("kill");
    h.wait_for("the killed VM gone", Duration::from_secs(60), || {
        h.client()
            .instances()
            .is_ok_and(|l| !l.iter().any(|i| i.id == vm))
    });
    assert!(
        h.log().contains("killed by an operator: disk failing"),
        "the reason is logged"
    );
    h.wait_for(
        "the container back on another VM",
        Duration::from_secs(90),
        || {
            h.client().get(&id).is_ok_and(|c| {
                c.state == ContainerState::Running && c.instance_id.as_deref() != Some(vm.as_str())
            })
        },
    );
}

#[test]
fn the_cli_acts_on_several_and_fails_if_any_is_refused() {
    let h = harness();
    h.client().submit(&sleeper(1)).expect("submit");
    let vm = the_instance(&h);
    let out = cli(&[
        "hold",
        "--url",
        &h.url,
        "--token",
        MANAGEMENT_TOKEN,
        &vm,
        "no-such-vm",
    ]);
    assert!(!out.status.success(), "one refused: exit 1");
    assert!(text(&out.stdout).contains(&format!("{vm}: hold")));
    assert!(
        text(&out.stderr).contains("no-such-vm"),
        "{}",
        text(&out.stderr)
    );
    h.wait_for("the hold shows", Duration::from_secs(10), || {
        h.client().instances().is_ok_and(|l| {
            l.iter()
                .any(|i| i.id == vm && i.idle_behavior.as_str() == "hold")
        })
    });
    // The fleet in the original's columns: the held VM, its types and price.
    let out = cli(&["instances", "--url", &h.url, "--token", MANAGEMENT_TOKEN]);
    let table = text(&out.stdout);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "INSTANCE",
            "ADDRESS",
            "STATE",
            "IDLE",
            "TYPE",
            "PROVIDER-TYPE",
            "PRICE",
            "CONTAINERS",
            "LAST-BUSY",
            "REASON"
        ]
    );
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&vm))
        .unwrap_or_else(|| panic!("{vm} not listed:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[3], "hold", "{table}");
    assert_eq!(
        (row[4], row[5], row[6]),
        ("small", "lb.small", "0.2500"),
        "{table}"
    );
    let out = cli(&["run", "--url", &h.url, "--token", MANAGEMENT_TOKEN, &vm]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `(status, body)` of a GET with the management token.
fn get(h: &ServeHarness, path: &str) -> (u16, serde_json::Value) {
    let request = ureq::get(&format!("{}{path}", h.url))
        .set("Authorization", &format!("Bearer {MANAGEMENT_TOKEN}"));
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let status = response.status();
    let body = serde_json::from_str(&response.into_string().expect("body")).expect("JSON");
    (status, body)
}

#[test]
fn the_scheduler_queue_shows_where_each_runs_and_kill_stops_one_with_a_reason() {
    let h = harness();
    let id = h.client().submit(&sleeper(60)).expect("submit").id;
    h.wait_for_state(&id, ContainerState::Running, Duration::from_secs(60));
    let vm = the_instance(&h);
    h.wait_for(
        "the queue to show it running",
        Duration::from_secs(30),
        || {
            let (status, entry) = get(&h, &format!("/scheduler/queue/{id}"));
            status == 200 && entry["scheduling_status"] == format!("running on {vm}")
        },
    );
    let (_, queue) = get(&h, "/scheduler/queue");
    assert_eq!(queue[0]["container"], id.as_str(), "{queue}");
    assert_eq!(queue[0]["instance_types"], serde_json::json!(["small"]));
    let (status, error) = get(&h, "/scheduler/queue/zzzzz-dz642-000000000000000");
    assert_eq!(status, 404, "{error}");
    let out = cli(&[
        "ps",
        "--scheduling",
        "--url",
        &h.url,
        "--token",
        MANAGEMENT_TOKEN,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&id) && listing.contains(&format!("running on {vm}")),
        "{listing}"
    );

    let kill = format!("/scheduler/queue/{id}/kill");
    assert_eq!(post(&h, &kill, None, "").0, 401);
    let (status, error) = post(&h, &kill, Some(&h.token), "{\"reason\": \"x\"}");
    assert_eq!(status, 403, "{error}");
    let (status, error) = post(&h, &kill, Some(MANAGEMENT_TOKEN), "");
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("reason"), "{error}");
    let (status, _) = post(
        &h,
        "/scheduler/queue/zzzzz-dz642-000000000000000/kill",
        Some(MANAGEMENT_TOKEN),
        "{\"reason\": \"x\"}",
    );
    assert_eq!(status, 404);
    let (status, error) = post(
        &h,
        &kill,
        Some(MANAGEMENT_TOKEN),
        "{\"reason\": \"runaway job\"}",
    );
    assert_eq!(status, 200, "{error}");
    let killed = h.client().get(&id).expect("get");
    assert_eq!(killed.state, ContainerState::Cancelled);
    assert_eq!(
        killed.runtime_error.as_deref(),
        Some("killed by an operator: runaway job")
    );
    // Its process is stopped: the VM no longer lists it, well before its 60 s are up.
    h.wait_for("the VM to let it go", Duration::from_secs(30), || {
        h.client()
            .instances()
            .is_ok_and(|l| l.iter().any(|i| i.id == vm && !i.containers.contains(&id)))
    });
}

#[test]
fn drain_lets_a_running_container_finish_then_shuts_the_vm_down() {
    let h = harness();
    let id = h.client().submit(&sleeper(3)).expect("submit").id;
    h.wait_for_state(&id, ContainerState::Running, Duration::from_secs(60));
    let vm = the_instance(&h);
    manager(&h)
        .instance_action(&vm, "drain", Some("retiring"))
        .expect("drain");
    h.wait_for_state(&id, ContainerState::Complete, Duration::from_secs(60));
    let done = h.client().get(&id).expect("get");
    assert_eq!(done.exit_code, Some(0), "it finished, not killed");
    h.wait_for("the drained VM to go", Duration::from_secs(60), || {
        h.client()
            .instances()
            .is_ok_and(|l| !l.iter().any(|i| i.id == vm))
    });
}
