//! Bad input through the command line: every case gets a clear error or a
//! bounded answer; none panics, aborts or runs without bound (issue 9's
//! catalogue, one test per class as it is fixed).

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the kiln binary runs")
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Exit code, stdout, stderr; panics (the test fails) on a Rust panic or a
/// signal.
fn outcome(args: &[&str]) -> (i32, String, String) {
    let out = kiln(args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("kiln {args:?} was killed by a signal\n{stderr}"));
    assert!(
        !stderr.contains("panicked at"),
        "kiln {args:?} panicked:\n{stderr}"
    );
    (code, stdout, stderr)
}

#[test]
fn names_of_any_length_print_a_bounded_shape_trace() {
    // A value and an output name of 70,000 characters each: the shape-trace
    // table used a format width, which must fit 16 bits, and panicked.
    let dir = scratch("long-names");
    let long = "v".repeat(70_000);
    let out_name = "o".repeat(70_000);
    let src = format!(
        "func @f(%x: f32[B, 4]) -> ({out_name}: f32[B, 4]) {{\n  %{long} = relu(%x) : f32[B, 4]\n  return %{long}\n}}\n"
    );
    let file = dir.join("long.kir");
    std::fs::write(&file, src).unwrap();
    let (code, stdout, stderr) = outcome(&["check", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains('…'),
        "long cells are shortened: {}",
        &stdout[..stdout.len().min(2000)]
    );
    // The table's lines stay bounded (the signature line above it echoes
    // the names as written).
    for line in stdout.lines().filter(|l| l.starts_with('|')) {
        assert!(
            line.chars().count() < 1_000,
            "a table line of {} characters",
            line.len()
        );
    }
}
