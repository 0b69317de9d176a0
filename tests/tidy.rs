//! Tidy checks of the documentation map: every crate opens with its docs, `ARCHITECTURE.md` names
//! every crate under `crates/`, and every file or folder it cites exists in the repository. The
//! map is only useful while it is true; these checks fail the change that makes it stale.

use std::fs;
use std::path::{Path, PathBuf};

/// The repository's root (this package lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives inside the repository")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The crate folders under `crates/`, sorted.
fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root().join("crates"))
        .expect("crates/ is readable")
        .map(|entry| entry.expect("crates/ entry").path())
        .filter(|path| path.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// Whether a source file opens with a `//!` paragraph: its first line is a crate doc comment
/// with text on it.
fn opens_with_crate_docs(source: &str) -> bool {
    source
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("//!"))
        .is_some_and(|text| !text.trim().is_empty())
}

/// The library target of a package outside `crates/`: its `[lib] path`, or `src/lib.rs`.
fn lib_of(package: &Path) -> Option<PathBuf> {
    let manifest: toml::Table = toml::from_str(&read(&package.join("Cargo.toml")))
        .unwrap_or_else(|e| panic!("{}/Cargo.toml: {e}", package.display()));
    let declared = manifest
        .get("lib")
        .and_then(|lib| lib.get("path"))
        .and_then(|path| path.as_str());
    let path = package.join(declared.unwrap_or("src/lib.rs"));
    path.is_file().then_some(path)
}

#[test]
fn crates_open_with_their_docs() {
    let root = root();
    let mut missing = Vec::new();
    let mut checked = 0;
    for dir in crate_dirs() {
        let targets: Vec<PathBuf> = ["src/lib.rs", "src/main.rs"]
            .iter()
            .map(|target| dir.join(target))
            .filter(|path| path.is_file())
            .collect();
        if targets.is_empty() {
            missing.push(format!("{}: no src/lib.rs or src/main.rs", dir.display()));
        }
        for target in targets {
            checked += 1;
            if !opens_with_crate_docs(&read(&target)) {
                missing.push(
                    target
                        .strip_prefix(&root)
                        .unwrap_or(&target)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    // The test package's shared support library.
    if let Some(support) = lib_of(&root.join("tests")) {
        checked += 1;
        if !opens_with_crate_docs(&read(&support)) {
            missing.push(
                support
                    .strip_prefix(&root)
                    .unwrap_or(&support)
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(checked > 0, "no crate found under crates/");
    assert!(
        missing.is_empty(),
        "these crate roots do not open with a `//!` paragraph saying what the crate is:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn architecture_names_every_crate() {
    let map = read(&root().join("ARCHITECTURE.md"));
    let unnamed: Vec<String> = crate_dirs()
        .iter()
        .map(|dir| {
            let name = dir.file_name().expect("a crate folder has a name");
            format!("crates/{}", name.to_string_lossy())
        })
        .filter(|path| !map.contains(path.as_str()))
        .collect();
    assert!(
        unnamed.is_empty(),
        "ARCHITECTURE.md does not name these crates (add each to the code map):\n  {}",
        unnamed.join("\n  ")
    );
}

/// The text of a Markdown document without its fenced code blocks.
fn without_fences(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Inline code spans (between single backticks) and link targets of Markdown text.
fn cited(text: &str) -> Vec<String> {
    let mut cited: Vec<String> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    let mut rest = text;
    while let Some(start) = rest.find("](") {
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                let target = &after[..end];
                cited.push(target.split('#').next().unwrap_or(target).to_string());
                rest = &after[end..];
            }
            None => break,
        }
    }
    cited
}

/// The repository path a citation names, if it looks like one: relative, with a `/`, no
/// placeholders or globs, and either a file of a kind the map cites (`.rs`, `.md`, `.toml`,
/// `.proto`), a folder (a trailing `/`), or a path under one of the repository's top folders.
fn as_repo_path(citation: &str, root: &Path) -> Option<String> {
    let path = citation.trim().trim_start_matches("./");
    if path.contains("://")
        || !path.contains('/')
        || path.starts_with('/')
        || path.starts_with('~')
        || path
            .chars()
            .any(|c| c.is_whitespace() || "<>*|(){}[]$:,;'\"".contains(c))
    {
        return None;
    }
    let file_kind = [".rs", ".md", ".toml", ".proto"]
        .iter()
        .any(|ext| path.ends_with(ext));
    let first = path.split('/').next().unwrap_or_default();
    let under_top_folder = !first.is_empty() && root.join(first).is_dir();
    (file_kind || path.ends_with('/') || under_top_folder).then(|| path.to_string())
}

#[test]
fn architecture_cites_only_existing_paths() {
    let root = root();
    let map = read(&root.join("ARCHITECTURE.md"));
    let text = without_fences(&map);
    let mut paths: Vec<String> = cited(&text)
        .iter()
        .filter_map(|citation| as_repo_path(citation, &root))
        .collect();
    // Documents named anywhere in the prose (`THREATS.md`, `README.md`) are at the root.
    for word in text.split(|c: char| !(c.is_alphanumeric() || "._-/".contains(c))) {
        let word = word.trim_end_matches('.');
        if word.ends_with(".md") && !word.contains('/') && word.len() > 3 {
            paths.push(word.to_string());
        }
    }
    paths.sort();
    paths.dedup();
    assert!(!paths.is_empty(), "ARCHITECTURE.md cites no path at all");
    let dangling: Vec<&String> = paths
        .iter()
        .filter(|path| !root.join(path.as_str()).exists())
        .collect();
    assert!(
        dangling.is_empty(),
        "ARCHITECTURE.md cites paths that do not exist in the repository:\n  {}",
        dangling
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn path_citations_are_recognized() {
    let root = root();
    for path in [
        "crates/sandbox-sql/src/guard.rs",
        "crates/sandbox-wasm/tests/guests/",
        "tests/adversary",
        ".ci/run",
        "proto/sandbox/v1/audit.proto",
    ] {
        assert_eq!(as_repo_path(path, &root).as_deref(), Some(path), "{path}");
    }
    for not_a_path in [
        "//!",
        "/metrics",
        "<data-dir>/audit/journal.log",
        "crates/*/tests/",
        "sandbox_release::release",
        "tonic/prost",
        "https://example.org/a.md",
        "audit tail|checkpoint",
    ] {
        assert_eq!(as_repo_path(not_a_path, &root), None, "{not_a_path}");
    }
    assert!(opens_with_crate_docs("//! A crate.\n"));
    assert!(!opens_with_crate_docs("//!\n//! A crate.\n"));
    assert!(!opens_with_crate_docs("use std::fs;\n"));
    assert_eq!(
        cited("see `a/b.rs` and [x](c/d.md#part)"),
        vec!["a/b.rs".to_string(), "c/d.md".to_string()]
    );
}
