//! Cross-crate end-to-end tests (checkpoint → package → runtime) live in this crate's test files;
//! this library only locates the workspace for them.

use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}
