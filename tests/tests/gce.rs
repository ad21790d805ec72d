//! The GCE driver's real `.so`, pinned in a `plugins.toml`, against the in-repo Compute fake
//! (`tests/fakes/gce_compute.py`): the conformance kit without SSH, set isolation and paging,
//! zone fail-over, the shape of what is sent, fingerprinted metadata writes, host keys through
//! guest attributes, and every error mapping, as the host sees them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dispatch_cloud::plugin::{self, Catalogue};
use driver_abi::{CapacityScope, CreateRequest, DriverError, InstanceSet, InstanceType, Tags};
use serde_json::{json, Value};
use system_tests::*;

const PROJECT: &str = "dispatch-test";
const IMAGE: &str = "projects/debian-cloud/global/images/family/debian-12";

fn gce_so() -> PathBuf {
    built("libdispatch_cloud_gce.so")
}

/// A pinned catalogue with one instance set per `(name, set ID, extra parameters)`.
fn catalogue_text(fake: &GceFake, credentials: &Path, sets: &[(&str, &str, &str)]) -> String {
    let mut text = pinned_plugin_entry("gce", &gce_so());
    for (name, set_id, extra) in sets {
        let zones = if extra.contains("zones =") {
            String::new()
        } else {
            "zones = [\"us-central1-a\"]\n".to_string()
        };
        text.push_str(&format!(
            "\n[[instance_sets]]\nname = \"{name}\"\ndriver = \"gce\"\nset_id = \"{set_id}\"\n[instance_sets.parameters]\nproject = \"{PROJECT}\"\n{zones}endpoint = \"{}\"\ncredentials_file = {:?}\n{extra}\n",
            fake.endpoint,
            credentials.display().to_string()
        ));
    }
    text
}

struct Setup {
    fake: GceFake,
    driver: DriverUnderTest,
}

impl Setup {
    fn new(sets: &[(&str, &str, &str)]) -> Setup {
        let fake = GceFake::start();
        let dir = tempfile::tempdir().expect("tmp");
        let credentials = fake.credentials_file(dir.path(), true);
        let text = catalogue_text(&fake, &credentials, sets);
        Setup {
            driver: DriverUnderTest::load_in(dir, &text, "gce"),
            fake,
        }
    }

    fn open(&self, name: &str) -> Arc<dyn InstanceSet> {
        self.driver.open(name)
    }

    /// The logged requests whose method is `method` and whose path ends with `suffix`.
    fn calls(&self, method: &str, suffix: &str) -> Vec<Value> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| {
                r["method"] == method && r["path"].as_str().is_some_and(|p| p.ends_with(suffix))
            })
            .collect()
    }
}

fn request(t: InstanceType, key: Option<String>) -> CreateRequest {
    let mut tags = Tags::new();
    tags.insert("purpose".into(), "test".into());
    CreateRequest {
        instance_type: t,
        image_id: IMAGE.into(),
        tags,
        init_command: "echo hello from init".into(),
        public_key: key,
    }
}

/// The value of metadata item `key` in an instance (or insert body).
fn metadata_item<'a>(instance: &'a Value, key: &str) -> Option<&'a str> {
    instance["metadata"]["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)?["value"]
        .as_str()
}

#[test]
fn the_real_so_passes_driver_test_against_the_fake() {
    let fake = GceFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let credentials = fake.credentials_file(dir.path(), true);
    let file = write_plugins_toml(
        dir.path(),
        &catalogue_text(
            &fake,
            &credentials,
            &[("gce", "zzzzz-zzzzz-gceconformance0", "")],
        ),
    );
    assert_driver_test_passes(&file, "gce", "n2-standard-2", IMAGE, &[]);
    // Every Compute call carried a bearer token from the fake's token endpoint.
    let requests = fake.requests();
    for (method, suffix) in [
        ("GET", "/aggregated/instances"),
        ("POST", "/zones/us-central1-a/instances"),
        ("POST", "/wait"),
        ("POST", "/setMetadata"),
        ("DELETE", ""),
    ] {
        assert!(
            requests.iter().any(|r| r["method"] == method
                && r["path"].as_str().is_some_and(|p| p.ends_with(suffix))),
            "no {method} …{suffix}: {requests:?}"
        );
    }
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "{requests:?}"
    );
    eventually(
        "the deleted instance is gone from the fake",
        Duration::from_secs(10),
        || fake.instances().is_empty(),
    );
}

#[test]
fn sets_see_only_their_own_instances_and_listings_page() {
    let s = Setup::new(&[
        ("a", "zzzzz-zzzzz-gceseta00000000", "page_size = 5"),
        ("b", "zzzzz-zzzzz-gcesetb00000000", ""),
    ]);
    let a = s.open("a");
    let b = s.open("b");
    for _ in 0..12 {
        a.create(&request(InstanceType::minimal("e2-small"), None))
            .expect("create in a");
    }
    b.create(&request(InstanceType::minimal("e2-small"), None))
        .expect("create in b");
    let listed_a = a.instances(&Tags::new()).expect("list a");
    assert_eq!(listed_a.len(), 12);
    let listed_b = b.instances(&Tags::new()).expect("list b");
    assert_eq!(listed_b.len(), 1);
    assert!(listed_b
        .iter()
        .all(|i| !listed_a.iter().any(|j| j.id() == i.id())));

    // One aggregated listing over all zones, label-filtered server-side, in pages of 5 with
    // the token handed back.
    let lists = s.calls("GET", "/aggregated/instances");
    let of_a: Vec<&Value> = lists
        .iter()
        .filter(|r| {
            r["query"]["filter"] == "labels.dispatch_cloud_set = \"zzzzz-zzzzz-gceseta00000000\""
        })
        .collect();
    assert_eq!(of_a.len(), 3, "12 in pages of 5: {of_a:?}");
    assert_eq!(of_a[0]["query"]["maxResults"], "5");
    assert!(of_a[0]["query"].get("pageToken").is_none());
    assert_eq!(of_a[1]["query"]["pageToken"], "5");
    assert_eq!(of_a[2]["query"]["pageToken"], "10");

    // A tag filter narrows the set's listing.
    let vm = &listed_a[0];
    let mut tags = vm.tags();
    tags.insert("chosen".into(), "yes".into());
    vm.set_tags(&tags).expect("tag one");
    let mut filter = Tags::new();
    filter.insert("chosen".into(), "yes".into());
    let chosen = a.instances(&filter).expect("filtered list");
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].id(), vm.id());

    for i in listed_a.iter().chain(listed_b.iter()) {
        i.destroy().expect("destroy");
    }
    assert!(a.instances(&Tags::new()).expect("list").is_empty());
    assert!(b.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn an_exhausted_zone_fails_over_and_the_working_zone_is_remembered() {
    let s = Setup::new(&[(
        "z",
        "zzzzz-zzzzz-gcezones0000000",
        "zones = [\"us-central1-a\", \"us-central1-b\"]",
    )]);
    let set = s.open("z");
    s.fake.inject(
        "POST",
        "/zones/us-central1-a/instances$",
        json!({"operation_error": {"httpErrorStatusCode": 503, "httpErrorMessage": "SERVICE UNAVAILABLE", "errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "The zone 'projects/dispatch-test/zones/us-central1-a' does not have enough resources available to fulfill the request.  Try a different zone, or try again later."}]}}),
    );
    let first = set
        .create(&request(InstanceType::minimal("n2-standard-4"), None))
        .expect("create fails over to the next zone");
    let second = set
        .create(&request(InstanceType::minimal("n2-standard-4"), None))
        .expect("second create");
    let zones: Vec<String> = s
        .calls("POST", "/instances")
        .iter()
        .filter_map(|r| r["path"].as_str())
        .map(|p| p.split('/').nth(6).unwrap_or("").to_string())
        .collect();
    assert_eq!(
        zones,
        ["us-central1-a", "us-central1-b", "us-central1-b"],
        "tried a, then b; b first the next time"
    );
    let live = s.fake.instances();
    assert_eq!(live.len(), 2, "the failed insert left nothing: {live:?}");
    assert!(live.iter().all(|i| i["zone"]
        .as_str()
        .is_some_and(|z| z.ends_with("/us-central1-b"))));

    // Every zone exhausted: the type's capacity error, for the host's hold-off.
    for zone in ["a", "b"] {
        s.fake.inject(
            "POST",
            &format!("/zones/us-central1-{zone}/instances$"),
            json!({"operation_error": {"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "message": "The zone does not have enough resources available to fulfill the request.  '(resource type:compute)'."}]}}),
        );
    }
    match set.create(&request(InstanceType::minimal("n2-standard-4"), None)) {
        Err(DriverError::Capacity {
            scope: CapacityScope::InstanceType(t),
            ..
        }) => assert_eq!(t, "n2-standard-4"),
        other => panic!("{:?}", other.map(|i| i.id())),
    }
    first.destroy().expect("destroy");
    second.destroy().expect("destroy");
}

#[test]
fn what_create_sends_spot_startup_script_ssh_keys_labels_and_tags() {
    let s = Setup::new(&[(
        "shape",
        "zzzzz-zzzzz-gceshape0000000",
        "labels = { team = \"genomics\" }\nservice_account = \"vm@dispatch-test.iam.gserviceaccount.com\"\nscopes = [\"https://www.googleapis.com/auth/devstorage.read_only\"]\nsubnetwork = \"regions/us-central1/subnetworks/batch\"\nadmin_username = \"crunch\"",
    )]);
    let set = s.open("shape");
    let key = test_public_key();
    let spot = InstanceType {
        preemptible: true,
        added_scratch_bytes: 50 << 30,
        ..InstanceType::minimal("n2-standard-8")
    };
    let vm = set
        .create(&request(spot, Some(key.clone())))
        .expect("create");
    let inserts = s.calls("POST", "/instances");
    assert_eq!(inserts.len(), 1);
    let sent = &inserts[0]["body"];
    assert_eq!(
        sent["machineType"],
        "zones/us-central1-a/machineTypes/n2-standard-8"
    );
    assert_eq!(sent["scheduling"]["provisioningModel"], "SPOT");
    assert_eq!(sent["scheduling"]["instanceTerminationAction"], "DELETE");
    assert_eq!(
        metadata_item(sent, "startup-script"),
        Some("#!/bin/sh\necho hello from init\n")
    );
    assert_eq!(
        metadata_item(sent, "ssh-keys"),
        Some(format!("crunch:{}", key.trim()).as_str())
    );
    assert_eq!(metadata_item(sent, "enable-guest-attributes"), Some("TRUE"));
    assert_eq!(metadata_item(sent, "dc-tag-purpose"), Some("test"));
    assert_eq!(
        sent["labels"]["dispatch_cloud_set"],
        "zzzzz-zzzzz-gceshape0000000"
    );
    assert_eq!(sent["labels"]["team"], "genomics");
    let nic = &sent["networkInterfaces"][0];
    assert_eq!(nic["subnetwork"], "regions/us-central1/subnetworks/batch");
    assert!(nic.get("accessConfigs").is_none(), "no external IP: {nic}");
    let disks = sent["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "boot and scratch: {disks:?}");
    assert_eq!(disks[0]["boot"], true);
    assert_eq!(disks[0]["initializeParams"]["sourceImage"], IMAGE);
    assert_eq!(disks[1]["deviceName"], "scratch");
    assert_eq!(
        disks[1]["initializeParams"]["diskSizeGb"], "50",
        "int64 as a string"
    );
    assert_eq!(disks[1]["autoDelete"], true);
    assert_eq!(
        sent["serviceAccounts"][0]["email"],
        "vm@dispatch-test.iam.gserviceaccount.com"
    );
    assert_eq!(
        sent["serviceAccounts"][0]["scopes"],
        json!(["https://www.googleapis.com/auth/devstorage.read_only"])
    );

    // What the driver reports back.
    assert!(
        vm.address().starts_with("10.128."),
        "networkIP: {}",
        vm.address()
    );
    assert_eq!(vm.provider_type(), "n2-standard-8");
    assert_eq!(vm.remote_user(), "crunch");
    assert_eq!(vm.tags().get("purpose").map(String::as_str), Some("test"));
    assert_eq!(
        set.quota_group(&InstanceType {
            preemptible: true,
            ..InstanceType::minimal("n2-standard-8")
        }),
        "n2-spot"
    );
    vm.destroy().expect("destroy");
}

#[test]
fn set_metadata_survives_a_concurrent_change() {
    let s = Setup::new(&[("m", "zzzzz-zzzzz-gcemetadata0000", "")]);
    let set = s.open("m");
    let vm = set
        .create(&request(InstanceType::minimal("e2-small"), None))
        .expect("create");
    s.fake.race_metadata(&vm.id());
    let mut tags = vm.tags();
    tags.insert("dispatch-cloud-idle-behavior".into(), "hold".into());
    tags.remove("purpose");
    vm.set_tags(&tags)
        .expect("set_tags retries past the stale fingerprint");

    let writes: Vec<Value> = s
        .calls("POST", "/setMetadata")
        .into_iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(
        writes,
        [json!(412), json!(200)],
        "stale, then re-read and written"
    );
    let stored = s
        .fake
        .instances()
        .into_iter()
        .find(|i| i["name"] == vm.id().as_str())
        .expect("instance");
    assert_eq!(
        metadata_item(&stored, "other-writer"),
        Some("was here"),
        "the other writer's item is kept"
    );
    assert_eq!(
        metadata_item(&stored, "dc-tag-dispatch-cloud-idle-behavior"),
        Some("hold")
    );
    assert_eq!(
        metadata_item(&stored, "dc-tag-purpose"),
        None,
        "removed tag is gone"
    );
    assert!(metadata_item(&stored, "startup-script").is_some());
    let relisted = set.instances(&Tags::new()).expect("list");
    assert_eq!(relisted[0].tags(), tags);
    vm.destroy().expect("destroy");
}

#[test]
fn host_keys_are_checked_against_guest_attributes() {
    let s = Setup::new(&[("k", "zzzzz-zzzzz-gcehostkeys0000", "")]);
    let set = s.open("k");
    let vm = set
        .create(&request(InstanceType::minimal("e2-small"), None))
        .expect("create");
    let key = test_public_key();
    let blob = key.split_whitespace().nth(1).expect("blob").to_string();

    // Nothing published yet: an error to retry at the next probe, never an acceptance.
    let early = vm.verify_host_key(&key).expect_err("nothing published");
    assert_eq!(early.kind(), "other");
    assert!(early.to_string().contains("not published"), "{early}");

    s.fake.guest_attributes(
        PROJECT,
        "us-central1-a",
        &vm.id(),
        json!([
            {"namespace": "hostkeys", "key": "ssh-rsa", "value": "AAAAB3NzaC1yc2EAAAADAQABAAABAQC7"},
            {"namespace": "hostkeys", "key": "ssh-ed25519", "value": blob},
        ]),
    );
    vm.verify_host_key(&key)
        .expect("the published key is accepted");
    let stranger = test_public_key();
    let refused = vm
        .verify_host_key(&stranger)
        .expect_err("another key is refused");
    assert!(refused.to_string().contains("not the one"), "{refused}");
    let queried = s.calls("GET", "/getGuestAttributes");
    assert_eq!(queried.len(), 3, "{queried:?}");
    assert!(queried
        .iter()
        .all(|r| r["query"]["queryPath"] == "hostkeys/"));
    vm.destroy().expect("destroy");
}

#[test]
fn every_error_mapping_reaches_the_host_typed() {
    let s = Setup::new(&[("e", "zzzzz-zzzzz-gceerrors000000", "")]);
    let set = s.open("e");
    let create = || set.create(&request(InstanceType::minimal("n2-standard-8"), None));
    let list = "/aggregated/instances$";
    let insert = "/zones/us-central1-a/instances$";

    // 429 with a retry hint: held off at least that long.
    s.fake.inject(
        "GET",
        list,
        json!({"respond": {"status": 429, "headers": {"Retry-After": "30"}, "body": {"error": {"code": 429, "message": "Too Many Requests", "status": "RESOURCE_EXHAUSTED"}}}}),
    );
    let hinted = set.instances(&Tags::new()).err().expect("429");
    assert!(
        rate_limit_wait(&hinted) > Duration::from_secs(25),
        "{hinted:?}"
    );
    // 429 without a hint, then the legacy 403 rateLimitExceeded: a growing back-off.
    s.fake.inject(
        "GET",
        list,
        json!({"respond": {"status": 429, "body": {"error": {"code": 429, "message": "Too Many Requests", "status": "RESOURCE_EXHAUSTED"}}}}),
    );
    s.fake.inject(
        "GET",
        list,
        json!({"respond": {"status": 403, "body": {"error": {"code": 403, "message": "Rate Limit Exceeded", "errors": [{"message": "Rate Limit Exceeded", "domain": "usageLimits", "reason": "rateLimitExceeded"}]}}}}),
    );
    let first = rate_limit_wait(&set.instances(&Tags::new()).err().expect("429"));
    let second = rate_limit_wait(&set.instances(&Tags::new()).err().expect("403"));
    assert!(second > first, "{first:?} then {second:?}");
    set.instances(&Tags::new())
        .expect("and then it answers again");

    // Quotas: shared, and per family.
    s.fake.inject(
        "POST",
        insert,
        json!({"operation_error": {"httpErrorStatusCode": 403, "errors": [{"code": "QUOTA_EXCEEDED", "message": "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.", "errorDetails": [{"quotaInfo": {"metricName": "compute.googleapis.com/cpus", "limitName": "CPUS-per-project-region", "limit": 24}}]}]}}),
    );
    assert_eq!(create().err().expect("quota").kind(), "quota");
    s.fake.inject(
        "POST",
        insert,
        json!({"operation_error": {"httpErrorStatusCode": 403, "errors": [{"code": "QUOTA_EXCEEDED", "message": "Quota 'N2_CPUS' exceeded.  Limit: 8.0 in region us-central1.", "errorDetails": [{"quotaInfo": {"metricName": "compute.googleapis.com/n2_cpus", "limitName": "N2-CPUS-per-project-region", "limit": 8}}]}]}}),
    );
    match create() {
        Err(DriverError::Capacity {
            scope: CapacityScope::QuotaGroup(g),
            ..
        }) => assert_eq!(g, "n2"),
        other => panic!("{:?}", other.map(|i| i.id())),
    }
    // A machine type this zone does not have (GCE's 400 for it).
    let missing = "Invalid value for field 'resource.machineType': 'zones/us-central1-a/machineTypes/n2-standard-8'. Machine type with name 'n2-standard-8' does not exist in zone 'us-central1-a'.";
    s.fake.inject(
        "POST",
        insert,
        json!({"respond": {"status": 400, "body": {"error": {"code": 400, "message": missing, "errors": [{"message": missing, "domain": "global", "reason": "invalid"}]}}}}),
    );
    match create() {
        Err(DriverError::Capacity {
            scope: CapacityScope::InstanceType(t),
            ..
        }) => assert_eq!(t, "n2-standard-8"),
        other => panic!("{:?}", other.map(|i| i.id())),
    }
    // Configuration the operator got wrong, named.
    for (message, param) in [
        (
            "The resource 'projects/debian-cloud/global/images/family/debain-12' was not found",
            "image",
        ),
        (
            "The resource 'projects/dispatch-test/global/networks/nope' was not found",
            "network",
        ),
        (
            "The resource 'projects/dispatch-test' was not found",
            "project",
        ),
    ] {
        s.fake.inject(
            "POST",
            insert,
            json!({"respond": {"status": 404, "body": {"error": {"code": 404, "message": message, "errors": [{"message": message, "domain": "global", "reason": "notFound"}]}}}}),
        );
        let e = create().err().expect("config error");
        assert_eq!(e.kind(), "invalid_config", "{e}");
        assert!(e.to_string().contains(param), "{param}: {e}");
    }
    // A server error is just an error, for the host to retry later.
    s.fake.inject(
        "POST",
        insert,
        json!({"respond": {"status": 503, "body": {"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}}}}),
    );
    assert_eq!(create().err().expect("5xx").kind(), "other");
    assert!(s.fake.instances().is_empty(), "no failed create left a VM");
}

#[test]
fn bad_parameters_and_credentials_are_named() {
    let s = Setup::new(&[
        ("typo", "zzzzz-zzzzz-gcetypo00000000", "zoens = [\"x\"]"),
        ("nofile", "zzzzz-zzzzz-gcenofile000000", ""),
    ]);
    let err = s.driver.open_err("typo");
    assert_eq!(err.kind(), "invalid_config");
    assert!(err.to_string().contains("zoens"), "{err}");

    // A credentials file that is not there.
    let original = std::fs::read_to_string(s.driver.dir.path().join("plugins.toml")).expect("read");
    let missing = s.driver.dir.path().join("no-such-key.json");
    let moved = original.replacen(
        &format!(
            "{:?}",
            s.driver
                .dir
                .path()
                .join("gce-credentials.json")
                .display()
                .to_string()
        ),
        &format!("{:?}", missing.display().to_string()),
        2,
    );
    let c = Catalogue::load(&write_plugins_toml(s.driver.dir.path(), &moved)).expect("catalogue");
    let err = s
        .driver
        .loaded
        .new_instance_set(c.instance_set("nofile").expect("set"), &Tags::new())
        .err()
        .expect("missing file refused");
    assert_eq!(err.kind(), "invalid_config");
    assert!(err.to_string().contains("credentials_file"), "{err}");

    // A refresh token the token endpoint refuses: the first call says which setting.
    let revoked = s.fake.credentials_file(s.driver.dir.path(), false);
    let with_revoked = moved.replace(
        &format!("{:?}", missing.display().to_string()),
        &format!("{:?}", revoked.display().to_string()),
    );
    let c = Catalogue::load(&write_plugins_toml(s.driver.dir.path(), &with_revoked))
        .expect("catalogue");
    let set = s
        .driver
        .loaded
        .new_instance_set(c.instance_set("nofile").expect("set"), &Tags::new())
        .expect("the set opens; the token is fetched on use");
    let err = set.instances(&Tags::new()).err().expect("token refused");
    assert_eq!(err.kind(), "invalid_config", "{err}");
    assert!(err.to_string().contains("credentials_file"), "{err}");

    // No credentials_file and no application-default credentials, through the CLI (its own
    // environment).
    let no_file = with_revoked.replace(
        &format!("credentials_file = {:?}\n", revoked.display().to_string()),
        "",
    );
    let file = write_plugins_toml(s.driver.dir.path(), &no_file);
    let out = std::process::Command::new(built("dispatch-cloud"))
        .args([
            "driver-test",
            "--plugins",
            file.to_str().expect("utf8"),
            "--instance-set",
            "nofile",
            "--instance-type",
            "e2-small",
            "--skip-ssh",
        ])
        .env(
            "GOOGLE_APPLICATION_CREDENTIALS",
            s.driver.dir.path().join("absent-adc.json"),
        )
        .output()
        .expect("run driver-test");
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAIL initialize the instance set") && stdout.contains("credentials_file"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
}

#[test]
fn a_service_account_key_signs_its_own_tokens() {
    let fake = GceFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let key = fake.service_account_file();
    let file = write_plugins_toml(
        dir.path(),
        &catalogue_text(&fake, &key, &[("sa", "zzzzz-zzzzz-gceserviceacct0", "")]),
    );
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let loaded = plugin::load(catalogue.plugin("gce").expect("entry")).expect("load");
    let set = loaded
        .new_instance_set(catalogue.instance_set("sa").expect("set"), &Tags::new())
        .expect("instance set");
    let vm = set
        .create(&request(InstanceType::minimal("e2-small"), None))
        .expect("create with a key's own JWTs");
    assert_eq!(set.instances(&Tags::new()).expect("list").len(), 1);
    vm.destroy().expect("destroy");
    let requests = fake.requests();
    assert!(requests.len() >= 4, "{requests:?}");
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "{requests:?}"
    );
}

#[test]
fn without_a_credentials_file_the_metadata_server_supplies_tokens() {
    let fake = GceFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let credentials = fake.credentials_file(dir.path(), true);
    let catalogue = catalogue_text(
        &fake,
        &credentials,
        &[("mds", "zzzzz-zzzzz-gcemetadatasrv0", "")],
    )
    .replace(
        &format!(
            "credentials_file = {:?}\n",
            credentials.display().to_string()
        ),
        "",
    );
    assert!(!catalogue.contains("credentials_file"));
    let file = write_plugins_toml(dir.path(), &catalogue);
    // As on a GCE VM: no key file, no gcloud configuration, a metadata server.
    let home = tempfile::tempdir().expect("empty home");
    let metadata_host = fake.endpoint.trim_start_matches("http://").to_string();
    let gcloud = home.path().join("gcloud");
    assert_driver_test_passes(
        &file,
        "mds",
        "e2-small",
        IMAGE,
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", None),
            ("HOME", Some(home.path().as_os_str())),
            ("CLOUDSDK_CONFIG", Some(gcloud.as_os_str())),
            ("GCE_METADATA_HOST", Some(metadata_host.as_ref())),
        ],
    );
    let requests = fake.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "{requests:?}"
    );
}
