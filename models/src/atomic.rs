//! Atomic writes: a file or a whole directory appears complete or not at all.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{ModelsError, Result};

/// Sibling temp path of `path` (same directory, so the final rename stays on one filesystem).
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Write `bytes` to `path` through a temp file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = fs::File::create(tmp).map_err(|e| ModelsError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| ModelsError::io(tmp, e))?;
        Ok(())
    })
}

/// Let `write` fill a temp file, then fsync it and rename it onto `path`. On error the temp file
/// is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(path, "tmp");
    let result = write(&tmp).and_then(|()| {
        // Some writers create their file 0600; outputs are meant to be shared like any other file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
                .map_err(|e| ModelsError::io(&tmp, e))?;
        }
        let f = fs::File::open(&tmp).map_err(|e| ModelsError::io(&tmp, e))?;
        f.sync_all().map_err(|e| ModelsError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| ModelsError::io(path, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A directory built under a temp name beside its target and moved into place by [`commit`].
/// Dropped without `commit`, it removes itself, so a failure leaves no half-written output.
///
/// [`commit`]: StagedDir::commit
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Refuses an existing non-empty `target` unless `overwrite`.
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        if target.exists() && !overwrite && !is_empty_dir(target) {
            return Err(ModelsError::OutputExists {
                path: target.to_path_buf(),
            });
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| ModelsError::io(parent, e))?;
        }
        let staging = sibling(target, "partial");
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| ModelsError::io(&staging, e))?;
        }
        fs::create_dir(&staging).map_err(|e| ModelsError::io(&staging, e))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Move the finished directory into place. An existing target is moved aside first and removed
    /// only after the new one is in place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let old = sibling(&self.target, "old");
        let had_old = self.target.exists();
        if had_old {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| ModelsError::io(&old, e))?;
            }
            fs::rename(&self.target, &old).map_err(|e| ModelsError::io(&self.target, e))?;
        }
        if let Err(e) = fs::rename(&self.staging, &self.target) {
            if had_old {
                let _ = fs::rename(&old, &self.target);
            }
            return Err(ModelsError::io(&self.target, e));
        }
        self.committed = true;
        if had_old {
            fs::remove_dir_all(&old).map_err(|e| ModelsError::io(&old, e))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path)
        .map(|mut it| it.next().is_none())
        .unwrap_or(false)
}
