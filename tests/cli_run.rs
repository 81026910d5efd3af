//! `kiln run` and `kiln generate` on Hugging Face folders: the JSON contract other
//! tools rely on, and clear errors (exit code 2) for every kind of bad input.

mod support;

use std::path::Path;

use support::kiln;

fn check_ok(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = kiln(args);
    assert_eq!(code, 0, "kiln {args:?}\n{err}");
    assert!(
        !err.contains("no compiled kernel"),
        "kiln {args:?}: steps ran on the reference kernels:\n{err}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln {args:?}: not JSON ({e}):\n{out}"))
}

fn check_fails(args: &[&str], needle: &str) {
    let (code, out, err) = kiln(args);
    assert_eq!(code, 2, "kiln {args:?}\nstdout: {out}\nstderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains(needle),
        "kiln {args:?}: expected `{needle}` in:\n{err}"
    );
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    let mut s = vec![];
    let mut cur = v;
    while let Some(a) = cur.as_array() {
        s.push(a.len());
        match a.first() {
            Some(x) => cur = x,
            None => break,
        }
    }
    s
}

/// Replaces `from` by `to` in the `config.json` of `dir`.
fn edit_config(dir: &Path, from: &str, to: &str) {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{} has no `{from}`", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn run_prints_one_json_object_per_family() {
    let v = check_ok(&[
        "run",
        "tests/data/hf/gpt2",
        "--tokens",
        "1,2,3",
        "--tokens",
        "4,5,6",
        "--backend",
        "interp",
        "--output",
        "json",
    ]);
    assert_eq!(shape(&v["logits"]), vec![2, 3, 101]);
    let v = check_ok(&[
        "run",
        "tests/data/hf/llama",
        "--tokens",
        "1,2,3,4",
        "--output",
        "json",
    ]);
    assert_eq!(shape(&v["logits"]), vec![1, 4, 101]);
    let v = check_ok(&[
        "run",
        "tests/data/hf/bert",
        "--tokens",
        "5,6,7",
        "--tokens",
        "8,9,0",
        "--attention-mask",
        "1,1,1",
        "--attention-mask",
        "1,1,0",
        "--output",
        "json",
    ]);
    assert_eq!(shape(&v["last_hidden_state"]), vec![2, 3, 32]);
    assert_eq!(shape(&v["pooled"]), vec![2, 32]);
    let v = check_ok(&[
        "run",
        "tests/data/hf/bart",
        "--tokens",
        "5,6,7,8",
        "--decoder-tokens",
        "2,0,14",
        "--output",
        "json",
    ]);
    assert_eq!(shape(&v["logits"]), vec![1, 3, 101]);
}

#[test]
fn generate_greedy_matches_the_reference_and_sampling_is_seeded() {
    let v = check_ok(&[
        "generate",
        "tests/data/hf/gpt2",
        "--tokens",
        "11,73,4,58,90",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--output",
        "json",
    ]);
    assert_eq!(
        v["tokens"],
        serde_json::json!([96, 70, 70, 74, 74, 96, 6, 6])
    );
    let v = check_ok(&[
        "generate",
        "tests/data/hf/bart",
        "--tokens",
        "11,73,4,58,90",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--ignore-eos",
        "--output",
        "json",
    ]);
    assert_eq!(
        v["tokens"],
        serde_json::json!([75, 75, 75, 35, 35, 69, 69, 69])
    );
    let sample = |seed: &str| {
        check_ok(&[
            "generate",
            "tests/data/hf/llama",
            "--tokens",
            "11,73,4",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.5",
            "--top-k",
            "20",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ignore-eos",
            "--output",
            "json",
        ])
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(sample("7"), sample("8"));
    let two = check_ok(&[
        "generate",
        "tests/data/hf/gpt2",
        "--tokens",
        "11,73",
        "--tokens",
        "4,58",
        "--max-new-tokens",
        "3",
        "--output",
        "json",
    ]);
    assert_eq!(shape(&two["tokens"]), vec![2, 3]);
}

#[test]
fn bad_tokens_are_clear_errors() {
    check_fails(
        &["run", "tests/data/hf/gpt2", "--tokens", "1,101"],
        "--tokens row 0, position 1: token id 101 is out of range (vocabulary size 101)",
    );
    check_fails(
        &["run", "tests/data/hf/gpt2", "--tokens", "1,-3"],
        "token id -3 is out of range",
    );
    check_fails(
        &["run", "tests/data/hf/gpt2", "--tokens", "1,x"],
        "`x` is not an integer token id",
    );
    let long: Vec<String> = (0..65).map(|i| (i % 100).to_string()).collect();
    check_fails(
        &["run", "tests/data/hf/gpt2", "--tokens", &long.join(",")],
        "has 65 tokens, more than the model's 64 positions",
    );
    check_fails(
        &[
            "generate",
            "tests/data/hf/gpt2",
            "--tokens",
            "1,2,3",
            "--max-new-tokens",
            "63",
        ],
        "3 tokens + 63 new ones need 65 positions, more than the model's 64",
    );
    check_fails(
        &[
            "run",
            "tests/data/hf/gpt2",
            "--tokens",
            "1,2,3",
            "--tokens",
            "4,5",
        ],
        "--tokens row 1 has 2 entries but row 0 has 3",
    );
    check_fails(
        &[
            "run",
            "tests/data/hf/gpt2",
            "--tokens",
            "1,2,3",
            "--attention-mask",
            "0,1,1",
        ],
        "only right-padded rows (1…1 0…0) can be run, but --attention-mask row 0 has padding before tokens",
    );
    check_fails(
        &[
            "run",
            "tests/data/hf/bert",
            "--tokens",
            "1,2,3",
            "--attention-mask",
            "1,1",
        ],
        "--attention-mask has shape [1, 2] but --tokens has [1, 3]",
    );
    check_fails(
        &[
            "run",
            "tests/data/hf/bert",
            "--tokens",
            "1,2,3",
            "--attention-mask",
            "1,2,1",
        ],
        "values other than 0 and 1",
    );
    check_fails(
        &["generate", "tests/data/hf/bert", "--tokens", "1,2,3"],
        "encoder does not generate tokens",
    );
    check_fails(
        &[
            "generate",
            "tests/data/hf/gpt2",
            "--tokens",
            "1",
            "--temperature",
            "0",
        ],
        "--temperature must be positive",
    );
}

#[test]
fn bad_folders_and_weights_are_clear_errors() {
    check_fails(
        &["run", "no/such/model", "--tokens", "1"],
        "cannot read no/such/model",
    );
    check_fails(&["check", "examples/invalid"], "without config.json");

    let dir = support::scratch_copy("gpt2", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "the folder has no model.safetensors",
    );

    let dir = support::scratch_copy("gpt2", "truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "not a valid safetensors file",
    );
    std::fs::write(dir.join("model.safetensors"), b"garbage").unwrap();
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "not a valid safetensors file",
    );

    let dir = support::scratch_copy("gpt2", "misshaped");
    edit_config(&dir, "\"vocab_size\": 101", "\"vocab_size\": 100");
    // (The stop token 100 must stay inside the smaller vocabulary.)
    edit_config(&dir, "\"eos_token_id\": 100", "\"eos_token_id\": 99");
    check_fails(&["run", dir.to_str().unwrap(), "--tokens", "1"], "tensor `transformer.wte.weight` has shape [101, 32] but the model expects [100, 32] (f32[V, d])");
    // A stop token outside the vocabulary is a config error naming the field.
    edit_config(&dir, "\"eos_token_id\": 99", "\"eos_token_id\": 100");
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "eos_token_id 100 is outside the vocabulary (vocab_size 100)",
    );

    let dir = support::scratch_copy("llama", "extra");
    edit_config(&dir, "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "unexpected tensor `model.layers.1.input_layernorm.weight`",
    );
    edit_config(&dir, "\"num_hidden_layers\": 1", "\"num_hidden_layers\": 3");
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "missing tensor `model.layers.2.input_layernorm.weight` (expected f32 [32])",
    );

    let dir = support::scratch_copy("llama", "ropescaling");
    edit_config(
        &dir,
        "\"rope_type\": \"default\"",
        "\"rope_type\": \"yarn\"",
    );
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "has rope_type \"yarn\"; only \"default\" is supported",
    );

    let dir = support::scratch_copy("gpt2", "modeltype");
    edit_config(
        &dir,
        "\"model_type\": \"gpt2\"",
        "\"model_type\": \"falcon\"",
    );
    check_fails(
        &["run", dir.to_str().unwrap(), "--tokens", "1"],
        "model_type \"falcon\" is not supported",
    );
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    check_fails(
        &["check", dir.to_str().unwrap()],
        "config.json: not valid JSON",
    );

    let dir = support::scratch_copy("gpt2", "heads");
    edit_config(&dir, "\"n_head\": 4", "\"n_head\": 5");
    let (code, _, err) = kiln(&["check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("32 is not divisible by 5"), "{err}");
}

#[test]
fn check_and_ir_work_on_model_folders() {
    let (code, out, err) = kiln(&["check", "tests/data/hf/llama"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| %l0.q_rope"), "{out}");
    let (code, out, _) = kiln(&["ir", "tests/data/hf/bart"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("func @bart(%tokens: i64[B, S], %attention_mask: i64[B, S], %decoder_tokens: i64[B, T])"), "{out}");
}

#[test]
fn right_padded_rows_of_a_causal_lm_give_the_unpadded_outputs() {
    let full = check_ok(&[
        "run",
        "tests/data/hf/gpt2",
        "--tokens",
        "5,17,42",
        "--output",
        "json",
        "-O0",
    ]);
    let padded = check_ok(&[
        "run",
        "tests/data/hf/gpt2",
        "--tokens",
        "5,17,42,0,0",
        "--tokens",
        "88,12,7,51,100",
        "--attention-mask",
        "1,1,1,0,0",
        "--attention-mask",
        "1,1,1,1,1",
        "--output",
        "json",
        "-O0",
    ]);
    assert_eq!(
        full["logits"][0],
        serde_json::json!(padded["logits"][0].as_array().unwrap()[..3])
    );
    check_fails(
        &[
            "generate",
            "tests/data/hf/gpt2",
            "--tokens",
            "5,17,0",
            "--attention-mask",
            "1,1,0",
        ],
        "padded prompts cannot be continued",
    );
}

#[test]
fn review_regressions_on_inputs_and_configs() {
    // An empty decoder row is an input error, not a panic.
    let model = kiln::Model::load(support::hf_dir("bart")).unwrap();
    let inputs = kiln::RunInputs {
        tokens: vec![vec![1, 2]],
        decoder_tokens: Some(vec![vec![]]),
        ..kiln::RunInputs::default()
    };
    let err = model.run(&inputs).expect_err("empty decoder row");
    assert!(
        err.to_string().contains("--decoder-tokens row 0 is empty"),
        "{err}"
    );
    // Zero new tokens still validates the prompt.
    check_fails(
        &[
            "generate",
            "tests/data/hf/gpt2",
            "--tokens",
            "1000",
            "--max-new-tokens",
            "0",
            "--no-kv-cache",
        ],
        "out of range",
    );
    // Sizes too large for any model are configuration errors (exit 2), not panics.
    let dir = support::scratch_copy("bart", "hugepos");
    edit_config(
        &dir,
        "\"max_position_embeddings\": 64",
        "\"max_position_embeddings\": 9223372036854775807",
    );
    check_fails(
        &["check", dir.to_str().unwrap()],
        "`max_position_embeddings` = 9223372036854775807 is larger than kiln accepts",
    );
    // eos_token_id may be a list (Llama 3 style).
    let dir = support::scratch_copy("llama", "eoslist");
    edit_config(&dir, "\"eos_token_id\": 2", "\"eos_token_id\": [2, 3]");
    let m = kiln::Model::load(&dir).unwrap();
    assert_eq!(m.info().unwrap().eos_token_ids, vec![2, 3]);
    // A tensor larger than the interpreter allows is refused before running.
    let big = std::env::temp_dir().join(format!("kiln-big-{}.kir", std::process::id()));
    std::fs::write(
        &big,
        "func @f(%tokens: i64[B, T]) -> (y: f32[100000, 100000, 100000]) {\n  %y = constant() value=1.0 dtype=f32 shape=[100000, 100000, 100000] : f32[100000, 100000, 100000]\n  return %y\n}\n",
    )
    .unwrap();
    check_fails(
        &["run", big.to_str().unwrap(), "--tokens", "1"],
        "needs more than the 8 GiB a run may allocate",
    );
    check_fails(
        &[
            "run",
            big.to_str().unwrap(),
            "--tokens",
            "1",
            "--backend",
            "interp",
        ],
        "needs more than the interpreter's 8 GiB per tensor",
    );
}

#[test]
fn progress_bars_stay_off_when_stderr_is_not_a_terminal() {
    let dir = support::hf_dir("llama");
    let dir = dir.to_str().expect("utf-8 path");
    for args in [
        vec!["run", dir, "--tokens", "1,2,3", "--output", "json"],
        vec![
            "generate",
            dir,
            "--tokens",
            "1,2,3",
            "--max-new-tokens",
            "2",
        ],
    ] {
        let (code, out, err) = kiln(&args);
        assert_eq!(code, 0, "{err}");
        for (what, text) in [("stdout", &out), ("stderr", &err)] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\r'),
                "kiln {args:?}: control characters on {what}: {text:?}"
            );
        }
    }
}

/// Writes a safetensors file of f16 tensors (name, shape, values).
fn write_f16_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn steps_without_a_compiled_kernel_are_named_on_stderr() {
    // f16 activations: the CPU backend compiles products and loops over
    // f32 activations (f16/bf16 weights are widened in its kernels), so the
    // product of two f16 values and the cast of its f16 result run on the
    // reference kernels. That is correct but slow, and said, not silent.
    let dir = support::scratch_dir("fallback_warning");
    let kir = dir.join("f16.kir");
    std::fs::write(
        &kir,
        "func @main(%tokens: i64[B, T]) -> (logits: f32[B, T, 4]) {\n  \
         param @emb: f16[10, 8]\n  param @w: f16[8, 4]\n  \
         %x = gather(@emb, %tokens) : f16[B, T, 8]\n  \
         %y = matmul(%x, @w) : f16[B, T, 4]\n  \
         %z = cast(%y) to=f32 : f32[B, T, 4]\n  \
         return %z\n}\n",
    )
    .unwrap();
    let weights = dir.join("w.safetensors");
    write_f16_safetensors(
        &weights,
        &[
            (
                "emb",
                vec![10, 8],
                (0..80).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect(),
            ),
            (
                "w",
                vec![8, 4],
                (0..32).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect(),
            ),
        ],
    );
    let (kir, weights) = (kir.to_str().unwrap(), weights.to_str().unwrap());
    let args = |backend| {
        vec![
            "run",
            kir,
            "--weights",
            weights,
            "--tokens",
            "1,2,9",
            "--output",
            "json",
            "--backend",
            backend,
        ]
    };
    let (code, cpu, err) = kiln(&args("cpu"));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("kiln: warning: the CPU backend has no compiled kernel for 2 steps")
            && err.contains("@main s1 gemm (%y = matmul(%x, @w) (line 5))")
            && err.contains("@main s2 loop (%z = cast(%y) (line 6))"),
        "{err}"
    );
    // The reference executor runs every step on those kernels by design.
    let (code, reference, err) = kiln(&args("reference"));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(cpu, reference);
}

#[test]
fn progress_bars_show_on_a_terminal() {
    // stderr on a pseudo-terminal (200 columns): the spinner while the
    // folder loads and the compile's bar are drawn there, and stdout keeps
    // only the JSON.
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 50,
        ws_col: 200,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers to two ints; no name buffer; default terminal
    // settings; the window size is read.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // Not inherited by the kiln processes other tests spawn meanwhile
    // (the master would wait for them to exit).
    for fd in [master, slave] {
        // SAFETY: a descriptor this test just opened.
        assert_eq!(
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) },
            0
        );
    }
    // SAFETY: both descriptors were just opened and are owned here only.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    };
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut seen = Vec::new();
        // Ends with EIO once the last holder of the other side exits.
        let _ = master.read_to_end(&mut seen);
        seen
    });
    let child = {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args([
            "run",
            "tests/data/hf/llama",
            "--tokens",
            "1,2,3",
            "--output",
            "json",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(slave));
        cmd.spawn().expect("kiln runs")
        // `cmd`, holding the terminal's other side, is dropped here.
    };
    let out = child.wait_with_output().expect("kiln exits");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains('\u{1b}') && serde_json::from_str::<serde_json::Value>(&stdout).is_ok(),
        "{stdout}"
    );
    let seen = reader.join().expect("reader");
    let terminal = String::from_utf8_lossy(&seen);
    for what in [
        "loading tests/data/hf/llama",
        "compiling @llama (code, packed weights) [",
    ] {
        assert!(
            terminal.contains(what),
            "`{what}` on the terminal:\n{terminal:?}"
        );
    }
    // Every bar is cleared when its work is done: the last thing drawn is a
    // line erase.
    assert!(terminal.trim_end().ends_with("\u{1b}[2K"), "{terminal:?}");
}
