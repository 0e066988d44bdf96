//! Sandbox logs: each sandbox's main-process output and lifecycle events,
//! kept under `<state>/logs/<id>/` so they survive gateway restarts, in at
//! most two files of [`MAX_FILE`] bytes (`log`, and `log.1`, the one before;
//! older records are dropped whole with it).
//!
//! A record on disk: `len u32 | seq u64 | time_ms i64 | source u8 |
//! flags u8 | exit i32 | data`, little-endian, `len` counting what follows
//! it. Written with one `write` under the sandbox's lock, so a reader sees
//! whole records or a partial tail it waits out.
//!
//! The main process ([`MainSpec`], `main.json`) is started and re-attached
//! by the runtime (`runtime/main_process.rs`); the numbers (`seq`) of its records say where to
//! resume after a reconnect. A marker record starts each supervisor
//! process's numbering.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openshell_core::SandboxId;
use openshell_proto::v1 as pb;
use tokio::sync::watch;

/// One log file at most; the log is at most twice this.
pub const MAX_FILE: u64 = 8 << 20;
const HEADER: usize = 8 + 8 + 1 + 1 + 4;
const NO_EXIT: i32 = i32::MIN;
/// A marker: the records after it are numbered by a new supervisor
/// process, from 0.
const FLAG_MARKER: u8 = 1;
/// The largest record read back (a line is cut at 16 KiB; events are short).
const MAX_RECORD: usize = 1 << 20;

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ms: i64,
    pub source: pb::LogSource,
    pub exit_code: Option<i32>,
    pub marker: bool,
    pub data: Vec<u8>,
}

impl Record {
    pub fn event(text: impl Into<String>) -> Self {
        Self {
            seq: 0,
            time_ms: now_ms(),
            source: pb::LogSource::Event,
            exit_code: None,
            marker: false,
            data: text.into().into_bytes(),
        }
    }

    pub fn to_pb(&self) -> pb::LogRecord {
        pb::LogRecord {
            time_ms: self.time_ms,
            source: self.source as i32,
            data: self.data.clone().into(),
            exit_code: self.exit_code,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + HEADER + self.data.len());
        out.extend_from_slice(&((HEADER + self.data.len()) as u32).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        out.push(self.source as u8);
        out.push(if self.marker { FLAG_MARKER } else { 0 });
        out.extend_from_slice(&self.exit_code.unwrap_or(NO_EXIT).to_le_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Whole records from the front of `buf`, how many bytes they took,
    /// and whether what follows is not a record (a damaged file: readers
    /// skip the rest of it).
    fn decode_all(buf: &[u8]) -> (Vec<Record>, usize, bool) {
        let mut at = 0;
        let mut out = Vec::new();
        while buf.len() >= at + 4 {
            let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            if !(HEADER..=HEADER + MAX_RECORD).contains(&len) {
                return (out, at, true);
            }
            if buf.len() < at + 4 + len {
                break;
            }
            match Self::decode(&buf[at + 4..at + 4 + len]) {
                Some(r) => out.push(r),
                None => return (out, at, true),
            }
            at += 4 + len;
        }
        (out, at, false)
    }

    fn decode(r: &[u8]) -> Option<Record> {
        let source = pb::LogSource::try_from(i32::from(r[16])).ok()?;
        let exit = i32::from_le_bytes(r[18..22].try_into().ok()?);
        Some(Record {
            seq: u64::from_le_bytes(r[0..8].try_into().ok()?),
            time_ms: i64::from_le_bytes(r[8..16].try_into().ok()?),
            source,
            marker: r[17] & FLAG_MARKER != 0,
            exit_code: (exit != NO_EXIT).then_some(exit),
            data: r[HEADER..].to_vec(),
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the main process is, as it was asked for, and which supervisor
/// process runs it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MainSpec {
    pub argv: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub workdir: String,
}

struct SandboxLog {
    dir: PathBuf,
    /// Appends, rotation and a reader's first snapshot, one at a time.
    file: Mutex<Option<File>>,
    /// Bumped after every append: followers wake.
    appended: watch::Sender<u64>,
}

/// Every sandbox's log.
pub struct Logs {
    dir: Option<PathBuf>,
    open: Mutex<HashMap<SandboxId, Arc<SandboxLog>>>,
}

impl Logs {
    /// Logs under `dir`; `None` keeps none (every read is empty).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            open: Mutex::default(),
        }
    }

    fn log(&self, id: SandboxId) -> Option<Arc<SandboxLog>> {
        let dir = self.dir.as_ref()?.join(id.to_string());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            open.entry(id)
                .or_insert_with(|| {
                    Arc::new(SandboxLog {
                        dir,
                        file: Mutex::new(None),
                        appended: watch::channel(0).0,
                    })
                })
                .clone(),
        )
    }

    /// Makes the sandbox's log dir: records are kept only for sandboxes
    /// that have one (so an event that comes after the removal keeps
    /// nothing, and holds no file open).
    pub fn ensure(&self, id: SandboxId) {
        if let Some(dir) = &self.dir
            && let Err(e) = fs::create_dir_all(dir.join(id.to_string()))
        {
            tracing::warn!(sandbox = %id, "cannot create the sandbox's log dir: {e}");
        }
    }

    /// Appends records. A failure is logged, never returned: a full disk
    /// must not fail the sandbox.
    pub fn append(&self, id: SandboxId, records: &[Record]) {
        let Some(log) = self.log(id) else { return };
        match log.append(records) {
            Ok(()) => log.appended.send_modify(|n| *n += 1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed (or never made): nothing to keep.
                self.open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, "cannot write the sandbox log: {e}");
                log.appended.send_modify(|n| *n += 1);
            }
        }
    }

    pub fn event(&self, id: SandboxId, text: impl Into<String>) {
        self.append(id, &[Record::event(text)]);
    }

    /// The records kept, oldest first, and a follower positioned after
    /// them.
    pub fn read(&self, id: SandboxId) -> io::Result<(Vec<Record>, Option<Follower>)> {
        let Some(log) = self.log(id) else {
            return Ok((Vec::new(), None));
        };
        let _held = log.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = read_whole(&log.dir.join("log.1"))?;
        let current = log.dir.join("log");
        let mut follower = Follower {
            path: current.clone(),
            file: None,
            pending: Vec::new(),
            woken: log.appended.subscribe(),
        };
        match File::open(&current) {
            Ok(f) => {
                follower.file = Some(f);
                records.extend(follower.available()?);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok((records, Some(follower)))
    }

    /// Where the main process's records resume: the number after the
    /// last one stored since the last marker, and whether it exited.
    pub fn main_progress(&self, id: SandboxId) -> io::Result<(u64, bool)> {
        let (records, _) = self.read(id)?;
        let mut next = 0;
        let mut exited = false;
        for r in &records {
            if r.marker {
                (next, exited) = (0, false);
            } else if r.source != pb::LogSource::Event {
                next = r.seq + 1;
            } else if r.exit_code.is_some() {
                (next, exited) = (r.seq + 1, true);
            }
        }
        Ok((next, exited))
    }

    pub fn main_spec(&self, id: SandboxId) -> Option<MainSpec> {
        let dir = self.dir.as_ref()?.join(id.to_string());
        let raw = fs::read(dir.join("main.json")).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// Records the main process; false if the sandbox has one already.
    pub fn set_main_spec(&self, id: SandboxId, spec: &MainSpec) -> io::Result<bool> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let dir = dir.join(id.to_string());
        let body = serde_json::to_vec(spec).map_err(io::Error::other)?;
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join("main.json"))
        {
            Ok(mut f) => {
                f.write_all(&body)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Which supervisor process ran the main process last.
    pub fn main_instance(&self, id: SandboxId) -> Option<String> {
        let dir = self.dir.as_ref()?.join(id.to_string());
        fs::read_to_string(dir.join("main.instance")).ok()
    }

    pub fn set_main_instance(&self, id: SandboxId, instance: &str) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let dir = dir.join(id.to_string());
        let tmp = dir.join("main.instance.tmp");
        fs::write(&tmp, instance)?;
        fs::rename(tmp, dir.join("main.instance"))
    }

    /// Forgets a sandbox's log (its record is gone). Its dir is renamed
    /// away under the map's lock, so no append can open a file there after
    /// (an event racing the removal finds nothing and keeps nothing), then
    /// removed.
    pub fn remove(&self, id: SandboxId) {
        let Some(dir) = &self.dir else { return };
        let gone = dir.join(format!(".removed-{id}"));
        let log = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = fs::rename(dir.join(id.to_string()), &gone)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(sandbox = %id, "cannot remove the sandbox's log: {e}");
            }
            open.remove(&id)
        };
        let _ = fs::remove_dir_all(&gone);
        // Followers see the channel close and end.
        drop(log);
    }
}

impl SandboxLog {
    fn append(&self, records: &[Record]) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.dir.join("log");
        // Never the dir: only `Logs::ensure` makes it.
        if file.is_none() {
            *file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&current)?,
            );
        }
        let bytes: Vec<u8> = records.iter().flat_map(Record::encode).collect();
        let len = file
            .as_ref()
            .map_or(0, |f| f.metadata().map_or(0, |m| m.len()));
        if len > 0 && len + bytes.len() as u64 > MAX_FILE {
            fs::rename(&current, self.dir.join("log.1"))?;
            *file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&current)?,
            );
        }
        match file.as_mut() {
            Some(f) => f.write_all(&bytes),
            None => Ok(()),
        }
    }
}

fn read_whole(path: &Path) -> io::Result<Vec<Record>> {
    match fs::read(path) {
        Ok(buf) => Ok(Record::decode_all(&buf).0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Reads what is appended to a sandbox's log after a point, across
/// rotations: it holds the file it reads open, drains it, and moves to the
/// new `log` when the name points elsewhere.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
    woken: watch::Receiver<u64>,
}

impl Follower {
    /// Whole records readable now.
    fn available(&mut self) -> io::Result<Vec<Record>> {
        let Some(f) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        f.read_to_end(&mut self.pending)?;
        let (records, used, damaged) = Record::decode_all(&self.pending);
        self.pending.drain(..used);
        if damaged {
            // Skip to this file's end.
            self.pending.clear();
            f.seek(SeekFrom::End(0))?;
        }
        Ok(records)
    }

    /// The next records, waiting for them; `None` once the sandbox's log is
    /// gone (the sandbox was deleted).
    pub async fn next(&mut self) -> io::Result<Option<Vec<Record>>> {
        loop {
            let got = self.available()?;
            if !got.is_empty() {
                return Ok(Some(got));
            }
            let on_disk = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
            let ours = self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map(|m| (m.dev(), m.ino()));
            if on_disk.is_some() && on_disk != ours {
                self.file = Some(File::open(&self.path)?);
                self.pending.clear();
                continue;
            }
            if self.woken.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64, text: &str) -> Record {
        Record {
            seq,
            time_ms: 1,
            source: pb::LogSource::Stdout,
            exit_code: None,
            marker: false,
            data: text.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_followers_see_appends_across_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let id = SandboxId::new();
        let logs = Logs::new(Some(d.path().into()));
        logs.ensure(id);
        logs.append(id, &[line(0, "a\n"), line(1, "b\n")]);
        let again = Logs::new(Some(d.path().into()));
        let (kept, follower) = again.read(id).unwrap();
        assert_eq!(kept, vec![line(0, "a\n"), line(1, "b\n")]);
        let mut follower = follower.unwrap();
        // Enough to rotate the file more than once.
        let big = "x".repeat(1 << 20);
        let writer = tokio::spawn(async move {
            for i in 2..30 {
                again.append(id, &[line(i, &big)]);
                tokio::task::yield_now().await;
            }
            again
        });
        let mut seen = Vec::new();
        while seen.last() != Some(&29) {
            for r in follower.next().await.unwrap().unwrap() {
                seen.push(r.seq);
            }
        }
        assert_eq!(seen, (2..30).collect::<Vec<_>>(), "in order, none lost");
        let again = writer.await.unwrap();
        let (kept, _) = again.read(id).unwrap();
        let bytes: usize = kept.iter().map(|r| r.data.len()).sum();
        assert!(bytes as u64 <= 2 * MAX_FILE, "bounded: {bytes}");
        assert_eq!(kept.last().unwrap().seq, 29);
        assert!(kept.first().unwrap().seq > 2, "the oldest were dropped");
    }

    #[test]
    fn the_main_process_resumes_after_its_last_stored_record() {
        let d = tempfile::tempdir().unwrap();
        let id = SandboxId::new();
        let logs = Logs::new(Some(d.path().into()));
        logs.ensure(id);
        assert_eq!(logs.main_progress(id).unwrap(), (0, false));
        logs.append(id, &[line(0, "a"), line(1, "b")]);
        assert_eq!(logs.main_progress(id).unwrap(), (2, false));
        let mut exit = Record::event("exited");
        (exit.seq, exit.exit_code) = (2, Some(0));
        logs.append(id, &[exit]);
        assert_eq!(logs.main_progress(id).unwrap(), (3, true));
        let mut marker = Record::event("restarted");
        marker.marker = true;
        logs.append(id, &[marker]);
        assert_eq!(logs.main_progress(id).unwrap(), (0, false));
    }

    #[test]
    fn after_a_removal_an_event_keeps_nothing_and_holds_no_file() {
        let d = tempfile::tempdir().unwrap();
        let id = SandboxId::new();
        let logs = Logs::new(Some(d.path().into()));
        logs.ensure(id);
        logs.event(id, "created");
        logs.remove(id);
        logs.event(id, "supervisor disconnected");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        assert!(logs.open.lock().unwrap().is_empty());
        assert!(logs.read(id).unwrap().0.is_empty());
    }

    #[test]
    fn a_damaged_file_reads_as_what_came_before_the_damage() {
        let d = tempfile::tempdir().unwrap();
        let id = SandboxId::new();
        let logs = Logs::new(Some(d.path().into()));
        logs.ensure(id);
        logs.append(id, &[line(0, "ok\n")]);
        let path = d.path().join(id.to_string()).join("log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&u32::MAX.to_le_bytes()).unwrap();
        f.write_all(b"garbage").unwrap();
        let (kept, _) = logs.read(id).unwrap();
        assert_eq!(kept, vec![line(0, "ok\n")]);
    }
}
