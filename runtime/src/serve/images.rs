//! Images of a request: `data:` URLs (base64), or `file://` URLs under `--allow-file-root`;
//! decoded with the server's limits (bytes, pixels per side) and CLIP-preprocessed.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use kosmos_models::image::{ImageLimits, clip_preprocess, decode_image};

use super::error::ApiError;

/// What a request's images may be.
#[derive(Clone, Debug)]
pub struct ImagePolicy {
    /// Encoded bytes of one image.
    pub max_bytes: usize,
    /// Pixels per side, checked from the header before decoding (decompression bombs).
    pub max_side: u32,
    /// Canonical directory `file://` URLs may read from; `None` refuses them.
    pub file_root: Option<PathBuf>,
}

/// The encoded bytes behind an image URL.
pub fn fetch(url: &str, policy: &ImagePolicy, index: usize) -> Result<Vec<u8>, ApiError> {
    let what = format!("image {}", index + 1);
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(ApiError::invalid(
                format!("{what}: a data: URL needs a ',' before its payload"),
                "messages",
            ));
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::invalid(
                format!("{what}: only base64 data: URLs are accepted (data:image/png;base64,...)"),
                "messages",
            ));
        }
        // base64 inflates by 4/3; refuse before decoding anything bigger than the limit.
        if payload.len() / 4 * 3 > policy.max_bytes + 3 {
            return Err(too_big(&what, payload.len() / 4 * 3, policy.max_bytes));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| {
                ApiError::invalid(
                    format!("{what}: invalid base64 in the data: URL ({e})"),
                    "messages",
                )
            })?;
        if bytes.len() > policy.max_bytes {
            return Err(too_big(&what, bytes.len(), policy.max_bytes));
        }
        return Ok(bytes);
    }
    if let Some(path) = url.strip_prefix("file://") {
        let Some(root) = &policy.file_root else {
            return Err(ApiError::invalid(
                format!(
                    "{what}: file:// URLs are refused; start the server with --allow-file-root DIR to allow files under DIR"
                ),
                "messages",
            ));
        };
        let path =
            resolve_under(root, Path::new(path)).map_err(|m| ApiError::forbidden(format!("{what}: {m}")))?;
        let len = std::fs::metadata(&path)
            .map_err(|e| {
                ApiError::invalid(format!("{what}: cannot read {}: {e}", path.display()), "messages")
            })?
            .len();
        if len as usize > policy.max_bytes {
            return Err(too_big(&what, len as usize, policy.max_bytes));
        }
        return std::fs::read(&path).map_err(|e| {
            ApiError::invalid(format!("{what}: cannot read {}: {e}", path.display()), "messages")
        });
    }
    let scheme = url.split(':').next().unwrap_or_default();
    Err(ApiError::invalid(
        format!(
            "{what}: '{scheme}:' image URLs are refused (the server makes no network requests); send the image inline as a data: URL"
        ),
        "messages",
    ))
}

fn too_big(what: &str, bytes: usize, limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "{what}: {bytes} bytes exceeds the limit of {limit} bytes per image"
    ))
}

/// `path` if it lies under `root` (canonical) after resolving symlinks; no `..` components.
fn resolve_under(root: &Path, path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("file URL path {} is not absolute", path.display()));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("file URL path {} contains '..'", path.display()));
    }
    let real = path
        .canonicalize()
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if !real.starts_with(root) {
        return Err(format!(
            "{} is outside the allowed file root {}",
            path.display(),
            root.display()
        ));
    }
    Ok(real)
}

/// Decode and CLIP-preprocess one image to `size`x`size`.
pub fn preprocess(bytes: &[u8], index: usize, size: u32, policy: &ImagePolicy) -> Result<Vec<f32>, ApiError> {
    let limits = ImageLimits {
        max_side: policy.max_side,
        max_bytes: (policy.max_side as u64).pow(2) * 4,
    };
    let rgb = decode_image(bytes, &format!("image {}", index + 1), limits)
        .map_err(|e| ApiError::invalid(e.to_string(), "messages"))?;
    Ok(clip_preprocess(&rgb, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve_under(&root, &root.join("a.png")).is_ok());
        let up = format!("{}/../secret", root.display());
        assert!(resolve_under(&root, Path::new(&up)).unwrap_err().contains(".."));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
            let e = resolve_under(&root, &root.join("link")).unwrap_err();
            assert!(e.contains("outside the allowed file root"), "{e}");
        }
        assert!(
            resolve_under(&root, Path::new("a.png"))
                .unwrap_err()
                .contains("not absolute")
        );
    }

    #[test]
    fn data_urls_are_checked() {
        let policy = ImagePolicy {
            max_bytes: 10,
            max_side: 64,
            file_root: None,
        };
        assert_eq!(
            fetch("data:image/png;base64,aGVsbG8=", &policy, 0).unwrap(),
            b"hello"
        );
        assert!(
            fetch("data:image/png;base64,@@@", &policy, 0)
                .unwrap_err()
                .message
                .contains("invalid base64")
        );
        assert!(
            fetch("data:image/png,abc", &policy, 0)
                .unwrap_err()
                .message
                .contains("base64")
        );
        assert_eq!(
            fetch("data:image/png;base64,aGVsbG8gd29ybGQgaGVsbG8=", &policy, 0)
                .unwrap_err()
                .status,
            413
        );
        assert!(
            fetch("https://example.com/a.png", &policy, 0)
                .unwrap_err()
                .message
                .contains("no network")
        );
        assert!(
            fetch("file:///etc/passwd", &policy, 0)
                .unwrap_err()
                .message
                .contains("--allow-file-root")
        );
    }
}
