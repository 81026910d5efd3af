//! Every example in `examples/` checks clean; every file in `examples/invalid/`
//! breaks a contract (or the syntax) and its error message is snapshot-tested.

use std::path::{Path, PathBuf};

fn kir_files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "kir"))
        .collect();
    files.sort();
    files
}

fn relative(p: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Loads and checks `path`, returning the trace or the error text with its exit code.
fn check_file(path: &Path) -> Result<String, (i32, String)> {
    let model = kiln::Model::load(relative(path)).map_err(|e| (e.exit_code(), e.to_string()))?;
    model
        .shape_trace()
        .map_err(|e| (e.exit_code(), e.to_string()))
}

#[test]
fn valid_examples_check_clean_and_round_trip() {
    let files = kir_files("examples");
    assert!(
        files.len() >= 8,
        "expected at least 8 examples, found {}",
        files.len()
    );
    for f in files {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("example")
            .to_string();
        let trace = check_file(&f).unwrap_or_else(|(_, e)| panic!("{}: {e}", f.display()));
        let model = kiln::Model::load(relative(&f)).unwrap();
        let text = model.to_text();
        let again = kiln::Model::from_text(&text, "printed").unwrap();
        assert_eq!(
            again.module(),
            model.module(),
            "{}: print/parse round trip",
            f.display()
        );
        assert_eq!(again.to_text(), text);
        insta::assert_snapshot!(format!("trace_{name}"), trace);
        insta::assert_snapshot!(format!("ir_{name}"), text);
    }
}

#[test]
fn invalid_examples_fail_with_their_snapshot_message() {
    let files = kir_files("examples/invalid");
    assert!(
        files.len() >= 12,
        "expected at least 12 invalid examples, found {}",
        files.len()
    );
    for f in files {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("invalid")
            .to_string();
        let (code, msg) = match check_file(&f) {
            Ok(_) => panic!("{} should violate a contract but checks clean", f.display()),
            Err(e) => e,
        };
        insta::assert_snapshot!(
            format!("invalid_{name}"),
            format!("exit code {code}\n{msg}")
        );
    }
}
