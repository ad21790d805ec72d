//! The loopback cloud through the real plugin and real SSH: the conformance kit end to end,
//! exact command I/O, host-key checks, restart survival and the boot / crash / broken faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_cloud::instance_secret;
use dispatch_cloud::ssh::{DriverTarget, Executor, SshError, Target};
use driver_abi::{CreateRequest, DriverError, Instance, InstanceSet, InstanceType, Tags};
use russh::keys::PrivateKey;
use system_tests::*;

fn small() -> InstanceType {
    InstanceType::minimal("lb.small")
}

fn key() -> Arc<PrivateKey> {
    Arc::new(dispatch_cloud::ssh::generate_key().expect("key"))
}

/// Creates a VM with an instance secret (tagged and written at boot) authorized for `key`.
fn create_vm(
    set: &Arc<dyn InstanceSet>,
    key: &PrivateKey,
    secret: Option<&str>,
) -> Arc<dyn Instance> {
    let mut tags = Tags::new();
    let mut init = String::new();
    if let Some(secret) = secret {
        tags.insert(instance_secret::TAG.into(), secret.into());
        init = instance_secret::init_command(secret, "");
    }
    let request = CreateRequest {
        instance_type: small(),
        image_id: "img".into(),
        tags,
        init_command: init,
        public_key: Some(key.public_key().to_openssh().expect("openssh")),
    };
    Arc::from(set.create(&request).expect("create"))
}

fn executor(instance: &Arc<dyn Instance>, key: Arc<PrivateKey>) -> Executor {
    Executor::new(
        Arc::new(DriverTarget {
            instance: Arc::clone(instance),
        }),
        key,
    )
    .with_dial_timeout(Duration::from_secs(5))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn until_booted(exec: &Executor) {
    eventually_async("the VM to boot", Duration::from_secs(10), || async {
        match exec.execute("true", b"").await {
            Ok(out) if out.success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[test]
fn driver_test_passes_against_loopback_end_to_end() {
    let cloud = LoopbackCloud::new();
    let file = write_plugins_toml(
        cloud.state_dir(),
        &loopback_catalogue_text(
            &cloud,
            "zzzzz-zzzzz-drivertest00000",
            "faults = { boot_delay_ms = 300 }",
        ),
    );
    let out = cli(&[
        "driver-test",
        "--plugins",
        file.to_str().expect("utf8"),
        "--instance-set",
        "test",
        "--instance-type",
        "lb.small",
        "--command",
        "printf hello; test -f \"$DISPATCH_CLOUD_VM_ROOT/var/run/dispatch-cloud-instance-secret\"",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for step in [
        "PASS list instances",
        "PASS create an instance",
        "PASS new instance appears in the filtered list",
        "PASS tags round-trip",
        "PASS boot probe over verified SSH",
        "PASS destroy, and the instance disappears",
        "PASS quota fault is a Quota error",
        "PASS type capacity fault names the type",
        "PASS group capacity fault names the group",
        "PASS rate limit gives a future earliest retry",
    ] {
        assert!(stdout.contains(step), "{step:?} missing from:\n{stdout}");
    }
    assert!(stdout.contains("hello"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

#[test]
fn driver_test_refuses_a_set_that_already_has_instances() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-existing0000000", "");
    let _vm = create_vm(&set, &key(), None);
    let file = cloud.state_dir().join("plugins.toml");
    let args = [
        "driver-test",
        "--plugins",
        file.to_str().expect("utf8"),
        "--instance-set",
        "test",
    ];
    let out = cli(&args);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("--destroy-existing"),
        "{}",
        text(&out.stdout)
    );
    let mut with_destroy = args.to_vec();
    with_destroy.push("--destroy-existing");
    let out = cli(&with_destroy);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(set.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn commands_return_exact_output_and_exit_codes() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-sshoutput000000", "");
    let key = key();
    let vm = create_vm(&set, &key, None);
    let exec = executor(&vm, Arc::clone(&key));
    runtime().block_on(async {
        until_booted(&exec).await;
        let out = exec
            .execute("printf 'a\\nb'; printf 'oops' >&2; exit 3", b"")
            .await
            .expect("run");
        assert_eq!(out.stdout, b"a\nb");
        assert_eq!(out.stderr, b"oops");
        assert_eq!(out.exit_status, Some(3));

        // stdin reaches the command intact, binary and large.
        let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = exec.execute("cat", &input).await.expect("cat");
        assert_eq!(out.exit_status, Some(0));
        assert_eq!(out.stdout.len(), input.len());
        assert!(out.stdout == input, "stdin came back altered");

        // Commands run in the VM's root, told where it is; a leading sudo is accepted.
        let out = exec
            .execute("sudo sh -c 'pwd; echo $DISPATCH_CLOUD_VM_ROOT'", b"")
            .await
            .expect("pwd");
        let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], lines[1]);
        assert!(lines[0].starts_with(&cloud.state_dir().display().to_string()));

        // Many commands share the one connection concurrently.
        let exec = Arc::new(exec);
        let runs: Vec<_> = (0..20)
            .map(|i| {
                let exec = Arc::clone(&exec);
                tokio::spawn(async move {
                    exec.execute(&format!("echo {i}; exit {}", i % 4), b"")
                        .await
                })
            })
            .collect();
        for (i, run) in runs.into_iter().enumerate() {
            let out = run.await.expect("task").expect("concurrent run");
            assert_eq!(text(&out.stdout), format!("{i}\n"));
            assert_eq!(out.exit_status, Some((i % 4) as u32));
        }

        // Concurrent commands that read their stdin slowly each get their own input, whole
        // (the runner's `start` reads its spec this way), over several rounds so channel
        // numbers are reused.
        for round in 0..5 {
            let runs: Vec<_> = (0..20)
                .map(|i| {
                    let exec = Arc::clone(&exec);
                    tokio::spawn(async move {
                        let input = format!("round {round} input {i}");
                        let out = exec
                            .execute("sleep 0.0$(($$ % 5)); cat", input.as_bytes())
                            .await;
                        (input, out)
                    })
                })
                .collect();
            for run in runs {
                let (input, out) = run.await.expect("task");
                let out = out.expect("concurrent run with stdin");
                assert_eq!(text(&out.stdout), input, "stdin crossed or lost");
            }
        }
    });
}

/// A target that presents `vm`'s address but asks a different VM's driver object to verify,
/// as if someone else answered at that address.
struct Impostor {
    answering: Arc<dyn Instance>,
    verifying: Arc<dyn Instance>,
}

impl Target for Impostor {
    fn address(&self) -> String {
        self.answering.address()
    }
    fn remote_user(&self) -> String {
        self.answering.remote_user()
    }
    fn verify_host_key(&self, host_key: &str) -> Result<(), DriverError> {
        self.verifying.verify_host_key(host_key)
    }
    fn instance_secret(&self) -> Option<String> {
        None
    }
}

#[test]
fn a_wrong_host_key_is_refused() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-hostkeys0000000", "");
    let key = key();
    let a = create_vm(&set, &key, None);
    let b = create_vm(&set, &key, None);
    runtime().block_on(async {
        until_booted(&executor(&a, Arc::clone(&key))).await;
        let auth_log = cloud
            .state_dir()
            .join("vms")
            .join(a.id())
            .join("root/var/log/loopback-sshd-auth.log");
        let attempts = || {
            std::fs::read_to_string(&auth_log)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let before = attempts();
        assert!(before >= 1, "the sshd records authentication attempts");
        let exec = Executor::new(
            Arc::new(Impostor {
                answering: Arc::clone(&a),
                verifying: Arc::clone(&b),
            }),
            Arc::clone(&key),
        );
        match exec.execute("true", b"").await {
            Err(e @ SshError::HostKeyRefused { .. }) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("host key") && shown.contains("does not match"),
                    "{shown}"
                )
            }
            other => panic!("impostor accepted: {other:?}"),
        }
        // Refused during the key exchange: our key was never offered to the impostor.
        assert_eq!(
            attempts(),
            before,
            "authenticated before checking the host key"
        );
    });
}

#[test]
fn the_instance_secret_verifies_hosts_when_the_driver_cannot() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(
        &cloud,
        "zzzzz-zzzzz-secretpath00000",
        "verify_host_key = false",
    );
    let key = key();
    let secret = instance_secret::generate();
    let good = create_vm(&set, &key, Some(&secret));
    let untagged = create_vm(&set, &key, None);
    runtime().block_on(async {
        let exec = executor(&good, Arc::clone(&key));
        until_booted(&exec).await;
        let out = exec.execute("echo verified", b"").await.expect("run");
        assert_eq!(out.stdout, b"verified\n");

        // Same VM, but its tag claims another secret: refused.
        let mut wrong = good.tags();
        wrong.insert(instance_secret::TAG.into(), instance_secret::generate());
        good.set_tags(&wrong).expect("retag");
        let retagged: Arc<dyn Instance> = Arc::from(
            set.instances(&Tags::new())
                .expect("list")
                .into_iter()
                .find(|i| i.id() == good.id())
                .expect("listed"),
        );
        match executor(&retagged, Arc::clone(&key))
            .execute("true", b"")
            .await
        {
            Err(SshError::HostKeyRefused { reason, .. }) => {
                assert!(reason.contains("does not match"), "{reason}")
            }
            other => panic!("wrong secret accepted: {other:?}"),
        }

        // No secret tag and no driver verification: never accepted.
        match executor(&untagged, Arc::clone(&key))
            .execute("true", b"")
            .await
        {
            Err(SshError::HostKeyRefused { reason, .. }) => {
                assert!(reason.contains("no secret tag"), "{reason}")
            }
            other => panic!("unverifiable host accepted: {other:?}"),
        }
    });
}

#[test]
fn an_unknown_client_key_is_refused() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-clientkey000000", "");
    let vm = create_vm(&set, &key(), None);
    runtime().block_on(async {
        eventually_async(
            "a stranger's key refused",
            Duration::from_secs(10),
            || async {
                match executor(&vm, key()).execute("true", b"").await {
                    Err(SshError::AuthRefused { .. }) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    });
}

#[test]
fn vms_survive_a_daemon_restart_with_their_keys_tags_and_files() {
    let cloud = LoopbackCloud::new();
    let key = key();
    let rt = runtime();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-restart00000000", "");
    let vm = create_vm(&set, &key, None);
    let mut tags = vm.tags();
    tags.insert("idle-behavior".into(), "hold".into());
    vm.set_tags(&tags).expect("tags");
    let exec = executor(&vm, Arc::clone(&key));
    rt.block_on(async {
        until_booted(&exec).await;
        let out = exec
            .execute("echo kept > kept.txt", b"")
            .await
            .expect("write");
        assert!(out.success());
    });
    let old_pid = cloud.daemon_pid().expect("daemon running");
    cloud.stop_daemon();

    // A new host process would open the set again; the plugin restarts the daemon.
    let (_p, _e, reopened) = loopback_set(&cloud, "zzzzz-zzzzz-restart00000000", "");
    assert_ne!(cloud.daemon_pid(), Some(old_pid));
    let vms = reopened.instances(&Tags::new()).expect("list");
    assert_eq!(vms.len(), 1);
    let again: Arc<dyn Instance> = Arc::from(vms.into_iter().next().expect("one"));
    assert_eq!(again.id(), vm.id());
    assert_eq!(again.address(), vm.address());
    assert_eq!(
        again.tags().get("idle-behavior").map(String::as_str),
        Some("hold")
    );
    rt.block_on(async {
        // The old executor's connection died with the daemon: it reconnects, and the VM's
        // host key is the same one it verified before.
        let out = exec
            .execute("cat kept.txt", b"")
            .await
            .expect("reconnected");
        assert_eq!(out.stdout, b"kept\n");
        let fresh = executor(&again, Arc::clone(&key));
        let out = fresh
            .execute("cat kept.txt", b"")
            .await
            .expect("fresh connection");
        assert_eq!(out.stdout, b"kept\n");
    });
    // A set with another ID sees none of them.
    let (_p, _e, other) = loopback_set(&cloud, "zzzzz-zzzzz-restart00000001", "");
    assert!(other.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn boot_delay_then_broken_then_crash_faults_happen_on_time() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(
        &cloud,
        "zzzzz-zzzzz-lifefaults00000",
        "[instance_sets.parameters.faults]\nboot_delay_ms = 400\nbroken_after_ms = 300\ncrash_after_ms = 1500\n",
    );
    let key = key();
    let created = Instant::now();
    let vm = create_vm(&set, &key, None);
    let exec = executor(&vm, Arc::clone(&key));
    runtime().block_on(async {
        assert!(
            exec.execute("true", b"").await.is_err(),
            "answered while booting"
        );
        until_booted(&exec).await;
        assert!(
            created.elapsed() >= Duration::from_millis(400),
            "booted early"
        );
        let flag = "test -f \"$DISPATCH_CLOUD_VM_ROOT/var/lib/dispatch-cloud/broken\"";
        eventually_async("the VM to turn broken", Duration::from_secs(10), || async {
            match exec.execute(flag, b"").await {
                Ok(out) if out.success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        eventually_async("the VM to crash", Duration::from_secs(10), || async {
            match exec.execute("true", b"").await {
                Err(_) => Ok(()),
                Ok(out) => Err(format!("still answering: {out:?}")),
            }
        })
        .await;
    });
    // A crashed VM is still listed, as a cloud lists a stopped machine, until destroyed.
    assert_eq!(set.instances(&Tags::new()).expect("list").len(), 1);
    vm.destroy().expect("destroy");
    assert!(set.instances(&Tags::new()).expect("list").is_empty());
}

#[test]
fn destroying_a_vm_ends_the_processes_it_started() {
    let cloud = LoopbackCloud::new();
    let (_p, _e, set) = loopback_set(&cloud, "zzzzz-zzzzz-destroyproc0000", "");
    let key = key();
    let vm = create_vm(&set, &key, None);
    let pid = runtime().block_on(async {
        let exec = executor(&vm, Arc::clone(&key));
        until_booted(&exec).await;
        let out = exec
            .execute("nohup sleep 300 >/dev/null 2>&1 </dev/null & echo $!", b"")
            .await
            .expect("start");
        text(&out.stdout).trim().to_string()
    });
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    vm.destroy().expect("destroy");
    eventually("the VM's process to end", Duration::from_secs(5), || {
        // A killed child may linger as a zombie of the daemon until reaped.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        state.is_empty() || state.split_whitespace().nth(2) == Some("Z")
    });
}
