//! Plugin loading through the real binary and in-process: catalogue, hashes, refusals, two
//! drivers side by side, and panics contained at the boundary.

use dispatch_cloud::plugin::{self, Catalogue, PluginEntry};
use driver_abi::{CreateRequest, DriverError, InstanceType, Tags};
use system_tests::*;

fn entry(name: &str, path: std::path::PathBuf, sha256: Option<String>) -> PluginEntry {
    PluginEntry {
        name: name.into(),
        path,
        sha256,
    }
}

fn small() -> InstanceType {
    InstanceType::minimal("lb.small")
}

fn create_request() -> CreateRequest {
    CreateRequest {
        instance_type: small(),
        image_id: "img".into(),
        tags: Tags::new(),
        init_command: String::new(),
        public_key: None,
    }
}

#[test]
fn plugins_command_lists_the_repository_catalogue() {
    let file = workspace_root().join("plugins.toml");
    let out = cli(&[
        "plugins",
        "--json",
        "--plugins",
        file.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let loopback = &list[0];
    assert_eq!(loopback["name"], "loopback");
    assert_eq!(loopback["driver"], "loopback");
    assert_eq!(loopback["abi_version"], driver_abi::ffi::ABI_VERSION);
    assert_eq!(loopback["sha256"], sha256_hex(&loopback_so()));
}

#[test]
fn a_pinned_hash_that_matches_loads() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        &format!(
            "[[plugins]]\nname = \"loopback\"\npath = {:?}\nsha256 = \"{}\"\n",
            loopback_so().display().to_string(),
            sha256_hex(&loopback_so()).to_uppercase()
        ),
    );
    let out = cli(&["plugins", "--plugins", file.to_str().expect("utf8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("loopback"));
}

/// Each refusal through the real binary: exit code non-zero, one clear sentence on stderr.
#[test]
fn refusals_are_one_clear_sentence_each() {
    let dir = tempfile::tempdir().expect("tmp");
    let drifted = build_fixture("drifted-driver", "libdispatch_cloud_drifted.so");
    let not_elf = dir.path().join("notes.so");
    std::fs::write(&not_elf, "not a library").expect("write");
    let libc = libc_path();
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!(
                "path = {:?}\nsha256 = \"{}\"",
                probe_so().display().to_string(),
                "0".repeat(64)
            ),
            vec![
                "has sha256",
                "but plugins.toml pins 0000",
                "refusing to load it",
            ],
        ),
        (
            format!("path = {:?}", drifted.display().to_string()),
            vec![
                "was built against driver-abi 0.1.0, this host has 0.1.0",
                "first mismatch in FfiInstanceType",
                "gpu_vram_bytes",
            ],
        ),
        (
            format!("path = {:?}", libc.display().to_string()),
            vec![
                "is not a dispatch-cloud driver plugin",
                "exports no abi_stable root module",
            ],
        ),
        (
            format!("path = {:?}", not_elf.display().to_string()),
            vec!["is not a dispatch-cloud driver plugin", "cannot open it"],
        ),
        (
            "path = \"/nonexistent/libgone.so\"".to_string(),
            vec!["plugin bad: /nonexistent/libgone.so does not exist"],
        ),
    ];
    for (plugin_lines, expected) in cases {
        let file = write_plugins_toml(
            dir.path(),
            &format!("[[plugins]]\nname = \"bad\"\n{plugin_lines}\n"),
        );
        let out = cli(&["plugins", "--plugins", file.to_str().expect("utf8")]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{plugin_lines}: accepted");
        assert_eq!(stderr.lines().count(), 1, "one line, got:\n{stderr}");
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "{plugin_lines}: {stderr:?} lacks {needle:?}"
            );
        }
    }
}

#[test]
fn unknown_keys_in_plugins_toml_name_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        "[[plugins]]\nname = \"x\"\npath = \"x.so\"\nsha265 = \"00\"\n",
    );
    let out = cli(&["plugins", "--plugins", file.to_str().expect("utf8")]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    for needle in ["plugins.toml", "line 4", "sha265"] {
        assert!(stderr.contains(needle), "{stderr:?} lacks {needle:?}");
    }
}

fn libc_path() -> std::path::PathBuf {
    // The C library mapped into this very process: a real shared object that is no plugin.
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(std::path::PathBuf::from)
        .expect("libc is mapped")
}

#[test]
fn refused_plugins_leave_the_host_able_to_load_good_ones() {
    let drifted = build_fixture("drifted-driver", "libdispatch_cloud_drifted.so");
    for bad in [
        entry("drifted", drifted, None),
        entry("libc", libc_path(), None),
        entry("pinned", probe_so(), Some("f".repeat(64))),
    ] {
        assert!(plugin::load(&bad).is_err(), "{} loaded", bad.name);
    }
    let good = plugin::load(&entry("probe", probe_so(), None)).expect("probe loads after refusals");
    assert_eq!(good.driver_name, "probe");
}

#[test]
fn two_plugins_in_one_process_each_answer_as_themselves() {
    let cloud = LoopbackCloud::new();
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        &format!(
            "{}\n[[plugins]]\nname = \"probe\"\npath = {:?}\n\n[[instance_sets]]\nname = \"p\"\ndriver = \"probe\"\nset_id = \"zzzzz-zzzzz-probe0000000000\"\n",
            loopback_catalogue_text(&cloud, "zzzzz-zzzzz-twoplugins00000", ""),
            probe_so().display().to_string()
        ),
    );
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let loaded: Vec<_> = plugin::load_all(&catalogue)
        .into_iter()
        .map(|r| r.expect("loads"))
        .collect();
    assert_eq!(
        loaded
            .iter()
            .map(|p| (p.driver_name.as_str(), p.driver_version.as_str()))
            .collect::<Vec<_>>(),
        vec![("loopback", "0.1.0"), ("probe", "0.3.1")]
    );
    let lb = loaded[0]
        .new_instance_set(catalogue.instance_set("test").expect("set"), &Tags::new())
        .expect("loopback set");
    let probe = loaded[1]
        .new_instance_set(catalogue.instance_set("p").expect("set"), &Tags::new())
        .expect("probe set");
    assert_eq!(probe.quota_group(&small()), "probe-lb.small");
    assert_eq!(lb.quota_group(&small()), "lb");
    let vm = probe.create(&create_request()).expect("probe create");
    assert_eq!(vm.id(), "probe-0");
    let lb_vm = lb.create(&create_request()).expect("loopback create");
    assert!(lb_vm.id().starts_with("lb-"), "{}", lb_vm.id());
    assert_eq!(probe.instances(&Tags::new()).expect("list").len(), 1);
    lb_vm.destroy().expect("destroy");
}

#[test]
fn a_panicking_driver_returns_errors_and_the_host_keeps_running() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_plugins_toml(
        dir.path(),
        &format!(
            "[[plugins]]\nname = \"probe\"\npath = {:?}\n\n\
             [[instance_sets]]\nname = \"create\"\ndriver = \"probe\"\nset_id = \"zzzzz-zzzzz-panic0000000001\"\n[instance_sets.parameters]\npanic_on = \"create\"\n\n\
             [[instance_sets]]\nname = \"init\"\ndriver = \"probe\"\nset_id = \"zzzzz-zzzzz-panic0000000002\"\n[instance_sets.parameters]\npanic_on = \"new_instance_set\"\n\n\
             [[instance_sets]]\nname = \"group\"\ndriver = \"probe\"\nset_id = \"zzzzz-zzzzz-panic0000000003\"\n[instance_sets.parameters]\npanic_on = \"quota_group\"\n",
            probe_so().display().to_string()
        ),
    );
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let probe = plugin::load(catalogue.plugin("probe").expect("entry")).expect("load");

    let set = probe
        .new_instance_set(catalogue.instance_set("create").expect("set"), &Tags::new())
        .expect("set");
    let err = set
        .create(&create_request())
        .err()
        .expect("create panicked");
    assert_eq!(
        err,
        DriverError::other("driver panicked: probe driver told to panic in create")
    );
    // The same set still answers after the panic.
    assert!(set
        .instances(&Tags::new())
        .expect("list after panic")
        .is_empty());

    let err = probe
        .new_instance_set(catalogue.instance_set("init").expect("set"), &Tags::new())
        .err()
        .expect("init panicked");
    assert!(err.to_string().contains("driver panicked"), "{err}");

    let set = probe
        .new_instance_set(catalogue.instance_set("group").expect("set"), &Tags::new())
        .expect("set");
    assert_eq!(
        set.quota_group(&small()),
        "",
        "a panic in a call without errors gives the neutral value"
    );
}

/// A private copy of `so` in `dir` with `mode`.
fn copy_with_mode(
    so: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    mode: u32,
) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::copy(so, &path).expect("copy");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

#[test]
fn plugins_others_could_change_are_refused_with_their_reason() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let writable = copy_with_mode(&loopback_so(), dir.path(), "writable.so", 0o666);
    let link = dir.path().join("link.so");
    std::os::unix::fs::symlink(&writable, &link).expect("symlink");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let in_shared = copy_with_mode(&loopback_so(), &shared, "lib.so", 0o644);
    let cases = [
        (&writable, "is writable by group or others"),
        (&link, "is writable by group or others"),
        (&in_shared, "which group or others can write"),
        (&dir.path().to_path_buf(), "is not a regular file"),
    ];
    for (path, reason) in cases {
        let file = write_plugins_toml(
            dir.path(),
            &format!(
                "[[plugins]]\nname = \"bad\"\npath = {:?}\n",
                path.display().to_string()
            ),
        );
        let out = cli(&["plugins", "--plugins", file.to_str().expect("utf8")]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{}: accepted", path.display());
        assert_eq!(stderr.lines().count(), 1, "one line, got:\n{stderr}");
        assert!(
            stderr.contains(reason) && stderr.contains("refusing to load it"),
            "{}: {stderr:?} lacks {reason:?}",
            path.display()
        );
    }
}

/// The file behind a pinned path is swapped back and forth with another driver while the
/// host loads it: every load either refuses (hash mismatch) or loads the pinned driver.
#[test]
fn a_file_swapped_during_loading_never_runs_under_the_pinned_hash() {
    let dir = tempfile::tempdir().expect("tmp");
    let pinned = copy_with_mode(&loopback_so(), dir.path(), "pinned-master.so", 0o644);
    let other = copy_with_mode(&probe_so(), dir.path(), "other-master.so", 0o644);
    let target = dir.path().join("driver.so");
    std::fs::copy(&pinned, &target).expect("copy");
    let catalogue = write_plugins_toml(
        dir.path(),
        &format!(
            "[[plugins]]\nname = \"swapped\"\npath = {:?}\nsha256 = \"{}\"\n",
            target.display().to_string(),
            sha256_hex(&pinned)
        ),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (dir, stop, target) = (dir.path().to_path_buf(), stop.clone(), target.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let master = if n.is_multiple_of(2) { &other } else { &pinned };
                let staged = dir.join(format!("staged-{n}"));
                if std::fs::hard_link(master, &staged).is_ok() {
                    let _ = std::fs::rename(&staged, &target);
                }
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            n
        })
    };
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..16 {
        let out = cli(&[
            "plugins",
            "--plugins",
            catalogue.to_str().expect("utf8"),
            "--json",
        ]);
        if out.status.success() {
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert_eq!(
                list[0]["driver"], "loopback",
                "an unpinned library ran: {list}"
            );
            loaded += 1;
        } else {
            assert!(
                text(&out.stderr).contains("but plugins.toml pins"),
                "{}",
                text(&out.stderr)
            );
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let swaps = swapper.join().expect("swapper");
    assert!(swaps > 100, "the file was swapped only {swaps} times");
    assert_eq!(loaded + refused, 16);
}

#[test]
fn a_loopback_daemon_others_could_change_is_not_started() {
    let cloud = LoopbackCloud::new();
    let dir = tempfile::tempdir().expect("tmp");
    let tampered = copy_with_mode(
        &built("loopback-cloud"),
        dir.path(),
        "loopback-cloud",
        0o777,
    );
    let catalogue = format!(
        "[[plugins]]\nname = \"loopback\"\npath = {:?}\n\n[[instance_sets]]\nname = \"test\"\ndriver = \"loopback\"\nset_id = \"zzzzz-zzzzz-tampereddaemon0\"\n[instance_sets.parameters]\nstate_dir = {:?}\ndaemon_path = {:?}\n",
        loopback_so().display().to_string(),
        cloud.state_dir().display().to_string(),
        tampered.display().to_string()
    );
    let file = write_plugins_toml(dir.path(), &catalogue);
    let catalogue = Catalogue::load(&file).expect("catalogue");
    let loaded = plugin::load(catalogue.plugin("loopback").expect("entry")).expect("load");
    let entry = catalogue.instance_set("test").expect("set");
    let err = loaded
        .new_instance_set(entry, &Default::default())
        .and_then(|set| set.instances(&Tags::new()).map(|_| ()))
        .expect_err("a world-writable daemon was started");
    let shown = err.to_string();
    assert!(
        shown.contains("is writable by group or others") && shown.contains("refusing to start it"),
        "{shown}"
    );
    assert!(cloud.daemon_pid().is_none(), "the daemon ran");
}

#[test]
fn plugins_json_lists_every_driver_of_the_workspace() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut body = String::new();
    for (name, so) in [
        ("loopback", loopback_so()),
        ("aws", built("libdispatch_cloud_aws.so")),
        ("gce", built("libdispatch_cloud_gce.so")),
        ("azure", built("libdispatch_cloud_azure.so")),
    ] {
        body.push_str(&pinned_plugin_entry(name, &so));
        body.push('\n');
    }
    let file = write_plugins_toml(dir.path(), &body);
    let out = cli(&[
        "plugins",
        "--plugins",
        file.to_str().expect("utf8"),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let drivers: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["driver"].as_str())
        .collect();
    assert_eq!(drivers, ["loopback", "aws", "gce", "azure"], "{listed}");
}

/// `plugins` only loads the libraries; `plugins --check` also opens every instance set with
/// its parameters, so a typo is found before `serve`, naming the file, the set and the key.
#[test]
fn plugins_check_opens_every_set_and_names_bad_parameters() {
    let cloud = LoopbackCloud::new();
    let file = write_plugins_toml(
        cloud.state_dir(),
        &loopback_catalogue_text(
            &cloud,
            "zzzzz-zzzzz-checkparams0000",
            "idel_exit_seconds = 5",
        ),
    );
    let file = file.to_str().expect("utf8");
    let plain = cli(&["plugins", "--plugins", file]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let checked = cli(&["plugins", "--check", "--plugins", file]);
    let stderr = text(&checked.stderr);
    assert_eq!(checked.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("instance set test") && stderr.contains("idel_exit_seconds"),
        "{stderr}"
    );
    assert!(stderr.contains(file), "names the file: {stderr}");
}
