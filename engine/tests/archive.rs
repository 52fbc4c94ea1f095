//! Model archives: a tiny model packed as .tar, .tar.gz and .zip unpacks to its files
//! (a single top-level folder stripped, hidden files skipped) and reads back as a model;
//! entries that escape (`..`, absolute paths), links, devices and pipes are refused by
//! name; bombs (past the total or the entry count), corrupt and foreign files are refused.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use maas_engine::archive::{ArchiveError, ArchiveLimits, Unpacked, unpack};
use maas_engine::model_files::inspect;
use maas_engine::tiny::{TinyShape, write_llama};

const LIMITS: ArchiveLimits = ArchiveLimits { max_total_bytes: 64 << 20, max_entries: 100 };

/// Unpacks into `out`, as the CLI does.
fn unpack_into(archive: &Path, out: &Path, limits: ArchiveLimits) -> Result<Unpacked<u64>, ArchiveError> {
    unpack(archive, limits, |path, reader| {
        let target = out.join(path);
        std::fs::create_dir_all(target.parent().unwrap())?;
        std::io::copy(reader, &mut File::create_new(&target)?)
    })
}

fn tiny_model(dir: &Path) -> (PathBuf, Vec<String>) {
    let model = dir.join("tiny");
    let mut files = write_llama(&model, TinyShape::default(), 3).unwrap();
    files.sort();
    (model, files)
}

fn tar_gz_of(model: &Path, top: &str, out: &Path) {
    let encoder = flate2::write::GzEncoder::new(File::create(out).unwrap(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    builder.append_dir_all(top, model).unwrap();
    builder.into_inner().unwrap().finish().unwrap();
}

fn zip_of(model: &Path, top: &str, out: &Path) {
    let mut writer = zip::ZipWriter::new(File::create(out).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    writer.add_directory(format!("{top}/"), options).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let path = entry.unwrap().path();
        writer.start_file(format!("{top}/{}", path.file_name().unwrap().to_str().unwrap()), options).unwrap();
        writer.write_all(&std::fs::read(&path).unwrap()).unwrap();
    }
    writer.finish().unwrap();
}

/// A tar whose entries are written raw (the tar crate's own builder refuses `..`), so
/// hostile archives can be made.
fn raw_tar(out: &Path, entries: &[(&[u8], tar::EntryType, &[u8])]) {
    let mut builder = tar::Builder::new(File::create(out).unwrap());
    for (name, kind, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            header.as_old_mut().linkname[..11].copy_from_slice(b"/etc/passwd");
        }
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().flush().unwrap();
}

fn unpacked_paths(unpacked: &Unpacked<u64>) -> Vec<String> {
    let mut paths: Vec<String> = unpacked.files.iter().map(|(path, _)| path.clone()).collect();
    paths.sort();
    paths
}

#[test]
fn a_model_packed_as_tar_gz_zip_or_tar_unpacks_to_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let (model, files) = tiny_model(dir.path());

    let tgz = dir.path().join("tiny.tar.gz");
    tar_gz_of(&model, "tiny-llama", &tgz);
    let out = dir.path().join("from-tgz");
    let unpacked = unpack_into(&tgz, &out, LIMITS).unwrap();
    assert_eq!(unpacked.top_folder.as_deref(), Some("tiny-llama"));
    assert_eq!(unpacked_paths(&unpacked), files);
    inspect(&out.join("tiny-llama")).unwrap();

    let zip = dir.path().join("tiny.zip");
    zip_of(&model, "tiny-llama", &zip);
    let out = dir.path().join("from-zip");
    let unpacked = unpack_into(&zip, &out, LIMITS).unwrap();
    assert_eq!(unpacked.top_folder.as_deref(), Some("tiny-llama"));
    assert_eq!(unpacked_paths(&unpacked), files);
    for (path, bytes) in &unpacked.files {
        assert_eq!(*bytes, std::fs::metadata(model.join(path)).unwrap().len(), "{path}");
    }
    inspect(&out.join("tiny-llama")).unwrap();

    // Files at the root, a hidden file and macOS metadata beside them.
    let tar = dir.path().join("flat.tar");
    let config = std::fs::read(model.join("config.json")).unwrap();
    raw_tar(
        &tar,
        &[
            (b"./", tar::EntryType::Directory, b""),
            (b"./config.json", tar::EntryType::Regular, &config),
            (b"./.gitattributes", tar::EntryType::Regular, b"*.safetensors filter=lfs"),
            (b"__MACOSX/._config.json", tar::EntryType::Regular, b"apple"),
        ],
    );
    let unpacked = unpack_into(&tar, &dir.path().join("flat"), LIMITS).unwrap();
    assert_eq!((unpacked.top_folder.as_deref(), unpacked_paths(&unpacked)), (None, vec!["config.json".to_owned()]));
    assert_eq!(unpacked.skipped, ["./.gitattributes", "__MACOSX/._config.json"]);
}

#[test]
fn entries_that_escape_links_devices_and_pipes_are_refused_by_name() {
    use tar::EntryType as T;
    let dir = tempfile::tempdir().unwrap();
    let table: &[(&[u8], T, &str)] = &[
        (b"../evil.json", T::Regular, "leaves the archive"),
        (b"model/../../evil.json", T::Regular, "leaves the archive"),
        (b"/etc/evil.json", T::Regular, "absolute path"),
        (b"model/link", T::Symlink, "a link"),
        (b"model/hard", T::Link, "a link"),
        (b"model/tty", T::Char, "a device file"),
        (b"model/disk", T::Block, "a device file"),
        (b"model/fifo", T::Fifo, "a pipe"),
    ];
    for (name, kind, reason) in table {
        let archive = dir.path().join("hostile.tar");
        raw_tar(&archive, &[(b"model/config.json", T::Regular, b"{}"), (name, *kind, b"")]);
        let out = dir.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        match unpack_into(&archive, &out, LIMITS) {
            Err(ArchiveError::Refused { entry, reason: why }) => {
                assert_eq!(entry.as_bytes(), *name);
                assert!(why.contains(reason), "{why:?} should say {reason:?}");
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(name)),
        }
        assert!(!dir.path().join("evil.json").exists() && !Path::new("/etc/evil.json").exists());
    }

    // The same in a zip: a path that leaves it, and a symbolic link.
    let archive = dir.path().join("hostile.zip");
    let mut writer = zip::ZipWriter::new(File::create(&archive).unwrap());
    writer.start_file("../evil.json", zip::write::SimpleFileOptions::default()).unwrap();
    writer.write_all(b"{}").unwrap();
    writer.finish().unwrap();
    let error = unpack_into(&archive, &dir.path().join("zip-out"), LIMITS).unwrap_err().to_string();
    assert!(error.contains("\"../evil.json\" is refused") && error.contains("leaves the archive"), "{error}");
    let mut writer = zip::ZipWriter::new(File::create(&archive).unwrap());
    writer.add_symlink("model/link", "/etc/passwd", zip::write::SimpleFileOptions::default()).unwrap();
    writer.finish().unwrap();
    let error = unpack_into(&archive, &dir.path().join("zip-out2"), LIMITS).unwrap_err().to_string();
    assert!(error.contains("\"model/link\" is refused: it is a link"), "{error}");

    // Twice the same path, and a file where a folder should be.
    let archive = dir.path().join("twice.tar");
    raw_tar(&archive, &[(b"m/config.json", T::Regular, b"{}"), (b"m/./config.json", T::Regular, b"{}")]);
    let error = unpack_into(&archive, &dir.path().join("twice"), LIMITS).unwrap_err().to_string();
    assert!(error.contains("appears twice"), "{error}");
    raw_tar(&archive, &[(b"m/a", T::Regular, b"{}"), (b"m/a/b", T::Regular, b"{}")]);
    let error = unpack(&archive, LIMITS, |_, reader| std::io::copy(reader, &mut std::io::sink())).unwrap_err();
    assert!(error.to_string().contains("m/a is a file in the archive"), "{error}");
}

#[test]
fn bombs_corrupt_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let small = ArchiveLimits { max_total_bytes: 1 << 20, max_entries: 10 };
    let zeros = vec![0u8; 8 << 20];

    // 8 MiB of zeros compress to a few KiB: past a 1 MiB total either way.
    let bomb = dir.path().join("zeros");
    std::fs::create_dir_all(&bomb).unwrap();
    std::fs::write(bomb.join("weights.safetensors"), &zeros).unwrap();
    let tgz = dir.path().join("bomb.tar.gz");
    tar_gz_of(&bomb, "m", &tgz);
    assert!(std::fs::metadata(&tgz).unwrap().len() < 64 << 10);
    let mut stored = 0u64;
    let error = unpack(&tgz, small, |_, reader| {
        let n = std::io::copy(reader, &mut std::io::sink());
        stored += 1;
        n
    })
    .unwrap_err();
    assert!(matches!(error, ArchiveError::TooLarge { limit_bytes } if limit_bytes == 1 << 20), "{error}");
    assert_eq!(stored, 0, "a declared size past the limit is refused before reading");
    let zip = dir.path().join("bomb.zip");
    zip_of(&bomb, "m", &zip);
    let error = unpack_into(&zip, &dir.path().join("zip-bomb"), small).unwrap_err();
    assert!(matches!(error, ArchiveError::TooLarge { .. }), "{error}");

    // More entries than the bound.
    let many = dir.path().join("many.tar");
    let names: Vec<String> = (0..11).map(|i| format!("m/f{i}.json")).collect();
    let entries: Vec<(&[u8], tar::EntryType, &[u8])> =
        names.iter().map(|n| (n.as_bytes(), tar::EntryType::Regular, b"{}".as_slice())).collect();
    raw_tar(&many, &entries);
    let error = unpack_into(&many, &dir.path().join("many"), small).unwrap_err();
    assert!(matches!(error, ArchiveError::TooManyEntries { limit: 10 }), "{error}");

    // Cut short, damaged inside, or not an archive at all.
    let (model, _) = tiny_model(dir.path());
    let good = dir.path().join("good.tar.gz");
    tar_gz_of(&model, "m", &good);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let error = unpack_into(&cut, &dir.path().join("cut"), LIMITS).unwrap_err();
    assert!(matches!(error, ArchiveError::Corrupt(_)), "{error}");

    let zip = dir.path().join("good.zip");
    zip_of(&model, "m", &zip);
    let mut bytes = std::fs::read(&zip).unwrap();
    let middle = bytes.len() / 3;
    for byte in &mut bytes[middle..middle + 64] {
        *byte ^= 0x5a;
    }
    let damaged = dir.path().join("damaged.zip");
    std::fs::write(&damaged, &bytes).unwrap();
    let error = unpack_into(&damaged, &dir.path().join("damaged"), LIMITS).unwrap_err();
    assert!(matches!(error, ArchiveError::Corrupt(_)), "{error}");

    let foreign = dir.path().join("notes.tar.gz");
    std::fs::write(&foreign, "just some notes, not an archive").unwrap();
    assert!(matches!(unpack_into(&foreign, &dir.path().join("x"), LIMITS), Err(ArchiveError::NotAnArchive)));

    let empty = dir.path().join("empty.tar");
    raw_tar(&empty, &[(b"m/", tar::EntryType::Directory, b"")]);
    assert!(matches!(unpack_into(&empty, &dir.path().join("y"), LIMITS), Err(ArchiveError::Empty)));

    // A sink's own failure is not blamed on the archive.
    let mut sink_input = Vec::new();
    let error = unpack(&good, LIMITS, |_, reader| {
        reader.read_to_end(&mut sink_input)?;
        Err::<(), _>(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(matches!(error, ArchiveError::Store { .. }), "{error}");
}
