//! Turning `runner collect`'s stream into the container's log files as it arrives: a header
//! line, then the stdout bytes, then the stderr bytes. Nothing is held in memory but the
//! chunk at hand, whatever a container printed. The VM is untrusted: a header that claims more
//! than the cap, or a stream longer or shorter than its header, is an error, never a bigger file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::runner::{CollectHeader, LogPart};

/// The longest header accepted (it holds an exit record and two counts).
const HEADER_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("runner collect: bad output: {0}")]
    BadOutput(String),
    #[error("saving {path}: {source}")]
    Save {
        path: String,
        source: std::io::Error,
    },
}

/// One log being written: its file, and how many bytes are still due.
struct Part {
    name: &'static str,
    path: PathBuf,
    file: File,
    due: u64,
    info: LogPart,
}

pub struct CollectWriter {
    dir: PathBuf,
    cap: u64,
    header_bytes: Vec<u8>,
    header: Option<CollectHeader>,
    /// stdout then stderr; the first is the one being written.
    parts: Vec<Part>,
}

fn save_error(path: &Path, source: std::io::Error) -> CollectError {
    CollectError::Save {
        path: path.display().to_string(),
        source,
    }
}

impl CollectWriter {
    /// Writes `stdout` and `stderr` in `dir` (created private), keeping at most `cap` bytes each.
    pub fn new(dir: &Path, cap: u64) -> Self {
        CollectWriter {
            dir: dir.to_path_buf(),
            cap,
            header_bytes: Vec::new(),
            header: None,
            parts: Vec::new(),
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), CollectError> {
        if self.header.is_none() {
            let Some(end) = chunk.iter().position(|b| *b == b'\n') else {
                self.header_bytes.extend_from_slice(chunk);
                if self.header_bytes.len() > HEADER_LIMIT {
                    return Err(CollectError::BadOutput("header line too long".into()));
                }
                return Ok(());
            };
            self.header_bytes.extend_from_slice(&chunk[..end]);
            chunk = &chunk[end + 1..];
            self.open_parts()?;
        }
        while !chunk.is_empty() {
            let Some(part) = self.parts.iter_mut().find(|p| p.due > 0) else {
                return Err(CollectError::BadOutput(
                    "more bytes than the header announced".into(),
                ));
            };
            let take = usize::try_from(part.due)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            part.file
                .write_all(&chunk[..take])
                .map_err(|e| save_error(&part.path, e))?;
            part.due -= take as u64;
            chunk = &chunk[take..];
        }
        Ok(())
    }

    fn open_parts(&mut self) -> Result<(), CollectError> {
        let header: CollectHeader = serde_json::from_slice(&self.header_bytes)
            .map_err(|e| CollectError::BadOutput(format!("header: {e}")))?;
        for (name, info) in [("stdout", header.stdout), ("stderr", header.stderr)] {
            if info.sent > self.cap || info.sent > info.total {
                return Err(CollectError::BadOutput(format!(
                    "{name}: {} bytes announced, the limit is {} and the log has {}",
                    info.sent, self.cap, info.total
                )));
            }
            // An empty log is no file (the API serves it as empty): creating files is most of
            // what recording a short container costs.
            if info.total == 0 {
                continue;
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| save_error(&self.dir, e))?;
            let path = self.dir.join(name);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| save_error(&path, e))?;
            self.parts.push(Part {
                name,
                path,
                file,
                due: info.sent,
                info,
            });
        }
        self.header = Some(header);
        Ok(())
    }

    /// The stream ended: every announced byte must have come. Truncated logs get a last line
    /// saying so.
    pub fn finish(mut self) -> Result<CollectHeader, CollectError> {
        let Some(header) = self.header.take() else {
            return Err(CollectError::BadOutput("no header".into()));
        };
        for part in &mut self.parts {
            if part.due > 0 {
                return Err(CollectError::BadOutput(format!(
                    "{} ended {} bytes short",
                    part.name, part.due
                )));
            }
            if part.info.total > part.info.sent {
                let marker = format!(
                    "\n[dispatch-cloud: {} truncated: the first {} of {} bytes are kept \
                     (limits.max_log_bytes)]\n",
                    part.name, part.info.sent, part.info.total
                );
                part.file
                    .write_all(marker.as_bytes())
                    .map_err(|e| save_error(&part.path, e))?;
            }
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::ExitRecord;

    fn stream(stdout: LogPart, stderr: LogPart, body: &[u8]) -> Vec<u8> {
        let header = CollectHeader {
            exit: ExitRecord {
                exit_code: 7,
                error: None,
                started_at_ms: Some(1_000),
                finished_at_ms: Some(2_000),
            },
            stdout,
            stderr,
        };
        let mut bytes = serde_json::to_vec(&header).expect("json");
        bytes.push(b'\n');
        bytes.extend_from_slice(body);
        bytes
    }

    fn part(sent: u64, total: u64) -> LogPart {
        LogPart { sent, total }
    }

    #[test]
    fn empty_logs_make_no_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("c");
        let mut w = CollectWriter::new(&out, 100);
        w.feed(&stream(part(0, 0), part(0, 0), b"")).expect("feed");
        assert_eq!(w.finish().expect("finish").exit.exit_code, 7);
        assert!(!out.exists());
    }

    #[test]
    fn logs_are_written_from_chunks_of_any_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let bytes = stream(part(6, 6), part(4, 4), b"hello\noops");
        for chunk_size in [1, 3, 7, 1000] {
            let out = dir.path().join(format!("c{chunk_size}"));
            let mut w = CollectWriter::new(&out, 100);
            for chunk in bytes.chunks(chunk_size) {
                w.feed(chunk).expect("feed");
            }
            let header = w.finish().expect("finish");
            assert_eq!(header.exit.exit_code, 7);
            assert_eq!(
                std::fs::read(out.join("stdout")).expect("stdout"),
                b"hello\n"
            );
            assert_eq!(std::fs::read(out.join("stderr")).expect("stderr"), b"oops");
        }
    }

    #[test]
    fn a_truncated_log_ends_with_a_marker() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = CollectWriter::new(dir.path(), 4);
        w.feed(&stream(part(4, 10), part(0, 0), b"abcd"))
            .expect("feed");
        w.finish().expect("finish");
        let text = std::fs::read_to_string(dir.path().join("stdout")).expect("stdout");
        assert!(
            text.starts_with("abcd\n[dispatch-cloud: stdout truncated: the first 4 of 10 bytes"),
            "{text}"
        );
    }

    #[test]
    fn a_vm_cannot_send_more_or_less_than_it_may() {
        let dir = tempfile::tempdir().expect("tmp");
        // More than the cap announced.
        let mut w = CollectWriter::new(dir.path(), 4);
        assert!(w.feed(&stream(part(5, 5), part(0, 0), b"abcde")).is_err());
        // More bytes than announced.
        let mut w = CollectWriter::new(dir.path(), 100);
        assert!(w.feed(&stream(part(1, 1), part(0, 0), b"ab")).is_err());
        // Fewer.
        let mut w = CollectWriter::new(dir.path(), 100);
        w.feed(&stream(part(3, 3), part(0, 0), b"ab"))
            .expect("feed");
        assert!(w.finish().is_err());
        // No header at all.
        let mut w = CollectWriter::new(dir.path(), 100);
        w.feed(&[b'x'; 10]).expect("feed");
        assert!(w.finish().is_err());
    }
}
