//! The matcher against Python's validators (scripts/oracles/structured_check.py): JSON Schema
//! outputs must be JSON the `jsonschema` package accepts, the schema's listed instances must be
//! accepted, and regular expressions must accept exactly what `re.fullmatch` matches.

use std::path::{Path, PathBuf};
use std::process::Command;

use kosmos_grammar::{Constraint, Json};
use serde_json::{Value, json};

fn venv_python() -> PathBuf {
    let venv =
        std::env::var("KOSMOS_VENV").unwrap_or_else(|_| format!("{}/../.venv", env!("CARGO_MANIFEST_DIR")));
    let py = Path::new(&venv).join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup.sh", py.display());
    py
}

fn oracle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/oracles/structured_check.py")
}

fn accepted(c: &Constraint, candidates: &[Value]) -> Result<Vec<bool>, String> {
    let g = c.compile().map_err(|e| e.to_string())?;
    Ok(candidates
        .iter()
        .map(|t| Constraint::matches(&g, t.as_str().expect("a string")))
        .collect())
}

#[test]
fn schemas_and_patterns_agree_with_jsonschema_and_re() {
    let out = Command::new(venv_python())
        .arg(oracle())
        .arg("cases")
        .output()
        .expect("run the oracle");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut cases: Value = serde_json::from_slice(&out.stdout).expect("cases JSON");
    // The schemas again with their keys in order (properties are generated in schema order).
    let ordered = Json::parse(&String::from_utf8_lossy(&out.stdout)).expect("cases JSON");
    let Some(Json::Array(schemas)) = ordered.get("schemas") else {
        panic!("schemas")
    };
    let mut total = 0;
    for (case, ordered) in cases["schemas"]
        .as_array_mut()
        .expect("schemas")
        .iter_mut()
        .zip(schemas)
    {
        let schema = ordered.get("schema").expect("schema").clone();
        let candidates = case["candidates"].as_array().expect("candidates").clone();
        total += candidates.len();
        match accepted(&Constraint::JsonSchema(schema), &candidates) {
            Ok(a) => case["accepted"] = json!(a),
            Err(e) => case["error"] = json!(e),
        }
    }
    for case in cases["patterns"].as_array_mut().expect("patterns") {
        let pattern = case["pattern"].as_str().expect("pattern").to_string();
        let candidates = case["candidates"].as_array().expect("candidates").clone();
        total += candidates.len();
        let a = accepted(&Constraint::Regex(pattern.clone()), &candidates)
            .unwrap_or_else(|e| panic!("{pattern}: {e}"));
        case["accepted"] = json!(a);
    }
    assert!(total > 10_000, "{total} candidates");
    let dir = tempfile::tempdir().expect("tempdir");
    let results = dir.path().join("results.json");
    std::fs::write(&results, serde_json::to_vec(&cases).expect("json")).expect("write results");
    let out = Command::new(venv_python())
        .arg(oracle())
        .arg("judge")
        .arg(&results)
        .output()
        .expect("run the judge");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&report).expect("report");
    // Both sides of every check were exercised.
    for key in ["schema_accepted", "pattern_matches"] {
        assert!(report[key].as_u64().unwrap_or(0) > 1000, "{report}");
    }
}
