//! The README's examples are files that build: every ```` ```rust ```` block of
//! `sdk/README.md` is preceded by the file it belongs to (`` `src/lib.rs`: ``); this test
//! writes those files into crates in a temp dir (the `asya-sdk` git dependency of the
//! README's `Cargo.toml` becomes a path to this checkout), runs their native tests and
//! builds them for `wasm32-wasip2` with the README's release profile. Every ```` ```toml ````
//! block must parse. The rendered docs (`cargo doc -p asya-sdk`) must build without a
//! warning.
//!
//! Build cost: the crates share `plugins/target` and `plugins/Cargo.lock`, so the SDK's
//! dependencies built for the shipped plugins are reused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fenced block: its language and the file it is labelled with, if any.
struct Block {
    lang: String,
    file: Option<String>,
    code: String,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut last_text = "";
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let lang = info.split(',').next().unwrap_or("").trim().to_owned();
            let file = last_text
                .strip_prefix('`')
                .and_then(|l| l.strip_suffix("`:"))
                .map(str::to_owned);
            let mut code = String::new();
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            out.push(Block { lang, file, code });
            last_text = "";
        } else if !line.trim().is_empty() {
            last_text = line.trim();
        }
    }
    out
}

fn cargo(dir: &Path, args: &[&str]) {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(dir)
        // Shared with the plugins workspace (its target, its flags: none).
        .env("CARGO_TARGET_DIR", repo().join("plugins/target"))
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTDOCFLAGS")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {} in {} failed:\n{}{}",
        args.join(" "),
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn readme_examples_build_as_files() {
    let readme = std::fs::read_to_string(repo().join("sdk/README.md")).unwrap();
    let blocks = blocks(&readme);
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for b in &blocks {
        match (b.lang.as_str(), &b.file) {
            ("toml", _) => {
                if let Err(e) = b.code.parse::<toml::Table>() {
                    panic!(
                        "a toml block of sdk/README.md does not parse: {e}\n{}",
                        b.code
                    );
                }
            }
            ("rust", None) => panic!(
                "every rust block of sdk/README.md must name its file on the line before \
                 (`src/lib.rs`:), this one does not:\n{}",
                b.code
            ),
            _ => {}
        }
        if let Some(f) = &b.file {
            files.insert(f.clone(), b.code.clone());
        }
    }
    let manifest = files
        .get("Cargo.toml")
        .expect("sdk/README.md labels a `Cargo.toml`")
        .clone();
    assert!(
        manifest.contains("asya-sdk = { git = "),
        "the README's Cargo.toml shows the git dependency"
    );
    let sdk = repo().join("sdk").canonicalize().unwrap();
    let local_manifest: String = manifest
        .lines()
        .map(|l| {
            if l.starts_with("asya-sdk = ") {
                format!("asya-sdk = {{ path = {:?} }}", sdk.display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        files.contains_key("src/lib.rs"),
        "the README shows src/lib.rs"
    );

    let tmp = tempfile::tempdir().unwrap();
    // Each crate: the root (`src/...`) and every `DIR/src/...` (it gets the README's
    // Cargo.toml under its own name unless the README shows `DIR/Cargo.toml`).
    let mut crates: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (file, code) in &files {
        let path = tmp.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let code = if file == "Cargo.toml" {
            local_manifest.clone()
        } else {
            code.clone()
        };
        std::fs::write(&path, code).unwrap();
        let dir = match file.split_once("src/") {
            Some((dir, _)) => dir.trim_end_matches('/').to_owned(),
            None => continue,
        };
        crates.insert(tmp.path().join(&dir), dir);
    }
    assert_eq!(crates.len(), 2, "a policy crate and a transport crate");
    let original_name = "name = \"vip-router\"";
    assert!(local_manifest.contains(original_name));
    for (dir, name) in &crates {
        if !dir.join("Cargo.toml").exists() {
            let m = local_manifest.replace(original_name, &format!("name = {name:?}"));
            std::fs::write(dir.join("Cargo.toml"), m).unwrap();
        }
        std::fs::copy(repo().join("plugins/Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        cargo(dir, &["test", "--quiet"]);
        cargo(
            dir,
            &["build", "--quiet", "--release", "--target", "wasm32-wasip2"],
        );
        let crate_name = if name.is_empty() { "vip-router" } else { name };
        let wasm = repo()
            .join("plugins/target/wasm32-wasip2/release")
            .join(format!("{}.wasm", crate_name.replace('-', "_")));
        assert!(wasm.is_file(), "{} was not built", wasm.display());
    }
}

#[test]
fn rendered_docs_build_without_warnings() {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["doc", "--quiet", "-p", "asya-sdk", "--no-deps"])
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", repo().join("plugins/target"))
        .env("RUSTDOCFLAGS", "-D warnings")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo doc -p asya-sdk failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(repo()
        .join("plugins/target/doc/asya_sdk/index.html")
        .is_file());
}
