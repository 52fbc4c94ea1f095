//! Model archives (`.tar`, `.tar.gz` / `.tgz`, `.zip`) unpacked without trusting them:
//! each regular file is handed to a sink (the blob store on a node, a folder in the CLI),
//! and anything that could escape or exhaust the machine is refused with the entry named:
//! absolute paths, `..`, links, device files, pipes, a total past the limit (a zip or tar
//! bomb) and more entries than the limit. A single top-level folder (`Qwen2.5-0.5B/...`,
//! as `tar czf model.tgz Qwen2.5-0.5B` makes) is stripped, so the model's files sit at
//! its root. Hidden files and `__MACOSX` metadata are skipped, as a folder import skips
//! hidden files.
//!
//! Synchronous and CPU-bound (decompression): call it on a blocking thread.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The default bound on an archive's entries.
pub const MAX_ENTRIES: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    TarGz,
    Zip,
}

impl ArchiveKind {
    /// The kind a file name's ending says (`.tar`, `.tar.gz`, `.tgz`, `.zip`), if any.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let ends_with = |suffix: &str| name.ends_with(suffix);
        if ends_with(".tar.gz") || ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if ends_with(".tar") {
            Some(ArchiveKind::Tar)
        } else if ends_with(".zip") {
            Some(ArchiveKind::Zip)
        } else {
            None
        }
    }

    /// The kind the first bytes say: the gzip magic (a compressed tar), a zip header, or
    /// the ustar magic at byte 257 of a tar header.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(ArchiveKind::TarGz)
        } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(ArchiveKind::Zip)
        } else if head.get(257..262) == Some(b"ustar".as_slice()) {
            Some(ArchiveKind::Tar)
        } else {
            None
        }
    }
}

/// Bounds on what an archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// The sum of every file's unpacked size.
    pub max_total_bytes: u64,
    /// Entries of any kind (files, folders, skipped ones).
    pub max_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not an archive: expected a .tar, .tar.gz (.tgz) or .zip file")]
    NotAnArchive,
    #[error("the archive is corrupt: {0}")]
    Corrupt(String),
    #[error("archive entry {entry:?} is refused: {reason}")]
    Refused { entry: String, reason: String },
    #[error("the archive unpacks to more than {limit_bytes} bytes (the upload limit); import the folder instead")]
    TooLarge { limit_bytes: u64 },
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("the archive holds no files")]
    Empty,
    #[error("cannot store archive entry {entry:?}: {source}")]
    Store {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the archive: {0}")]
    Io(#[source] io::Error),
}

/// What [`unpack`] found.
#[derive(Debug)]
pub struct Unpacked<T> {
    /// Every file, by its path in the model (the single top-level folder stripped), with
    /// what the sink made of it, in archive order.
    pub files: Vec<(String, T)>,
    /// The top-level folder that was stripped.
    pub top_folder: Option<String>,
    /// Entries skipped: hidden files and `__MACOSX` metadata.
    pub skipped: Vec<String>,
}

/// Unpacks the archive at `path` (its kind sniffed from its first bytes): `sink` gets each
/// regular file's path in the archive (normalised, checked to stay inside it) and a reader
/// of its bytes, bounded by the limits; what it returns is kept with the file.
pub fn unpack<T>(
    path: &Path,
    limits: ArchiveLimits,
    mut sink: impl FnMut(&str, &mut dyn Read) -> io::Result<T>,
) -> Result<Unpacked<T>, ArchiveError> {
    let mut file = File::open(path).map_err(ArchiveError::Io)?;
    let mut head = Vec::with_capacity(512);
    (&mut file).take(512).read_to_end(&mut head).map_err(ArchiveError::Io)?;
    file.seek(SeekFrom::Start(0)).map_err(ArchiveError::Io)?;
    let kind = ArchiveKind::sniff(&head).ok_or(ArchiveError::NotAnArchive)?;
    let mut state = Walk {
        limits,
        remaining: limits.max_total_bytes,
        entries: 0,
        seen: BTreeSet::new(),
        files: Vec::new(),
        skipped: Vec::new(),
    };
    match kind {
        ArchiveKind::Tar => walk_tar(BufReader::with_capacity(1 << 20, file), &mut state, &mut sink)?,
        ArchiveKind::TarGz => {
            walk_tar(flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, file)), &mut state, &mut sink)?;
        }
        ArchiveKind::Zip => walk_zip(file, &mut state, &mut sink)?,
    }
    state.finish()
}

struct Walk<T> {
    limits: ArchiveLimits,
    remaining: u64,
    entries: u64,
    seen: BTreeSet<String>,
    files: Vec<(String, T)>,
    skipped: Vec<String>,
}

impl<T> Walk<T> {
    fn count_entry(&mut self) -> Result<(), ArchiveError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ArchiveError::TooManyEntries { limit: self.limits.max_entries });
        }
        Ok(())
    }

    /// Hands one regular file to the sink, bounded by what remains of the total.
    fn file(
        &mut self,
        path: String,
        declared_bytes: u64,
        reader: &mut dyn Read,
        sink: &mut impl FnMut(&str, &mut dyn Read) -> io::Result<T>,
    ) -> Result<(), ArchiveError> {
        if !self.seen.insert(path.clone()) {
            return Err(refused(&path, "it appears twice in the archive"));
        }
        if declared_bytes > self.remaining {
            return Err(ArchiveError::TooLarge { limit_bytes: self.limits.max_total_bytes });
        }
        let mut bounded = Bounded { inner: reader, remaining: self.remaining, read: 0, exceeded: false, failure: None };
        let made = sink(&path, &mut bounded);
        if bounded.exceeded {
            return Err(ArchiveError::TooLarge { limit_bytes: self.limits.max_total_bytes });
        }
        if let Some(failure) = bounded.failure {
            return Err(ArchiveError::Corrupt(format!("{path}: {failure}")));
        }
        let made = made.map_err(|source| ArchiveError::Store { entry: path.clone(), source })?;
        if bounded.read != declared_bytes {
            return Err(ArchiveError::Corrupt(format!(
                "{path} holds {} of its {declared_bytes} bytes: the archive is truncated",
                bounded.read
            )));
        }
        self.remaining -= bounded.read;
        self.files.push((path, made));
        Ok(())
    }

    fn finish(self) -> Result<Unpacked<T>, ArchiveError> {
        let Walk { seen, mut files, skipped, .. } = self;
        if files.is_empty() {
            return Err(ArchiveError::Empty);
        }
        // A file and a folder of the same path cannot both be laid out.
        for path in &seen {
            let mut ancestor = path.as_str();
            while let Some((parent, _)) = ancestor.rsplit_once('/') {
                if seen.contains(parent) {
                    return Err(refused(path, &format!("{parent} is a file in the archive, not a folder")));
                }
                ancestor = parent;
            }
        }
        let top_folder = single_top_folder(files.iter().map(|(path, _)| path.as_str()));
        if let Some(top) = &top_folder {
            for (path, _) in &mut files {
                *path = path[top.len() + 1..].to_owned();
            }
        }
        Ok(Unpacked { files, top_folder, skipped })
    }
}

/// The one folder every path is inside, if there is one (`model/config.json`,
/// `model/tokenizer.json` → `model`).
fn single_top_folder<'a>(mut paths: impl Iterator<Item = &'a str>) -> Option<String> {
    let first = paths.next()?;
    let (top, _) = first.split_once('/')?;
    paths.all(|path| path.split_once('/').is_some_and(|(other, _)| other == top)).then(|| top.to_owned())
}

/// What an entry's name means once checked.
#[derive(Debug, PartialEq, Eq)]
enum EntryPath {
    /// A normalised relative path (`a/b.json`).
    Inside(String),
    /// The archive's root (`./`), a hidden file or macOS metadata.
    Skip,
}

/// Checks an entry name and normalises it: `\` counts as a separator, `.` and empty parts
/// are dropped; absolute paths (including a drive letter), `..` and names that are not
/// UTF-8 are refused.
fn entry_path(raw: &[u8]) -> Result<EntryPath, ArchiveError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let name = std::str::from_utf8(raw).map_err(|_| refused(&shown, "its name is not UTF-8"))?;
    if name.contains('\0') {
        return Err(refused(&shown, "its name holds a NUL byte"));
    }
    let name = name.replace('\\', "/");
    if name.starts_with('/') {
        return Err(refused(&shown, "it has an absolute path"));
    }
    let parts: Vec<&str> = name.split('/').filter(|part| !part.is_empty() && *part != ".").collect();
    if parts.first().is_some_and(|first| first.contains(':')) {
        return Err(refused(&shown, "it has an absolute path (a drive letter)"));
    }
    if parts.contains(&"..") {
        return Err(refused(&shown, "its path leaves the archive (`..`)"));
    }
    if parts.is_empty() || parts.iter().any(|part| part.starts_with('.') || *part == "__MACOSX") {
        return Ok(EntryPath::Skip);
    }
    Ok(EntryPath::Inside(parts.join("/")))
}

fn refused(entry: &str, reason: &str) -> ArchiveError {
    ArchiveError::Refused { entry: entry.to_owned(), reason: reason.to_owned() }
}

fn corrupt(err: &io::Error) -> ArchiveError {
    ArchiveError::Corrupt(err.to_string())
}

fn walk_tar<R: Read, T>(
    reader: R,
    state: &mut Walk<T>,
    sink: &mut impl FnMut(&str, &mut dyn Read) -> io::Result<T>,
) -> Result<(), ArchiveError> {
    use tar::EntryType;

    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| corrupt(&e))? {
        let mut entry = entry.map_err(|e| corrupt(&e))?;
        state.count_entry()?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        // The kind first: a link or device is refused whatever its name.
        match kind {
            EntryType::Regular | EntryType::Continuous => {}
            EntryType::Directory | EntryType::XGlobalHeader => {
                entry_path(&raw)?;
                continue;
            }
            EntryType::Symlink | EntryType::Link => return Err(refused(&shown, "it is a link")),
            EntryType::Char | EntryType::Block => return Err(refused(&shown, "it is a device file")),
            EntryType::Fifo => return Err(refused(&shown, "it is a pipe")),
            EntryType::GNUSparse => return Err(refused(&shown, "it is a sparse file")),
            other => return Err(refused(&shown, &format!("its entry type {:?} is not supported", other.as_byte()))),
        }
        match entry_path(&raw)? {
            EntryPath::Skip => state.skipped.push(shown),
            EntryPath::Inside(path) => {
                let declared = entry.size();
                state.file(path, declared, &mut entry, sink)?;
            }
        }
    }
    Ok(())
}

fn walk_zip<T>(
    file: File,
    state: &mut Walk<T>,
    sink: &mut impl FnMut(&str, &mut dyn Read) -> io::Result<T>,
) -> Result<(), ArchiveError> {
    /// The file-type bits of a Unix mode, and the two types allowed.
    const S_IFMT: u32 = 0o170_000;
    const S_IFREG: u32 = 0o100_000;
    const S_IFDIR: u32 = 0o040_000;
    const S_IFLNK: u32 = 0o120_000;

    let mut archive = zip::ZipArchive::new(BufReader::with_capacity(1 << 20, file))
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    if archive.len() as u64 > state.limits.max_entries {
        return Err(ArchiveError::TooManyEntries { limit: state.limits.max_entries });
    }
    for index in 0..archive.len() {
        state.count_entry()?;
        let mut entry = archive.by_index(index).map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let raw = entry.name_raw().to_vec();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let file_type = entry.unix_mode().map_or(0, |mode| mode & S_IFMT);
        if entry.is_symlink() || file_type == S_IFLNK {
            return Err(refused(&shown, "it is a link"));
        }
        if file_type != 0 && file_type != S_IFREG && file_type != S_IFDIR {
            return Err(refused(&shown, "it is a device file or pipe"));
        }
        if entry.is_dir() || file_type == S_IFDIR {
            entry_path(&raw)?;
            continue;
        }
        match entry_path(&raw)? {
            EntryPath::Skip => state.skipped.push(shown),
            EntryPath::Inside(path) => {
                let declared = entry.size();
                state.file(path, declared, &mut entry, sink)?;
            }
        }
    }
    Ok(())
}

/// A reader that counts what it passes on, stops past the remaining total, and notes a
/// failure of the archive (as opposed to one of the sink).
struct Bounded<'a> {
    inner: &'a mut dyn Read,
    remaining: u64,
    read: u64,
    exceeded: bool,
    failure: Option<String>,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(err) => {
                self.failure = Some(err.to_string());
                return Err(err);
            }
        };
        self.read += n as u64;
        if self.read > self.remaining {
            self.exceeded = true;
            return Err(io::Error::other("the archive unpacks to more than the limit"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_normalised_or_refused() {
        let inside = |path: &str| EntryPath::Inside(path.to_owned());
        let table: &[(&str, Option<EntryPath>)] = &[
            ("config.json", Some(inside("config.json"))),
            ("./model/config.json", Some(inside("model/config.json"))),
            ("model//weights/./a.safetensors", Some(inside("model/weights/a.safetensors"))),
            ("model\\tokenizer.json", Some(inside("model/tokenizer.json"))),
            ("./", Some(EntryPath::Skip)),
            ("model/.gitattributes", Some(EntryPath::Skip)),
            ("__MACOSX/model/._config.json", Some(EntryPath::Skip)),
            ("/etc/passwd", None),
            ("\\windows\\system32", None),
            ("C:/model/config.json", None),
            ("../config.json", None),
            ("model/../../config.json", None),
            ("model\\..\\..\\x", None),
        ];
        for (name, expected) in table {
            match (entry_path(name.as_bytes()), expected) {
                (Ok(found), Some(expected)) => assert_eq!(&found, expected, "{name}"),
                (Err(ArchiveError::Refused { entry, .. }), None) => assert_eq!(&entry, name),
                (other, _) => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(entry_path(b"caf\xe9.json"), Err(ArchiveError::Refused { .. })));
    }

    #[test]
    fn a_single_top_folder_is_found() {
        assert_eq!(single_top_folder(["m/config.json", "m/a/b"].into_iter()), Some("m".to_owned()));
        assert_eq!(single_top_folder(["m/config.json", "n/b"].into_iter()), None);
        assert_eq!(single_top_folder(["config.json", "m/b"].into_iter()), None);
        assert_eq!(single_top_folder(["model.gguf"].into_iter()), None);
    }

    #[test]
    fn kinds_come_from_names_and_magic_bytes() {
        assert_eq!(ArchiveKind::from_file_name("m.TAR.GZ"), Some(ArchiveKind::TarGz));
        assert_eq!(ArchiveKind::from_file_name("m.tgz"), Some(ArchiveKind::TarGz));
        assert_eq!(ArchiveKind::from_file_name("m.tar"), Some(ArchiveKind::Tar));
        assert_eq!(ArchiveKind::from_file_name("m.zip"), Some(ArchiveKind::Zip));
        assert_eq!(ArchiveKind::from_file_name("m.gguf"), None);
        let mut tar_head = vec![0u8; 512];
        tar_head[257..263].copy_from_slice(b"ustar\0");
        assert_eq!(ArchiveKind::sniff(&tar_head), Some(ArchiveKind::Tar));
        assert_eq!(ArchiveKind::sniff(b"PK\x03\x04rest"), Some(ArchiveKind::Zip));
        assert_eq!(ArchiveKind::sniff(&[0x1f, 0x8b, 8]), Some(ArchiveKind::TarGz));
        assert_eq!(ArchiveKind::sniff(b"{\"json\": true}"), None);
    }
}
