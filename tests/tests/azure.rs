//! The Azure driver's real `.so`, pinned in a `plugins.toml`, against the in-repo ARM fake
//! (`tests/fakes/azure_arm.py`, HTTPS with the test CA): the conformance kit without SSH, set
//! isolation and paging, late NIC addresses, clean-up of failed creates, the sweeper, the
//! shape of what is sent, and every error mapping, as the host sees them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use driver_abi::{CapacityScope, CreateRequest, DriverError, InstanceSet, InstanceType, Tags};
use serde_json::{json, Value};
use system_tests::*;

const IMAGE: &str = "worker-image";

fn azure_so() -> PathBuf {
    built("libdispatch_cloud_azure.so")
}

/// A pinned catalogue with one instance set per `(name, set ID, extra parameters)`; an extra
/// parameter replaces the default of the same key.
fn catalogue_text(fake: &AzureFake, sets: &[(&str, &str, &str)]) -> String {
    let mut text = pinned_plugin_entry("azure", &azure_so());
    for (name, set_id, extra) in sets {
        let defaults = [
            (
                "subscription_id",
                "\"00000000-0000-0000-0000-000000000000\"",
            ),
            ("tenant_id", "\"11111111-1111-1111-1111-111111111111\""),
            ("client_id", "\"22222222-2222-2222-2222-222222222222\""),
            ("client_secret", "\"fake-client-secret\""),
            ("resource_group", "\"batch\""),
            ("image_resource_group", "\"images\""),
            ("network", "\"vnet\""),
            ("network_resource_group", "\"network\""),
            ("subnet", "\"workers\""),
            ("location", "\"eastus\""),
        ];
        let mut params = String::new();
        for (k, v) in defaults {
            if !extra.lines().any(|l| l.starts_with(&format!("{k} ="))) {
                params.push_str(&format!("{k} = {v}\n"));
            }
        }
        text.push_str(&format!(
            "\n[[instance_sets]]\nname = \"{name}\"\ndriver = \"azure\"\nset_id = \"{set_id}\"\n[instance_sets.parameters]\n{params}endpoint = \"{0}\"\nauthority = \"{0}\"\nca_certificate_file = {1:?}\n{extra}\n",
            fake.endpoint,
            fake.ca_file().display().to_string()
        ));
    }
    text
}

struct Setup {
    fake: AzureFake,
    driver: DriverUnderTest,
}

impl Setup {
    fn new(sets: &[(&str, &str, &str)]) -> Setup {
        let fake = AzureFake::start();
        let text = catalogue_text(&fake, sets);
        Setup {
            driver: DriverUnderTest::load(&text, "azure"),
            fake,
        }
    }

    fn open(&self, name: &str) -> Arc<dyn InstanceSet> {
        self.driver.open(name)
    }

    /// Logged requests with this method whose path matches `pattern`.
    fn calls(&self, method: &str, pattern: &str) -> Vec<Value> {
        self.fake
            .requests()
            .into_iter()
            .filter(|r| {
                r["method"] == method && r["path"].as_str().is_some_and(|p| p.contains(pattern))
            })
            .collect()
    }

    /// Names of the fake's resources of one type (`networkInterfaces`, `disks`, …).
    fn names(&self, kind: &str) -> Vec<String> {
        self.fake
            .resources()
            .iter()
            .filter(|r| r["type"].as_str().is_some_and(|t| t.ends_with(kind)))
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect()
    }
}

fn request(t: InstanceType) -> CreateRequest {
    let mut tags = Tags::new();
    tags.insert("purpose".into(), "test".into());
    CreateRequest {
        instance_type: t,
        image_id: IMAGE.into(),
        tags,
        init_command: "echo hello from init".into(),
        public_key: Some(test_public_key()),
    }
}

fn small() -> InstanceType {
    InstanceType::minimal("Standard_D2s_v5")
}

#[test]
fn the_real_so_passes_driver_test_against_the_fake() {
    let fake = AzureFake::start();
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        &catalogue_text(&fake, &[("azure", "zzzzz-zzzzz-azureconformanc", "")]),
    );
    assert_driver_test_passes(&file, "azure", "Standard_D2s_v5", IMAGE, &[]);
    let requests = fake.requests();
    assert!(
        requests.iter().filter(|r| r["method"] == "PUT").count() == 2,
        "a NIC and a VM: {requests:?}"
    );
    assert!(
        requests.iter().all(|r| r["authorized"] == true),
        "{requests:?}"
    );
    eventually(
        "the VM, its NIC and disk are gone",
        Duration::from_secs(10),
        || fake.resources().is_empty(),
    );
}

#[test]
fn sets_in_one_resource_group_see_only_their_own_vms_and_listings_page() {
    let s = Setup::new(&[
        ("a", "zzzzz-zzzzz-azureseta000000", ""),
        ("b", "zzzzz-zzzzz-azuresetb000000", ""),
    ]);
    s.fake.configure(json!({"page_size": 3}));
    let a = s.open("a");
    let b = s.open("b");
    for _ in 0..7 {
        a.create(&request(small())).expect("create in a");
    }
    b.create(&request(small())).expect("create in b");
    let listed_a = a.instances(&Tags::new()).expect("list a");
    assert_eq!(listed_a.len(), 7);
    let listed_b = b.instances(&Tags::new()).expect("list b");
    assert_eq!(listed_b.len(), 1);
    assert!(listed_b
        .iter()
        .all(|i| !listed_a.iter().any(|j| j.id() == i.id())));
    assert!(listed_a.iter().all(|i| !i.address().is_empty()));
    // 8 VMs in pages of 3: the nextLink was followed.
    let follow_ups = s
        .calls("GET", "/providers/Microsoft.Compute/virtualMachines")
        .into_iter()
        .filter(|r| r["query"].get("$skiptoken").is_some())
        .count();
    assert!(follow_ups >= 2, "nextLink pages: {follow_ups}");
    for i in listed_a.iter().chain(listed_b.iter()) {
        i.destroy().expect("destroy");
    }
    assert!(a.instances(&Tags::new()).expect("list").is_empty());
    assert!(b.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn a_nic_ip_that_comes_late_is_picked_up_by_a_later_listing() {
    let s = Setup::new(&[("late", "zzzzz-zzzzz-azurelateip0000", "")]);
    s.fake.configure(json!({"nic_ip_delay": 6.0}));
    let set = s.open("late");
    let vm = set.create(&request(small())).expect("create");
    assert_eq!(vm.address(), "", "no IP yet");
    let first = set.instances(&Tags::new()).expect("list");
    assert_eq!(first[0].address(), "", "still none");
    eventually("a listing with the IP", Duration::from_secs(20), || {
        set.instances(&Tags::new())
            .ok()
            .and_then(|l| l.first().map(|i| i.address()))
            .is_some_and(|a| a.starts_with("10.0."))
    });
    vm.destroy().expect("destroy");
}

#[test]
fn a_failed_vm_create_leaves_no_nic() {
    let s = Setup::new(&[("f", "zzzzz-zzzzz-azurefailed0000", "")]);
    let set = s.open("f");
    s.fake.inject(
        "PUT",
        "/virtualMachines/",
        json!({"async_error": {"code": "AllocationFailed", "message": "Allocation failed. We do not have sufficient capacity for the requested VM size in this region."}}),
    );
    match set.create(&request(small())) {
        Err(DriverError::Capacity {
            scope: CapacityScope::InstanceType(t),
            ..
        }) => assert_eq!(t, "Standard_D2s_v5"),
        other => panic!("{:?}", other.map(|i| i.id())),
    }
    eventually("no NIC, VM or disk left", Duration::from_secs(10), || {
        s.fake.resources().is_empty()
    });
    // Refused outright: the NIC made for it is deleted too.
    s.fake.inject(
        "PUT",
        "/virtualMachines/",
        json!({"respond": {"status": 409, "body": {"error": {"code": "SkuNotAvailable", "message": "The requested size for resource is currently not available in location 'eastus'."}}}}),
    );
    assert_eq!(
        set.create(&request(small())).err().map(|e| e.kind()),
        Some("capacity")
    );
    eventually("no NIC left", Duration::from_secs(10), || {
        s.names("networkInterfaces").is_empty()
    });
}

#[test]
fn a_throttled_or_failing_poll_is_asked_again() {
    let s = Setup::new(&[("poll", "zzzzz-zzzzz-azurepolling000", "")]);
    let set = s.open("poll");
    let operations = "/operations/";
    s.fake.inject(
        "GET",
        operations,
        json!({"respond": {"status": 429, "headers": {"Retry-After": "1"}, "body": {"error": {"code": "TooManyRequests", "message": "throttled"}}}}),
    );
    s.fake.inject(
        "GET",
        operations,
        json!({"respond": {"status": 503, "body": {"error": {"code": "ServiceUnavailable", "message": "try later"}}}}),
    );
    let vm = set
        .create(&request(small()))
        .expect("the create rides out its polls' failures");
    let polls: Vec<Value> = s
        .calls("GET", operations)
        .into_iter()
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(&polls[..2], &[json!(429), json!(503)], "{polls:?}");
    assert_eq!(s.names("virtualMachines"), [vm.id()]);
    vm.destroy().expect("destroy");
}

#[test]
fn dangling_nics_and_disks_older_than_the_threshold_are_swept() {
    let s = Setup::new(&[(
        "sw",
        "zzzzz-zzzzz-azuresweep00000",
        "delete_dangling_resources_after_seconds = 60\nsweep_interval_seconds = 0",
    )]);
    let ours = json!({"dispatch-cloud-instance-set": "zzzzz-zzzzz-azuresweep00000"});
    let old = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() - 600)
        .unwrap_or_default();
    let mut old_tags = ours.clone();
    old_tags["dispatch-cloud-created-at"] = json!(old.to_string());
    let mut young_tags = ours.clone();
    young_tags["dispatch-cloud-created-at"] = json!((old + 595).to_string());
    s.fake.orphan("nic", "old-nic", 600, old_tags.clone());
    s.fake.orphan("nic", "young-nic", 5, young_tags);
    // Our name, another set's tag: the tag decides.
    s.fake.orphan(
        "nic",
        "dc-zzzzz-zzzzz-azuresweep00000-borrowed-nic",
        600,
        json!({"dispatch-cloud-instance-set": "zzzzz-zzzzz-anothersetxxxxx", "dispatch-cloud-created-at": old.to_string()}),
    );
    s.fake.orphan(
        "nic",
        "someone-elses-nic",
        600,
        json!({"dispatch-cloud-instance-set": "zzzzz-zzzzz-anothersetxxxxx", "dispatch-cloud-created-at": old.to_string()}),
    );
    // An untagged OS disk whose name says it is ours, and an old one of someone else.
    s.fake.orphan(
        "disk",
        "dc-zzzzz-zzzzz-azuresweep00000-abc-os",
        600,
        json!({}),
    );
    s.fake
        .orphan("disk", "data-disk-of-another-team", 600, json!({}));
    let set = s.open("sw");
    set.instances(&Tags::new())
        .expect("a listing starts a sweep");
    eventually("the old ones swept", Duration::from_secs(10), || {
        let nics = s.names("networkInterfaces");
        let disks = s.names("disks");
        !nics.contains(&"old-nic".to_string())
            && !disks.contains(&"dc-zzzzz-zzzzz-azuresweep00000-abc-os".to_string())
    });
    let nics = s.names("networkInterfaces");
    assert!(nics.contains(&"young-nic".to_string()), "{nics:?}");
    assert!(nics.contains(&"someone-elses-nic".to_string()), "{nics:?}");
    assert!(
        nics.contains(&"dc-zzzzz-zzzzz-azuresweep00000-borrowed-nic".to_string()),
        "{nics:?}"
    );
    assert!(s
        .names("disks")
        .contains(&"data-disk-of-another-team".to_string()));
    let deletes = s.calls("DELETE", "");
    assert_eq!(deletes.len(), 2, "{deletes:?}");
}

#[test]
fn what_create_sends_custom_data_key_tags_spot_and_scratch() {
    let s = Setup::new(&[(
        "shape",
        "zzzzz-zzzzz-azureshape00000",
        "admin_username = \"crunch\"",
    )]);
    let set = s.open("shape");
    let spot = InstanceType {
        preemptible: true,
        price: 0.12,
        added_scratch_bytes: 100 << 30,
        ..InstanceType::minimal("Standard_D4s_v5")
    };
    let req = request(spot);
    let key = req.public_key.clone().expect("key");
    let vm = set.create(&req).expect("create");

    let nic_put = &s.calls("PUT", "/networkInterfaces/")[0];
    let nic = &nic_put["body"];
    assert_eq!(nic_put["query"]["api-version"], "2024-05-01");
    assert_eq!(
        nic["tags"]["dispatch-cloud-instance-set"],
        "zzzzz-zzzzz-azureshape00000"
    );
    assert_eq!(nic["tags"]["purpose"], "test");
    let ip = &nic["properties"]["ipConfigurations"][0]["properties"];
    assert_eq!(ip["privateIPAllocationMethod"], "Dynamic");
    assert!(ip.get("publicIPAddress").is_none(), "no public IP: {ip}");

    let vm_put = &s.calls("PUT", "/virtualMachines/")[0];
    let body = &vm_put["body"];
    let p = &body["properties"];
    assert_eq!(vm_put["query"]["api-version"], "2024-07-01");
    assert_eq!(
        body["tags"]["dispatch-cloud-instance-set"],
        "zzzzz-zzzzz-azureshape00000"
    );
    assert_eq!(p["hardwareProfile"]["vmSize"], "Standard_D4s_v5");
    let custom = base64::engine::general_purpose::STANDARD
        .decode(p["osProfile"]["customData"].as_str().expect("custom data"))
        .expect("base64");
    assert_eq!(
        String::from_utf8_lossy(&custom),
        "#!/bin/sh\necho hello from init\n"
    );
    let linux = &p["osProfile"]["linuxConfiguration"];
    assert_eq!(linux["disablePasswordAuthentication"], true);
    assert_eq!(
        linux["ssh"]["publicKeys"][0]["path"],
        "/home/crunch/.ssh/authorized_keys"
    );
    assert_eq!(linux["ssh"]["publicKeys"][0]["keyData"], key.trim());
    assert!(p["osProfile"].get("adminPassword").is_none());
    assert_eq!(p["priority"], "Spot");
    assert_eq!(p["evictionPolicy"], "Delete");
    assert_eq!(p["billingProfile"]["maxPrice"], 0.12);
    assert_eq!(p["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    assert_eq!(p["storageProfile"]["dataDisks"][0]["diskSizeGB"], 100);
    assert_eq!(
        p["storageProfile"]["dataDisks"][0]["deleteOption"],
        "Delete"
    );
    assert_eq!(
        p["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"],
        "Delete"
    );
    assert_eq!(
        p["storageProfile"]["imageReference"]["id"],
        "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/images/providers/Microsoft.Compute/images/worker-image"
    );
    // Both disks were tagged after the VM made them.
    let disk_patches = s.calls("PATCH", "/disks/");
    assert_eq!(disk_patches.len(), 2, "{disk_patches:?}");
    assert!(
        disk_patches
            .iter()
            .all(|d| d["body"]["tags"]["dispatch-cloud-instance-set"]
                == "zzzzz-zzzzz-azureshape00000")
    );
    assert_eq!(vm.remote_user(), "crunch");
    assert_eq!(
        vm.verify_host_key("ssh-ed25519 AAAA")
            .err()
            .map(|e| e.kind()),
        Some("not_implemented")
    );
    assert_eq!(
        set.quota_group(&InstanceType {
            preemptible: true,
            ..InstanceType::minimal("Standard_D4s_v5")
        }),
        "lowPriorityCores"
    );

    // set_tags: a PATCH that keeps the set ID.
    let mut tags = Tags::new();
    tags.insert("dispatch-cloud-idle-behavior".into(), "hold".into());
    vm.set_tags(&tags).expect("set_tags");
    let patch = &s.calls("PATCH", "/virtualMachines/")[0]["body"];
    assert_eq!(patch["tags"]["dispatch-cloud-idle-behavior"], "hold");
    assert_eq!(
        patch["tags"]["dispatch-cloud-instance-set"],
        "zzzzz-zzzzz-azureshape00000"
    );
    vm.destroy().expect("destroy");
}

#[test]
fn every_error_mapping_reaches_the_host_typed() {
    let s = Setup::new(&[
        ("e", "zzzzz-zzzzz-azureerrors0000", ""),
        (
            "norg",
            "zzzzz-zzzzz-azurenorg000000",
            "resource_group = \"nope\"",
        ),
        (
            "badsecret",
            "zzzzz-zzzzz-azurebadsecret0",
            "client_secret = \"wr0ng-s3cret-value\"",
        ),
        ("typo", "zzzzz-zzzzz-azuretypo000000", "subnett = \"x\""),
    ]);
    let set = s.open("e");
    let list = "/providers/Microsoft.Compute/virtualMachines$";
    let vm_put = "/virtualMachines/";

    // 429 without Retry-After: 20 s; with one: that long; a Retry-After on a 503 too.
    s.fake.inject("GET", list, json!({"respond": {"status": 429, "body": {"error": {"code": "TooManyRequests", "message": "The request is being throttled."}}}}));
    let w = rate_limit_wait(&set.instances(&Tags::new()).err().expect("429"));
    assert!(
        (Duration::from_secs(15)..=Duration::from_secs(20)).contains(&w),
        "{w:?}"
    );
    s.fake.inject("GET", list, json!({"respond": {"status": 429, "headers": {"Retry-After": "7"}, "body": {"error": {"code": "TooManyRequests", "message": "throttled"}}}}));
    let w = rate_limit_wait(&set.instances(&Tags::new()).err().expect("429"));
    assert!(
        (Duration::from_secs(5)..=Duration::from_secs(7)).contains(&w),
        "{w:?}"
    );
    s.fake.inject("GET", list, json!({"respond": {"status": 503, "headers": {"Retry-After": "40"}, "body": {"error": {"code": "ServerBusy", "message": "busy"}}}}));
    let w = rate_limit_wait(&set.instances(&Tags::new()).err().expect("503"));
    assert!(w > Duration::from_secs(35), "{w:?}");

    let create = || set.create(&request(small()));
    // Quotas: the family's cores, the region's.
    s.fake.inject("PUT", vm_put, json!({"respond": {"status": 409, "body": {"error": {"code": "OperationNotAllowed", "message": "Operation could not be completed as it results in exceeding approved standardDSv5Family Cores quota. Additional details - Deployment Model: Resource Manager, Location: eastus, Current Limit: 10, Current Usage: 8, Additional Required: 2."}}}}));
    match create() {
        Err(DriverError::Capacity {
            scope: CapacityScope::QuotaGroup(g),
            ..
        }) => assert_eq!(g, "standardDSv5Family"),
        other => panic!("{:?}", other.map(|i| i.id())),
    }
    s.fake.inject("PUT", vm_put, json!({"respond": {"status": 409, "body": {"error": {"code": "QuotaExceeded", "message": "Operation results in exceeding quota limits of Core. Maximum allowed: 10, Current in use: 10, Additional requested: 2."}}}}));
    assert_eq!(create().err().map(|e| e.kind()), Some("quota"));
    // Allocation failures in the operation.
    for code in ["ZonalAllocationFailed", "OverconstrainedAllocationRequest"] {
        s.fake.inject(
            "PUT",
            vm_put,
            json!({"async_error": {"code": code, "message": "Allocation failed."}}),
        );
        assert_eq!(create().err().map(|e| e.kind()), Some("capacity"), "{code}");
    }
    // Server errors, permissions.
    s.fake.inject("PUT", vm_put, json!({"respond": {"status": 500, "body": {"error": {"code": "InternalServerError", "message": "An unexpected error occured."}}}}));
    assert_eq!(create().err().map(|e| e.kind()), Some("other"));
    s.fake.inject("GET", list, json!({"respond": {"status": 403, "body": {"error": {"code": "AuthorizationFailed", "message": "The client does not have authorization to perform action 'Microsoft.Compute/virtualMachines/read'."}}}}));
    let e = set.instances(&Tags::new()).err().expect("403");
    assert_eq!(e.kind(), "invalid_config", "{e}");
    assert!(e.to_string().contains("role assignments"), "{e}");
    eventually(
        "no failed create left anything",
        Duration::from_secs(10),
        || s.fake.resources().is_empty(),
    );

    // Configuration the operator got wrong, named.
    let e = s
        .open("norg")
        .instances(&Tags::new())
        .err()
        .expect("no such group");
    assert_eq!(e.kind(), "invalid_config", "{e}");
    assert!(e.to_string().contains("(check resource_group)"), "{e}");
    let e = s
        .open("badsecret")
        .instances(&Tags::new())
        .err()
        .expect("wrong secret");
    assert_eq!(e.kind(), "invalid_config", "{e}");
    assert!(e.to_string().contains("client_secret"), "{e}");
    assert!(
        !e.to_string().contains("wr0ng-s3cret-value"),
        "the secret never shows: {e}"
    );
    let e = s.driver.open_err("typo");
    assert_eq!(e.kind(), "invalid_config");
    assert!(e.to_string().contains("subnett"), "{e}");
    let mut missing_image = request(small());
    missing_image.image_id = "no-such-image".into();
    let e = set.create(&missing_image).err().expect("no image");
    assert_eq!(e.kind(), "invalid_config", "{e}");
    assert!(e.to_string().contains("image_resource_group"), "{e}");
}
