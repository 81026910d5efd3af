//! The CPU backend's kernels read and write raw memory; valgrind's memcheck
//! watches every access of a whole `kiln run` and `kiln generate` of each
//! family and must find nothing (no read or write outside an allocation, no
//! use of uninitialized memory). Valgrind's CPU has no AVX-512, so the
//! kernels' AVX2 paths are the ones checked here (`tests/guard_pages.rs`
//! runs the AVX-512 ones with every allocation against a guard page); debug
//! builds also assert every address the native kernels touch.

mod support;

use std::process::Command;

fn memcheck(args: &[&str]) {
    let out = Command::new("valgrind")
        .args(["--error-exitcode=99", "-q", "--leak-check=no"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("valgrind runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "memcheck of kiln {}:\n{stderr}",
        args.join(" ")
    );
}

/// Whether valgrind is here (CI must have it).
fn have_valgrind() -> bool {
    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            !support::in_ci(),
            "valgrind is missing; CI must run this test"
        );
        println!("skipping: valgrind is not installed");
        return false;
    }
    true
}

#[test]
fn every_family_runs_clean_under_memcheck_on_the_cpu_backend() {
    if !have_valgrind() {
        return;
    }
    let cpu = ["--backend", "cpu"];
    let runs: [&[&str]; 12] = [
        &[
            "run",
            "tests/data/hf/gpt2",
            "--tokens",
            "5,17,42",
            "--tokens",
            "8,1,9",
        ],
        &["run", "tests/data/hf/llama", "--tokens", "5,17,42,99"],
        &["run", "tests/data/hf/llama_tied", "--tokens", "5,17"],
        &[
            "run",
            "tests/data/hf/bert",
            "--tokens",
            "5,17,42",
            "--tokens",
            "8,1,9",
            "--attention-mask",
            "1,1,1",
            "--attention-mask",
            "1,1,0",
        ],
        &[
            "run",
            "tests/data/hf/bart",
            "--tokens",
            "5,17,42",
            "--decoder-tokens",
            "2,0",
        ],
        // ALiBi.
        &[
            "run",
            "tests/data/hf/bloom",
            "--tokens",
            "5,17,42",
            "--tokens",
            "8,1,9",
        ],
        // Sparse experts.
        &["run", "tests/data/hf/mixtral", "--tokens", "5,17,42,99"],
        // Relative position buckets, a padded row.
        &[
            "run",
            "tests/data/hf/t5",
            "--tokens",
            "5,17,42",
            "--tokens",
            "8,1,9",
            "--attention-mask",
            "1,1,1",
            "--attention-mask",
            "1,1,0",
            "--decoder-tokens",
            "0,7",
            "--decoder-tokens",
            "0,3",
        ],
        // Gated feed-forward, untied head.
        &[
            "run",
            "tests/data/hf/t5_v11",
            "--tokens",
            "5,17,42",
            "--decoder-tokens",
            "0,7",
        ],
        // Sinusoidal positions.
        &[
            "run",
            "tests/data/hf/marian",
            "--tokens",
            "5,17,42",
            "--decoder-tokens",
            "0,7",
        ],
        // The masked-LM head.
        &["run", "tests/data/hf/bert_mlm", "--tokens", "5,17,42"],
        // LoRA kept unmerged: `lora_linear` nodes.
        &[
            "run",
            "tests/data/hf/llama",
            "--adapter",
            "tests/data/hf/llama_lora",
            "--lora-mode",
            "unmerged",
            "--tokens",
            "5,17,42",
        ],
    ];
    for args in runs {
        memcheck(&[args, &cpu[..]].concat());
    }
}

/// Generation with the KV cache (the decode kernels and the cache's
/// in-place writes) of each family, apart from the test above so that the
/// two run side by side.
#[test]
fn every_family_generates_clean_under_memcheck_on_the_cpu_backend() {
    if !have_valgrind() {
        return;
    }
    // Each model (and its options), then the same prompt and length.
    let models: [&[&str]; 8] = [
        &["tests/data/hf/gpt2"],
        &["tests/data/hf/llama"],
        &["tests/data/hf/bart"],
        &["tests/data/hf/bloom"],
        &["tests/data/hf/mixtral"],
        &["tests/data/hf/t5"],
        &["tests/data/hf/marian"],
        &[
            "tests/data/hf/llama",
            "--adapter",
            "tests/data/hf/llama_lora",
            "--lora-mode",
            "unmerged",
        ],
    ];
    for model in models {
        memcheck(
            &[
                &["generate"][..],
                model,
                &[
                    "--tokens",
                    "5,17,42",
                    "--max-new-tokens",
                    "3",
                    "--backend",
                    "cpu",
                ],
            ]
            .concat(),
        );
    }
}
