//! What a runner's result means for its container: the one place that decides it.

use crate::queue::Container;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Record the exit code: the container is Complete.
    Complete,
    /// Record it as Cancelled with this reason (its result is kept in the logs).
    Cancel(&'static str),
    /// Already final (cancelled while it ran): keep the logs, change nothing.
    AlreadyFinal,
}

/// A container stopped because its priority went to 0 ended by our SIGTERM, not by itself:
/// a non-zero exit then means cancelled, as in the original dispatcher.
pub fn outcome(c: &Container, exit_code: i32) -> Outcome {
    if c.state.is_final() {
        Outcome::AlreadyFinal
    } else if c.priority == 0 && exit_code != 0 {
        Outcome::Cancel("priority set to 0")
    } else {
        Outcome::Complete
    }
}
