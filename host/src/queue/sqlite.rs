//! The embedded queue: one SQLite file (WAL), written by this host alone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    Changes, Container, ContainerState, NewContainer, Queue, QueueError, RunResult,
    RuntimeConstraints,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE containers (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        priority INTEGER NOT NULL,
        command TEXT NOT NULL,
        env TEXT NOT NULL,
        working_dir TEXT,
        image TEXT,
        vcpus INTEGER NOT NULL,
        ram_bytes INTEGER NOT NULL,
        scratch_bytes INTEGER NOT NULL,
        gpus INTEGER NOT NULL,
        preemptible INTEGER NOT NULL,
        lock_count INTEGER NOT NULL DEFAULT 0,
        instance_type TEXT,
        instance_id TEXT,
        created_at_ms INTEGER NOT NULL,
        started_at_ms INTEGER,
        finished_at_ms INTEGER,
        exit_code INTEGER,
        runtime_error TEXT,
        log_dir TEXT
    );
    CREATE INDEX containers_active ON containers(state) WHERE state IN ('Queued','Locked','Running');",
    // Dispatch attempts: starts on a VM that produced no result. `lock_count` stays as a plain
    // statistic; it no longer decides anything.
    "ALTER TABLE containers ADD COLUMN dispatch_attempts INTEGER NOT NULL DEFAULT 0;",
    // When the host recorded the final state; `finished_at_ms` is the VM's own end time.
    "ALTER TABLE containers ADD COLUMN recorded_at_ms INTEGER;",
    // Every write stamps the row with the next revision, so the dispatcher reads only what
    // changed since its last pass instead of the whole active queue.
    "ALTER TABLE containers ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX containers_rev ON containers(rev);",
    // A finished container's share of its VM's price; the index finds the VM's other runs.
    "ALTER TABLE containers ADD COLUMN cost REAL;
     CREATE INDEX containers_instance ON containers(instance_id);",
];

/// The columns `from_row` reads, in its order (positional: looking columns up by name costs
/// more than decoding them).
const COLUMNS: &str = "id, state, priority, command, env, working_dir, image, vcpus, ram_bytes, \
    scratch_bytes, gpus, preemptible, lock_count, dispatch_attempts, instance_type, instance_id, \
    seq, created_at_ms, started_at_ms, finished_at_ms, recorded_at_ms, exit_code, runtime_error, \
    log_dir, cost";

pub struct SqliteQueue {
    path: PathBuf,
    cluster_id: String,
    /// One connection: SQLite serializes writers anyway, and every statement here is short.
    /// A std mutex, never held across an await.
    conn: Mutex<Connection>,
    /// The last revision stamped; advanced only while `conn` is held (and only by a write
    /// that succeeded), so revisions are in commit order.
    rev: AtomicI64,
}

/// Wall-clock Unix milliseconds (0 before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `<cluster>-dz642-<15 random>`, the shape of the original's container UUIDs.
fn new_id(cluster_id: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let bytes: [u8; 15] = rand::random();
    let tail: String = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("{cluster_id}-dz642-{tail}")
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<Container> {
    let state: String = row.get(1)?;
    let command: String = row.get(3)?;
    let env: String = row.get(4)?;
    let json_err = |e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    };
    Ok(Container {
        id: row.get(0)?,
        state: ContainerState::parse(&state).unwrap_or(ContainerState::Cancelled),
        priority: row.get(2)?,
        command: serde_json::from_str(&command).map_err(json_err)?,
        env: serde_json::from_str(&env).map_err(json_err)?,
        working_dir: row.get(5)?,
        image: row.get(6)?,
        runtime_constraints: RuntimeConstraints {
            vcpus: row.get(7)?,
            ram_bytes: row.get::<_, i64>(8)?.max(0).unsigned_abs(),
            scratch_bytes: row.get::<_, i64>(9)?.max(0).unsigned_abs(),
            gpus: row.get(10)?,
            preemptible: row.get(11)?,
        },
        lock_count: row.get(12)?,
        dispatch_attempts: row.get(13)?,
        instance_type: row.get(14)?,
        instance_id: row.get(15)?,
        seq: row.get(16)?,
        created_at_ms: row.get(17)?,
        started_at_ms: row.get(18)?,
        finished_at_ms: row.get(19)?,
        recorded_at_ms: row.get(20)?,
        exit_code: row.get(21)?,
        runtime_error: row.get(22)?,
        log_dir: row.get(23)?,
        cost: row.get(24)?,
        scheduling_status: None,
    })
}

/// What a finished container that ran on a VM cost at `price_per_hour`, its VM's other runs
/// sharing it; `None` when it is not final, never ran, or has its cost already. The VM's
/// times are bounded by the host's (submission, recording): a VM's clock cannot make a run
/// cost more than the host saw it take.
fn cost_of(c: &Connection, id: &str, price_per_hour: f64) -> rusqlite::Result<Option<f64>> {
    type Own = (Option<String>, Option<i64>, Option<i64>, i64, Option<i64>);
    let own: Option<Own> = c
        .query_row(
            "SELECT instance_id, started_at_ms, finished_at_ms, created_at_ms, recorded_at_ms
             FROM containers
             WHERE id = ?1 AND state IN ('Complete', 'Cancelled') AND cost IS NULL",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((Some(instance), Some(start), Some(end), created, recorded)) = own else {
        return Ok(None);
    };
    let start = start.max(created);
    let end = recorded.map_or(end, |r| end.min(r)).max(start);
    let mut others = c.prepare_cached(
        "SELECT started_at_ms, finished_at_ms FROM containers
         WHERE instance_id = ?1 AND id != ?2 AND started_at_ms IS NOT NULL
           AND started_at_ms < ?4 AND (finished_at_ms IS NULL OR finished_at_ms > ?3)",
    )?;
    let others: Vec<(i64, Option<i64>)> = others
        .query_map(params![instance, id, start, end], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(crate::cost::container_cost(
        price_per_hour,
        start,
        end,
        &others,
    )))
}

impl SqliteQueue {
    pub fn open(path: &Path, cluster_id: &str) -> Result<Self, QueueError> {
        let db_err = |source| QueueError::Database {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // NORMAL in WAL mode is durable across application crashes (kill -9), which is the
        // failure the tests and operators care about; only an OS crash may lose the last commit.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .map_err(db_err)?
            .max(0)
            .unsigned_abs() as usize;
        if version > MIGRATIONS.len() {
            return Err(QueueError::Invalid(format!(
                "{} has schema version {version}, newer than this build knows ({})",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(db_err)?;
            tx.execute_batch(migration).map_err(db_err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
        }
        let rev: i64 = conn
            .query_row("SELECT COALESCE(MAX(rev), 0) FROM containers", [], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        Ok(SqliteQueue {
            path: path.to_path_buf(),
            cluster_id: cluster_id.to_string(),
            conn: Mutex::new(conn),
            rev: AtomicI64::new(rev),
        })
    }

    fn db_err(&self, source: rusqlite::Error) -> QueueError {
        QueueError::Database {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, QueueError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|e| self.db_err(e))
    }

    /// Like `with`, for a write: `f` gets the revision to stamp on the rows it changes.
    fn write<T>(
        &self,
        f: impl FnOnce(&Connection, i64) -> rusqlite::Result<T>,
    ) -> Result<T, QueueError> {
        self.with(|c| {
            // Advanced only for a write that went through: a failing database must not look
            // like a queue that keeps changing.
            let next = self.rev.load(Ordering::SeqCst) + 1;
            let out = f(c, next)?;
            self.rev.store(next, Ordering::SeqCst);
            Ok(out)
        })
    }

    /// Moves `id` from one of `from` to `to` with `set` (extra assignments); reports why not.
    fn transition(
        &self,
        id: &str,
        from: &[ContainerState],
        to: ContainerState,
        set: &str,
        args: &[&dyn rusqlite::ToSql],
        // Record the cost at this hourly price in the same transaction (a final state).
        price_per_hour: Option<f64>,
    ) -> Result<(), QueueError> {
        let from_list = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "UPDATE containers SET state = '{}', rev = ?{}{}{set} WHERE id = ?1 AND state IN ({from_list})",
            to.as_str(),
            args.len() + 2,
            if set.is_empty() { "" } else { ", " }
        );
        let changed = self.write(|c, rev| {
            let tx = c.unchecked_transaction()?;
            let mut all: Vec<&dyn rusqlite::ToSql> = vec![&id];
            all.extend_from_slice(args);
            all.push(&rev);
            let changed = tx.execute(&sql, all.as_slice())?;
            if let (1, Some(price)) = (changed, price_per_hour) {
                if let Some(cost) = cost_of(&tx, id, price)? {
                    tx.execute(
                        "UPDATE containers SET cost = ?2 WHERE id = ?1",
                        params![id, cost],
                    )?;
                }
            }
            tx.commit()?;
            Ok(changed)
        })?;
        if changed == 1 {
            return Ok(());
        }
        let current = self.get(id)?;
        Err(QueueError::Conflict {
            id: id.to_string(),
            state: current.state,
            message: format!("cannot become {to:?}"),
        })
    }
}

impl Queue for SqliteQueue {
    fn submit(&self, new: NewContainer) -> Result<Container, QueueError> {
        self.submit_many(vec![new])?
            .pop()
            .ok_or_else(|| QueueError::Invalid("nothing submitted".into()))
    }

    fn submit_many(&self, batch: Vec<NewContainer>) -> Result<Vec<Container>, QueueError> {
        // Checked and encoded before anything is written: one bad entry refuses the batch.
        let mut rows = Vec::with_capacity(batch.len());
        for (i, new) in batch.iter().enumerate() {
            let at = |what: &str| {
                if batch.len() == 1 {
                    what.to_string()
                } else {
                    format!("[{i}].{what}")
                }
            };
            if let Some(problem) = new.problem() {
                return Err(QueueError::Invalid(at(&problem)));
            }
            let command = serde_json::to_string(&new.command)
                .map_err(|e| QueueError::Invalid(format!("{}: {e}", at("command"))))?;
            let env = serde_json::to_string(&new.env)
                .map_err(|e| QueueError::Invalid(format!("{}: {e}", at("env"))))?;
            rows.push((new_id(&self.cluster_id), command, env));
        }
        let now = now_ms();
        self.write(|c, rev| {
            let tx = c.unchecked_transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO containers (id, state, priority, command, env, working_dir, image,
                        vcpus, ram_bytes, scratch_bytes, gpus, preemptible, created_at_ms, rev)
                     VALUES (?1, 'Queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?;
                for (new, (id, command, env)) in batch.iter().zip(&rows) {
                    let rc = &new.runtime_constraints;
                    insert.execute(params![
                        id,
                        new.priority,
                        command,
                        env,
                        new.working_dir,
                        new.image,
                        rc.vcpus,
                        i64::try_from(rc.ram_bytes).unwrap_or(i64::MAX),
                        i64::try_from(rc.scratch_bytes).unwrap_or(i64::MAX),
                        rc.gpus,
                        rc.preemptible,
                        now,
                        rev
                    ])?;
                }
            }
            tx.commit()
        })?;
        rows.iter().map(|(id, _, _)| self.get(id)).collect()
    }

    fn page(&self, limit: usize, before_seq: Option<i64>) -> Result<Vec<Container>, QueueError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM containers WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![
                    before_seq.unwrap_or(i64::MAX),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                from_row,
            )?;
            rows.collect()
        })
    }

    fn get(&self, id: &str) -> Result<Container, QueueError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM containers WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()
        })?
        .ok_or_else(|| QueueError::NotFound(id.to_string()))
    }

    fn list(&self, active_only: bool) -> Result<Vec<Container>, QueueError> {
        let sql = if active_only {
            format!(
                "SELECT {COLUMNS} FROM containers WHERE state IN ('Queued','Locked','Running') ORDER BY seq"
            )
        } else {
            format!("SELECT {COLUMNS} FROM containers ORDER BY seq DESC")
        };
        self.with(|c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map([], from_row)?;
            rows.collect()
        })
    }

    fn revision(&self) -> i64 {
        self.rev.load(Ordering::SeqCst)
    }

    fn changes_since(&self, rev: Option<i64>) -> Result<Changes, QueueError> {
        self.with(|c| {
            // Under the connection's lock: no write can fall between the rows and the revision.
            let now = self.rev.load(Ordering::SeqCst);
            let containers = match rev {
                None => {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM containers
                         WHERE state IN ('Queued','Locked','Running') ORDER BY seq"
                    ))?;
                    let rows = stmt.query_map([], from_row)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                }
                Some(rev) => {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM containers WHERE rev > ?1 ORDER BY seq"
                    ))?;
                    let rows = stmt.query_map([rev], from_row)?;
                    rows.collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(Changes {
                rev: now,
                containers,
            })
        })
    }

    fn lock(&self, id: &str, instance_type: &str) -> Result<bool, QueueError> {
        let changed = self.write(|c, rev| {
            c.execute(
                "UPDATE containers SET state = 'Locked', lock_count = lock_count + 1,
                    instance_type = ?2, rev = ?3
                 WHERE id = ?1 AND state = 'Queued'",
                params![id, instance_type, rev],
            )
        })?;
        Ok(changed == 1)
    }

    fn unlock(&self, id: &str) -> Result<(), QueueError> {
        self.transition(
            id,
            &[ContainerState::Locked],
            ContainerState::Queued,
            "instance_id = NULL",
            &[],
            None,
        )
    }

    fn attempt_failed(
        &self,
        id: &str,
        why: &str,
        max_attempts: u32,
    ) -> Result<ContainerState, QueueError> {
        let c = self.get(id)?;
        let active = [ContainerState::Locked, ContainerState::Running];
        let attempts = c.dispatch_attempts.saturating_add(1);
        if max_attempts > 0 && attempts >= max_attempts {
            self.transition(
                id,
                &active,
                ContainerState::Cancelled,
                "dispatch_attempts = ?2, runtime_error = ?3, finished_at_ms = ?4, recorded_at_ms = ?4",
                &[
                    &attempts,
                    &format!(
                        "Cancelled after {attempts} failed dispatch attempts \
                         (max_dispatch_attempts = {max_attempts}); last: {why}"
                    ),
                    &now_ms(),
                ],
            None,
        )?;
            return Ok(ContainerState::Cancelled);
        }
        self.transition(
            id,
            &active,
            ContainerState::Queued,
            "dispatch_attempts = ?2, instance_id = NULL, started_at_ms = NULL",
            &[&attempts],
            None,
        )?;
        Ok(ContainerState::Queued)
    }

    fn set_running(
        &self,
        id: &str,
        instance_id: &str,
        instance_type: Option<&str>,
    ) -> Result<(), QueueError> {
        // Queued too: a run judged gone that turned up again is adopted, not run twice.
        self.transition(
            id,
            &[ContainerState::Locked, ContainerState::Queued],
            ContainerState::Running,
            "instance_id = ?2, started_at_ms = ?3, instance_type = COALESCE(?4, instance_type)",
            &[&instance_id, &now_ms(), &instance_type],
            None,
        )
    }

    fn complete(&self, id: &str, result: &RunResult<'_>) -> Result<(), QueueError> {
        self.transition(
            id,
            &[
                ContainerState::Queued,
                ContainerState::Locked,
                ContainerState::Running,
            ],
            ContainerState::Complete,
            "exit_code = ?2, runtime_error = ?3, log_dir = ?4, recorded_at_ms = ?5,
             finished_at_ms = COALESCE(?6, ?5),
             started_at_ms = COALESCE(?7, started_at_ms, ?5)",
            &[
                &result.exit_code,
                &result.runtime_error,
                &result.log_dir,
                &now_ms(),
                &result.finished_at_ms,
                &result.started_at_ms,
            ],
            result.price_per_hour,
        )
    }

    fn cancel(&self, id: &str, reason: &str) -> Result<(), QueueError> {
        self.transition(
            id,
            &[
                ContainerState::Queued,
                ContainerState::Locked,
                ContainerState::Running,
            ],
            ContainerState::Cancelled,
            "runtime_error = ?2, finished_at_ms = ?3, recorded_at_ms = ?3",
            &[&reason, &now_ms()],
            None,
        )
    }

    fn record_cost(&self, id: &str, price_per_hour: f64) -> Result<Option<f64>, QueueError> {
        // Read first: a container with nothing to record costs no write (and no revision).
        if self.with(|c| cost_of(c, id, price_per_hour))?.is_none() {
            return Ok(None);
        }
        self.write(|c, rev| {
            let tx = c.unchecked_transaction()?;
            let cost = cost_of(&tx, id, price_per_hour)?;
            if let Some(cost) = cost {
                tx.execute(
                    "UPDATE containers SET cost = ?2, rev = ?3 WHERE id = ?1",
                    params![id, cost, rev],
                )?;
            }
            tx.commit()?;
            Ok(cost)
        })
    }

    fn set_priority(&self, id: &str, priority: i64) -> Result<(), QueueError> {
        if priority < 0 {
            return Err(QueueError::Invalid("priority: must be 0 or more".into()));
        }
        let changed = self.write(|c, rev| {
            c.execute(
                "UPDATE containers SET priority = ?2, rev = ?3 WHERE id = ?1",
                params![id, priority, rev],
            )
        })?;
        if changed == 0 {
            return Err(QueueError::NotFound(id.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (tempfile::TempDir, SqliteQueue) {
        let dir = tempfile::tempdir().expect("tmp");
        let q = SqliteQueue::open(&dir.path().join("queue.sqlite"), "zzzzz").expect("open");
        (dir, q)
    }

    fn submit(q: &SqliteQueue) -> Container {
        q.submit(NewContainer {
            command: vec!["echo".into(), "hi".into()],
            priority: 5,
            ..Default::default()
        })
        .expect("submit")
    }

    #[test]
    fn a_container_walks_its_states_and_final_states_stick() {
        let (_d, q) = queue();
        let c = submit(&q);
        assert_eq!(c.state, ContainerState::Queued);
        assert!(c.id.starts_with("zzzzz-dz642-"));
        assert!(q.lock(&c.id, "small").expect("lock"));
        assert!(
            !q.lock(&c.id, "small").expect("second lock"),
            "locked twice"
        );
        q.set_running(&c.id, "i-1", Some("medium")).expect("run");
        q.complete(
            &c.id,
            &RunResult {
                exit_code: 3,
                log_dir: "/logs/x",
                started_at_ms: Some(1_000),
                finished_at_ms: Some(2_500),
                ..RunResult::default()
            },
        )
        .expect("complete");
        let done = q.get(&c.id).expect("get");
        assert_eq!(
            (done.state, done.exit_code, done.lock_count),
            (ContainerState::Complete, Some(3), 1)
        );
        // The VM's own times, not when the host noticed.
        assert_eq!(
            (done.started_at_ms, done.finished_at_ms),
            (Some(1_000), Some(2_500))
        );
        assert_eq!(
            done.instance_type.as_deref(),
            Some("medium"),
            "the type it ran on"
        );
        assert!(q.cancel(&c.id, "late").is_err(), "final state changed");
        let again = RunResult {
            log_dir: "/x",
            ..RunResult::default()
        };
        assert!(q.complete(&c.id, &again).is_err(), "completed twice");
    }

    #[test]
    fn locks_never_count_as_attempts_and_failed_starts_do() {
        let (_d, q) = queue();
        let c = submit(&q);
        // A scheduler may lock and release a waiting container any number of times.
        for _ in 0..20 {
            assert!(q.lock(&c.id, "small").expect("lock"));
            q.unlock(&c.id).expect("unlock");
        }
        let c = q.get(&c.id).expect("get");
        assert_eq!((c.state, c.dispatch_attempts), (ContainerState::Queued, 0));
        // Two starts that produced nothing: requeued, then cancelled at the limit of 3.
        for n in 1..=2 {
            assert!(q.lock(&c.id, "small").expect("lock"));
            q.set_running(&c.id, "i-1", None).expect("run");
            assert_eq!(
                q.attempt_failed(&c.id, "VM vanished", 3).expect("attempt"),
                ContainerState::Queued
            );
            let now = q.get(&c.id).expect("get");
            assert_eq!((now.dispatch_attempts, now.instance_id), (n, None));
        }
        assert!(q.lock(&c.id, "small").expect("lock"));
        assert_eq!(
            q.attempt_failed(&c.id, "runner start: exit 1", 3)
                .expect("attempt"),
            ContainerState::Cancelled
        );
        let done = q.get(&c.id).expect("get");
        let reason = done.runtime_error.expect("reason");
        assert!(
            reason.contains("3 failed dispatch attempts") && reason.contains("runner start"),
            "{reason}"
        );
        assert!(
            q.attempt_failed(&c.id, "late", 3).is_err(),
            "final state changed"
        );
    }

    #[test]
    fn a_finished_container_pays_its_share_of_its_vm_once() {
        let (_d, q) = queue();
        const HOUR: i64 = 3_600_000;
        let run = |id: &str, vm: &str, start: i64, end: i64| {
            q.lock(id, "small").expect("lock");
            q.set_running(id, vm, Some("small")).expect("run");
            q.complete(
                id,
                &RunResult {
                    log_dir: "/tmp/x",
                    started_at_ms: Some(start),
                    finished_at_ms: Some(end),
                    ..RunResult::default()
                },
            )
            .expect("complete");
        };
        let (a, b, c) = (submit(&q).id, submit(&q).id, submit(&q).id);
        // a runs two hours; b shares its second hour on the same VM; c is on another VM.
        run(&a, "i-1", 0, 2 * HOUR);
        run(&b, "i-1", HOUR, 2 * HOUR);
        run(&c, "i-2", 0, 2 * HOUR);
        // The host saw them submitted before and recorded after those hours (the VM's times
        // are bounded by the host's).
        q.with(|conn| {
            conn.execute(
                "UPDATE containers SET created_at_ms = ?1, recorded_at_ms = ?2",
                params![-HOUR, 3 * HOUR],
            )
        })
        .expect("host times");
        let cost = |id: &str| q.record_cost(id, 1.0).expect("cost");
        assert_eq!(cost(&a), Some(1.5));
        assert_eq!(cost(&b), Some(0.5));
        assert_eq!(cost(&c), Some(2.0));
        assert_eq!(cost(&a), None, "recorded once");
        assert_eq!(q.get(&a).expect("get").cost, Some(1.5));
        // A VM claiming a run far longer than the host saw pays only what the host saw.
        let liar = submit(&q).id;
        run(&liar, "i-3", i64::MIN / 2, i64::MAX / 2);
        q.with(|conn| {
            conn.execute(
                "UPDATE containers SET created_at_ms = 0, recorded_at_ms = ?2 WHERE id = ?1",
                params![liar, HOUR],
            )
        })
        .expect("host times");
        assert_eq!(cost(&liar), Some(1.0));
        let waiting = submit(&q).id;
        assert_eq!(q.record_cost(&waiting, 1.0).expect("cost"), None);
        assert_eq!(q.get(&waiting).expect("get").cost, None);
    }

    #[test]
    fn reopening_keeps_everything_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("queue.sqlite");
        let id = {
            let q = SqliteQueue::open(&path, "zzzzz").expect("open");
            submit(&q).id
        };
        let q = SqliteQueue::open(&path, "zzzzz").expect("reopen");
        assert_eq!(q.get(&id).expect("get").command, vec!["echo", "hi"]);
        assert_eq!(q.list(true).expect("list").len(), 1);
    }

    #[test]
    fn bad_submissions_name_the_field() {
        let (_d, q) = queue();
        let err = q.submit(NewContainer::default()).expect_err("empty");
        assert!(err.to_string().contains("command"), "{err}");
        let ok = || NewContainer {
            command: vec!["true".into()],
            ..NewContainer::default()
        };
        let with_env = |k: &str, v: &str| {
            let mut c = ok();
            c.env.insert(k.into(), v.into());
            c
        };
        let cases = [
            (with_env("", "x"), "env: a key is empty"),
            (with_env("A=B", "x"), "env.A=B: a key must not contain '='"),
            (with_env("A", "x\0y"), "env.A: contains a NUL byte"),
            (
                NewContainer {
                    command: vec!["echo".into(), "a\0b".into()],
                    ..ok()
                },
                "command[1]: contains a NUL byte",
            ),
            (
                NewContainer {
                    image: Some("--privileged".into()),
                    ..ok()
                },
                "image: must not start with '-'",
            ),
            (
                NewContainer {
                    working_dir: Some("-C/".into()),
                    ..ok()
                },
                "working_dir: must not start with '-'",
            ),
        ];
        for (bad, message) in cases {
            let err = q.submit(bad).expect_err(message);
            assert_eq!(err.to_string(), format!("invalid submission: {message}"));
        }
        assert!(q.list(false).expect("list").is_empty());
    }

    #[test]
    fn a_batch_goes_in_whole_or_not_at_all_and_pages_walk_it() {
        let (_d, q) = queue();
        let one = || NewContainer {
            command: vec!["true".into()],
            ..NewContainer::default()
        };
        let mut bad = vec![one(), one(), one()];
        bad[2].command.clear();
        let err = q.submit_many(bad).expect_err("refused");
        assert!(err.to_string().contains("[2].command"), "{err}");
        assert!(
            q.list(false).expect("list").is_empty(),
            "part of a refused batch stayed"
        );
        let made = q
            .submit_many((0..7).map(|_| one()).collect())
            .expect("batch");
        assert_eq!(made.len(), 7);
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = q.page(3, before).expect("page");
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 3);
            before = page.last().map(|c| c.seq);
            seen.extend(page.into_iter().map(|c| c.id));
        }
        let mut newest_first: Vec<String> = made.into_iter().map(|c| c.id).collect();
        newest_first.reverse();
        assert_eq!(seen, newest_first);
    }

    #[test]
    fn changes_since_returns_exactly_what_was_written_after() {
        let (_d, q) = queue();
        let a = submit(&q);
        let first = q.changes_since(None).expect("all");
        assert_eq!(first.containers.len(), 1);
        assert!(q
            .changes_since(Some(first.rev))
            .expect("none")
            .containers
            .is_empty());
        let b = submit(&q);
        q.lock(&a.id, "small").expect("lock");
        q.cancel(&a.id, "gone").expect("cancel");
        let next = q.changes_since(Some(first.rev)).expect("changes");
        let states: Vec<(String, ContainerState)> = next
            .containers
            .iter()
            .map(|c| (c.id.clone(), c.state))
            .collect();
        // In queue order, final ones included (so a reader drops them), each once.
        assert_eq!(
            states,
            vec![
                (a.id, ContainerState::Cancelled),
                (b.id, ContainerState::Queued)
            ]
        );
        assert!(next.rev > first.rev);
    }
}
