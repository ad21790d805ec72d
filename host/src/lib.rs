//! dispatch-cloud: runs batch containers on elastic cloud VMs through driver plugins.
//! See ARCHITECTURE.md at the repository root for the map of modules and their invariants.

pub mod conformance;
pub mod instance_secret;
pub mod plugin;
pub mod ssh;
