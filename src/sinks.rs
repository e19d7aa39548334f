//! Result sinks: where finished results go besides the lookup table.

use crate::contract::{ExecResult, Status};
use crate::engine::ResultSink;
use crossbeam_channel::Sender;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Appends every result as one JSON line to a file, flushed per line
/// (`WORKER_RESULTS_FILE`), so no answer is lost if nobody polls.
#[derive(Debug)]
pub struct JsonLinesFile {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
}

impl JsonLinesFile {
    /// Opens (creating, appending) the file.
    pub fn open(path: &Path) -> io::Result<JsonLinesFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(JsonLinesFile {
            path: path.to_owned(),
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    /// Flushes and fsyncs the file (at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.flush()?;
        f.get_ref().sync_all()
    }
}

impl ResultSink for JsonLinesFile {
    fn deliver(&self, result: &Arc<ExecResult>) {
        self.deliver_line(result, &result.to_json_line());
    }

    fn deliver_line(&self, _result: &Arc<ExecResult>, line: &str) {
        // Line and newline in one buffer, so one `write(2)` appends both: a
        // line larger than the writer's buffer would otherwise go out alone,
        // and another appender's line (or a crash) could land before its
        // newline.
        let mut record = Vec::with_capacity(line.len() + 1);
        record.extend_from_slice(line.as_bytes());
        record.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&record).and_then(|()| f.flush()) {
            log::error!(path = self.path.display().to_string(), error = e.to_string(); "cannot append a result to the results file");
        }
    }
}

/// A line for the `run` command's printer.
#[derive(Debug)]
pub enum BatchLine {
    /// A result as a JSON line, and whether it succeeded.
    Result {
        /// The JSON line (no newline).
        line: String,
        /// Its status.
        status: Status,
    },
    /// An Ack line for a rejected or duplicate input.
    Ack(String),
    /// No more lines will come.
    Done,
}

/// Sends every result to the `run` printer.
#[derive(Debug)]
pub struct ChannelSink(pub Sender<BatchLine>);

impl ResultSink for ChannelSink {
    fn deliver(&self, result: &Arc<ExecResult>) {
        self.deliver_line(result, &result.to_json_line());
    }

    fn deliver_line(&self, result: &Arc<ExecResult>, line: &str) {
        self.deliver_owned(result, line.to_owned());
    }

    fn deliver_owned(&self, result: &Arc<ExecResult>, line: String) {
        let _ = self.0.send(BatchLine::Result {
            line,
            status: result.status,
        });
    }
}
