//! The `kiln` command line: exit codes, streams and help, run as a user would.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the kiln binary runs")
}

/// Runs kiln and checks its exit code; returns (stdout, stderr).
fn check_run(args: &[&str], code: i32) -> (String, String) {
    let out = kiln(args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "kiln {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

#[test]
fn every_subcommand_has_help() {
    let (top, _) = check_run(&["--help"], 0);
    for sub in ["check", "ir", "demo"] {
        assert!(top.contains(sub), "{top}");
        let (help, _) = check_run(&[sub, "--help"], 0);
        assert!(help.contains("Usage: kiln"), "{help}");
    }
}

#[test]
fn demo_checks_the_builtin_model() {
    let (out, err) = check_run(&["demo"], 0);
    assert!(out.contains("all shape contracts hold"), "{out}");
    assert!(out.contains("| %logits"), "{out}");
    assert!(err.is_empty(), "{err}");
    // The passes, the compile time and the generation's speed on the CPU.
    for line in [
        "optimized with -O2:",
        "  attention-fusion: fused 2 attention patterns",
        "lowered and compiled for the CPU in ",
        "  greedy generation with the KV cache, batch 2: 64 tokens in ",
        "then 62 tokens in ",
    ] {
        assert!(out.contains(line), "`{line}` in:\n{out}");
    }
    assert!(out.contains(" tokens/s)"), "{out}");
    // The interpreter's tokens.
    let first = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("  first tokens: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("first tokens in:\n{out}"))
    };
    let (interp, _) = check_run(&["demo", "--backend", "interp"], 0);
    assert_eq!(first(&out), first(&interp));
}

#[test]
fn check_prints_the_shape_trace_on_success() {
    let (out, _) = check_run(&["check", "examples/encoder_block_preln.kir"], 0);
    assert!(out.contains("| node"), "{out}");
    assert!(out.contains("f32[B, h, T, T]"), "{out}");
}

#[test]
fn contract_violation_exits_1_with_the_message_on_stderr() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.kir");
    std::fs::write(
        &bad,
        "func @f(%x: f32[B, T, d]) -> f32[B, T, d] where d = 768 {\n  param @w: f32[512, 768]\n  %y = matmul(%x, @w) : f32[B, T, 768]\n  return %y\n}\n",
    )
    .unwrap();
    let (out, err) = check_run(&["check", bad.to_str().unwrap()], 1);
    assert!(out.is_empty(), "{out}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("%y = matmul(%x, @w): inner dims differ: d=768 vs 512"),
        "{err}"
    );
    assert!(err.contains("line 3, column 3"), "{err}");
    let garbled = dir.join("garbled.kir");
    std::fs::write(
        &garbled,
        "func @f(%x: f32[B]) -> f32[B] {\n  %y = exp(%x)\n  return %y\n}\n",
    )
    .unwrap();
    let (_, err) = check_run(&["check", garbled.to_str().unwrap()], 2);
    assert!(
        err.contains("garbled.kir:3:3: expected `: <result type>` after `exp(...)`"),
        "{err}"
    );
    let binary = dir.join("binary.kir");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let (_, err) = check_run(&["check", binary.to_str().unwrap()], 2);
    assert!(err.contains("not UTF-8"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_input_exits_2() {
    let (_, err) = check_run(&["check", "no/such/file.kir"], 2);
    assert!(err.contains("cannot read no/such/file.kir"), "{err}");
    let (_, err) = check_run(&["ir", "examples"], 2);
    assert!(err.contains("is a directory"), "{err}");
}

#[test]
fn ir_prints_canonical_text_and_dot() {
    let (text, _) = check_run(&["ir", "examples/encoder_block_preln.kir"], 0);
    assert!(
        text.starts_with("func @encoder_block(%x: f32[B, T, d]) -> (y: f32[B, T, d])"),
        "{text}"
    );
    let (dot, _) = check_run(
        &["ir", "-O0", "--dot", "examples/encoder_block_preln.kir"],
        0,
    );
    assert!(dot.starts_with("digraph \"encoder_block\" {"), "{dot}");
    assert!(dot.contains("[label=\"f32[B, h, T, T]\""), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}
