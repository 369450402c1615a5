//! Images of a request: `data:` URLs (base64), `file://` URLs under `--allow-file-root`, or
//! `http(s)://` URLs with `--allow-remote-images`; decoded with the server's limits (bytes,
//! pixels per side) and CLIP-preprocessed.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// How `http(s)://` URLs are fetched; `None` refuses them.
    pub remote: Option<RemoteImages>,
}

/// Downloading `http(s)://` image URLs (vLLM fetches them; OpenAI's API takes them).
#[derive(Clone, Debug)]
pub struct RemoteImages {
    /// Host names URLs and their redirects may name (exact, lower case); empty: any.
    pub allowed_domains: Vec<String>,
    /// For one image's whole download, redirects included.
    pub timeout: Duration,
    agent: ureq::Agent,
}

/// Redirects followed per image (each one's host checked like the URL's).
const MAX_REDIRECTS: usize = 5;

impl RemoteImages {
    /// Through the proxy HTTPS_PROXY / HTTP_PROXY / ALL_PROXY name (NO_PROXY honoured), if any.
    pub fn new(allowed_domains: Vec<String>, timeout: Duration) -> Self {
        Self::with_proxy(allowed_domains, timeout, ureq::Proxy::try_from_env())
    }

    fn with_proxy(allowed_domains: Vec<String>, timeout: Duration, proxy: Option<ureq::Proxy>) -> Self {
        let agent = ureq::Agent::config_builder()
            .proxy(proxy)
            .timeout_global(Some(timeout))
            // Followed here, so that each hop's host is checked against the allowed ones.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .http_status_as_error(false)
            .user_agent(concat!("kosmos-rt/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        RemoteImages {
            allowed_domains: allowed_domains
                .iter()
                .map(|d| d.trim().to_ascii_lowercase())
                .collect(),
            timeout,
            agent,
        }
    }

    /// The image at `url` (http or https), at most `max_bytes`.
    fn fetch(&self, url: &str, max_bytes: usize, what: &str) -> Result<Vec<u8>, ApiError> {
        let bad = |m: String| ApiError::invalid(format!("{what}: {m}"), "messages");
        let deadline = Instant::now() + self.timeout;
        let mut current = url.to_owned();
        for _ in 0..=MAX_REDIRECTS {
            let uri: ureq::http::Uri = current
                .parse()
                .map_err(|e| bad(format!("'{current}' is not a valid URL ({e})")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) {
                return Err(bad(format!("'{current}' is not an http(s) URL")));
            }
            let host = uri.host().unwrap_or_default().to_ascii_lowercase();
            if !self.allowed_domains.is_empty() && !self.allowed_domains.contains(&host) {
                return Err(ApiError::forbidden(format!(
                    "{what}: host '{host}' is not one of --allowed-media-domains ({})",
                    self.allowed_domains.join(", ")
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timed_out = || {
                bad(format!(
                    "downloading {url} took over {:.1} s (--image-fetch-timeout)",
                    self.timeout.as_secs_f64()
                ))
            };
            if left.is_zero() {
                return Err(timed_out());
            }
            let failed = |e: ureq::Error| match e {
                ureq::Error::Timeout(_) => timed_out(),
                ureq::Error::BodyExceedsLimit(_) => too_big(what, max_bytes + 1, max_bytes),
                e => bad(format!("cannot download {current}: {e}")),
            };
            let mut resp = self
                .agent
                .get(&current)
                .config()
                .timeout_global(Some(left))
                .build()
                .call()
                .map_err(failed)?;
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| bad(format!("{current} redirects (HTTP {status}) without a Location")))?;
                current = resolve_location(&uri, location);
                continue;
            }
            if !status.is_success() {
                return Err(bad(format!("{current} answered HTTP {status}")));
            }
            let declared = resp
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
            if let Some(len) = declared.filter(|&l| l > max_bytes) {
                return Err(too_big(what, len, max_bytes));
            }
            return resp
                .body_mut()
                .with_config()
                .limit(max_bytes as u64)
                .read_to_vec()
                .map_err(failed);
        }
        Err(bad(format!("{url}: more than {MAX_REDIRECTS} redirects")))
    }
}

/// A redirect's `Location` against the URL that gave it (absolute, `//host/…`, `/path` or a
/// relative path).
fn resolve_location(base: &ureq::http::Uri, location: &str) -> String {
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{scheme}://{authority}{dir}{location}")
    }
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
    if matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return match &policy.remote {
            Some(remote) => remote.fetch(url, policy.max_bytes, &what),
            None => Err(ApiError::invalid(
                format!(
                    "{what}: '{scheme}:' image URLs are refused: the server makes no network requests unless started with --allow-remote-images (and --allowed-media-domains to name the hosts); or send the image inline as a data: URL"
                ),
                "messages",
            )),
        };
    }
    Err(ApiError::invalid(
        format!("{what}: '{scheme}:' image URLs are not supported; send the image as a data: URL"),
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
            remote: None,
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
                .contains("--allow-remote-images")
        );
        assert!(
            fetch("file:///etc/passwd", &policy, 0)
                .unwrap_err()
                .message
                .contains("--allow-file-root")
        );
    }

    /// A local HTTP server: `/img` the bytes, `/moved` → `img` (relative), `/abs` → `/img`,
    /// `/loop` → itself, `/away` → `http://localhost:<port>/img`, `/big` 100 bytes without a
    /// length, `/slow` after 3 s, anything else 404.
    fn http_server() -> u16 {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    let n = conn.read(&mut buf).unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let redirect = |to: &str| {
                        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .into_bytes()
                    };
                    let answer = match path.as_str() {
                        "/img" => {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec()
                        }
                        "/moved" => redirect("img"),
                        "/abs" => redirect("/img"),
                        "/loop" => redirect("/loop"),
                        "/away" => redirect(&format!("http://localhost:{port}/img")),
                        "/big" => {
                            let mut v = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                            v.extend([b'x'; 100]);
                            v
                        }
                        "/slow" => {
                            std::thread::sleep(Duration::from_secs(3));
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello".to_vec()
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = conn.write_all(&answer);
                });
            }
        });
        port
    }

    #[test]
    fn remote_urls_are_fetched_within_the_limits() {
        let port = http_server();
        let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
        let policy = |domains: &[&str]| ImagePolicy {
            max_bytes: 10,
            max_side: 64,
            file_root: None,
            // Straight to the local server whatever proxy the environment names.
            remote: Some(RemoteImages::with_proxy(
                domains.iter().map(|d| d.to_string()).collect(),
                Duration::from_secs(1),
                None,
            )),
        };
        let any = policy(&[]);
        for p in ["/img", "/moved", "/abs"] {
            assert_eq!(fetch(&url(p), &any, 0).unwrap(), b"hello", "{p}");
        }
        let err = |p: &str, policy: &ImagePolicy| fetch(&url(p), policy, 0).unwrap_err();
        assert!(err("/loop", &any).message.contains("more than 5 redirects"));
        assert_eq!(err("/big", &any).status, 413);
        let e = err("/missing", &any);
        assert!(
            e.message.contains("HTTP 404") && e.message.starts_with("image 1"),
            "{}",
            e.message
        );
        let e = err("/slow", &any);
        assert!(e.message.contains("--image-fetch-timeout"), "{}", e.message);
        // Each host, redirects' included, must be allowed.
        let local = policy(&["127.0.0.1"]);
        assert_eq!(fetch(&url("/img"), &local, 0).unwrap(), b"hello");
        let e = err("/away", &local);
        assert_eq!(e.status, 403);
        assert!(e.message.contains("host 'localhost'"), "{}", e.message);
        assert_eq!(err("/img", &policy(&["images.example.com"])).status, 403);
    }

    #[test]
    fn redirect_locations_resolve_against_their_url() {
        let base: ureq::http::Uri = "https://h.example:8443/a/b/c.png?x=1".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "d.png"),
            "https://h.example:8443/a/b/d.png"
        );
        assert_eq!(resolve_location(&base, "/e.png"), "https://h.example:8443/e.png");
        assert_eq!(
            resolve_location(&base, "//cdn.example/f.png"),
            "https://cdn.example/f.png"
        );
        assert_eq!(
            resolve_location(&base, "http://g.example/g.png"),
            "http://g.example/g.png"
        );
    }
}
