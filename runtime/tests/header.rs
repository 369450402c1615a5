//! `runtime/include/kosmos_rt.h` is what cbindgen generates from `src/ffi.rs`,
//! `src/ffi/engine.rs`, `src/ffi/score.rs` and `src/ffi/tokenizer.rs` now.

use std::path::Path;

#[test]
fn c_header_is_current() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi.rs"))
        .with_src(crate_dir.join("src/ffi/engine.rs"))
        .with_src(crate_dir.join("src/ffi/score.rs"))
        .with_src(crate_dir.join("src/ffi/tokenizer.rs"))
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = crate_dir.join("include/kosmos_rt.h");
    if std::env::var_os("KOSMOS_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate with KOSMOS_BLESS=1 cargo test -p kosmos-rt --test header",
        path.display()
    );
}
