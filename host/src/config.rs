//! The cluster config (TOML). Every value has a default, so the repository's own files suffice.
//!
//! The file is parsed once into a spanned document (`toml_edit`) and walked key by key, each
//! value decoded on its own, so one bad key hides no other: `check` reports every problem at once
//! (unknown keys, wrong types, missing fields, values out of range), each at its own line and
//! under a key indexed into arrays of tables, like `instance_types[1].vcpus`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use driver_abi::InstanceType;
use serde::de::{DeserializeOwned, IntoDeserializer, Unexpected};
use serde::{Deserialize, Deserializer};
use toml_edit::{ImDocument, Item, TableLike, Value};

use crate::runner::RunAs;
use crate::toml_lines::line_of;

/// A byte count written as `1073741824`, `"1GiB"`, `"512MiB"`, `"10G"` or `"100M"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size like 4GiB"))?;
        let multiplier: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "K" | "KB" => 1e3,
            "M" | "MB" => 1e6,
            "G" | "GB" => 1e9,
            "T" | "TB" => 1e12,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => return Err(format!("unknown size unit {other:?} in {text:?}")),
        };
        Ok(Size((number * multiplier).round() as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte count like 1073741824 or \"4GiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(n), &self))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
                Size::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct InstanceTypeConfig {
    pub name: String,
    /// Defaults to `name`.
    pub provider_type: Option<String>,
    pub vcpus: u32,
    pub ram: Size,
    pub included_scratch: Size,
    pub added_scratch: Size,
    pub gpu_count: u32,
    pub gpu_kind: String,
    pub price: f64,
    pub preemptible: bool,
}

impl InstanceTypeConfig {
    pub fn to_instance_type(&self) -> InstanceType {
        InstanceType {
            name: self.name.clone(),
            provider_type: self
                .provider_type
                .clone()
                .unwrap_or_else(|| self.name.clone()),
            vcpus: self.vcpus,
            ram_bytes: self.ram.0,
            included_scratch_bytes: self.included_scratch.0,
            added_scratch_bytes: self.added_scratch.0,
            gpu_count: self.gpu_count,
            gpu_kind: self.gpu_kind.clone(),
            price: self.price,
            preemptible: self.preemptible,
        }
    }
}

/// Timeouts, converted once at load. The file writes each as `<name>_seconds` (fractions
/// allowed: tests compress minutes into milliseconds). Names and defaults follow the original
/// dispatcher's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub idle: Duration,
    pub booting: Duration,
    pub probe: Duration,
    pub probe_interval: Duration,
    /// Between probes of a VM whose runner streams its events (they only check liveness and
    /// reconcile); never shorter than `probe_interval`.
    pub watched_probe_interval: Duration,
    pub sync_interval: Duration,
    pub shutdown: Duration,
    pub signal: Duration,
    pub term: Duration,
    pub stale_lock: Duration,
    pub quota_holdoff: Duration,
    pub capacity_holdoff: Duration,
    pub ssh_dial: Duration,
    /// How long an API client may take to send a request's headers.
    pub api_header_read: Duration,
    /// How long a stopping `serve` waits for API requests in flight.
    pub api_shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            idle: s(60),
            booting: s(600),
            probe: s(600),
            probe_interval: s(10),
            watched_probe_interval: s(60),
            sync_interval: s(60),
            shutdown: s(10),
            signal: s(5),
            term: s(120),
            stale_lock: s(60),
            quota_holdoff: s(60),
            capacity_holdoff: s(60),
            api_header_read: s(10),
            api_shutdown: s(10),
            ssh_dial: s(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Instances including pending creates; 0 = unlimited.
    pub max_instances: usize,
    /// Pacing of create/list/destroy/set_tags; 0 = unlimited.
    pub max_cloud_ops_per_second: f64,
    /// In-flight creates; 0 = unlimited.
    pub max_concurrent_instance_create_ops: usize,
    pub max_probes_per_second: f64,
    /// 0 = as many as fit.
    pub max_running_containers_per_instance: usize,
    /// Eligible types cost at most this times the cheapest fitting one.
    pub maximum_price_factor: f64,
    /// A container whose starts failed this many times is cancelled.
    pub max_dispatch_attempts: u32,
    /// Per container and stream: a longer stdout or stderr keeps its first this many bytes,
    /// then a line saying it was truncated.
    pub max_log_bytes: u64,
    /// The fleet's price may not pass this many $/h: no create that would pass it (it acts
    /// like a quota). 0 = no cap.
    pub max_hourly_spend: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 64,
            max_cloud_ops_per_second: 10.0,
            max_concurrent_instance_create_ops: 1,
            max_probes_per_second: 10.0,
            max_running_containers_per_instance: 0,
            maximum_price_factor: 1.5,
            max_dispatch_attempts: 10,
            max_log_bytes: 100 << 20,
            max_hourly_spend: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// Five lowercase letters or digits; prefixes container IDs.
    pub cluster_id: String,
    /// Everything `serve` writes lives here.
    pub state_dir: PathBuf,
    pub listen: String,
    /// Bearer tokens accepted by the API; empty = one generated into `<state_dir>/api-token`.
    pub tokens: Vec<String>,
    /// Tokens for the management endpoints (instance hold/drain/run/kill), which `tokens` then
    /// may not use; they cannot submit or change containers. Empty: `tokens` manage too.
    pub management_tokens: Vec<String>,
    /// The plugin catalogue (relative to the current directory).
    pub plugins: PathBuf,
    /// Which `[[instance_sets]]` entry of the catalogue to run.
    pub instance_set: String,
    pub image: String,
    /// Appended to the boot script after the instance-secret line.
    pub instance_init_command: String,
    /// Exit 0 means booted.
    pub boot_probe_command: String,
    /// Added to every VM's tags.
    pub resource_tags: BTreeMap<String, String>,
    /// The dispatcher's SSH key; generated (0600) on first start when absent.
    pub ssh_key: Option<PathBuf>,
    /// A runner already installed on the VM image; unset = deploy this executable (by hash).
    pub runner_path: Option<String>,
    /// Whom containers without an image run as: `per-run` (a user ID of its own each, the
    /// default), `runner` (the runner's user: no isolation), or a user name on the VM.
    pub container_user: RunAs,
    /// The queue's SQLite file; default `<state_dir>/queue.sqlite`.
    pub queue_path: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub instance_types: Vec<InstanceTypeConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let t = |name: &str, vcpus: u32, ram_gib: u64, price: f64| InstanceTypeConfig {
            name: name.into(),
            provider_type: Some(format!("lb.{name}")),
            vcpus,
            ram: Size(ram_gib << 30),
            included_scratch: Size(10 << 30),
            added_scratch: Size(0),
            gpu_count: 0,
            gpu_kind: String::new(),
            price,
            preemptible: false,
        };
        ClusterConfig {
            cluster_id: "zzzzz".into(),
            state_dir: PathBuf::from(".dispatch-cloud"),
            listen: "127.0.0.1:9006".into(),
            tokens: Vec::new(),
            management_tokens: Vec::new(),
            plugins: PathBuf::from("plugins.toml"),
            instance_set: "default".into(),
            image: "default".into(),
            instance_init_command: String::new(),
            boot_probe_command: "true".into(),
            resource_tags: BTreeMap::new(),
            ssh_key: None,
            runner_path: None,
            container_user: RunAs::PerRun,
            queue_path: None,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            instance_types: vec![
                t("small", 1, 2, 0.02),
                t("medium", 2, 4, 0.04),
                t("large", 4, 8, 0.08),
            ],
        }
    }
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is with the whole file (it cannot be read).
    pub line: usize,
    /// Empty when no key is to blame (the file cannot be read, or is not TOML).
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if self.line > 0 {
            write!(f, "{}:", self.line)?;
        }
        if !self.key.is_empty() {
            write!(f, " {}:", self.key)?;
        }
        write!(f, " {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

const CLUSTER_FIELDS: &[&str] = &[
    "cluster_id",
    "state_dir",
    "listen",
    "tokens",
    "management_tokens",
    "plugins",
    "instance_set",
    "image",
    "instance_init_command",
    "boot_probe_command",
    "resource_tags",
    "ssh_key",
    "runner_path",
    "container_user",
    "queue_path",
    "timeouts",
    "limits",
    "instance_types",
];

const LIMITS_FIELDS: &[&str] = &[
    "max_instances",
    "max_cloud_ops_per_second",
    "max_concurrent_instance_create_ops",
    "max_probes_per_second",
    "max_running_containers_per_instance",
    "maximum_price_factor",
    "max_dispatch_attempts",
    "max_log_bytes",
    "max_hourly_spend",
];

const INSTANCE_TYPE_FIELDS: &[&str] = &[
    "name",
    "provider_type",
    "vcpus",
    "ram",
    "included_scratch",
    "added_scratch",
    "gpu_count",
    "gpu_kind",
    "price",
    "preemptible",
];

/// One table of the file: the root, a `[header]` table, an inline table or a `[[array]]` entry.
struct Table<'d> {
    /// What problems with the table itself are reported under: empty for the root, else like
    /// `timeouts` or `instance_types[1]`.
    key: String,
    /// Where the table starts (its header, for a `[header]` table).
    line: usize,
    items: &'d dyn TableLike,
}

impl Table<'_> {
    /// The full key of `field`, like `instance_types[1].vcpus`.
    fn key_of(&self, field: &str) -> String {
        if self.key.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.key)
        }
    }
}

/// Decodes one value on its own, so that its error names only it. Tables become inline tables
/// first, so that a table where a number belongs reads "invalid type: map, expected …".
fn decode<T: DeserializeOwned>(item: &Item) -> Result<T, String> {
    let value = item
        .clone()
        .into_value()
        .map_err(|item| format!("{} has no value", item.type_name()))?;
    T::deserialize(value.into_deserializer()).map_err(|e| e.message().to_string())
}

/// serde's wording, so that unknown keys read alike everywhere.
fn unknown_field(field: &str, known: &[&str]) -> String {
    let known: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
    format!(
        "unknown field `{field}`, expected one of {}",
        known.join(", ")
    )
}

/// A timeout as the file writes it (seconds, fractions allowed).
fn duration(seconds: f64, must_be_positive: bool) -> Result<Duration, String> {
    if seconds.is_nan() {
        return Err("NaN is not a number of seconds".into());
    }
    if seconds < 0.0 || (must_be_positive && seconds == 0.0) {
        let bound = if must_be_positive {
            "more than 0"
        } else {
            "0 or more"
        };
        return Err(format!("{seconds} must be {bound}"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{seconds} seconds is too long"))
}

/// Walks the document, filling a config from the defaults and noting every problem on the way.
struct Reader<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn report(&mut self, line: usize, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    fn line(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        span.map(|s| line_of(self.text, s.start))
    }

    /// The line of `field`'s value: where the value (or its table's header) starts, else where its
    /// key is (dotted and implicit tables have no span of their own), else where `t` starts.
    fn value_line(&self, t: &Table, field: &str, item: &Item) -> usize {
        self.line(item.span())
            .or_else(|| self.line(t.items.key(field).and_then(|k| k.span())))
            .unwrap_or(t.line)
    }

    fn unknown_fields(&mut self, t: &Table, known: &[&str]) {
        for (field, item) in t.items.iter() {
            if !known.contains(&field) {
                let line = self
                    .line(t.items.key(field).and_then(|k| k.span()))
                    .unwrap_or_else(|| self.value_line(t, field, item));
                self.report(line, t.key_of(field), unknown_field(field, known));
            }
        }
    }

    /// `field` of `t` and its line; None when absent, or not a `T` (then reported).
    fn get<T: DeserializeOwned>(&mut self, t: &Table, field: &str) -> Option<(T, usize)> {
        let item = t.items.get(field)?;
        let line = self.value_line(t, field, item);
        match decode(item) {
            Ok(value) => Some((value, line)),
            Err(message) => {
                self.report(line, t.key_of(field), message);
                None
            }
        }
    }

    /// Overwrites the default `into` with `field` of `t`; returns the line when it did.
    fn set<T: DeserializeOwned>(&mut self, t: &Table, field: &str, into: &mut T) -> Option<usize> {
        let (value, line) = self.get(t, field)?;
        *into = value;
        Some(line)
    }

    /// Like `get`, for a field without default: its absence is reported at `t`'s start.
    fn required<T: DeserializeOwned>(&mut self, t: &Table, field: &str) -> Option<(T, usize)> {
        if !t.items.contains_key(field) {
            self.report(t.line, t.key.clone(), format!("missing field `{field}`"));
            return None;
        }
        self.get(t, field)
    }

    /// Sub-table `field` of `t`; None when absent, or not a table (then reported).
    fn table<'d>(&mut self, t: &Table<'d>, field: &str) -> Option<Table<'d>> {
        let item = t.items.get(field)?;
        let line = self.value_line(t, field, item);
        match item.as_table_like() {
            Some(items) => Some(Table {
                key: t.key_of(field),
                line,
                items,
            }),
            None => {
                let message = format!("invalid type: {}, expected a table", item.type_name());
                self.report(line, t.key_of(field), message);
                None
            }
        }
    }

    /// The entries of `field` of `t`, written as `[[field]]` tables or as an array of inline
    /// tables, and the line of the array; entries that are no table are reported and skipped.
    fn tables<'d>(&mut self, t: &Table<'d>, field: &str) -> Option<(Vec<Table<'d>>, usize)> {
        let item = t.items.get(field)?;
        let line = self.value_line(t, field, item);
        let key = t.key_of(field);
        let mut entries = Vec::new();
        match item {
            Item::ArrayOfTables(array) => {
                for (i, entry) in array.iter().enumerate() {
                    entries.push(Table {
                        key: format!("{key}[{i}]"),
                        line: self.line(entry.span()).unwrap_or(line),
                        items: entry,
                    });
                }
            }
            Item::Value(Value::Array(array)) => {
                for (i, entry) in array.iter().enumerate() {
                    let entry_line = self.line(entry.span()).unwrap_or(line);
                    match entry.as_inline_table() {
                        Some(items) => entries.push(Table {
                            key: format!("{key}[{i}]"),
                            line: entry_line,
                            items,
                        }),
                        None => self.report(
                            entry_line,
                            format!("{key}[{i}]"),
                            format!("invalid type: {}, expected a table", entry.type_name()),
                        ),
                    }
                }
            }
            other => {
                let message = format!(
                    "invalid type: {}, expected an array of tables",
                    other.type_name()
                );
                self.report(line, key, message);
                return None;
            }
        }
        Some((entries, line))
    }

    /// Array `field` of `t`, each element decoded on its own so that each bad one is reported
    /// with its index and line; None when absent or anything in it is bad.
    fn list<T: DeserializeOwned>(&mut self, t: &Table, field: &str) -> Option<Vec<T>> {
        let item = t.items.get(field)?;
        let line = self.value_line(t, field, item);
        let Some(array) = item.as_array() else {
            let message = format!("invalid type: {}, expected an array", item.type_name());
            self.report(line, t.key_of(field), message);
            return None;
        };
        let mut out = Vec::new();
        let mut all_good = true;
        for (i, element) in array.iter().enumerate() {
            match decode(&Item::Value(element.clone())) {
                Ok(v) => out.push(v),
                Err(message) => {
                    all_good = false;
                    let line = self.line(element.span()).unwrap_or(line);
                    self.report(line, format!("{}[{i}]", t.key_of(field)), message);
                }
            }
        }
        all_good.then_some(out)
    }

    /// Every entry of `t` as a `T` (a free-form table such as `resource_tags`).
    fn map<T: DeserializeOwned>(&mut self, t: &Table) -> BTreeMap<String, T> {
        let mut out = BTreeMap::new();
        for (field, _) in t.items.iter() {
            if let Some((value, _)) = self.get(t, field) {
                out.insert(field.to_string(), value);
            }
        }
        out
    }

    fn cluster(&mut self, root: &Table) -> ClusterConfig {
        let mut c = ClusterConfig::default();
        self.unknown_fields(root, CLUSTER_FIELDS);
        if let Some(line) = self.set(root, "cluster_id", &mut c.cluster_id) {
            let id = &c.cluster_id;
            if id.len() != 5
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                let message = format!("{id:?} must be 5 lowercase letters or digits");
                self.report(line, "cluster_id", message);
            }
        }
        self.set(root, "state_dir", &mut c.state_dir);
        if let Some(line) = self.set(root, "listen", &mut c.listen) {
            if c.listen.parse::<std::net::SocketAddr>().is_err() {
                let message = format!("{:?} is not an address like 127.0.0.1:9006", c.listen);
                self.report(line, "listen", message);
            }
        }
        if let Some(tokens) = self.list(root, "management_tokens") {
            c.management_tokens = tokens;
        }
        if let Some(tokens) = self.list(root, "tokens") {
            c.tokens = tokens;
        }
        for key in ["tokens", "management_tokens"] {
            let list = if key == "tokens" {
                &c.tokens
            } else {
                &c.management_tokens
            };
            if list.iter().any(|t| t.trim().is_empty()) {
                let line = root
                    .items
                    .get(key)
                    .map(|item| self.value_line(root, key, item))
                    .unwrap_or(root.line);
                self.report(line, key, "an empty token would let anyone in");
            }
        }
        self.set(root, "plugins", &mut c.plugins);
        self.set(root, "instance_set", &mut c.instance_set);
        self.set(root, "image", &mut c.image);
        self.set(root, "instance_init_command", &mut c.instance_init_command);
        self.set(root, "boot_probe_command", &mut c.boot_probe_command);
        if let Some(tags) = self.table(root, "resource_tags") {
            c.resource_tags = self.map(&tags);
        }
        self.set(root, "ssh_key", &mut c.ssh_key);
        self.set(root, "runner_path", &mut c.runner_path);
        let mut user = String::new();
        if let Some(line) = self.set(root, "container_user", &mut user) {
            match parse_container_user(&user) {
                Ok(run_as) => c.container_user = run_as,
                Err(why) => self.report(line, "container_user", why),
            }
        }
        self.set(root, "queue_path", &mut c.queue_path);
        if let Some(t) = self.table(root, "timeouts") {
            c.timeouts = self.timeouts(&t);
        }
        if let Some(t) = self.table(root, "limits") {
            c.limits = self.limits(&t);
        }
        if let Some((entries, line)) = self.tables(root, "instance_types") {
            // Only `instance_types = []` has no entries: entries that are no table were reported.
            let declared_empty = root
                .items
                .get("instance_types")
                .and_then(Item::as_array)
                .is_some_and(|a| a.is_empty());
            if declared_empty {
                self.report(
                    line,
                    "instance_types",
                    "at least one instance type is needed",
                );
            }
            let mut names = HashSet::new();
            let cap = c.limits.max_hourly_spend;
            c.instance_types = entries
                .iter()
                .filter_map(|t| self.instance_type(t, &mut names, cap))
                .collect();
        }
        c
    }

    fn timeouts(&mut self, t: &Table) -> Timeouts {
        let mut out = Timeouts::default();
        // The flag marks the timeouts that pace a loop or bound a wait, where 0 would spin.
        let fields: [(&str, &mut Duration, bool); 15] = [
            ("idle_seconds", &mut out.idle, true),
            ("booting_seconds", &mut out.booting, true),
            ("probe_seconds", &mut out.probe, true),
            ("probe_interval_seconds", &mut out.probe_interval, true),
            (
                "watched_probe_interval_seconds",
                &mut out.watched_probe_interval,
                true,
            ),
            ("sync_interval_seconds", &mut out.sync_interval, true),
            ("shutdown_seconds", &mut out.shutdown, false),
            ("signal_seconds", &mut out.signal, true),
            ("term_seconds", &mut out.term, false),
            ("stale_lock_seconds", &mut out.stale_lock, false),
            ("quota_holdoff_seconds", &mut out.quota_holdoff, false),
            ("capacity_holdoff_seconds", &mut out.capacity_holdoff, false),
            ("ssh_dial_seconds", &mut out.ssh_dial, false),
            ("api_header_read_seconds", &mut out.api_header_read, true),
            ("api_shutdown_seconds", &mut out.api_shutdown, false),
        ];
        let known: Vec<&str> = fields.iter().map(|(field, _, _)| *field).collect();
        self.unknown_fields(t, &known);
        for (field, into, must_be_positive) in fields {
            if let Some((seconds, line)) = self.get::<f64>(t, field) {
                match duration(seconds, must_be_positive) {
                    Ok(d) => *into = d,
                    Err(message) => self.report(line, t.key_of(field), message),
                }
            }
        }
        out
    }

    fn limits(&mut self, t: &Table) -> Limits {
        let mut out = Limits::default();
        self.unknown_fields(t, LIMITS_FIELDS);
        self.set(t, "max_instances", &mut out.max_instances);
        if let Some(line) = self.set(
            t,
            "max_cloud_ops_per_second",
            &mut out.max_cloud_ops_per_second,
        ) {
            let v = out.max_cloud_ops_per_second;
            if v.is_nan() || v < 0.0 {
                self.report(
                    line,
                    t.key_of("max_cloud_ops_per_second"),
                    "must be 0 or more",
                );
            }
        }
        self.set(
            t,
            "max_concurrent_instance_create_ops",
            &mut out.max_concurrent_instance_create_ops,
        );
        if let Some(line) = self.set(t, "max_probes_per_second", &mut out.max_probes_per_second) {
            if out.max_probes_per_second.is_nan() || out.max_probes_per_second <= 0.0 {
                self.report(
                    line,
                    t.key_of("max_probes_per_second"),
                    "must be more than 0",
                );
            }
        }
        self.set(
            t,
            "max_running_containers_per_instance",
            &mut out.max_running_containers_per_instance,
        );
        if let Some(line) = self.set(t, "maximum_price_factor", &mut out.maximum_price_factor) {
            if out.maximum_price_factor.is_nan() || out.maximum_price_factor < 1.0 {
                self.report(line, t.key_of("maximum_price_factor"), "must be at least 1");
            }
        }
        self.set(t, "max_dispatch_attempts", &mut out.max_dispatch_attempts);
        self.set(t, "max_log_bytes", &mut out.max_log_bytes);
        if let Some(line) = self.set(t, "max_hourly_spend", &mut out.max_hourly_spend) {
            if !out.max_hourly_spend.is_finite() || out.max_hourly_spend < 0.0 {
                self.report(
                    line,
                    t.key_of("max_hourly_spend"),
                    "must be 0 (no cap) or a price per hour",
                );
            }
        }
        out
    }

    /// One `[[instance_types]]` entry; None when a required field is missing or bad.
    /// `names` collects the names seen so far, to refuse a second type of the same name.
    fn instance_type(
        &mut self,
        t: &Table,
        names: &mut HashSet<String>,
        max_hourly_spend: f64,
    ) -> Option<InstanceTypeConfig> {
        self.unknown_fields(t, INSTANCE_TYPE_FIELDS);
        let name = self.required::<String>(t, "name");
        if let Some((name, line)) = &name {
            if !names.insert(name.clone()) {
                self.report(
                    *line,
                    t.key_of("name"),
                    format!("{name:?} is declared twice"),
                );
            }
        }
        let vcpus = self.required::<u32>(t, "vcpus");
        if let Some((0, line)) = vcpus {
            self.report(line, t.key_of("vcpus"), "must be at least 1");
        }
        let ram = self.required::<Size>(t, "ram");
        if let Some((Size(0), line)) = ram {
            self.report(line, t.key_of("ram"), "must be more than 0");
        }
        let price = self.required::<f64>(t, "price");
        if let Some((price, line)) = price {
            if price.is_nan() || price < 0.0 {
                self.report(line, t.key_of("price"), "must be 0 or more");
            } else if max_hourly_spend > 0.0 && price > max_hourly_spend {
                // Under the cap it could never be created: what needs it would wait forever.
                self.report(
                    line,
                    t.key_of("price"),
                    format!("{price} is more than limits.max_hourly_spend ({max_hourly_spend}): it could never be created"),
                );
            }
        }
        let mut out = InstanceTypeConfig {
            name: String::new(),
            provider_type: None,
            vcpus: 0,
            ram: Size(0),
            included_scratch: Size(0),
            added_scratch: Size(0),
            gpu_count: 0,
            gpu_kind: String::new(),
            price: 0.0,
            preemptible: false,
        };
        self.set(t, "provider_type", &mut out.provider_type);
        self.set(t, "included_scratch", &mut out.included_scratch);
        self.set(t, "added_scratch", &mut out.added_scratch);
        self.set(t, "gpu_count", &mut out.gpu_count);
        self.set(t, "gpu_kind", &mut out.gpu_kind);
        self.set(t, "preemptible", &mut out.preemptible);
        out.name = name?.0;
        out.vcpus = vcpus?.0;
        out.ram = ram?.0;
        out.price = price?.0;
        Some(out)
    }
}

/// `per-run`, `runner`, or a user name as `useradd` accepts it.
fn parse_container_user(text: &str) -> Result<RunAs, String> {
    match text {
        "per-run" => Ok(RunAs::PerRun),
        "runner" => Ok(RunAs::Runner),
        name if !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
            }) =>
        {
            Ok(RunAs::User(name.to_string()))
        }
        other => Err(format!(
            "{other:?} is not per-run, runner, or a user name (lowercase letters, digits, _ and -)"
        )),
    }
}

impl ClusterConfig {
    /// Loads `file`, or the defaults when `file` is None. Reports every problem at once.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(file) = file else {
            return Ok(ClusterConfig::default());
        };
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: file.to_path_buf(),
                line: 0,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(file, &text)
    }

    /// Reads `text` (the contents of `file`, named in problems). Every problem is reported, in
    /// the order of the file, except after a syntax error: then that is the only one.
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let document = ImDocument::parse(text).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: file.to_path_buf(),
                line: e.span().map_or(1, |s| line_of(text, s.start)),
                key: String::new(),
                // toml_edit's message may span lines (what was found, then what was expected).
                message: e.message().trim_end().replace('\n', "; "),
            }],
        })?;
        let mut reader = Reader {
            file,
            text,
            problems: Vec::new(),
        };
        let root = Table {
            key: String::new(),
            line: 1,
            items: document.as_table(),
        };
        let config = reader.cluster(&root);
        let mut problems = reader.problems;
        // Stable: problems on one line keep the order they were found in.
        problems.sort_by_key(|p| p.line);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    pub fn instance_types(&self) -> Vec<InstanceType> {
        self.instance_types
            .iter()
            .map(InstanceTypeConfig::to_instance_type)
            .collect()
    }

    pub fn queue_path(&self) -> PathBuf {
        self.queue_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("queue.sqlite"))
    }

    pub fn ssh_key_path(&self) -> PathBuf {
        self.ssh_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ssh_key"))
    }

    pub fn token_path(&self) -> PathBuf {
        self.state_dir.join("api-token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match ClusterConfig::parse(Path::new("c.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn sizes_accept_the_usual_units() {
        assert_eq!(Size::parse("1GiB").expect("ok").0, 1 << 30);
        assert_eq!(Size::parse("512MiB").expect("ok").0, 512 << 20);
        assert_eq!(Size::parse("10G").expect("ok").0, 10_000_000_000);
        assert_eq!(Size::parse("123").expect("ok").0, 123);
        assert!(Size::parse("12 parsecs").is_err());
    }

    #[test]
    fn an_empty_file_is_the_default() {
        let c = ClusterConfig::parse(Path::new("c.toml"), "").expect("defaults");
        assert_eq!(c, ClusterConfig::default());
    }

    #[test]
    fn every_value_is_read_and_timeouts_become_durations() {
        let text = r#"
cluster_id = "abc12"
state_dir = "/var/lib/dc"
listen = "0.0.0.0:9000"
tokens = ["t1", "t2"]
plugins = "/etc/dc/plugins.toml"
instance_set = "aws"
image = "ami-1"
instance_init_command = "echo hi"
boot_probe_command = "test -e /ready"
ssh_key = "/etc/dc/key"
runner_path = "/usr/bin/runner"
queue_path = "/var/lib/dc/q.sqlite"
[resource_tags]
team = "batch"
[timeouts]
idle_seconds = 0.1
booting_seconds = 60
shutdown_seconds = 0
[limits]
max_instances = 3
max_cloud_ops_per_second = 200
max_concurrent_instance_create_ops = 4
max_probes_per_second = 0.5
max_running_containers_per_instance = 2
maximum_price_factor = 2
[[instance_types]]
name = "a"
vcpus = 2
ram = "1GiB"
price = 1
gpu_count = 1
gpu_kind = "t4"
preemptible = true
[[instance_types]]
name = "b"
provider_type = "b.large"
vcpus = 4
ram = 1073741824
included_scratch = "10G"
price = 0.5
"#;
        let c = ClusterConfig::parse(Path::new("c.toml"), text).expect("valid");
        assert_eq!(c.cluster_id, "abc12");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/dc"));
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.tokens, vec!["t1".to_string(), "t2".to_string()]);
        assert_eq!(c.plugins, PathBuf::from("/etc/dc/plugins.toml"));
        assert_eq!(
            (c.instance_set.as_str(), c.image.as_str()),
            ("aws", "ami-1")
        );
        assert_eq!(c.instance_init_command, "echo hi");
        assert_eq!(c.boot_probe_command, "test -e /ready");
        assert_eq!(c.ssh_key_path(), PathBuf::from("/etc/dc/key"));
        assert_eq!(c.queue_path(), PathBuf::from("/var/lib/dc/q.sqlite"));
        assert_eq!(c.runner_path.as_deref(), Some("/usr/bin/runner"));
        assert_eq!(c.resource_tags["team"], "batch");
        assert_eq!(c.timeouts.idle, Duration::from_millis(100));
        assert_eq!(c.timeouts.booting, Duration::from_secs(60));
        assert_eq!(c.timeouts.shutdown, Duration::ZERO);
        assert_eq!(c.timeouts.probe, Timeouts::default().probe);
        assert_eq!(c.limits.max_instances, 3);
        assert_eq!(c.limits.max_cloud_ops_per_second, 200.0);
        assert_eq!(c.limits.max_concurrent_instance_create_ops, 4);
        assert_eq!(c.limits.max_probes_per_second, 0.5);
        assert_eq!(c.limits.max_running_containers_per_instance, 2);
        assert_eq!(c.limits.maximum_price_factor, 2.0);
        assert_eq!(c.limits.max_dispatch_attempts, 10);
        let types = c.instance_types();
        assert_eq!(types.len(), 2);
        assert_eq!(types[0].provider_type, "a");
        assert_eq!(types[0].ram_bytes, 1 << 30);
        assert!(types[0].preemptible);
        assert_eq!(types[1].provider_type, "b.large");
        assert_eq!(types[1].included_scratch_bytes, 10_000_000_000);
    }

    #[test]
    fn inline_tables_and_dotted_keys_are_read_alike() {
        let text = "timeouts.idle_seconds = 5\nlimits = { max_instances = 2 }\ninstance_types = [{ name = \"a\", vcpus = 1, ram = \"1GiB\", price = 1.0 }]\n";
        let c = ClusterConfig::parse(Path::new("c.toml"), text).expect("valid");
        assert_eq!(c.timeouts.idle, Duration::from_secs(5));
        assert_eq!(c.limits.max_instances, 2);
        assert_eq!(c.instance_types[0].name, "a");

        let bad = "timeouts.idle_seconds = \"x\"\nlimits = { max_instances = -1 }\ninstance_types = [\n  { name = \"a\", vcpus = 1, ram = \"1GiB\", price = 1.0 },\n  { name = \"b\", vcpus = 0, ram = \"1GiB\", price = 1.0 },\n  3,\n]\n";
        let shown = problems(bad);
        assert_eq!(shown.len(), 4, "{shown:#?}");
        assert!(shown[0].starts_with("c.toml:1: timeouts.idle_seconds: invalid type"));
        assert!(shown[1].starts_with("c.toml:2: limits.max_instances: invalid value"));
        assert_eq!(
            shown[2],
            "c.toml:5: instance_types[1].vcpus: must be at least 1"
        );
        assert!(shown[3].starts_with("c.toml:6: instance_types[2]: invalid type: integer"));
    }

    #[test]
    fn every_problem_is_reported_at_once_with_line_and_key() {
        let text = "cluster_id = \"ZZ\"\nlisten = \"nowhere\"\nbogus = 1\n\n[timeouts]\nidle_seconds = \"soon\"\nprobe_seconds = 0\n\n[[instance_types]]\nname = \"a\"\nvcpus = 0\nram = \"1 parsec\"\nprice = 1.0\n";
        let err = ClusterConfig::parse(Path::new("/etc/c.toml"), text).expect_err("bad");
        let shown = err.to_string();
        for needle in [
            "/etc/c.toml:1: cluster_id: \"ZZ\" must be 5 lowercase letters or digits",
            "/etc/c.toml:2: listen: \"nowhere\" is not an address",
            "/etc/c.toml:3: bogus: unknown field `bogus`, expected one of `cluster_id`, ",
            "/etc/c.toml:6: timeouts.idle_seconds: invalid type: string \"soon\"",
            "/etc/c.toml:7: timeouts.probe_seconds: 0 must be more than 0",
            "/etc/c.toml:11: instance_types[0].vcpus: must be at least 1",
            "/etc/c.toml:12: instance_types[0].ram: unknown size unit \"parsec\"",
        ] {
            assert!(shown.contains(needle), "{needle:?} missing from:\n{shown}");
        }
        // Syntax-level and semantic problems alike, in the order of the file.
        assert_eq!(err.problems.len(), 7, "{shown}");
        let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 2, 3, 6, 7, 11, 12]);
    }

    #[test]
    fn a_table_missing_a_field_is_reported_once_and_later_tables_still_checked() {
        let text = "[[instance_types]]\nname = \"a\"\nvcpus = 1\nprice = 1.0\n[limits]\nmax_instances = \"many\"\n";
        let shown = problems(text);
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert_eq!(shown[0], "c.toml:1: instance_types[0]: missing field `ram`");
        assert!(
            shown[1].starts_with("c.toml:6: limits.max_instances:"),
            "{shown:#?}"
        );
    }

    #[test]
    fn the_second_instance_type_is_named_by_its_index_and_line() {
        let first = "[[instance_types]]\nname = \"a\"\nvcpus = 1\nram = \"1GiB\"\nprice = 1.0\n";
        let second = |vcpus: &str| {
            format!("{first}\n[[instance_types]]\nname = \"b\"\nvcpus = {vcpus}\nram = \"1GiB\"\nprice = 1.0\n")
        };
        for (vcpus, message) in [
            ("\"many\"", "invalid type: string \"many\", expected u32"),
            ("0", "must be at least 1"),
        ] {
            let err = ClusterConfig::parse(Path::new("c.toml"), &second(vcpus)).expect_err(vcpus);
            assert_eq!(
                err.problems,
                vec![Problem {
                    file: PathBuf::from("c.toml"),
                    line: 9,
                    key: "instance_types[1].vcpus".into(),
                    message: message.into(),
                }]
            );
        }
        // A missing field is blamed on the entry, at its header.
        let text = format!("{first}[[instance_types]]\nname = \"b\"\nvcpus = 1\nram = \"1GiB\"\n");
        assert_eq!(
            problems(&text),
            vec!["c.toml:6: instance_types[1]: missing field `price`"]
        );
        // A name used twice is blamed on the second.
        let text = format!(
            "{first}[[instance_types]]\nname = \"a\"\nvcpus = 1\nram = \"1GiB\"\nprice = 1.0\n"
        );
        assert_eq!(
            problems(&text),
            vec!["c.toml:7: instance_types[1].name: \"a\" is declared twice"]
        );
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let text = "cluster_id = \"ZZ\"\nlisten = \"nowhere\"\n[timeouts]\nprobe_seconds = 0\n[[instance_types]]\nname = \"a\"\nvcpus = 0\nram = \"1GiB\"\nprice = 1.0\n";
        let err = ClusterConfig::parse(Path::new("c.toml"), text).expect_err("bad");
        let keys: Vec<(&str, usize)> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("cluster_id", 1),
                ("listen", 2),
                ("timeouts.probe_seconds", 4),
                ("instance_types[0].vcpus", 7),
            ]
        );
    }

    #[test]
    fn numbers_out_of_range_are_refused_where_they_are_written() {
        let text = "instance_types = []\n[timeouts]\nidle_seconds = -1\nterm_seconds = nan\nssh_dial_seconds = inf\nshutdown_seconds = 0\n[limits]\nmax_probes_per_second = 0\nmaximum_price_factor = 0.5\nmax_hourly_spend = -2\nmax_cloud_ops_per_second = -1\n[resource_tags]\nteam = 1\n";
        assert_eq!(
            problems(text),
            vec![
                "c.toml:1: instance_types: at least one instance type is needed",
                "c.toml:3: timeouts.idle_seconds: -1 must be more than 0",
                "c.toml:4: timeouts.term_seconds: NaN is not a number of seconds",
                "c.toml:5: timeouts.ssh_dial_seconds: inf seconds is too long",
                "c.toml:8: limits.max_probes_per_second: must be more than 0",
                "c.toml:9: limits.maximum_price_factor: must be at least 1",
                "c.toml:10: limits.max_hourly_spend: must be 0 (no cap) or a price per hour",
                "c.toml:11: limits.max_cloud_ops_per_second: must be 0 or more",
                "c.toml:13: resource_tags.team: invalid type: integer `1`, expected a string",
            ]
        );
    }

    #[test]
    fn a_type_the_spending_cap_never_allows_is_refused() {
        let text = "[limits]\nmax_hourly_spend = 1.0\n[[instance_types]]\nname = \"big\"\nprovider_type = \"x\"\nvcpus = 1\nram = \"1GiB\"\nprice = 2.5\n";
        assert_eq!(
            problems(text),
            ["c.toml:8: instance_types[0].price: 2.5 is more than limits.max_hourly_spend (1): it could never be created"]
        );
    }

    #[test]
    fn empty_tokens_are_refused() {
        let shown = problems(
            "cluster_id = \"zzzzz\"\nmanagement_tokens = [\"ok\", \" \"]\ntokens = [\"\"]\n",
        );
        assert_eq!(
            shown,
            [
                "c.toml:2: management_tokens: an empty token would let anyone in",
                "c.toml:3: tokens: an empty token would let anyone in",
            ]
        );
    }

    #[test]
    fn wrong_shapes_and_unknown_tables_are_named() {
        let text = "tokens = [\n  \"a\",\n  2,\n]\ntimeouts = 5\n[bogus]\nx = 1\n[limits]\nmax_instance = 3\n";
        let shown = problems(text);
        assert_eq!(shown.len(), 4, "{shown:#?}");
        assert_eq!(
            shown[0],
            "c.toml:3: tokens[1]: invalid type: integer `2`, expected a string"
        );
        assert_eq!(
            shown[1],
            "c.toml:5: timeouts: invalid type: integer, expected a table"
        );
        assert!(
            shown[2].starts_with("c.toml:6: bogus: unknown field `bogus`"),
            "{shown:#?}"
        );
        assert!(
            shown[3].starts_with("c.toml:9: limits.max_instance: unknown field `max_instance`, expected one of `max_instances`,"),
            "{shown:#?}"
        );
    }

    #[test]
    fn a_syntax_error_is_reported_at_its_line() {
        let shown = problems("cluster_id = \"abcde\"\nlisten = \n");
        assert_eq!(shown.len(), 1, "{shown:#?}");
        assert!(shown[0].starts_with("c.toml:2: "), "{shown:#?}");
    }
}
