//! Property tests over the parsers of input the host does not control: the cluster config and
//! the plugin catalogue (files people write), API bodies (requests) and a VM's `runner list`
//! output. Whatever arrives, they answer with a value or an error, never a panic, and every
//! config error names a line.

use std::collections::HashSet;
use std::path::Path;

use dispatch_cloud::config::ClusterConfig;
use dispatch_cloud::plugin::catalogue::{Catalogue, CatalogueError};
use dispatch_cloud::pool::probe::parse_run_list;
use dispatch_cloud::queue::NewContainer;
use proptest::prelude::*;

/// Keys and tables a cluster config has, so generated files get past the syntax and into the
/// checks of each value.
const CONFIG_KEYS: &[&str] = &[
    "cluster_id",
    "state_dir",
    "listen",
    "tokens",
    "management_tokens",
    "plugins",
    "instance_set",
    "image",
    "boot_probe_command",
    "runner_path",
    "queue_path",
    "ssh_key",
    "container_user",
    "nonsense",
];
const TABLE_KEYS: &[(&str, &[&str])] = &[
    (
        "timeouts",
        &[
            "idle_seconds",
            "probe_interval_seconds",
            "term_seconds",
            "booting_seconds",
        ],
    ),
    (
        "limits",
        &[
            "max_instances",
            "maximum_price_factor",
            "max_hourly_spend",
            "max_log_bytes",
        ],
    ),
    ("resource_tags", &["team", "x"]),
];
const TYPE_KEYS: &[&str] = &[
    "name",
    "provider_type",
    "vcpus",
    "ram",
    "price",
    "preemptible",
    "gpu_count",
];

/// A TOML value of any kind, including the odd ones (NaN, huge numbers, nested arrays).
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| {
            if f.is_nan() {
                "nan".into()
            } else if f.is_infinite() {
                if f > 0.0 {
                    "inf".into()
                } else {
                    "-inf".into()
                }
            } else {
                format!("{f:?}")
            }
        }),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("\"4GiB\"".to_string()),
        Just("[]".to_string()),
        Just("[\"a\", 1]".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

/// `key = value` lines, each key once.
fn assignments(pairs: Vec<(&str, String)>) -> String {
    let mut seen = HashSet::new();
    pairs
        .into_iter()
        .filter(|(k, _)| seen.insert(*k))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

fn config_text() -> impl Strategy<Value = String> {
    let top = prop::collection::vec((prop::sample::select(CONFIG_KEYS), value()), 0..6);
    let tables = prop::collection::vec(
        (
            prop::sample::select(TABLE_KEYS),
            prop::collection::vec((0usize..4, value()), 0..4),
        ),
        0..3,
    );
    let types = prop::collection::vec(
        prop::collection::vec((prop::sample::select(TYPE_KEYS), value()), 0..7),
        0..3,
    );
    (top, tables, types).prop_map(|(top, tables, types)| {
        let mut text = assignments(top);
        let mut seen_tables = HashSet::new();
        for ((name, keys), entries) in tables {
            if seen_tables.insert(name) {
                text += &format!("[{name}]\n");
                text += &assignments(
                    entries
                        .into_iter()
                        .map(|(i, v)| (keys[i % keys.len()], v))
                        .collect(),
                );
            }
        }
        for t in types {
            text += "[[instance_types]]\n";
            text += &assignments(t);
        }
        text
    })
}

fn check_config(text: &str) {
    if let Err(e) = ClusterConfig::parse(Path::new("cluster.toml"), text) {
        assert!(!e.problems.is_empty());
        for p in &e.problems {
            assert!(p.line >= 1, "no line: {p}\n{text}");
            assert!(p.to_string().starts_with("cluster.toml:"), "{p}");
        }
    }
}

fn check_catalogue(text: &str) {
    match Catalogue::parse(Path::new("plugins.toml"), text) {
        Ok(_) => {}
        Err(CatalogueError::Invalid { line, .. }) => assert!(line >= 1),
        Err(e @ CatalogueError::Syntax { .. }) => {
            assert!(e.to_string().contains("line"), "{e}")
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

/// JSON shaped like a submission often enough to reach the checks behind the parser.
fn json_value(depth: u32) -> BoxedStrategy<serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "\\PC{0,10}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("-rf")),
        Just(serde_json::Value::from("a\u{0}b")),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let keys = prop::sample::select(
        &[
            "command",
            "env",
            "working_dir",
            "image",
            "priority",
            "runtime_constraints",
            "vcpus",
            "ram_bytes",
            "scratch_bytes",
            "gpus",
            "preemptible",
            "",
            "=x",
            "X",
        ][..],
    );
    prop_oneof![
        leaf,
        prop::collection::vec(json_value(depth - 1), 0..4).prop_map(serde_json::Value::from),
        prop::collection::btree_map(keys.prop_map(String::from), json_value(depth - 1), 0..6)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
    ]
    .boxed()
}

proptest! {
    // A failure prints its minimal input; nothing is written into the source tree.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_text_as_a_cluster_config(text in "\\PC{0,200}") {
        check_config(&text);
    }

    #[test]
    fn configs_made_of_real_keys_with_any_values(text in config_text()) {
        check_config(&text);
    }

    #[test]
    fn any_text_as_a_plugin_catalogue(text in "\\PC{0,200}") {
        check_catalogue(&text);
    }

    #[test]
    fn catalogues_made_of_real_keys_with_any_values(
        plugins in prop::collection::vec(
            prop::collection::vec(
                (prop::sample::select(&["name", "path", "directory", "sha256", "x"][..]), value()),
                0..5,
            ),
            0..3,
        ),
        sets in prop::collection::vec(
            prop::collection::vec(
                (prop::sample::select(&["name", "driver", "set_id", "parameters", "x"][..]), value()),
                0..5,
            ),
            0..3,
        ),
    ) {
        let mut text = String::new();
        for (table, entries) in [("plugins", plugins), ("instance_sets", sets)] {
            for entry in entries {
                text += &format!("[[{table}]]\n");
                text += &assignments(entry);
            }
        }
        check_catalogue(&text);
    }

    #[test]
    fn any_json_as_a_submission(json in json_value(3)) {
        if let Ok(new) = serde_json::from_value::<NewContainer>(json) {
            // What the API checks before queueing; it names the field it refuses.
            if let Some(problem) = new.problem() {
                prop_assert!(problem.contains(':'), "{problem}");
            }
        }
    }

    #[test]
    fn submissions_with_any_values_name_what_they_refuse(
        command in prop::collection::vec("\\PC{0,12}", 0..4),
        env in prop::collection::btree_map("\\PC{0,6}", "\\PC{0,6}", 0..4),
        working_dir in prop::option::of("\\PC{0,10}"),
        image in prop::option::of("\\PC{0,10}"),
        priority in any::<i64>(),
        vcpus in any::<u32>(),
        ram in any::<u64>(),
    ) {
        let body = serde_json::json!({
            "command": command,
            "env": env,
            "working_dir": working_dir,
            "image": image,
            "priority": priority,
            "runtime_constraints": {"vcpus": vcpus, "ram_bytes": ram},
        });
        let new: NewContainer = serde_json::from_value(body).expect("a well-formed submission parses");
        if let Some(problem) = new.problem() {
            let field = problem.split(':').next().unwrap_or_default();
            prop_assert!(
                ["command", "env", "working_dir", "image", "priority", "runtime_constraints"]
                    .iter()
                    .any(|f| field.starts_with(f)),
                "{problem}"
            );
        }
    }

    #[test]
    fn any_bytes_as_a_vms_run_list(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse_run_list(&bytes);
    }

    #[test]
    fn run_lists_with_any_names_keep_only_plain_ids(
        names in prop::collection::vec(prop_oneof!["\\PC{0,20}", "[a-z0-9-]{1,12}"], 0..8),
    ) {
        let entries: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({"id": n, "state": "running", "exit": null}))
            .collect();
        let text = serde_json::json!({"containers": entries, "broken": false}).to_string();
        let plain = |id: &str| {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let list = parse_run_list(text.as_bytes());
        prop_assert!(list.is_ok(), "{list:?}");
        let kept: Vec<String> = list.map(|l| l.containers.into_iter().map(|e| e.id).collect()).unwrap_or_default();
        let expected: Vec<String> = names.iter().filter(|n| plain(n)).cloned().collect();
        prop_assert_eq!(kept, expected);
    }
}
