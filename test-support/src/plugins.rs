//! The plugin components for tests and benchmarks: builds the `plugins/` workspace once per
//! process with the same command as `.ci/test` (a no-op when up to date).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

static BUILD: Once = Once::new();

/// `plugins/target/wasm32-wasip2/release/<name>.wasm` for a plugin folder or crate name
/// (`priority-router` or `priority_router`).
pub fn plugin(name: &str) -> PathBuf {
    let root = crate::repo_root();
    BUILD.call_once(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--manifest-path",
                "plugins/Cargo.toml",
                "--target",
                "wasm32-wasip2",
                "--release",
            ])
            .current_dir(&root)
            // The plugins workspace has its own target dir, target and flags.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building plugins/ failed");
    });
    let path = root
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "{} missing", path.display());
    path
}
