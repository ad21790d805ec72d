//! The sweeper: NICs and disks of this set whose VM is gone (a crash mid-create, a delete that
//! left them), deleted once older than `delete_dangling_resources_after_seconds`. It runs
//! after a listing, at most every `sweep_interval_seconds`, in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{age_of, tags_of, SetInner, CREATED_AT_TAG, DISK_API, NETWORK_API, SET_ID_TAG};

#[derive(Default)]
pub struct Sweeper {
    last: Mutex<Option<Instant>>,
    running: AtomicBool,
}

/// Starts a sweep over `nics` (the listing just made) if one is due.
pub fn maybe_start(set: &Arc<SetInner>, nics: Vec<Value>) {
    let interval = Duration::from_secs(set.params.sweep_interval_seconds);
    {
        let Ok(mut last) = set.sweeper.last.lock() else {
            return;
        };
        if last.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        *last = Some(Instant::now());
    }
    if set.sweeper.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let Ok(rt) = crate::arm::runtime() else {
        set.sweeper.running.store(false, Ordering::Release);
        return;
    };
    let set = Arc::clone(set);
    rt.spawn(async move {
        // Cleared even if the sweep panics, or no sweep would ever run again.
        let _running = Running(&set.sweeper.running);
        sweep(&set, nics).await;
    });
}

struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The set-ID tag decides; a resource without one (a disk ARM made before it was tagged) is
/// ours by its name.
fn is_ours(set: &SetInner, resource: &Value, name: &str) -> bool {
    if !crate::safe_name(name) {
        return false;
    }
    match tags_of(resource).get(SET_ID_TAG) {
        Some(tag) => tag == set.set_id.as_str(),
        None => name.starts_with(&set.name_prefix()),
    }
}

async fn sweep(set: &SetInner, nics: Vec<Value>) {
    let threshold = Duration::from_secs(set.params.delete_dangling_resources_after_seconds);
    let in_flight = set.in_flight.lock().map(|f| f.clone()).unwrap_or_default();
    for nic in &nics {
        let name = nic.get("name").and_then(Value::as_str).unwrap_or_default();
        let attached = nic.pointer("/properties/virtualMachine/id").is_some();
        let creating = name
            .strip_suffix("-nic")
            .is_some_and(|vm| in_flight.contains(vm));
        if name.is_empty() || attached || creating || !is_ours(set, nic, name) {
            continue;
        }
        let Some(age) = tags_of(nic)
            .get(CREATED_AT_TAG)
            .and_then(|t| t.parse::<u64>().ok())
            .map(crate::age_of)
        else {
            continue;
        };
        if age < threshold {
            continue;
        }
        match set.delete(&set.nic_path(name), NETWORK_API).await {
            Ok(()) => log::info!("sweeper: deleted NIC {name}: no VM, {}s old", age.as_secs()),
            Err(f) => log::warn!("sweeper: deleting NIC {name}: {f}"),
        }
    }
    let disks = match set
        .list(
            &format!("{}/providers/Microsoft.Compute/disks", set.rg_path),
            DISK_API,
        )
        .await
    {
        Ok(d) => d,
        Err(f) => {
            log::warn!("sweeper: listing disks: {f}");
            return;
        }
    };
    for disk in &disks {
        let name = disk.get("name").and_then(Value::as_str).unwrap_or_default();
        let state = disk
            .pointer("/properties/diskState")
            .and_then(Value::as_str);
        let managed_by = disk
            .get("managedBy")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if name.is_empty() || !managed_by.is_empty() || state.is_some_and(|s| s != "Unattached") {
            continue;
        }
        let vm = name
            .strip_suffix("-os")
            .or_else(|| name.strip_suffix("-scratch"))
            .unwrap_or(name);
        if in_flight.contains(vm) || !is_ours(set, disk, name) {
            continue;
        }
        let created = tags_of(disk)
            .get(CREATED_AT_TAG)
            .and_then(|t| t.parse::<u64>().ok())
            .or_else(|| {
                disk.pointer("/properties/timeCreated")
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339)
            });
        let Some(age) = created.map(age_of) else {
            continue;
        };
        if age < threshold {
            continue;
        }
        match set.delete(&set.disk_path(name), DISK_API).await {
            Ok(()) => log::info!(
                "sweeper: deleted disk {name}: unattached, {}s old",
                age.as_secs()
            ),
            Err(f) => log::warn!("sweeper: deleting disk {name}: {f}"),
        }
    }
}

/// Unix seconds of an RFC 3339 time as ARM writes it (`2026-11-29T05:00:00.1234567+00:00`).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let (date, rest) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let clock = &rest[..rest.find(['Z', '+', '-', '.']).unwrap_or(rest.len())];
    let mut c = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (c.next()??, c.next()??, c.next()??);
    let offset = match rest.rfind(['+', '-']) {
        Some(i) if i > 0 => {
            let sign = if rest.as_bytes()[i] == b'-' { -1 } else { 1 };
            let (oh, om) = rest[i + 1..].split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
        _ => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss - offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_times_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-29T05:00:00.1234567+00:00"),
            Some(1_795_928_400)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29T06:00:00+01:00"),
            Some(1_795_928_400)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29T00:00:00-05:00"),
            Some(1_795_928_400)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
