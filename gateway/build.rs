//! Embeds the web console (`console/dist`, built by Vite from `console/`) in the gateway,
//! so the `maas` binary serves it without any file beside it.
//!
//! When npm is on the PATH and the console's sources are newer than `console/dist`, this
//! builds the console first (`npm ci` when `node_modules` is missing or older than the lock
//! file, then `npm run build`), so `cargo run --bin maas -- up` serves a current console.
//! Without npm, or with `MAAS_CONSOLE_BUILD=0`, it embeds whatever `console/dist` holds; with
//! no `console/dist` the node serves a plain page that says how to build the console.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The console's inputs, relative to `console/`: a change to any of them rebuilds it.
const INPUTS: [&str; 8] = [
    "src",
    "public",
    "index.html",
    "package.json",
    "package-lock.json",
    "vite.config.ts",
    "tsconfig.json",
    "tsconfig.node.json",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let console = manifest_dir.parent().expect("the gateway is inside the workspace").join("console");
    let dist = console.join("dist");
    println!("cargo:rerun-if-env-changed=MAAS_CONSOLE_BUILD");
    for input in INPUTS {
        let path = console.join(input);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let wanted = std::env::var("MAAS_CONSOLE_BUILD").ok().as_deref() != Some("0");
    if wanted && console.join("package.json").exists() && is_stale(&console, &dist) {
        build_console(&console);
    }
    // Watch the built files when they exist; until then the whole folder, so a console
    // built later (by scripts/test-console, or by hand) is picked up. (Cargo would rerun
    // this script on every build if a watched path were missing.)
    if dist.join("index.html").exists() {
        println!("cargo:rerun-if-changed={}", dist.display());
    } else if console.exists() {
        println!("cargo:rerun-if-changed={}", console.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out_dir.join("console_assets.rs"), assets_source(&dist, &out_dir)).expect("OUT_DIR is writable");
}

/// Whether `dist` is missing or older than any of the console's inputs.
fn is_stale(console: &Path, dist: &Path) -> bool {
    let Some(built) = modified(&dist.join("index.html")) else { return true };
    INPUTS.iter().filter_map(|input| newest(&console.join(input))).any(|changed| changed > built)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of `path` or anything under it.
fn newest(path: &Path) -> Option<SystemTime> {
    let own = modified(path);
    let Ok(entries) = std::fs::read_dir(path) else { return own };
    entries.flatten().filter_map(|entry| newest(&entry.path())).chain(own).max()
}

fn build_console(console: &Path) {
    if Command::new("npm").arg("--version").output().is_err() {
        println!(
            "cargo:warning=npm is not installed: the web console is not rebuilt (install nodejs and npm, or build it with `npm ci && npm run build` in console/)"
        );
        return;
    }
    let lock = modified(&console.join("package-lock.json"));
    let installed = modified(&console.join("node_modules/.package-lock.json"));
    if (installed.is_none() || lock > installed)
        && !run(console, &["ci", "--no-audit", "--no-fund", "--loglevel=error"])
    {
        return;
    }
    run(console, &["run", "build"]);
}

/// Runs npm with `args` in `dir`; on failure, shows the end of its output as warnings.
fn run(dir: &Path, args: &[&str]) -> bool {
    match Command::new("npm").args(args).current_dir(dir).output() {
        Ok(output) if output.status.success() => true,
        Ok(output) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(20)..] {
                println!("cargo:warning={line}");
            }
            println!("cargo:warning=`npm {}` in console/ failed: the web console is not rebuilt", args.join(" "));
            false
        }
        Err(err) => {
            println!("cargo:warning=cannot run npm: {err}");
            false
        }
    }
}

/// Text files smaller than this are sent as they are: gzip would save a packet at most.
const GZIP_FROM_BYTES: u64 = 1024;
/// The file types worth compressing (fonts and images are compressed already).
const COMPRESSIBLE: [&str; 8] = ["html", "js", "mjs", "css", "json", "map", "svg", "txt"];

/// A Rust source that defines `CONSOLE_ASSETS`: every file under `dist` by its path
/// relative to `dist` (with `/` separators), with its contents and, for text files of
/// [`GZIP_FROM_BYTES`] or more, its gzip encoding (made here, once per build, at the best
/// compression, so a request costs no compression).
fn assets_source(dist: &Path, out_dir: &Path) -> String {
    let mut files = Vec::new();
    collect(dist, dist, &mut files);
    files.sort();
    let compressed = out_dir.join("console-gzip");
    let _ = std::fs::remove_dir_all(&compressed);
    let mut source = String::from("/// The built console's files.\n");
    source.push_str("pub static CONSOLE_ASSETS: &[ConsoleAsset] = &[\n");
    for (index, (relative, absolute)) in files.into_iter().enumerate() {
        let gzip = gzip(&absolute, &compressed.join(format!("{index}.gz")));
        let gzip = gzip.map_or_else(
            || "None".to_owned(),
            |path| format!("Some(include_bytes!({:?}))", path.display().to_string()),
        );
        let _ = writeln!(
            source,
            "    ConsoleAsset {{ path: {relative:?}, contents: include_bytes!({:?}), gzip: {gzip} }},",
            absolute.display().to_string()
        );
    }
    source.push_str("];\n");
    source
}

/// Writes the gzip encoding of `file` to `to` when the file is compressible text and the
/// encoding is smaller; its path if so.
fn gzip(file: &Path, to: &Path) -> Option<PathBuf> {
    use std::io::Write as _;
    let extension = file.extension()?.to_str()?;
    let size = std::fs::metadata(file).ok()?.len();
    if !COMPRESSIBLE.contains(&extension) || size < GZIP_FROM_BYTES {
        return None;
    }
    let contents = std::fs::read(file).ok()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&contents).ok()?;
    let encoded = gz.finish().ok()?;
    if encoded.len() >= contents.len() {
        return None;
    }
    std::fs::create_dir_all(to.parent()?).ok()?;
    std::fs::write(to, encoded).ok()?;
    Some(to.to_path_buf())
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(relative) = path.strip_prefix(root) {
            let relative = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            files.push((relative, path));
        }
    }
}
