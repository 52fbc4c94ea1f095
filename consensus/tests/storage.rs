//! Tests of `DiskStorage` through its public API, on real files: the `raft::Storage`
//! semantics of raft-rs's `MemStorage` (its unit tests, ported), durability across reopens,
//! torn tails, a writer killed with SIGKILL, compaction and snapshots, and format versions.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use maas_consensus::ConsensusError;
use maas_consensus::storage::DiskStorage;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage, StorageError};

const CHILD_DIR_ENV: &str = "MAAS_STORAGE_TEST_CHILD_DIR";

fn new_entry(index: u64, term: u64) -> Entry {
    Entry { index, term, ..Default::default() }
}

/// An entry whose data is derived from its index and term, so that a reader can tell that
/// it is intact. Sizes vary from a few bytes to about 1.5 KiB.
fn data_entry(index: u64, term: u64) -> Entry {
    let mut entry = new_entry(index, term);
    entry.data = expected_data(index, term).into();
    entry
}

fn expected_data(index: u64, term: u64) -> Vec<u8> {
    let len = usize::try_from(index % 7 * 250).unwrap() + 8;
    let seed = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ term;
    (0..len).map(|i| seed.to_le_bytes()[i % 8] ^ u8::try_from(i % 251).unwrap()).collect()
}

fn new_snapshot(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = index;
    snapshot.mut_metadata().term = term;
    snapshot.mut_metadata().mut_conf_state().voters = voters;
    snapshot
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit, ..Default::default() }
}

fn voters(ids: &[u64]) -> ConfState {
    ConfState::from((ids.to_vec(), Vec::new()))
}

fn all_entries(storage: &DiskStorage) -> Vec<Entry> {
    let (first, last) = (storage.first_index().unwrap(), storage.last_index().unwrap());
    storage.entries(first, last + 1, None, GetEntriesContext::empty(false)).unwrap()
}

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join("raft.log")
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

/// The storage of `MemStorage`'s tests: `entries` after a snapshot at (`first - 1`, `first - 1`).
/// `MemStorage`'s tests put entries from index 3 straight into an empty storage, which
/// `DiskStorage` cannot hold (its first index is always the snapshot index + 1), so the
/// snapshot takes the place of `MemStorage`'s compacted prefix.
fn storage_with(dir: &Path, entries: &[Entry]) -> DiskStorage {
    let storage = DiskStorage::open(dir).unwrap();
    let before = entries[0].index - 1;
    storage.apply_snapshot(new_snapshot(before, before, vec![1, 2, 3])).unwrap();
    storage.persist(entries, None).unwrap();
    storage
}

fn store_err<T>(err: StorageError) -> raft::Result<T> {
    Err(raft::Error::Store(err))
}

// ---- MemStorage's unit tests, ported ----

#[test]
fn term_of_an_index_follows_mem_storage() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_with(dir.path(), &[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
    let cases = [
        (1, store_err(StorageError::Compacted)),
        // The term of the entry just before the first index is kept for matching.
        (2, Ok(2)),
        (3, Ok(3)),
        (4, Ok(4)),
        (5, Ok(5)),
        (6, store_err(StorageError::Unavailable)),
    ];
    for (index, want) in cases {
        assert_eq!(storage.term(index), want, "term({index})");
    }
}

#[test]
fn entries_follow_mem_storage_with_size_limits() {
    let dir = tempfile::tempdir().unwrap();
    let ents = [new_entry(3, 3), new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)];
    let storage = storage_with(dir.path(), &ents);
    let size = |i: usize| u64::from(ents[i].compute_size());
    let max = u64::MAX;
    let cases = [
        (2, 6, Some(max), store_err(StorageError::Compacted)),
        (3, 4, Some(max), Ok(vec![new_entry(3, 3)])),
        (4, 5, Some(max), Ok(vec![new_entry(4, 4)])),
        (4, 6, Some(max), Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (4, 7, Some(max), Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)])),
        (4, 7, None, Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)])),
        // Even with a limit of zero, the first entry is returned.
        (4, 7, Some(0), Ok(vec![new_entry(4, 4)])),
        (4, 7, Some(size(1) + size(2)), Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (4, 7, Some(size(1) + size(2) + size(3) / 2), Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (4, 7, Some(size(1) + size(2) + size(3) - 1), Ok(vec![new_entry(4, 4), new_entry(5, 5)])),
        (4, 7, Some(size(1) + size(2) + size(3)), Ok(vec![new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)])),
        (5, 5, None, Ok(vec![])),
        // MemStorage panics past the last index; DiskStorage answers Unavailable.
        (4, 8, None, store_err(StorageError::Unavailable)),
    ];
    for (low, high, max_size, want) in cases {
        let got = storage.entries(low, high, max_size, GetEntriesContext::empty(false));
        assert_eq!(got, want, "entries({low}, {high}, {max_size:?})");
    }
}

#[test]
fn last_index_grows_with_appends() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_with(dir.path(), &[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
    assert_eq!(storage.last_index(), Ok(5));
    storage.persist(&[new_entry(6, 5)], None).unwrap();
    assert_eq!(storage.last_index(), Ok(6));
}

#[test]
fn first_index_moves_with_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_with(dir.path(), &[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
    assert_eq!(storage.first_index(), Ok(3));
    storage.set_commit(5).unwrap();
    storage.compact_to_snapshot(3, Vec::new()).unwrap();
    assert_eq!(storage.first_index(), Ok(4));
}

#[test]
fn compaction_follows_mem_storage() {
    // MemStorage's `compact(i)` discards the entries before `i`; its counterpart here is
    // `compact_to_snapshot(i - 1)`. (compact index, first index, its term, entries left)
    let cases = [(2, 3, 3, 3), (3, 3, 3, 3), (4, 4, 4, 2), (5, 5, 5, 1)];
    for (compact, want_first, want_term, want_len) in cases {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage_with(dir.path(), &[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]);
        storage.set_commit(5).unwrap();
        storage.compact_to_snapshot(compact - 1, Vec::new()).unwrap();
        let first = storage.first_index().unwrap();
        assert_eq!(first, want_first, "compact({compact})");
        let term = storage.entries(first, first + 1, 1, GetEntriesContext::empty(false)).unwrap()[0].term;
        assert_eq!(term, want_term, "compact({compact})");
        let last = storage.last_index().unwrap();
        let len = storage.entries(first, last + 1, 100, GetEntriesContext::empty(false)).unwrap().len();
        assert_eq!(len, want_len, "compact({compact})");
    }
}

#[test]
fn snapshot_requests_get_the_stored_snapshot_or_temporarily_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    // With no snapshot yet there is nothing to send (raft-rs treats an index-0 snapshot as fatal).
    assert_eq!(storage.snapshot(0, 2), store_err(StorageError::SnapshotTemporarilyUnavailable));

    storage.initialize(voters(&[1, 2, 3])).unwrap();
    storage
        .persist(&[new_entry(1, 1), new_entry(2, 1), new_entry(3, 2), new_entry(4, 4), new_entry(5, 5)], None)
        .unwrap();
    storage.set_commit(5).unwrap();
    storage.compact_to_snapshot(4, b"state at 4".to_vec()).unwrap();

    let mut want = new_snapshot(4, 4, vec![1, 2, 3]);
    want.data = b"state at 4".to_vec().into();
    assert_eq!(storage.snapshot(0, 2), Ok(want.clone()));
    assert_eq!(storage.snapshot(4, 2), Ok(want));
    // MemStorage fakes a snapshot at the requested index; a real one must wait for a compaction.
    assert_eq!(storage.snapshot(5, 2), store_err(StorageError::SnapshotTemporarilyUnavailable));
}

#[test]
fn append_overwrites_the_conflicting_suffix_as_mem_storage_does() {
    let base = [new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)];
    let cases: Vec<(Vec<Entry>, Option<Vec<Entry>>)> = vec![
        (base.to_vec(), Some(base.to_vec())),
        (
            vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)],
            Some(vec![new_entry(3, 3), new_entry(4, 6), new_entry(5, 6)]),
        ),
        (
            vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5), new_entry(6, 5)],
            Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5), new_entry(6, 5)]),
        ),
        // Overwriting compacted entries is refused (MemStorage panics).
        (vec![new_entry(2, 3), new_entry(3, 3), new_entry(4, 5)], None),
        // Truncate the existing entries and append.
        (vec![new_entry(4, 5)], Some(vec![new_entry(3, 3), new_entry(4, 5)])),
        // Append directly.
        (vec![new_entry(6, 6)], Some(vec![new_entry(3, 3), new_entry(4, 4), new_entry(5, 5), new_entry(6, 6)])),
        // A gap after the last index is refused.
        (vec![new_entry(7, 6)], None),
        // So is a batch that is not contiguous.
        (vec![new_entry(6, 6), new_entry(8, 6)], None),
    ];
    for (i, (entries, want)) in cases.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let storage = storage_with(dir.path(), &base);
        let bytes_before = storage.log_file_bytes();
        let result = storage.persist(&entries, None);
        let want = if let Some(want) = want {
            result.unwrap();
            want
        } else {
            assert!(
                matches!(result, Err(ConsensusError::InvalidStorageRequest(_))),
                "case {i}: want a refusal, got {result:?}"
            );
            assert_eq!(storage.log_file_bytes(), bytes_before, "case {i}: a refusal writes nothing");
            base.to_vec()
        };
        assert_eq!(all_entries(&storage), want, "case {i}");
        drop(storage);
        assert_eq!(all_entries(&DiskStorage::open(dir.path()).unwrap()), want, "case {i} after reopening");
    }
}

#[test]
fn apply_snapshot_refuses_an_older_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.apply_snapshot(new_snapshot(4, 4, vec![1, 2, 3])).unwrap();
    let result = storage.apply_snapshot(new_snapshot(3, 3, vec![1, 2, 3]));
    assert!(
        matches!(result, Err(ConsensusError::Raft(raft::Error::Store(StorageError::SnapshotOutOfDate)))),
        "got {result:?}"
    );
}

// ---- Durability ----

#[test]
fn everything_persisted_comes_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    assert!(!storage.is_initialized());
    assert!(!storage.initial_state().unwrap().initialized());
    storage.initialize(voters(&[1, 2, 3])).unwrap();
    let entries: Vec<Entry> = (1..=20).map(|i| data_entry(i, 1 + i / 10)).collect();
    storage.persist(&entries[..12], Some(&hard_state(2, 1, 3))).unwrap();
    storage.persist(&entries[12..], None).unwrap();
    storage.set_commit(17).unwrap();
    storage.set_conf_state(voters(&[1, 2, 3, 4])).unwrap();
    drop(storage);

    let storage = DiskStorage::open(dir.path()).unwrap();
    assert!(storage.is_initialized());
    assert_eq!(storage.hard_state(), hard_state(2, 1, 17));
    assert_eq!(storage.conf_state(), voters(&[1, 2, 3, 4]));
    let initial = storage.initial_state().unwrap();
    assert_eq!((initial.hard_state, initial.conf_state), (hard_state(2, 1, 17), voters(&[1, 2, 3, 4])));
    assert_eq!((storage.first_index(), storage.last_index()), (Ok(1), Ok(20)));
    assert_eq!(all_entries(&storage), entries);
    assert_eq!(storage.snapshot_metadata().index, 0);
    assert!(storage.snapshot_data().is_empty());
}

#[test]
fn an_overwritten_suffix_does_not_come_back_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.persist(&(1..=5).map(|i| data_entry(i, 1)).collect::<Vec<_>>(), Some(&hard_state(1, 1, 2))).unwrap();
    // A new leader in term 2 overwrites entries 3 to 5 with two of its own.
    storage.persist(&[data_entry(3, 2), data_entry(4, 2)], Some(&hard_state(2, 2, 2))).unwrap();
    drop(storage);

    let storage = DiskStorage::open(dir.path()).unwrap();
    let want = vec![data_entry(1, 1), data_entry(2, 1), data_entry(3, 2), data_entry(4, 2)];
    assert_eq!(all_entries(&storage), want);
    assert_eq!(storage.term(5), store_err(StorageError::Unavailable));
    storage.persist(&[data_entry(5, 2)], None).unwrap();
    drop(storage);

    let storage = DiskStorage::open(dir.path()).unwrap();
    assert_eq!(all_entries(&storage).last(), Some(&data_entry(5, 2)));
    assert_eq!(storage.hard_state(), hard_state(2, 2, 2));
}

#[test]
fn a_storage_is_initialized_only_once_and_never_without_voters() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    let result = storage.initialize(ConfState::default());
    assert!(matches!(result, Err(ConsensusError::InvalidStorageRequest(_))), "got {result:?}");
    assert!(!storage.is_initialized());
    storage.initialize(voters(&[1])).unwrap();
    drop(storage);

    let storage = DiskStorage::open(dir.path()).unwrap();
    assert!(storage.is_initialized());
    let result = storage.initialize(voters(&[1, 2]));
    assert!(matches!(result, Err(ConsensusError::AlreadyInitialized { .. })), "got {result:?}");
    assert_eq!(storage.conf_state(), voters(&[1]));
}

#[test]
fn a_node_that_joins_is_initialized_by_its_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.persist(&[], Some(&hard_state(3, 0, 0))).unwrap();
    assert!(storage.is_initialized());
    drop(storage);
    assert!(DiskStorage::open(dir.path()).unwrap().is_initialized());
}

#[test]
fn empty_or_unchanged_writes_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    let fresh_bytes = storage.log_file_bytes();
    assert_eq!(fresh_bytes, file_len(&log_path(dir.path())));
    storage.persist(&[], None).unwrap();
    assert_eq!(storage.log_file_bytes(), fresh_bytes);
    assert!(!storage.is_initialized());

    storage.persist(&[new_entry(1, 1)], Some(&hard_state(1, 1, 1))).unwrap();
    let bytes = storage.log_file_bytes();
    assert_eq!(bytes, file_len(&log_path(dir.path())));
    storage.persist(&[], Some(&hard_state(1, 1, 1))).unwrap();
    storage.set_commit(1).unwrap();
    storage.set_conf_state(ConfState::default()).unwrap();
    assert_eq!(storage.log_file_bytes(), bytes);
}

#[test]
fn invalid_commits_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.persist(&[new_entry(1, 1), new_entry(2, 1)], Some(&hard_state(1, 1, 1))).unwrap();
    let bytes = storage.log_file_bytes();
    for result in [
        storage.set_commit(3),
        storage.persist(&[new_entry(3, 1)], Some(&hard_state(1, 1, 4))),
        // Raft never discards committed entries; a request to is a bug and refused.
        storage.persist(&[new_entry(1, 2)], None),
    ] {
        assert!(matches!(result, Err(ConsensusError::InvalidStorageRequest(_))), "got {result:?}");
    }
    assert_eq!(storage.log_file_bytes(), bytes);
    assert_eq!(storage.hard_state(), hard_state(1, 1, 1));
    assert_eq!(all_entries(&storage), vec![new_entry(1, 1), new_entry(2, 1)]);
}

#[test]
fn a_storage_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<DiskStorage>();
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    let writer = storage.clone();
    std::thread::spawn(move || writer.persist(&[new_entry(1, 1)], None).unwrap()).join().unwrap();
    assert_eq!(storage.last_index(), Ok(1));
}

#[test]
fn a_directory_is_opened_by_one_storage_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    let clone = storage.clone();
    let result = DiskStorage::open(dir.path());
    assert!(
        matches!(&result, Err(err @ ConsensusError::Io { .. }) if err.to_string().contains("already open in this process")),
        "got {result:?}"
    );
    drop(storage);
    assert!(DiskStorage::open(dir.path()).is_err(), "a clone still holds the directory");
    drop(clone);
    DiskStorage::open(dir.path()).unwrap();
}

// ---- Torn tails ----

/// Writes entries 1..=3 in `dir` and returns the log's length and the bytes of one more
/// valid record (entry 4), taken from a scratch storage with the same history.
fn log_with_three_entries_and_a_fourth_record(dir: &Path) -> (u64, Vec<u8>) {
    let history: Vec<Entry> = (1..=3).map(|i| data_entry(i, 1)).collect();
    let scratch = tempfile::tempdir().unwrap();
    let scratch_storage = DiskStorage::open(scratch.path()).unwrap();
    scratch_storage.persist(&history, None).unwrap();
    let before = usize::try_from(scratch_storage.log_file_bytes()).unwrap();
    scratch_storage.persist(&[data_entry(4, 1)], None).unwrap();
    let record = fs::read(log_path(scratch.path())).unwrap()[before..].to_vec();

    let storage = DiskStorage::open(dir).unwrap();
    storage.persist(&history, None).unwrap();
    (storage.log_file_bytes(), record)
}

/// Makes the bytes appended to a log from the bytes of a valid record.
type MakeTail = dyn Fn(&[u8]) -> Vec<u8>;

#[test]
fn a_torn_or_corrupt_tail_is_cut_off_and_never_applied() {
    let garbage: Vec<u8> = (0u8..200).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let tails: Vec<(&str, Box<MakeTail>)> = vec![
        ("garbage", Box::new(move |_| garbage.clone())),
        ("a short record header", Box::new(|record| record[..5].to_vec())),
        ("half a record", Box::new(|record| record[..record.len() / 2].to_vec())),
        ("all of a record but its last byte", Box::new(|record| record[..record.len() - 1].to_vec())),
        (
            "a flipped checksum byte",
            Box::new(|record| {
                let mut record = record.to_vec();
                record[5] ^= 0x01;
                record
            }),
        ),
        (
            "a flipped payload byte",
            Box::new(|record| {
                let mut record = record.to_vec();
                let last = record.len() - 1;
                record[last] ^= 0x80;
                record
            }),
        ),
        (
            "a length past the end of the file",
            Box::new(|record| {
                let mut record = record.to_vec();
                record[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                record
            }),
        ),
        ("a zero length", Box::new(|record| [&[0u8; 4][..], &record[4..]].concat())),
    ];
    for (name, make_tail) in tails {
        let dir = tempfile::tempdir().unwrap();
        let (valid_bytes, record) = log_with_three_entries_and_a_fourth_record(dir.path());
        let tail = make_tail(&record);
        OpenOptions::new().append(true).open(log_path(dir.path())).unwrap().write_all(&tail).unwrap();
        assert_eq!(file_len(&log_path(dir.path())), valid_bytes + u64::try_from(tail.len()).unwrap());

        let storage = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(file_len(&log_path(dir.path())), valid_bytes, "{name}: the tail is cut off the file");
        assert_eq!(storage.log_file_bytes(), valid_bytes, "{name}");
        assert_eq!(all_entries(&storage), (1..=3).map(|i| data_entry(i, 1)).collect::<Vec<_>>(), "{name}");

        storage.persist(&[data_entry(4, 2)], Some(&hard_state(2, 0, 4))).unwrap();
        drop(storage);
        let storage = DiskStorage::open(dir.path()).unwrap();
        assert_eq!(all_entries(&storage).last(), Some(&data_entry(4, 2)), "{name}: appending after the cut survives");
        assert_eq!(storage.hard_state(), hard_state(2, 0, 4), "{name}");
    }
}

/// The child half of `a_writer_killed_mid_stream_loses_no_acknowledged_entry`: appends
/// batches of entries until it is killed, printing `writing N` before each `persist` and
/// `persisted N` once it has returned (N the batch's last index). Without the environment
/// variable it is an empty test.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let storage = DiskStorage::open(Path::new(&dir)).unwrap();
    let mut next = storage.last_index().unwrap() + 1;
    let mut stdout = std::io::stdout().lock();
    for batch in 0..1_000_000u64 {
        // Mostly small batches, and every fourth one of about 800 KiB, whose write takes long
        // enough for a kill to land in the middle of it.
        let count = if batch % 4 == 3 { 1024 } else { 1 + batch % 9 };
        let entries: Vec<Entry> = (next..next + count).map(|i| data_entry(i, 1)).collect();
        writeln!(stdout, "writing {}", next + count - 1).unwrap();
        stdout.flush().unwrap();
        storage.persist(&entries, Some(&hard_state(1, 1, next - 1))).unwrap();
        next += count;
        writeln!(stdout, "persisted {}", next - 1).unwrap();
        stdout.flush().unwrap();
    }
}

#[test]
fn a_writer_killed_mid_stream_loses_no_acknowledged_entry() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = 0;
    // Each round kills a writer that continues the log the previous round left, so recovery
    // from a torn tail is followed by more appends and another crash.
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // The kill is aimed at one of the large batches (the fourth of every four), in even
        // rounds as soon as its write has begun (the file grows page by page, so the kill
        // tears the record), in odd rounds as soon as `persist` is called.
        let writes_before_kill = 4 + round * 4;
        let mut writes_seen = 0;
        while writes_seen < writes_before_kill {
            // The test harness prints "test child_writer ... " in front of the first line.
            let line = lines.next().expect("the child writer stopped early").unwrap();
            if let Some((_, index)) = line.split_once("persisted ") {
                acknowledged = index.parse().unwrap();
            } else if line.contains("writing ") {
                writes_seen += 1;
            }
        }
        if round == 0 {
            // A live writer in another process holds the directory. The child is stopped
            // meanwhile so that it does not write on for the whole wait.
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
            kill(pid, Signal::SIGSTOP).unwrap();
            let result = DiskStorage::open(dir.path());
            assert!(
                matches!(&result, Err(err) if err.to_string().contains("open in another process")),
                "the child holds the directory: {result:?}"
            );
            kill(pid, Signal::SIGCONT).unwrap();
        }
        if round % 2 == 0 {
            // The previous batch was fsynced before this one was announced, so the log is
            // still at its length; wait for the event of it growing.
            let length = file_len(&log_path(dir.path()));
            while file_len(&log_path(dir.path())) == length {
                assert!(child.try_wait().unwrap().is_none(), "the child writer stopped early");
                std::thread::yield_now();
            }
        }
        // The pipe stays open until the child is dead, so it dies of the signal, mid-stream,
        // and not of a broken pipe.
        kill(Pid::from_raw(i32::try_from(child.id()).unwrap()), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        drop(lines);

        let storage = DiskStorage::open(dir.path()).unwrap();
        let last = storage.last_index().unwrap();
        assert!(last >= acknowledged, "round {round}: entry {acknowledged} was acknowledged, the log ends at {last}");
        assert_eq!(storage.first_index(), Ok(1));
        for (position, entry) in all_entries(&storage).iter().enumerate() {
            let index = u64::try_from(position).unwrap() + 1;
            assert_eq!(entry.index, index, "round {round}: the log has a gap");
            assert_eq!(entry.term, 1);
            assert_eq!(&entry.data[..], &expected_data(index, 1)[..], "round {round}: entry {index} is damaged");
        }
        assert!(storage.hard_state().commit <= last);
    }
}

// ---- Compaction and snapshots ----

#[test]
fn compaction_shrinks_the_log_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.initialize(voters(&[1, 2, 3])).unwrap();
    let entries: Vec<Entry> = (1..=100).map(|i| data_entry(i, 1 + i / 50)).collect();
    for chunk in entries.chunks(10) {
        storage.persist(chunk, None).unwrap();
    }
    storage.set_commit(90).unwrap();
    let bytes_before = file_len(&log_path(dir.path()));

    // Past the commit index or the end of the log is refused and changes nothing.
    for index in [91, 101] {
        let result = storage.compact_to_snapshot(index, b"too far".to_vec());
        assert!(matches!(result, Err(ConsensusError::InvalidStorageRequest(_))), "got {result:?}");
    }
    assert_eq!(storage.first_index(), Ok(1));
    assert_eq!(storage.snapshot_metadata().index, 0);

    storage.compact_to_snapshot(80, b"state machine at 80".to_vec()).unwrap();
    let bytes_after = file_len(&log_path(dir.path()));
    assert!(bytes_after < bytes_before / 3, "the log went from {bytes_before} to {bytes_after} bytes");
    assert_eq!(storage.log_file_bytes(), bytes_after);
    assert_eq!(storage.term(79), store_err(StorageError::Compacted));
    assert_eq!(storage.term(80), Ok(2));
    assert_eq!(storage.entries(80, 82, None, GetEntriesContext::empty(false)), store_err(StorageError::Compacted));
    assert_eq!((storage.first_index(), storage.last_index()), (Ok(81), Ok(100)));
    // A compaction at or below the snapshot is a no-op.
    storage.compact_to_snapshot(70, b"older".to_vec()).unwrap();
    assert_eq!(storage.snapshot_data(), b"state machine at 80");
    storage.persist(&[data_entry(101, 3)], None).unwrap();
    drop(storage);

    let storage = DiskStorage::open(dir.path()).unwrap();
    let metadata = storage.snapshot_metadata();
    assert_eq!((metadata.index, metadata.term), (80, 2));
    assert_eq!(metadata.get_conf_state(), &voters(&[1, 2, 3]));
    assert_eq!(storage.snapshot_data(), b"state machine at 80");
    assert_eq!(storage.hard_state().commit, 90);
    assert_eq!(storage.conf_state(), voters(&[1, 2, 3]));
    let mut want: Vec<Entry> = entries[80..].to_vec();
    want.push(data_entry(101, 3));
    assert_eq!(all_entries(&storage), want);
    assert_eq!(storage.snapshot(0, 2).unwrap().get_data(), b"state machine at 80");
}

#[test]
fn an_older_snapshot_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.initialize(voters(&[1, 2, 3])).unwrap();
    storage.persist(&(1..=30).map(|i| data_entry(i, 2)).collect::<Vec<_>>(), Some(&hard_state(2, 1, 25))).unwrap();
    storage.compact_to_snapshot(20, b"at 20".to_vec()).unwrap();
    let snapshot_file = fs::read(dir.path().join("raft.snap")).unwrap();
    let log_file = fs::read(log_path(dir.path())).unwrap();

    for index in [20, 10] {
        let mut old = new_snapshot(index, 2, vec![1]);
        old.data = b"old".to_vec().into();
        let result = storage.apply_snapshot(old);
        assert!(
            matches!(result, Err(ConsensusError::Raft(raft::Error::Store(StorageError::SnapshotOutOfDate)))),
            "got {result:?}"
        );
    }
    assert_eq!(storage.snapshot_metadata().index, 20);
    assert_eq!(storage.snapshot_data(), b"at 20");
    assert_eq!((storage.first_index(), storage.last_index()), (Ok(21), Ok(30)));
    assert_eq!(storage.hard_state(), hard_state(2, 1, 25));
    assert_eq!(storage.conf_state(), voters(&[1, 2, 3]));
    assert_eq!(fs::read(dir.path().join("raft.snap")).unwrap(), snapshot_file);
    assert_eq!(fs::read(log_path(dir.path())).unwrap(), log_file);
}

#[test]
fn a_newer_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.initialize(voters(&[1, 2, 3])).unwrap();
    storage.persist(&(1..=30).map(|i| data_entry(i, 2)).collect::<Vec<_>>(), Some(&hard_state(2, 1, 10))).unwrap();
    let bytes_before = storage.log_file_bytes();

    // The leader's log differs from ours at index 40 (we do not have it), so ours goes.
    let mut snapshot = new_snapshot(40, 3, vec![1, 2, 3, 4]);
    snapshot.data = b"leader state at 40".to_vec().into();
    storage.apply_snapshot(snapshot.clone()).unwrap();
    let check = |storage: &DiskStorage| {
        assert_eq!((storage.first_index(), storage.last_index()), (Ok(41), Ok(40)));
        assert_eq!(storage.term(40), Ok(3));
        assert_eq!(storage.term(30), store_err(StorageError::Compacted));
        assert_eq!(storage.hard_state(), hard_state(3, 1, 40));
        assert_eq!(storage.conf_state(), voters(&[1, 2, 3, 4]));
        assert_eq!(storage.snapshot_metadata(), snapshot.get_metadata().clone());
        assert_eq!(storage.snapshot_data(), b"leader state at 40");
        assert_eq!(storage.snapshot(0, 2), Ok(snapshot.clone()));
    };
    check(&storage);
    assert!(storage.log_file_bytes() < bytes_before / 10);
    drop(storage);
    let storage = DiskStorage::open(dir.path()).unwrap();
    check(&storage);
    storage.persist(&[data_entry(41, 3)], None).unwrap();
    drop(storage);
    assert_eq!(all_entries(&DiskStorage::open(dir.path()).unwrap()), vec![data_entry(41, 3)]);
}

#[test]
fn a_snapshot_that_matches_the_log_keeps_the_entries_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.persist(&(1..=10).map(|i| data_entry(i, 1)).collect::<Vec<_>>(), Some(&hard_state(1, 1, 4))).unwrap();
    storage.apply_snapshot(new_snapshot(6, 1, vec![1, 2])).unwrap();
    assert_eq!(all_entries(&storage), (7..=10).map(|i| data_entry(i, 1)).collect::<Vec<_>>());
    assert_eq!(storage.hard_state(), hard_state(1, 1, 6));
    // A snapshot whose term differs at its index replaces everything.
    storage.apply_snapshot(new_snapshot(8, 2, vec![1, 2])).unwrap();
    assert_eq!((storage.first_index(), storage.last_index()), (Ok(9), Ok(8)));
}

#[test]
fn an_installation_interrupted_before_the_log_rewrite_is_completed_on_open() {
    // A crash between the snapshot file's rename and the log's leaves the new snapshot next
    // to the old log; copying a snapshot file into a directory reproduces that state.
    let history: Vec<Entry> = (1..=10).map(|i| data_entry(i, 1)).collect();
    let compacted = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(compacted.path()).unwrap();
    storage.initialize(voters(&[1])).unwrap();
    storage.persist(&history, Some(&hard_state(1, 1, 8))).unwrap();
    storage.compact_to_snapshot(6, b"at 6".to_vec()).unwrap();
    drop(storage);

    // The same history, interrupted: the entries after the snapshot stay.
    let interrupted = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(interrupted.path()).unwrap();
    storage.initialize(voters(&[1])).unwrap();
    storage.persist(&history, Some(&hard_state(1, 1, 8))).unwrap();
    drop(storage);
    fs::copy(compacted.path().join("raft.snap"), interrupted.path().join("raft.snap")).unwrap();
    let storage = DiskStorage::open(interrupted.path()).unwrap();
    assert_eq!(storage.snapshot_metadata().index, 6);
    assert_eq!(storage.snapshot_data(), b"at 6");
    assert_eq!(all_entries(&storage), history[6..].to_vec());
    assert_eq!(storage.hard_state(), hard_state(1, 1, 8));
    drop(storage);
    let storage = DiskStorage::open(interrupted.path()).unwrap();
    assert_eq!(all_entries(&storage), history[6..].to_vec());
    drop(storage);

    // A diverging history, interrupted: nothing of the old log stays.
    let diverged = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(diverged.path()).unwrap();
    storage.persist(&(1..=12).map(|i| data_entry(i, 5)).collect::<Vec<_>>(), Some(&hard_state(5, 2, 3))).unwrap();
    drop(storage);
    fs::copy(compacted.path().join("raft.snap"), diverged.path().join("raft.snap")).unwrap();
    let storage = DiskStorage::open(diverged.path()).unwrap();
    assert_eq!((storage.first_index(), storage.last_index()), (Ok(7), Ok(6)));
    assert_eq!(storage.hard_state(), hard_state(5, 2, 6));
    assert_eq!(storage.conf_state(), voters(&[1]));
}

// ---- Format versions ----

#[test]
fn a_wrong_magic_or_an_unknown_version_is_refused() {
    let header = |magic: &[u8; 8], version: u32| [&magic[..], &version.to_le_bytes()[..]].concat();
    let cases = [
        ("raft.log", header(b"NOTALOG!", 1), "wrong magic"),
        ("raft.log", header(b"MAASRLOG", 2), "version 2"),
        ("raft.log", header(b"MAASRLOG", 0), "version 0"),
        ("raft.log", b"MAAS".to_vec(), "too short"),
        ("raft.snap", header(b"MAASSNAP", 7), "version 7"),
        ("raft.snap", header(b"MAASRLOG", 1), "wrong magic"),
    ];
    for (file, bytes, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let storage = DiskStorage::open(dir.path()).unwrap();
        storage.persist(&[new_entry(1, 1)], None).unwrap();
        drop(storage);
        fs::write(dir.path().join(file), &bytes).unwrap();
        let err = DiskStorage::open(dir.path()).expect_err(want).to_string();
        assert!(err.contains(want) && err.contains(file), "{file} {want}: got {err}");
        if want.starts_with("version") {
            assert!(err.contains("reads only version 1"), "{err}");
        }
        // A refused file is left as it was for an operator to look at.
        assert_eq!(fs::read(dir.path().join(file)).unwrap(), bytes);
    }
}

#[test]
fn a_damaged_snapshot_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.persist(&[new_entry(1, 1), new_entry(2, 1)], Some(&hard_state(1, 1, 2))).unwrap();
    storage.compact_to_snapshot(2, b"snapshot data".to_vec()).unwrap();
    drop(storage);
    let path = dir.path().join("raft.snap");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = DiskStorage::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    fs::remove_file(&path).unwrap();
    let err = DiskStorage::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("raft.snap is missing"), "{err}");
}

// ---- With raft-rs ----

/// Runs a single-voter raft node over the storage until it has nothing left to do,
/// handling each Ready the way the raft-rs documentation asks.
fn drive(node: &mut raft::RawNode<DiskStorage>, storage: &DiskStorage, applied: &mut Vec<Vec<u8>>) {
    let mut apply = |entries: Vec<Entry>| {
        applied.extend(entries.into_iter().filter(|entry| !entry.data.is_empty()).map(|entry| entry.data.to_vec()));
    };
    while node.has_ready() {
        let mut ready = node.ready();
        if !ready.snapshot().is_empty() {
            storage.apply_snapshot(ready.snapshot().clone()).unwrap();
        }
        apply(ready.take_committed_entries());
        storage.persist(ready.entries(), ready.hs()).unwrap();
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            storage.set_commit(commit).unwrap();
        }
        apply(light.take_committed_entries());
        node.advance_apply();
    }
}

#[test]
fn a_raft_node_commits_through_the_storage_and_restarts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let config = raft::Config { id: 1, ..Default::default() };
    let mut applied = Vec::new();
    {
        let storage = DiskStorage::open(dir.path()).unwrap();
        storage.initialize(voters(&[1])).unwrap();
        let mut node = raft::RawNode::new(&config, storage.clone(), &logger).unwrap();
        node.campaign().unwrap();
        drive(&mut node, &storage, &mut applied);
        for i in 0..10 {
            node.propose(Vec::new(), format!("command {i}").into_bytes()).unwrap();
            drive(&mut node, &storage, &mut applied);
        }
        assert_eq!(applied.len(), 10);
        let commit = storage.hard_state().commit;
        storage.compact_to_snapshot(commit - 3, b"applied state".to_vec()).unwrap();
    }

    let storage = DiskStorage::open(dir.path()).unwrap();
    let snapshot_index = storage.snapshot_metadata().index;
    let config = raft::Config { applied: storage.hard_state().commit, ..config };
    let mut node = raft::RawNode::new(&config, storage.clone(), &logger).unwrap();
    assert_eq!(node.raft.raft_log.committed, snapshot_index + 3);
    node.campaign().unwrap();
    drive(&mut node, &storage, &mut applied);
    node.propose(Vec::new(), b"after restart".to_vec()).unwrap();
    drive(&mut node, &storage, &mut applied);
    assert_eq!(applied.last().map(Vec::as_slice), Some(&b"after restart"[..]));
    assert_eq!(storage.hard_state().commit, storage.last_index().unwrap());
}
