//! `kosmos_rt.json`: written and read back, the optional `quantization` section, and a bad one
//! named.

use kosmos_models::KosmosConfig;
use kosmos_models::package::{KvCacheLayout, MANIFEST_FILE, PackageDtype, PackageManifest, Quantization};

fn manifest() -> PackageManifest {
    PackageManifest::new(
        &KosmosConfig::tiny(),
        "portable",
        PackageDtype::Fp32,
        KvCacheLayout::Buffer,
        true,
        17,
        "test",
    )
}

fn load(m: &PackageManifest) -> kosmos_models::Result<PackageManifest> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(MANIFEST_FILE), m.to_json()).unwrap();
    PackageManifest::load(dir.path())
}

#[test]
fn quantization_is_optional_and_round_trips() {
    let plain = manifest();
    // Packages without quantisation do not mention it, so older readers still take them.
    assert!(!plain.to_json().contains("quantization"));
    assert_eq!(load(&plain).unwrap().quantization, None);
    let mut q = manifest();
    q.quantization = Some(Quantization {
        bits: 4,
        block_size: 32,
        accuracy_level: 4,
    });
    assert_eq!(load(&q).unwrap(), q);
}

#[test]
fn a_bad_quantization_is_named() {
    for (bits, block_size, accuracy_level, want) in [
        (3, 32, 4, "quantization: 3 bits (available: 4, 8)"),
        (8, 24, 4, "quantization: block size 24"),
        (4, 32, 9, "quantization: accuracy level 9"),
    ] {
        let mut m = manifest();
        m.quantization = Some(Quantization {
            bits,
            block_size,
            accuracy_level,
        });
        let e = load(&m).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains(MANIFEST_FILE), "{e}");
    }
}
