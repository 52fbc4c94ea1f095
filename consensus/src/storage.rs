//! Durable raft storage: [`DiskStorage`], a write-ahead log of our own plus a snapshot file.
//!
//! The live state (hard state, conf state, the entries after the snapshot, the snapshot
//! itself) is kept in memory, as in raft-rs's `MemStorage`; the log file is its write-ahead
//! log, replayed by [`DiskStorage::open`].
//!
//! # Files in the storage directory
//!
//! - `raft.log`: a header (`MAASRLOG`, then the format version as a u32 LE), then records
//!   `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`. A payload is a sequence
//!   of items `[kind: u8][body length: u32 LE][body]`: an entry, a hard state or a conf
//!   state (protobuf), a truncation (u64 LE: entries from this index on are discarded) or a
//!   base (u64 LE index, u64 LE term: the log continues after the snapshot at that index; only
//!   ever the first item of a rewritten log). Every call that changes state writes exactly one
//!   record, so after a crash each call is replayed whole or not at all.
//! - `raft.snap`: a header (`MAASSNAP`, version u32 LE), then `[payload length: u64 LE]
//!   [crc32 of payload: u32 LE]` and the payload `[metadata length: u32 LE][SnapshotMetadata
//!   protobuf][data]`. It is only ever replaced whole: temporary file, fsync, rename, fsync of
//!   the directory.
//! - `LOCK`: held with an exclusive file lock while the storage is open, so that no two
//!   storages, in one process or two, write the same directory.
//!
//! **Invariant:** `entries[i].index == snapshot index + 1 + i`, so the first index is always
//! the snapshot index plus one and the log has no gaps.
//!
//! # Crash safety
//!
//! A torn or corrupt tail of the log (the last write cut short by a crash) is cut off when
//! the log is opened. Installing a snapshot (from the leader or by compaction) replaces the
//! snapshot file first and then rewrites the log, starting with a base item at the snapshot;
//! a crash between the two leaves a snapshot newer than the log's base, and opening completes
//! the installation.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::{ConsensusError, Result};

const LOG_FILE: &str = "raft.log";
const LOG_TMP_FILE: &str = "raft.log.tmp";
const SNAPSHOT_FILE: &str = "raft.snap";
const SNAPSHOT_TMP_FILE: &str = "raft.snap.tmp";
const LOCK_FILE: &str = "LOCK";

const LOG_MAGIC: [u8; 8] = *b"MAASRLOG";
const SNAPSHOT_MAGIC: [u8; 8] = *b"MAASSNAP";
/// The log format this build writes and reads. A new version must keep reading the old ones.
const LOG_FORMAT_VERSION: u32 = 1;
/// The snapshot file format this build writes and reads.
const SNAPSHOT_FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 12;
const RECORD_HEADER_BYTES: usize = 8;
const ITEM_HEADER_BYTES: usize = 5;
const SNAPSHOT_FRAME_BYTES: usize = 12;

const ITEM_ENTRY: u8 = 1;
const ITEM_HARD_STATE: u8 = 2;
const ITEM_CONF_STATE: u8 = 3;
const ITEM_TRUNCATE: u8 = 4;
const ITEM_BASE: u8 = 5;

/// A log rewrite cuts its items into records of about this size, so that neither the
/// rewrite nor the replay holds one huge record in memory.
const REWRITE_RECORD_BYTES: usize = 1 << 20;

/// Durable raft storage in one directory; see the module documentation for the format.
///
/// Cloning is cheap and every clone shares the same storage. Writers are serialised; readers
/// (raft's [`raft::Storage`] calls) never wait for a write's fsync.
#[derive(Clone)]
pub struct DiskStorage {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// What raft reads. Only changed after the write that makes the change durable succeeded.
    core: RwLock<Core>,
    /// The open log. Writers hold this lock for the whole of a change, so the state cannot
    /// change between a writer's validation and its update.
    writer: Mutex<LogWriter>,
    log_file_bytes: AtomicU64,
    /// Held for the directory's exclusive claim, released when the last clone is dropped.
    _claim: DirectoryClaim,
}

#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// The entries after the snapshot: `entries[i].index == snapshot index + 1 + i`.
    entries: Vec<Entry>,
    /// The latest snapshot, metadata and data; index 0 when there is none.
    snapshot: Snapshot,
    /// Whether anything was ever persisted.
    initialized: bool,
}

/// What installing a snapshot changes, computed before any i/o so that a failed write
/// leaves the state untouched.
struct InstallPlan {
    hard_state: HardState,
    conf_state: ConfState,
    /// How many entries at the front of the log the snapshot replaces.
    entries_dropped: usize,
}

impl Core {
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot_index() + to_u64(self.entries.len())
    }

    /// The position in `entries` of `index`, which must be at least the first index.
    fn offset(&self, index: u64) -> usize {
        to_usize(index - self.first_index())
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let metadata = self.snapshot.get_metadata();
        if index == metadata.index {
            return Ok(metadata.term);
        }
        if index < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[self.offset(index)].term)
    }

    /// Checks that `entries` may be appended, as raft appends them: contiguous, not into the
    /// snapshot, without a gap, and not discarding committed entries. Returns the index from
    /// which existing entries are discarded, if any are.
    fn check_append(&self, entries: &[Entry]) -> Result<Option<u64>> {
        let Some(first) = entries.first() else {
            return Ok(None);
        };
        if let Some(pair) = entries.windows(2).find(|pair| pair[1].index != pair[0].index + 1) {
            return Err(invalid(format!(
                "entries to persist are not contiguous: index {} follows {}",
                pair[1].index, pair[0].index
            )));
        }
        if first.index <= self.snapshot_index() {
            return Err(invalid(format!(
                "entries from index {} would overwrite the snapshot at index {}",
                first.index,
                self.snapshot_index()
            )));
        }
        if first.index > self.last_index() + 1 {
            return Err(invalid(format!(
                "entries from index {} would leave a gap after the last index {}",
                first.index,
                self.last_index()
            )));
        }
        if first.index > self.last_index() {
            return Ok(None);
        }
        if first.index <= self.hard_state.commit {
            return Err(invalid(format!(
                "entries from index {} would discard entries up to the commit index {}",
                first.index, self.hard_state.commit
            )));
        }
        Ok(Some(first.index))
    }

    /// Appends entries that passed [`Core::check_append`], discarding any they overwrite.
    fn append(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            let keep = self.offset(first.index);
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
    }

    /// Plans installing a snapshot newer than the current one. The entries after it are kept
    /// only when the log holds the snapshot's last entry with the same term (the Log Matching
    /// property then makes them consistent with it); otherwise the whole log is replaced.
    fn install_plan(&self, metadata: &SnapshotMetadata) -> InstallPlan {
        let entries_dropped = match self.term(metadata.index) {
            Ok(term) if term == metadata.term && metadata.index >= self.snapshot_index() => {
                to_usize(metadata.index - self.snapshot_index())
            }
            _ => self.entries.len(),
        };
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(metadata.term);
        hard_state.commit = hard_state.commit.max(metadata.index);
        InstallPlan { hard_state, conf_state: metadata.get_conf_state().clone(), entries_dropped }
    }

    fn install(&mut self, snapshot: Snapshot, plan: InstallPlan) {
        self.entries.drain(..plan.entries_dropped);
        self.hard_state = plan.hard_state;
        self.conf_state = plan.conf_state;
        self.snapshot = snapshot;
        self.initialized = true;
    }
}

impl DiskStorage {
    /// Opens (creating) the storage in `dir`, replaying the log; a torn or corrupt tail
    /// (bad length, bad checksum, short read) is detected, logged with `tracing::warn!`,
    /// truncated away (file truncated to the last valid record and fsynced) and never applied.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|err| ConsensusError::io(dir, err))?;
        let claim = DirectoryClaim::take(dir)?;
        for stale in [LOG_TMP_FILE, SNAPSHOT_TMP_FILE] {
            remove_if_present(&dir.join(stale))?;
        }

        let snapshot = read_snapshot_file(&dir.join(SNAPSHOT_FILE))?;
        let log_path = dir.join(LOG_FILE);
        match fs::metadata(&log_path) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let tmp = write_log_tmp(dir, None)?;
                commit_rename(dir, &tmp, LOG_FILE)?;
            }
            Err(err) => return Err(ConsensusError::io(&log_path, err)),
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|err| ConsensusError::io(&log_path, err))?;
        let Replayed { mut state, valid_bytes, file_bytes, torn } = replay_log(&mut file, &log_path)?;
        if let Some(reason) = torn {
            tracing::warn!(
                path = %log_path.display(),
                valid_bytes,
                file_bytes,
                %reason,
                "the raft log has a torn or corrupt tail; truncating it to the last valid record"
            );
            file.set_len(valid_bytes)
                .and_then(|()| file.sync_all())
                .map_err(|err| ConsensusError::io(&log_path, err))?;
        }

        let needs_rewrite = reconcile_snapshot(&mut state, snapshot, dir)?;
        if state.hard_state.commit > state.last_index() {
            return Err(ConsensusError::Corrupt(format!(
                "{}: the commit index {} is past the last log index {}",
                log_path.display(),
                state.hard_state.commit,
                state.last_index()
            )));
        }
        let mut len_bytes = valid_bytes;
        if needs_rewrite {
            let tmp = write_log_tmp(dir, Some(LogContent::of(&state)))?;
            file = commit_rename(dir, &tmp, LOG_FILE)?;
            len_bytes = tmp.len_bytes;
        }
        file.seek(SeekFrom::Start(len_bytes)).map_err(|err| ConsensusError::io(&log_path, err))?;

        let writer = LogWriter { path: log_path, file, len_bytes, record: RecordBuf::default(), failed: false };
        Ok(DiskStorage {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                core: RwLock::new(state),
                writer: Mutex::new(writer),
                log_file_bytes: AtomicU64::new(len_bytes),
                _claim: claim,
            }),
        })
    }

    /// Whether anything was ever persisted (false on a fresh directory: the node bootstraps or joins).
    pub fn is_initialized(&self) -> bool {
        self.inner.read_core().initialized
    }

    /// Bootstraps a fresh storage with a conf state (the initial voters); refuses if already
    /// initialized or if the conf state has no voter.
    pub fn initialize(&self, conf_state: ConfState) -> Result<()> {
        let mut writer = self.inner.lock_writer();
        if self.inner.read_core().initialized {
            return Err(ConsensusError::AlreadyInitialized { dir: self.inner.dir.display().to_string() });
        }
        if conf_state.voters.is_empty() {
            return Err(invalid("a bootstrap conf state needs at least one voter"));
        }
        self.inner.write_record(&mut writer, |record| record.message(ITEM_CONF_STATE, &conf_state))?;
        let mut state = self.inner.write_core();
        state.conf_state = conf_state;
        state.initialized = true;
        Ok(())
    }

    /// Persists a Ready's entries (discarding any existing entries at or after the first new
    /// index, as raft requires) and, if given, the hard state, with one write and one
    /// `fdatasync` for the lot. Empty entries and `None` (or the unchanged hard state) is a
    /// no-op without fsync.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut writer = self.inner.lock_writer();
        let (truncate_from, hard_state) = {
            let state = self.inner.read_core();
            let truncate_from = state.check_append(entries)?;
            let hard_state = hard_state.filter(|hard_state| **hard_state != state.hard_state);
            if let Some(hard_state) = hard_state {
                let last_index = entries.last().map_or(state.last_index(), |entry| entry.index);
                if hard_state.commit > last_index {
                    return Err(invalid(format!(
                        "the commit index {} is past the last log index {last_index}",
                        hard_state.commit
                    )));
                }
            }
            (truncate_from, hard_state)
        };
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        self.inner.write_record(&mut writer, |record| {
            if let Some(index) = truncate_from {
                record.raw(ITEM_TRUNCATE, &index.to_le_bytes())?;
            }
            for entry in entries {
                record.message(ITEM_ENTRY, entry)?;
            }
            if let Some(hard_state) = hard_state {
                record.message(ITEM_HARD_STATE, hard_state)?;
            }
            Ok(())
        })?;
        let mut state = self.inner.write_core();
        state.append(entries);
        if let Some(hard_state) = hard_state {
            state.hard_state = hard_state.clone();
        }
        state.initialized = true;
        Ok(())
    }

    /// Sets the commit index in the hard state (for `LightReady`'s commit index), durably.
    pub fn set_commit(&self, commit: u64) -> Result<()> {
        let mut writer = self.inner.lock_writer();
        let hard_state = {
            let state = self.inner.read_core();
            if commit == state.hard_state.commit {
                return Ok(());
            }
            if commit > state.last_index() {
                return Err(invalid(format!(
                    "the commit index {commit} is past the last log index {}",
                    state.last_index()
                )));
            }
            let mut hard_state = state.hard_state.clone();
            hard_state.commit = commit;
            hard_state
        };
        self.inner.write_record(&mut writer, |record| record.message(ITEM_HARD_STATE, &hard_state))?;
        let mut state = self.inner.write_core();
        state.hard_state = hard_state;
        state.initialized = true;
        Ok(())
    }

    /// Records the conf state after a conf change was applied, durably.
    pub fn set_conf_state(&self, conf_state: ConfState) -> Result<()> {
        let mut writer = self.inner.lock_writer();
        if self.inner.read_core().conf_state == conf_state {
            return Ok(());
        }
        self.inner.write_record(&mut writer, |record| record.message(ITEM_CONF_STATE, &conf_state))?;
        let mut state = self.inner.write_core();
        state.conf_state = conf_state;
        state.initialized = true;
        Ok(())
    }

    /// Installs a snapshot received from the leader: the snapshot file replaces the old one,
    /// entries up to its index are dropped (all entries, unless the log holds the snapshot's
    /// last entry with the same term), the hard state's commit and term are raised to it and
    /// the conf state is set from its metadata. Refuses with `SnapshotOutOfDate`, changing
    /// nothing, a snapshot that is not newer than the current one.
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut writer = self.inner.lock_writer();
        let plan = {
            let state = self.inner.read_core();
            if snapshot.get_metadata().index <= state.snapshot_index() {
                return Err(ConsensusError::Raft(raft::Error::Store(StorageError::SnapshotOutOfDate)));
            }
            state.install_plan(snapshot.get_metadata())
        };
        self.inner.install(&mut writer, snapshot, plan)
    }

    /// Saves `data` (the state machine at applied index `index`) as the snapshot, with the
    /// current conf state and the term of `index`, then compacts: entries up to `index` leave
    /// memory and the log file is rewritten to hold only what is still needed. An `index` at
    /// or below the current snapshot is a no-op, as in `MemStorage::compact`; one past the
    /// commit index or the last index is refused.
    pub fn compact_to_snapshot(&self, index: u64, data: Vec<u8>) -> Result<()> {
        let mut writer = self.inner.lock_writer();
        let (snapshot, plan) = {
            let state = self.inner.read_core();
            if index <= state.snapshot_index() {
                return Ok(());
            }
            if index > state.last_index() {
                return Err(invalid(format!(
                    "cannot compact to index {index}: the log ends at index {}",
                    state.last_index()
                )));
            }
            if index > state.hard_state.commit {
                return Err(invalid(format!(
                    "cannot compact to index {index}: it is past the commit index {}",
                    state.hard_state.commit
                )));
            }
            let mut snapshot = Snapshot::default();
            let metadata = snapshot.mut_metadata();
            metadata.index = index;
            metadata.term = state.term(index)?;
            metadata.set_conf_state(state.conf_state.clone());
            snapshot.set_data(data.into());
            let plan = state.install_plan(snapshot.get_metadata());
            (snapshot, plan)
        };
        self.inner.install(&mut writer, snapshot, plan)
    }

    pub fn hard_state(&self) -> HardState {
        self.inner.read_core().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.inner.read_core().conf_state.clone()
    }

    /// The current snapshot's metadata (index 0 when none).
    pub fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.inner.read_core().snapshot.get_metadata().clone()
    }

    /// The current snapshot's data (empty when none), for restoring the state machine at start.
    pub fn snapshot_data(&self) -> Vec<u8> {
        self.inner.read_core().snapshot.get_data().to_vec()
    }

    /// Bytes of the log file (for tests and metrics).
    pub fn log_file_bytes(&self) -> u64 {
        self.inner.log_file_bytes.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.read_core();
        f.debug_struct("DiskStorage")
            .field("dir", &self.inner.dir)
            .field("snapshot_index", &state.snapshot_index())
            .field("last_index", &state.last_index())
            .field("commit", &state.hard_state.commit)
            .finish_non_exhaustive()
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let state = self.inner.read_core();
        Ok(RaftState::new(state.hard_state.clone(), state.conf_state.clone()))
    }

    /// Returns the entries in `[low, high)`: at least one when the range is not empty, and
    /// beyond the first only as many as fit in `max_size` bytes, counted as raft-rs's
    /// `limit_size` counts them. Unlike `MemStorage`, a `high` past the last index + 1 (a
    /// caller bug that raft-rs checks for before calling) is an `Unavailable` error, not a panic.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().filter(|max| *max != raft::NO_LIMIT);
        let state = self.inner.read_core();
        if low < state.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > state.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let range = &state.entries[state.offset(low)..state.offset(high)];
        let Some(max_size) = max_size else {
            return Ok(range.to_vec());
        };
        let mut total_bytes = 0u64;
        let taken = range
            .iter()
            .take_while(|entry| {
                let first = total_bytes == 0;
                total_bytes += u64::from(entry.compute_size());
                first || total_bytes <= max_size
            })
            .count();
        Ok(range[..taken].to_vec())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.inner.read_core().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read_core().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read_core().last_index())
    }

    /// Returns the stored snapshot (metadata and data). Unlike `MemStorage`, which makes an
    /// empty snapshot at the commit index, this storage holds the state machine's data only as
    /// of the last [`DiskStorage::compact_to_snapshot`] or [`DiskStorage::apply_snapshot`]; when
    /// there is none, or it is older than `request_index`, the answer is
    /// `SnapshotTemporarilyUnavailable` and raft asks again later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let state = self.inner.read_core();
        let index = state.snapshot_index();
        if index == 0 || index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        // A follower refuses a snapshot whose configuration leaves it out (a member added
        // after the snapshot was taken); raft asks again once a newer snapshot exists.
        let conf_state = state.snapshot.get_metadata().get_conf_state();
        if !conf_state.voters.contains(&to) && !conf_state.learners.contains(&to) {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(state.snapshot.clone())
    }
}

impl Inner {
    // A panic never happens while these locks are held with the state half updated (the
    // updates are plain assignments and vector operations), so a poisoned state lock is still
    // consistent and is used as is.
    fn read_core(&self) -> RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_core(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the writer. A writer poisoned by a panic may have left anything in the file, so
    /// it refuses further writes like one whose write failed.
    fn lock_writer(&self) -> MutexGuard<'_, LogWriter> {
        self.writer.lock().unwrap_or_else(|poisoned| {
            let mut writer = poisoned.into_inner();
            writer.failed = true;
            writer
        })
    }

    /// Appends one record built by `encode` with one write and one fsync.
    fn write_record(&self, writer: &mut LogWriter, encode: impl FnOnce(&mut RecordBuf) -> Result<()>) -> Result<()> {
        writer.ensure_healthy()?;
        writer.record.clear();
        writer.record.begin();
        encode(&mut writer.record)?;
        writer.record.finish()?;
        writer.write_buffered()?;
        self.log_file_bytes.store(writer.len_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `snapshot` the current snapshot and rewrites the log to continue after it, then
    /// applies `plan` to the state. Both files are written in full before either is renamed
    /// into place; the snapshot goes first, so a crash between the renames is completed by
    /// [`DiskStorage::open`].
    fn install(&self, writer: &mut LogWriter, snapshot: Snapshot, plan: InstallPlan) -> Result<()> {
        writer.ensure_healthy()?;
        let snapshot_tmp = write_snapshot_tmp(&self.dir, &snapshot)?;
        let log_tmp = {
            let state = self.read_core();
            let metadata = snapshot.get_metadata();
            write_log_tmp(
                &self.dir,
                Some(LogContent {
                    base: (metadata.index, metadata.term),
                    hard_state: &plan.hard_state,
                    conf_state: &plan.conf_state,
                    entries: &state.entries[plan.entries_dropped..],
                }),
            )?
        };
        // From the first rename on, a failure leaves the files in a state that only a reopen
        // sorts out, so the writer refuses further writes.
        let renamed = commit_rename(&self.dir, &snapshot_tmp, SNAPSHOT_FILE)
            .and_then(|_| commit_rename(&self.dir, &log_tmp, LOG_FILE));
        let file = match renamed {
            Ok(file) => file,
            Err(err) => {
                writer.failed = true;
                return Err(err);
            }
        };
        let old_bytes = writer.len_bytes;
        writer.file = file;
        writer.len_bytes = log_tmp.len_bytes;
        self.log_file_bytes.store(log_tmp.len_bytes, Ordering::Relaxed);

        let mut state = self.write_core();
        state.install(snapshot, plan);
        tracing::info!(
            dir = %self.dir.display(),
            snapshot_index = state.snapshot_index(),
            snapshot_term = state.snapshot.get_metadata().term,
            entries_kept = state.entries.len(),
            old_log_bytes = old_bytes,
            new_log_bytes = log_tmp.len_bytes,
            "installed a raft snapshot and rewrote the log"
        );
        Ok(())
    }
}

/// The open log file and a reusable buffer for the next record.
struct LogWriter {
    path: PathBuf,
    file: File,
    /// The length of the valid log, where the next record goes.
    len_bytes: u64,
    record: RecordBuf,
    /// Set when a write or fsync failed in a way that may have left the file different from
    /// what the state says; from then on every write is refused until the storage is reopened.
    failed: bool,
}

impl LogWriter {
    fn ensure_healthy(&self) -> Result<()> {
        if self.failed {
            return Err(ConsensusError::io(
                &self.path,
                io::Error::other(
                    "an earlier write to the raft storage failed and its outcome on disk is unknown; \
                     restart the node to reopen the storage",
                ),
            ));
        }
        Ok(())
    }

    /// Writes the buffered record with one write and one `fdatasync`.
    fn write_buffered(&mut self) -> Result<()> {
        if let Err(err) = self.file.write_all(&self.record.bytes) {
            // A failed write (a full disk, say) may have left part of the record behind; cut it
            // off so that later records do not follow garbage, which replay would discard.
            let rolled_back =
                self.file.set_len(self.len_bytes).and_then(|()| self.file.seek(SeekFrom::Start(self.len_bytes)));
            if rolled_back.is_err() {
                self.failed = true;
            }
            return Err(ConsensusError::io(&self.path, err));
        }
        if let Err(err) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages: nothing about
            // the file can be trusted any more.
            self.failed = true;
            return Err(ConsensusError::io(&self.path, err));
        }
        self.len_bytes += to_u64(self.record.bytes.len());
        Ok(())
    }
}

/// Builds log records in memory: `[len][crc][items]`, each item `[kind][len][body]`.
#[derive(Default)]
struct RecordBuf {
    bytes: Vec<u8>,
    record_start: usize,
}

impl RecordBuf {
    fn clear(&mut self) {
        self.bytes.clear();
        self.record_start = 0;
    }

    fn begin(&mut self) {
        self.record_start = self.bytes.len();
        self.bytes.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    }

    /// The payload bytes of the record being built.
    fn payload_bytes(&self) -> usize {
        self.bytes.len() - self.record_start - RECORD_HEADER_BYTES
    }

    fn message(&mut self, kind: u8, message: &impl protobuf::Message) -> Result<()> {
        self.bytes.push(kind);
        let len_at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        message
            .write_to_vec(&mut self.bytes)
            .map_err(|err| ConsensusError::Codec { what: item_name(kind), reason: err.to_string() })?;
        let body_len = self.bytes.len() - len_at - 4;
        self.bytes[len_at..len_at + 4].copy_from_slice(&record_len(body_len)?.to_le_bytes());
        Ok(())
    }

    fn raw(&mut self, kind: u8, body: &[u8]) -> Result<()> {
        self.bytes.push(kind);
        self.bytes.extend_from_slice(&record_len(body.len())?.to_le_bytes());
        self.bytes.extend_from_slice(body);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let payload_start = self.record_start + RECORD_HEADER_BYTES;
        let len = record_len(self.bytes.len() - payload_start)?;
        let crc = crc32fast::hash(&self.bytes[payload_start..]);
        self.bytes[self.record_start..self.record_start + 4].copy_from_slice(&len.to_le_bytes());
        self.bytes[self.record_start + 4..payload_start].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }
}

fn record_len(bytes: usize) -> Result<u32> {
    u32::try_from(bytes).map_err(|_| invalid(format!("a raft log record of {bytes} bytes is over the 4 GiB limit")))
}

fn item_name(kind: u8) -> &'static str {
    match kind {
        ITEM_ENTRY => "raft log entry",
        ITEM_HARD_STATE => "raft hard state",
        ITEM_CONF_STATE => "raft conf state",
        ITEM_TRUNCATE => "raft log truncation",
        ITEM_BASE => "raft log base",
        _ => "raft log item",
    }
}

/// The state a rewritten log holds: the snapshot it continues from and what follows it.
struct LogContent<'a> {
    base: (u64, u64),
    hard_state: &'a HardState,
    conf_state: &'a ConfState,
    entries: &'a [Entry],
}

impl<'a> LogContent<'a> {
    fn of(state: &'a Core) -> Self {
        let metadata = state.snapshot.get_metadata();
        LogContent {
            base: (metadata.index, metadata.term),
            hard_state: &state.hard_state,
            conf_state: &state.conf_state,
            entries: &state.entries,
        }
    }
}

/// A fully written and synced temporary file, ready to be renamed into place.
struct TmpFile {
    file: File,
    path: PathBuf,
    len_bytes: u64,
}

/// Writes a whole log file (a bare header when `content` is `None`) to the temporary log
/// path and syncs it.
fn write_log_tmp(dir: &Path, content: Option<LogContent<'_>>) -> Result<TmpFile> {
    let path = dir.join(LOG_TMP_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|err| ConsensusError::io(&path, err))?;
    let mut record = RecordBuf::default();
    record.bytes.extend_from_slice(&header(LOG_MAGIC, LOG_FORMAT_VERSION));
    let mut len_bytes = 0u64;
    let mut flush = |record: &mut RecordBuf, file: &mut File| -> Result<()> {
        file.write_all(&record.bytes).map_err(|err| ConsensusError::io(&path, err))?;
        len_bytes += to_u64(record.bytes.len());
        record.clear();
        Ok(())
    };
    if let Some(content) = content {
        record.begin();
        let mut base = [0u8; 16];
        base[..8].copy_from_slice(&content.base.0.to_le_bytes());
        base[8..].copy_from_slice(&content.base.1.to_le_bytes());
        record.raw(ITEM_BASE, &base)?;
        record.message(ITEM_HARD_STATE, content.hard_state)?;
        record.message(ITEM_CONF_STATE, content.conf_state)?;
        for entry in content.entries {
            if record.payload_bytes() >= REWRITE_RECORD_BYTES {
                record.finish()?;
                flush(&mut record, &mut file)?;
                record.begin();
            }
            record.message(ITEM_ENTRY, entry)?;
        }
        record.finish()?;
    }
    flush(&mut record, &mut file)?;
    file.sync_all().map_err(|err| ConsensusError::io(&path, err))?;
    Ok(TmpFile { file, path, len_bytes })
}

/// Writes the snapshot file to its temporary path and syncs it.
fn write_snapshot_tmp(dir: &Path, snapshot: &Snapshot) -> Result<TmpFile> {
    let path = dir.join(SNAPSHOT_TMP_FILE);
    let metadata = snapshot
        .get_metadata()
        .write_to_bytes()
        .map_err(|err| ConsensusError::Codec { what: "raft snapshot metadata", reason: err.to_string() })?;
    let metadata_len = record_len(metadata.len())?.to_le_bytes();
    let data = snapshot.get_data();
    let payload_len = to_u64(metadata_len.len() + metadata.len() + data.len());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&metadata_len);
    crc.update(&metadata);
    crc.update(data);

    let io_err = |err| ConsensusError::io(&path, err);
    let file = File::create(&path).map_err(io_err)?;
    let mut out = BufWriter::new(file);
    out.write_all(&header(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT_VERSION))
        .and_then(|()| out.write_all(&payload_len.to_le_bytes()))
        .and_then(|()| out.write_all(&crc.finalize().to_le_bytes()))
        .and_then(|()| out.write_all(&metadata_len))
        .and_then(|()| out.write_all(&metadata))
        .and_then(|()| out.write_all(data))
        .map_err(io_err)?;
    let file = out.into_inner().map_err(|err| io_err(err.into_error()))?;
    file.sync_all().map_err(io_err)?;
    let len_bytes = to_u64(HEADER_BYTES + SNAPSHOT_FRAME_BYTES) + payload_len;
    Ok(TmpFile { file, path, len_bytes })
}

/// Renames a synced temporary file over `name` and syncs the directory, so that the rename
/// itself survives a crash. Returns the file, now under its final name.
fn commit_rename(dir: &Path, tmp: &TmpFile, name: &str) -> Result<File> {
    let target = dir.join(name);
    fs::rename(&tmp.path, &target).map_err(|err| ConsensusError::io(&target, err))?;
    sync_dir(dir)?;
    tmp.file.try_clone().map_err(|err| ConsensusError::io(&target, err))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(|err| ConsensusError::io(dir, err))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(ConsensusError::io(path, err)),
        _ => Ok(()),
    }
}

/// The storage directories open in this process, by canonical path.
static OPEN_DIRECTORIES: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// How long `open` waits for another holder of a directory's file lock to let go: a child
/// process being spawned shares the lock until it execs (microseconds to milliseconds), and a
/// restarting node may find its predecessor still exiting.
const LOCK_WAIT: Duration = Duration::from_millis(250);

/// A directory's exclusive claim: its entry in [`OPEN_DIRECTORIES`] against a second storage
/// in this process, and the file lock on `LOCK` against one in another process. The file lock
/// is released before the entry, so a reopen after a drop never finds the entry gone and the
/// lock still held by this process.
struct DirectoryClaim {
    lock_file: Option<File>,
    canonical_dir: PathBuf,
}

impl DirectoryClaim {
    fn take(dir: &Path) -> Result<Self> {
        let canonical_dir = fs::canonicalize(dir).map_err(|err| ConsensusError::io(dir, err))?;
        let path = canonical_dir.join(LOCK_FILE);
        if !OPEN_DIRECTORIES.lock().unwrap_or_else(PoisonError::into_inner).insert(canonical_dir.clone()) {
            return Err(ConsensusError::io(
                &path,
                io::Error::new(io::ErrorKind::WouldBlock, "the raft storage is already open in this process"),
            ));
        }
        // From here on, dropping the claim (on any error) removes the entry again.
        let mut claim = DirectoryClaim { lock_file: None, canonical_dir };
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|err| ConsensusError::io(&path, err))?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Err(TryLockError::WouldBlock) => {
                    return Err(ConsensusError::io(
                        &path,
                        io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "the raft storage is open in another process; stop that process first",
                        ),
                    ));
                }
                Err(TryLockError::Error(err)) => return Err(ConsensusError::io(&path, err)),
            }
        }
        claim.lock_file = Some(file);
        Ok(claim)
    }
}

impl Drop for DirectoryClaim {
    fn drop(&mut self) {
        drop(self.lock_file.take());
        OPEN_DIRECTORIES.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.canonical_dir);
    }
}

fn header(magic: [u8; 8], version: u32) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(&magic);
    header[8..].copy_from_slice(&version.to_le_bytes());
    header
}

/// Checks a file's header (`bytes` is the start of the file, possibly shorter than a header).
fn check_header(bytes: &[u8], magic: [u8; 8], version: u32, path: &Path, what: &str) -> Result<()> {
    if bytes.len() < HEADER_BYTES {
        return Err(ConsensusError::Corrupt(format!(
            "{} is too short ({} bytes) to be a maas {what} file",
            path.display(),
            bytes.len()
        )));
    }
    if bytes[..8] != magic {
        return Err(ConsensusError::Corrupt(format!(
            "{} is not a maas {what} file (wrong magic bytes)",
            path.display()
        )));
    }
    let found = u32::from_le_bytes(bytes[8..HEADER_BYTES].try_into().expect("four bytes"));
    if found != version {
        return Err(ConsensusError::UnsupportedFormat { path: path.display().to_string(), found, supported: version });
    }
    Ok(())
}

/// Reads the snapshot file, `None` when there is none. It is only ever written whole and
/// renamed into place, so any damage is corruption, not a torn write.
fn read_snapshot_file(path: &Path) -> Result<Option<Snapshot>> {
    let mut bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ConsensusError::io(path, err)),
    };
    check_header(&bytes, SNAPSHOT_MAGIC, SNAPSHOT_FORMAT_VERSION, path, "raft snapshot")?;
    let corrupt = |reason: &str| ConsensusError::Corrupt(format!("{}: {reason}", path.display()));
    let frame = bytes
        .get(HEADER_BYTES..HEADER_BYTES + SNAPSHOT_FRAME_BYTES)
        .ok_or_else(|| corrupt("the snapshot file is cut short"))?;
    let payload_len = u64::from_le_bytes(frame[..8].try_into().expect("eight bytes"));
    let crc = u32::from_le_bytes(frame[8..].try_into().expect("four bytes"));
    let payload_start = HEADER_BYTES + SNAPSHOT_FRAME_BYTES;
    if to_u64(bytes.len() - payload_start) != payload_len {
        return Err(corrupt("the snapshot file's length does not match its header"));
    }
    if crc32fast::hash(&bytes[payload_start..]) != crc {
        return Err(corrupt("the snapshot file's checksum does not match"));
    }
    let payload = &bytes[payload_start..];
    let metadata_len = payload
        .get(..4)
        .map(|len| to_usize(u64::from(u32::from_le_bytes(len.try_into().expect("four bytes")))))
        .filter(|len| len + 4 <= payload.len())
        .ok_or_else(|| corrupt("the snapshot metadata is cut short"))?;
    let metadata = SnapshotMetadata::parse_from_bytes(&payload[4..4 + metadata_len])
        .map_err(|err| ConsensusError::Codec { what: "raft snapshot metadata", reason: err.to_string() })?;
    // Moves the data to the front of the buffer rather than copying it into a second one.
    bytes.drain(..payload_start + 4 + metadata_len);
    let mut snapshot = Snapshot::default();
    snapshot.set_metadata(metadata);
    snapshot.set_data(bytes.into());
    Ok(Some(snapshot))
}

struct Replayed {
    state: Core,
    /// The length of the log up to the end of its last valid record.
    valid_bytes: u64,
    file_bytes: u64,
    /// Why replay stopped before the end of the file, when it did.
    torn: Option<String>,
}

/// Replays the log from its start. A tail that is not a whole record with a matching
/// checksum stops the replay (a torn write); a whole, checksummed record that does not make
/// sense is corruption and refused.
fn replay_log(file: &mut File, path: &Path) -> Result<Replayed> {
    let io_err = |err| ConsensusError::io(path, err);
    let file_bytes = file.metadata().map_err(io_err)?.len();
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);

    let mut header = [0u8; HEADER_BYTES];
    let read = read_full(&mut reader, &mut header).map_err(io_err)?;
    check_header(&header[..read], LOG_MAGIC, LOG_FORMAT_VERSION, path, "raft log")?;

    let mut state = Core::default();
    let mut valid_bytes = to_u64(HEADER_BYTES);
    let mut payload = Vec::new();
    let torn = loop {
        let mut record_header = [0u8; RECORD_HEADER_BYTES];
        let read = read_full(&mut reader, &mut record_header).map_err(io_err)?;
        if read == 0 {
            break None;
        }
        if read < RECORD_HEADER_BYTES {
            break Some(format!("a record header is cut short ({read} of {RECORD_HEADER_BYTES} bytes)"));
        }
        let len = u32::from_le_bytes(record_header[..4].try_into().expect("four bytes"));
        let crc = u32::from_le_bytes(record_header[4..].try_into().expect("four bytes"));
        let remaining = file_bytes - valid_bytes - to_u64(RECORD_HEADER_BYTES);
        if len == 0 {
            break Some("a record has length zero".to_owned());
        }
        if u64::from(len) > remaining {
            break Some(format!("a record of {len} bytes runs past the end of the file ({remaining} bytes left)"));
        }
        payload.resize(to_usize(u64::from(len)), 0);
        let read = read_full(&mut reader, &mut payload).map_err(io_err)?;
        if read < payload.len() {
            break Some(format!("a record is cut short ({read} of {len} bytes)"));
        }
        if crc32fast::hash(&payload) != crc {
            break Some("a record's checksum does not match".to_owned());
        }
        apply_record(&mut state, &payload, valid_bytes == to_u64(HEADER_BYTES)).map_err(|reason| {
            ConsensusError::Corrupt(format!("{}: the record at byte {valid_bytes}: {reason}", path.display()))
        })?;
        valid_bytes += to_u64(RECORD_HEADER_BYTES + payload.len());
    };
    Ok(Replayed { state, valid_bytes, file_bytes, torn })
}

/// Applies one record's items to the state during replay, checking what `persist` checks.
fn apply_record(state: &mut Core, payload: &[u8], first_record: bool) -> std::result::Result<(), String> {
    let mut rest = payload;
    let mut first_item = first_record;
    while !rest.is_empty() {
        if rest.len() < ITEM_HEADER_BYTES {
            return Err("an item header is cut short".to_owned());
        }
        let kind = rest[0];
        let body_len = to_usize(u64::from(u32::from_le_bytes(rest[1..5].try_into().expect("four bytes"))));
        let body = rest
            .get(ITEM_HEADER_BYTES..ITEM_HEADER_BYTES + body_len)
            .ok_or_else(|| format!("an item of {body_len} bytes runs past the end of its record"))?;
        rest = &rest[ITEM_HEADER_BYTES + body_len..];
        let decode_err = |err: protobuf::ProtobufError| format!("cannot decode a {}: {err}", item_name(kind));
        match kind {
            ITEM_ENTRY => {
                let entry = Entry::parse_from_bytes(body).map_err(decode_err)?;
                if entry.index != state.last_index() + 1 {
                    return Err(format!("entry {} does not follow the last index {}", entry.index, state.last_index()));
                }
                state.entries.push(entry);
            }
            ITEM_HARD_STATE => state.hard_state = HardState::parse_from_bytes(body).map_err(decode_err)?,
            ITEM_CONF_STATE => state.conf_state = ConfState::parse_from_bytes(body).map_err(decode_err)?,
            ITEM_TRUNCATE => {
                let index = u64::from_le_bytes(body.try_into().map_err(|_| "a truncation is not 8 bytes")?);
                if index <= state.snapshot_index() || index > state.last_index() + 1 {
                    return Err(format!(
                        "a truncation at index {index} is outside the log ({}..={})",
                        state.first_index(),
                        state.last_index()
                    ));
                }
                let keep = state.offset(index);
                state.entries.truncate(keep);
            }
            ITEM_BASE => {
                if !first_item {
                    return Err("a base item appears after the start of the log".to_owned());
                }
                let body: [u8; 16] = body.try_into().map_err(|_| "a base item is not 16 bytes")?;
                let metadata = state.snapshot.mut_metadata();
                metadata.index = u64::from_le_bytes(body[..8].try_into().expect("eight bytes"));
                metadata.term = u64::from_le_bytes(body[8..].try_into().expect("eight bytes"));
            }
            other => return Err(format!("unknown item kind {other}")),
        }
        first_item = false;
    }
    state.initialized = true;
    Ok(())
}

/// Joins the snapshot file to the replayed log. Returns whether the log must be rewritten
/// because an installation was interrupted between the snapshot's rename and the log's.
fn reconcile_snapshot(state: &mut Core, snapshot: Option<Snapshot>, dir: &Path) -> Result<bool> {
    let (base_index, base_term) = (state.snapshot_index(), state.snapshot.get_metadata().term);
    let Some(snapshot) = snapshot else {
        if base_index == 0 {
            return Ok(false);
        }
        return Err(ConsensusError::Corrupt(format!(
            "the raft log in {} continues from a snapshot at index {base_index}, but {SNAPSHOT_FILE} is missing",
            dir.display()
        )));
    };
    let metadata = snapshot.get_metadata();
    if metadata.index == base_index {
        if metadata.term != base_term {
            return Err(ConsensusError::Corrupt(format!(
                "the snapshot in {} has term {} at index {base_index}, but the log says term {base_term}",
                dir.display(),
                metadata.term
            )));
        }
        state.snapshot = snapshot;
        state.initialized = true;
        return Ok(false);
    }
    if metadata.index < base_index {
        return Err(ConsensusError::Corrupt(format!(
            "the snapshot in {} (index {}) is older than the snapshot the log continues from (index {base_index})",
            dir.display(),
            metadata.index
        )));
    }
    tracing::warn!(
        dir = %dir.display(),
        snapshot_index = metadata.index,
        log_base_index = base_index,
        "a snapshot installation was interrupted; completing it"
    );
    let plan = state.install_plan(metadata);
    state.install(snapshot, plan);
    Ok(true)
}

/// Reads until `buf` is full or the end of the input; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

fn invalid(reason: impl Into<String>) -> ConsensusError {
    ConsensusError::InvalidStorageRequest(reason.into())
}

fn to_u64(value: usize) -> u64 {
    u64::try_from(value).expect("a usize fits in a u64")
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).expect("a log offset fits in memory, so in a usize")
}
