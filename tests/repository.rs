//! Repository contracts that CI relies on: the two README commands, CI calling the test script,
//! and the pins that keep libtorch at the version tch 0.24 links.

use kosmos_e2e::workspace_root;

fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn ci_runs_the_test_script_and_nothing_else() {
    let ci = read(".ci/run");
    let commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("set ") && !l.starts_with("cd "))
        .collect();
    assert_eq!(commands, vec!["exec scripts/test.sh"], "{ci}");
}

#[test]
fn readme_set_up_is_the_two_scripts() {
    let readme = read("README.md");
    assert!(readme.contains("scripts/quickstart.sh") && readme.contains("scripts/test.sh"));
    for script in ["scripts/quickstart.sh", "scripts/test.sh"] {
        assert!(
            read(script).contains("scripts/setup.sh"),
            "{script} sets itself up"
        );
    }
}

#[test]
fn torch_is_pinned_with_torchvision_for_tch() {
    let pins = read("scripts/constraints.txt");
    assert!(
        pins.lines().any(|l| l.trim() == "torch==2.11.0"),
        "tch 0.24 links libtorch 2.11.0"
    );
    assert!(pins.lines().any(|l| l.trim() == "torchvision==0.26.0"));
    assert!(pins.lines().any(|l| l.trim() == "onnxruntime==1.31.1"));
    let cargo = read("Cargo.toml");
    assert!(cargo.contains("tch = \"=0.24.0\""));
}
