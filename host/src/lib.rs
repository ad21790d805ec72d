//! dispatch-cloud: runs batch containers on elastic cloud VMs through driver plugins.
//! See ARCHITECTURE.md at the repository root for the map of modules and their invariants.

pub mod api;
pub mod client;
pub mod cloudops;
pub mod config;
pub mod conformance;
pub mod cost;
pub mod dispatcher;
pub mod history;
pub mod instance_secret;
pub mod metrics;
pub mod page;
pub mod plugin;
pub mod pool;
pub mod queue;
pub mod runner;
pub mod scheduler;
pub mod serve;
pub mod ssh;
pub(crate) mod toml_lines;
