//! The driver conformance kit behind `dispatch-cloud driver-test`: the original's cloudtest
//! steps, each timed, against one instance set of a real plugin. Against the loopback driver it
//! also switches faults on and checks each comes back as the right typed error.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use driver_abi::{
    CapacityScope, CreateRequest, DriverError, Instance, InstanceSet, InstanceType, Tags,
};
use russh::keys::PrivateKey;

use crate::instance_secret;
use crate::plugin::{InstanceSetEntry, LoadedPlugin};
use crate::ssh::{DriverTarget, Executor};

/// Tag marking VMs made by one run of the kit.
pub const TEST_PID_TAG: &str = "dispatch-cloud-test-pid";

#[derive(Clone, Debug)]
pub struct Options {
    pub instance_type: String,
    pub image: String,
    /// Destroy the set's existing VMs first instead of refusing to run.
    pub destroy_existing: bool,
    /// Run after the boot probe succeeds, over SSH.
    pub command: Option<String>,
    /// Boot probe; succeeds when it exits 0.
    pub boot_probe: String,
    pub boot_timeout: Duration,
    pub probe_interval: Duration,
    /// Skip everything that needs SSH (for API-only emulators).
    pub skip_ssh: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            instance_type: "small".into(),
            image: "default".into(),
            destroy_existing: false,
            command: None,
            boot_probe: "true".into(),
            boot_timeout: Duration::from_secs(600),
            probe_interval: Duration::from_millis(200),
            skip_ssh: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub elapsed: Duration,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:<44} {:>8.1?}  {}",
            if self.passed { "PASS" } else { "FAIL" },
            self.name,
            self.elapsed,
            self.detail
        )
    }
}

struct Run<'a> {
    steps: Vec<Step>,
    report: &'a mut dyn FnMut(&Step),
}

impl Run<'_> {
    fn record(&mut self, name: &str, started: Instant, outcome: Result<String, String>) -> bool {
        let passed = outcome.is_ok();
        let step = Step {
            name: name.to_string(),
            passed,
            detail: outcome.unwrap_or_else(|e| e),
            elapsed: started.elapsed(),
        };
        (self.report)(&step);
        self.steps.push(step);
        passed
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("driver call did not finish: {e}"))
}

/// Runs the kit; `report` sees each step as it finishes. Returns every step.
pub async fn run(
    plugin: &LoadedPlugin,
    entry: &InstanceSetEntry,
    key: Arc<PrivateKey>,
    options: &Options,
    report: &mut dyn FnMut(&Step),
) -> Vec<Step> {
    let mut run = Run {
        steps: Vec::new(),
        report,
    };
    let t = Instant::now();
    let set = {
        let (p, e) = (plugin.clone(), entry.clone());
        blocking(move || p.new_instance_set(&e, &Tags::new())).await
    };
    let set: Arc<dyn InstanceSet> = match set {
        Ok(Ok(s)) => Arc::from(s),
        Ok(Err(e)) => {
            run.record("initialize the instance set", t, Err(e.to_string()));
            return run.steps;
        }
        Err(e) => {
            run.record("initialize the instance set", t, Err(e));
            return run.steps;
        }
    };
    run.record(
        "initialize the instance set",
        t,
        Ok(format!(
            "driver {} {}, set {}",
            plugin.driver_name, plugin.driver_version, entry.set_id
        )),
    );

    if lifecycle(&mut run, &set, key, options).await && plugin.driver_name == "loopback" {
        loopback_faults(&mut run, plugin, entry, options).await;
    }
    set.stop();
    run.steps
}

async fn list(set: &Arc<dyn InstanceSet>, filter: Tags) -> Result<Vec<Arc<dyn Instance>>, String> {
    let set = Arc::clone(set);
    match blocking(move || set.instances(&filter)).await? {
        Ok(list) => Ok(list.into_iter().map(Arc::from).collect()),
        Err(e) => Err(e.to_string()),
    }
}

/// Lists until none of `filter`'s VMs remain, or `timeout`.
async fn wait_gone(
    set: &Arc<dyn InstanceSet>,
    filter: &Tags,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match list(set, filter.clone()).await {
            Ok(l) if l.is_empty() => return Ok(()),
            Ok(l) if Instant::now() >= deadline => {
                return Err(format!(
                    "{} instance(s) still listed after {timeout:?}",
                    l.len()
                ))
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn lifecycle(
    run: &mut Run<'_>,
    set: &Arc<dyn InstanceSet>,
    key: Arc<PrivateKey>,
    options: &Options,
) -> bool {
    let t = Instant::now();
    let existing = match list(set, Tags::new()).await {
        Ok(l) => l,
        Err(e) => {
            run.record("list instances", t, Err(e));
            return false;
        }
    };
    run.record(
        "list instances",
        t,
        Ok(format!("{} instance(s) in the set", existing.len())),
    );

    if !existing.is_empty() {
        let t = Instant::now();
        if !options.destroy_existing {
            run.record(
                "no instances of this set exist",
                t,
                Err(format!(
                    "{} instance(s) already carry this set ID; rerun with --destroy-existing to remove them",
                    existing.len()
                )),
            );
            return false;
        }
        for instance in &existing {
            let i = Arc::clone(instance);
            if let Ok(Err(e)) = blocking(move || i.destroy()).await {
                log::warn!("instance={} destroy failed: {e}", instance.id());
            }
        }
        let gone = wait_gone(set, &Tags::new(), options.boot_timeout).await;
        if !run.record(
            "destroy existing instances",
            t,
            gone.map(|_| format!("{} destroyed", existing.len())),
        ) {
            return false;
        }
    }

    let secret = instance_secret::generate();
    let mut tags = Tags::new();
    tags.insert(TEST_PID_TAG.into(), std::process::id().to_string());
    tags.insert(instance_secret::TAG.into(), secret.clone());
    let public_key = key.public_key().to_openssh().ok();
    let request = CreateRequest {
        instance_type: InstanceType::minimal(&options.instance_type),
        image_id: options.image.clone(),
        tags: tags.clone(),
        init_command: instance_secret::init_command(&secret, ""),
        public_key,
    };
    let t = Instant::now();
    let created = {
        let set = Arc::clone(set);
        blocking(move || set.create(&request)).await
    };
    let instance: Arc<dyn Instance> = match created {
        Ok(Ok(i)) => Arc::from(i),
        Ok(Err(e)) => {
            run.record("create an instance", t, Err(e.to_string()));
            return false;
        }
        Err(e) => {
            run.record("create an instance", t, Err(e));
            return false;
        }
    };
    let id = instance.id();
    run.record(
        "create an instance",
        t,
        Ok(format!("{id} ({})", options.instance_type)),
    );

    let mut filter = Tags::new();
    filter.insert(TEST_PID_TAG.into(), std::process::id().to_string());
    let mut all_ok = true;
    let t = Instant::now();
    let listed = match list(set, filter.clone()).await {
        Ok(l) => match l.iter().find(|i| i.id() == id) {
            Some(found) => Ok(Arc::clone(found)),
            None => Err(format!(
                "{id} is not in the filtered list ({} listed)",
                l.len()
            )),
        },
        Err(e) => Err(e),
    };
    let listed_ok = run.record(
        "new instance appears in the filtered list",
        t,
        listed.as_ref().map(|_| id.clone()).map_err(Clone::clone),
    );
    all_ok &= listed_ok;

    if let Ok(found) = &listed {
        let t = Instant::now();
        let have = found.tags();
        let missing: Vec<String> = tags
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        let outcome = if missing.is_empty() {
            Ok(format!("{} tag(s) as created", tags.len()))
        } else {
            Err(format!("missing or changed: {}", missing.join(", ")))
        };
        all_ok &= run.record("tags round-trip", t, outcome);

        let t = Instant::now();
        let mut changed = have.clone();
        changed.insert("dispatch-cloud-test-tag".into(), "changed".into());
        let outcome = {
            let (i, c) = (Arc::clone(found), changed.clone());
            match blocking(move || i.set_tags(&c)).await {
                Ok(Ok(())) => match list(set, filter.clone()).await {
                    Ok(l) => match l.iter().find(|i| i.id() == id) {
                        Some(i)
                            if i.tags().get("dispatch-cloud-test-tag").map(String::as_str)
                                == Some("changed") =>
                        {
                            Ok("new tag listed".to_string())
                        }
                        Some(_) => {
                            Err("set_tags succeeded but the listing lacks the new tag".into())
                        }
                        None => Err(format!("{id} vanished after set_tags")),
                    },
                    Err(e) => Err(e),
                },
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e),
            }
        };
        all_ok &= run.record("set_tags is seen by the next listing", t, outcome);
    }

    if !options.skip_ssh {
        all_ok &= ssh_checks(run, &instance, key, options).await;
    }

    let t = Instant::now();
    let destroyed = {
        let i = Arc::clone(&instance);
        blocking(move || i.destroy()).await
    };
    let outcome = match destroyed {
        Ok(Ok(())) => wait_gone(set, &filter, options.boot_timeout)
            .await
            .map(|_| format!("{id} gone")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e),
    };
    all_ok &= run.record("destroy, and the instance disappears", t, outcome);
    all_ok
}

async fn ssh_checks(
    run: &mut Run<'_>,
    instance: &Arc<dyn Instance>,
    key: Arc<PrivateKey>,
    options: &Options,
) -> bool {
    let executor = Executor::new(
        Arc::new(DriverTarget {
            instance: Arc::clone(instance),
        }),
        key,
    )
    .with_dial_timeout(Duration::from_secs(10));
    let t = Instant::now();
    let deadline = t + options.boot_timeout;
    let mut last_error = String::new();
    let mut attempts = 0;
    let booted = loop {
        attempts += 1;
        match executor.execute(&options.boot_probe, b"").await {
            Ok(out) if out.success() => break true,
            Ok(out) => {
                last_error = format!(
                    "exit {:?}: {}",
                    out.exit_status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(options.probe_interval).await;
    };
    let outcome = if booted {
        Ok(format!(
            "{:?} succeeded after {attempts} attempt(s); ssh -p{} {}@{}",
            options.boot_probe,
            instance.address().rsplit(':').next().unwrap_or("22"),
            instance.remote_user(),
            instance.address().split(':').next().unwrap_or_default(),
        ))
    } else {
        Err(format!(
            "no success within {:?}: {last_error}",
            options.boot_timeout
        ))
    };
    if !run.record("boot probe over verified SSH", t, outcome) {
        executor.close().await;
        return false;
    }
    let mut ok = true;
    if let Some(command) = &options.command {
        let t = Instant::now();
        let outcome = match executor.execute(command, b"").await {
            Ok(out) if out.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            Ok(out) => Err(format!(
                "exit {:?}: {}",
                out.exit_status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(e.to_string()),
        };
        ok = run.record(&format!("run {command:?}"), t, outcome);
    }
    executor.close().await;
    ok
}

/// One fault to switch on in a fresh loopback instance set, and the error it must produce.
struct FaultCase {
    name: &'static str,
    faults: serde_json::Value,
    /// Call `instances` twice instead of `create` once.
    via_listing: bool,
    check: fn(&DriverError, &str) -> bool,
}

async fn loopback_faults(
    run: &mut Run<'_>,
    plugin: &LoadedPlugin,
    entry: &InstanceSetEntry,
    options: &Options,
) {
    let provider_type = options.instance_type.clone();
    let cases = [
        FaultCase {
            name: "quota fault is a Quota error",
            faults: serde_json::json!({"max_instances": 0}),
            via_listing: false,
            check: |e, _| matches!(e, DriverError::Quota { .. }),
        },
        FaultCase {
            name: "type capacity fault names the type",
            faults: serde_json::json!({"capacity_error_types": [provider_type]}),
            via_listing: false,
            check: |e, t| matches!(e, DriverError::Capacity { scope: CapacityScope::InstanceType(s), .. } if s == t),
        },
        FaultCase {
            name: "group capacity fault names the group",
            faults: serde_json::json!({"capacity_error_groups": [provider_type.split('.').next().unwrap_or_default()]}),
            via_listing: false,
            check: |e, _| {
                matches!(
                    e,
                    DriverError::Capacity {
                        scope: CapacityScope::QuotaGroup(_),
                        ..
                    }
                )
            },
        },
        FaultCase {
            name: "rate limit gives a future earliest retry",
            faults: serde_json::json!({"list_rate_limit_ms": 60_000}),
            via_listing: true,
            check: |e, _| matches!(e, DriverError::RateLimit { earliest_retry, .. } if *earliest_retry > SystemTime::now()),
        },
        FaultCase {
            name: "injected create failure is an error",
            faults: serde_json::json!({"create_error_rate": 1.0}),
            via_listing: false,
            check: |e, _| matches!(e, DriverError::Other { .. }),
        },
    ];
    for case in cases {
        let t = Instant::now();
        let mut faulty = entry.clone();
        if let Some(params) = faulty.parameters.as_object_mut() {
            params.insert("faults".into(), case.faults.clone());
        }
        let plugin = plugin.clone();
        let request = CreateRequest {
            instance_type: InstanceType::minimal(&options.instance_type),
            image_id: options.image.clone(),
            tags: Tags::new(),
            init_command: String::new(),
            public_key: None,
        };
        let via_listing = case.via_listing;
        let outcome = blocking(move || -> Result<(), DriverError> {
            let set = plugin.new_instance_set(&faulty, &Tags::new())?;
            let result = if via_listing {
                set.instances(&Tags::new())
                    .and_then(|_| set.instances(&Tags::new()))
                    .map(|_| ())
            } else {
                // Should fail; if it does not, clean up what it made.
                set.create(&request).and_then(|i| i.destroy())
            };
            set.stop();
            result
        })
        .await;
        let verdict = match outcome {
            Ok(Err(e)) if (case.check)(&e, &options.instance_type) => {
                Ok(format!("{} ({e})", e.kind()))
            }
            Ok(Err(e)) => Err(format!("wrong error: {} ({e})", e.kind())),
            Ok(Ok(())) => Err("the call succeeded".into()),
            Err(e) => Err(e),
        };
        run.record(case.name, t, verdict);
    }
}
