//! Bad input through the command line: every case gets a clear error or a
//! bounded answer; none panics, aborts or runs without bound (issue 9's
//! catalogue, one test per class as it is fixed).

use std::process::Command;

mod support;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Exit code, stdout, stderr; panics (the test fails) on a Rust panic or a
/// signal.
fn outcome(args: &[&str]) -> (i32, String, String) {
    let (code, stdout, stderr) = support::kiln(args);
    assert!(code != -1, "kiln {args:?} was killed by a signal\n{stderr}");
    assert!(
        !stderr.contains("panicked at"),
        "kiln {args:?} panicked:\n{stderr}"
    );
    (code, stdout, stderr)
}

/// Rewrites the JSON file at `path` through `edit`.
fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
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

#[test]
fn requests_past_the_model_or_the_integers_are_refused_up_front() {
    let many: Vec<String> = (0..200).map(|i| (i % 50 + 3).to_string()).collect();
    let many = many.join(",");
    // 200 tokens on a llama of 64 positions.
    let (code, _, err) = outcome(&["run", "tests/data/hf/llama", "--tokens", &many]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("64 positions") && err.contains("max_position_embeddings"),
        "{err}"
    );
    // Generating past them, with and without the cache.
    for extra in [&[][..], &["--no-kv-cache"][..]] {
        let mut args = vec![
            "generate",
            "tests/data/hf/llama",
            "--tokens",
            "1,2",
            "--max-new-tokens",
            "100",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = outcome(&args);
        assert_eq!(code, 2, "{err}");
        assert!(out.is_empty(), "nothing generated half-way: {out}");
        assert!(
            err.contains("101 positions") && err.contains("max_position_embeddings"),
            "{err}"
        );
    }
    // A count that wraps the position arithmetic.
    let (code, _, err) = outcome(&[
        "generate",
        "tests/data/hf/llama",
        "--tokens",
        "1,2",
        "--max-new-tokens",
        "18446744073709551615",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--max-new-tokens 18446744073709551615 is too large"),
        "{err}"
    );
}

/// Runs kiln, killing it after `limit` (the test then fails: an unbounded
/// run); returns the exit code and stderr.
fn bounded(args: &[&str], limit: std::time::Duration) -> (i32, String) {
    // stderr goes to a file (a pipe nobody drains would block a chatty
    // child and look like a hang).
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let err_path =
        std::env::temp_dir().join(format!("kiln-bad-input-{}-{run}.err", std::process::id()));
    let err_file = std::fs::File::create(&err_path).expect("a scratch file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(err_file)
        .spawn()
        .expect("the kiln binary runs");
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waits") {
            let err = String::from_utf8_lossy(&std::fs::read(&err_path).unwrap()).to_string();
            assert!(
                !err.contains("panicked at"),
                "kiln {args:?} panicked:\n{err}"
            );
            return (status.code().expect("exited, not killed"), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("kiln {args:?} ran past {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_undefined_value_hint_costs_a_pass_not_a_product() {
    // 30,000 defined values then a misspelt use; and an undefined
    // identifier of 2 MB. The hint compared every pair of characters of
    // every candidate (23 s for a 300 KB file, gigabytes for a long name).
    let dir = scratch("hint");
    let mut src = String::from("func @f(%x: f32[4]) -> f32[4] {\n");
    let mut prev = "x".to_string();
    for i in 0..30_000 {
        src += &format!("  %value_{i} = relu(%{prev}) : f32[4]\n");
        prev = format!("value_{i}");
    }
    src += "  %y = relu(%valeu_29999) : f32[4]\n  return %y\n}\n";
    let many = dir.join("many.kir");
    std::fs::write(&many, &src).unwrap();
    let limit = std::time::Duration::from_secs(60);
    let (code, err) = bounded(&["check", many.to_str().unwrap()], limit);
    // A parse error: exit 2, like every input kiln cannot read.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("did you mean %value_29999?"), "{err}");

    let long = format!(
        "func @f(%x: f32[4]) -> f32[4] {{\n  %y = relu(%{}) : f32[4]\n  return %y\n}}\n",
        "z".repeat(2 << 20)
    );
    let file = dir.join("long.kir");
    std::fs::write(&file, long).unwrap();
    let (code, err) = bounded(&["check", file.to_str().unwrap()], limit);
    assert_eq!(code, 2, "{}", &err[..err.len().min(500)]);
    assert!(
        err.contains("use of undefined value"),
        "{}",
        &err[..err.len().min(500)]
    );
    assert!(
        err.len() < 10_000,
        "the message stays bounded: {} bytes",
        err.len()
    );
}

#[test]
fn files_are_read_with_a_limit_fitting_their_kind() {
    let limit = std::time::Duration::from_secs(60);
    // A device that never ends, as the model and as a config behind a link.
    let (code, err) = bounded(&["check", "/dev/zero"], limit);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("more than a text-IR file may be"), "{err}");
    let folder = support::scratch_copy("llama", "bad-input-links");
    std::fs::remove_file(folder.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", folder.join("config.json")).unwrap();
    let (code, err) = bounded(&["check", folder.to_str().unwrap()], limit);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.json") && err.contains("more than a model configuration may be"),
        "{err}"
    );
    // A text-IR file of 300 MB (sparse: refused on its size, not read).
    let big = scratch("links").join("big.kir");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let (code, err) = bounded(&["check", big.to_str().unwrap()], limit);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("314572800 bytes is more than a text-IR file may be"),
        "{err}"
    );
}

/// A copy of the tiny llama folder with `value` written over element 5 of
/// the weight `tensor` (f32).
fn llama_with(name: &str, tensor: &str, value: f32) -> std::path::PathBuf {
    let folder = support::scratch_copy("llama", &format!("bad-input-{name}"));
    let path = folder.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[tensor]["dtype"], "F32");
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + start + 5 * 4;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    folder
}

#[test]
fn nan_weights_stop_generation_with_the_tensor_named() {
    // A NaN in one weight made every logit NaN and greedy decoding printed
    // token 0 forever.
    let tensor = "model.layers.0.mlp.up_proj.weight";
    for (name, value) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let folder = llama_with(name, tensor, value);
        for backend in ["cpu", "interp"] {
            let (code, out, err) = outcome(&[
                "generate",
                folder.to_str().unwrap(),
                "--tokens",
                "1,2,3",
                "--max-new-tokens",
                "5",
                "--backend",
                backend,
            ]);
            assert_eq!(code, 2, "{backend}: {err}");
            assert!(out.is_empty(), "{out}");
            assert!(
                err.contains("are not finite") && err.contains(&format!("weight {tensor} holds")),
                "{backend}: {err}"
            );
        }
        // `run` prints what it computed, with a warning naming the weight.
        let (code, out, err) = outcome(&["run", folder.to_str().unwrap(), "--tokens", "1,2,3"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("logits"), "{out}");
        assert!(
            err.contains("warning:") && err.contains(&format!("weight {tensor} holds")),
            "{err}"
        );
    }
}

#[test]
fn fields_that_would_fail_silently_are_refused_by_name() {
    // eps = NaN in text IR (every output NaN).
    let dir = scratch("fields");
    let kir = dir.join("eps.kir");
    std::fs::write(
        &kir,
        "func @f(%x: f32[B, 4]) -> f32[B, 4] {\n  param @g: f32[4]\n  %y = rms_norm(%x, @g) eps=nan : f32[B, 4]\n  return %y\n}\n",
    )
    .unwrap();
    let (code, _, err) = outcome(&["check", kir.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("attribute `eps` must be a finite number"),
        "{err}"
    );
    // An eos_token_id outside the vocabulary (generation could never stop on it).
    let folder = support::scratch_copy("llama", "bad-input-eos");
    edit_json(&folder.join("config.json"), |c| {
        c["eos_token_id"] = serde_json::json!(100_000)
    });
    let (code, _, err) = outcome(&["generate", folder.to_str().unwrap(), "--tokens", "1,2"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("eos_token_id 100000 is outside the vocabulary"),
        "{err}"
    );
}

#[test]
fn adapter_messages_quote_the_config_not_rust_debug_text() {
    // target_modules naming a module the model lacks printed
    // `Names(["does_not_exist"])`.
    let dir = scratch("adapter").join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        "tests/data/hf/llama_lora/adapter_model.safetensors",
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        "tests/data/hf/llama_lora/adapter_config.json",
        dir.join("adapter_config.json"),
    )
    .unwrap();
    edit_json(&dir.join("adapter_config.json"), |c| {
        c["target_modules"] = serde_json::json!(["does_not_exist"])
    });
    let (code, _, err) = outcome(&[
        "run",
        "tests/data/hf/llama",
        "--adapter",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"`target_modules` ["does_not_exist"]"#),
        "{err}"
    );
    assert!(!err.contains("Names("), "{err}");
}

/// Runs the kiln binary with `KILN_MEMORY_LIMIT` set.
fn with_memory_limit(limit: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_MEMORY_LIMIT", limit)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the kiln binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn runs_needing_more_memory_than_the_machine_gives_are_refused_with_the_figure() {
    // A 7.4 GB output (under the per-tensor cap) from a one-element input:
    // refused before anything is allocated, on every backend, when the
    // machine has 4 GiB to give; the interpreter also counts the index map
    // its expand builds.
    let dir = scratch("memory");
    let kir = dir.join("big.kir");
    std::fs::write(
        &kir,
        "func @f(%tokens: i64[B, T]) -> (y: i64[100000, 9250]) {\n  \
         %s = slice(%tokens) axis=1 start=0 end=1 : i64[B, 1]\n  \
         %t = slice(%s) axis=0 start=0 end=1 : i64[1, 1]\n  \
         %y = expand(%t) shape=[100000, 9250] : i64[100000, 9250]\n  return %y\n}\n",
    )
    .unwrap();
    let kir = kir.to_str().unwrap();
    for (backend, figure) in [
        (
            "interp",
            "needs 13.78 GB of memory (the interpreter's live values at their peak)",
        ),
        (
            "reference",
            "needs 13.78 GB of memory (arena 0 bytes, outputs 6.89 GB and their host copies)",
        ),
        (
            "cpu",
            "needs 13.78 GB of memory (arena 0 bytes, outputs 6.89 GB and their host copies)",
        ),
    ] {
        let started = std::time::Instant::now();
        let (code, err) =
            with_memory_limit("4G", &["run", kir, "--tokens", "1", "--backend", backend]);
        assert_eq!(code, 2, "{backend}: {err}");
        assert!(
            err.contains(&format!(
                "@f with B=1, T=1 {figure}; the machine has 4.00 GB available"
            )),
            "{backend}: {err}"
        );
        assert!(started.elapsed().as_secs() < 20, "{backend}: refused late");
    }
    // A real model's arena, outputs and caches count too.
    for (args, what) in [
        (
            vec![
                "run",
                "tests/data/hf/llama",
                "--tokens",
                "1,2,3",
                "--backend",
                "interp",
            ],
            "@llama with B=1, T=3 needs",
        ),
        (
            vec!["run", "tests/data/hf/llama", "--tokens", "1,2,3"],
            "@llama with B=1, T=3 needs",
        ),
        (
            vec!["generate", "tests/data/hf/llama", "--tokens", "1,2,3"],
            "the cache key_cache of @prefill needs",
        ),
    ] {
        let (code, err) = with_memory_limit("1K", &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(what) && err.contains("the machine has 1024 bytes available"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn messages_say_where_and_stay_short() {
    // A safetensors header whose offsets lie: the tensor is named.
    let dir = support::scratch_copy("gpt2", "lying-header");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let end = header[&name]["data_offsets"][1].as_u64().unwrap();
    header[&name]["data_offsets"][1] = (end + 4).into();
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let (code, _, err) = outcome(&["run", dir.to_str().unwrap(), "--tokens", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("tensor `{name}`")) && err.contains("data_offsets"),
        "{err}"
    );

    // A config value of a megabyte: quoted, but cut.
    let dir = support::scratch_copy("gpt2", "huge-config-value");
    edit_json(&dir.join("config.json"), |c| {
        c["n_head"] = (0..200_000).collect::<Vec<i64>>().into();
    });
    let (code, _, err) = outcome(&["run", dir.to_str().unwrap(), "--tokens", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`n_head` must be a positive integer"), "{err}");
    assert!(err.len() < 1000, "{} bytes of stderr", err.len());
    edit_json(&dir.join("config.json"), |c| {
        c["n_head"] = 4.into();
        c["model_type"] = "y".repeat(1 << 20).into();
    });
    let (code, _, err) = outcome(&["run", dir.to_str().unwrap(), "--tokens", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not supported") && err.len() < 1000,
        "{} bytes",
        err.len()
    );

    // Segment ids are checked against the model, and the flag is named.
    let (code, _, err) = outcome(&[
        "run",
        "tests/data/hf/bert",
        "--tokens",
        "1,2",
        "--token-type-ids",
        "5,0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--token-type-ids row 0 has segment id 5; the model has 2 segment types"),
        "{err}"
    );

    // A NaN adapter factor is refused by name.
    let lora = std::env::temp_dir().join(format!("kiln-nan-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lora);
    std::fs::create_dir_all(&lora).unwrap();
    let src = support::hf_dir("llama_lora");
    std::fs::copy(
        src.join("adapter_config.json"),
        lora.join("adapter_config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, entry) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| *k != "__metadata__" && v["dtype"] == "F32")
        .unwrap();
    let at = 8 + n + entry["data_offsets"][0].as_u64().unwrap() as usize + 4;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(lora.join("adapter_model.safetensors"), bytes).unwrap();
    let (code, _, err) = outcome(&[
        "run",
        "tests/data/hf/llama",
        "--adapter",
        lora.to_str().unwrap(),
        "--tokens",
        "1",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "tensor `{name}` holds NaN at element 1; adapter factors must be finite"
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&lora);
}

/// The bad-input catalogue: one row per kind of mistake a user (or a
/// damaged file) makes, each answered within seconds by one clear error
/// (exit 2; `error: ` first, at most a few KB) that names what and where.
/// The classes with more to check have their own tests above.
#[test]
fn catalogue_every_bad_input_gets_one_clear_bounded_error() {
    let dir = scratch("catalogue");
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let folder = |name: &str, from: &str, edit: &dyn Fn(&std::path::Path)| {
        let f = dir.join(name);
        std::fs::create_dir_all(&f).unwrap();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(from);
        for e in std::fs::read_dir(&src).unwrap().flatten() {
            std::fs::copy(e.path(), f.join(e.file_name())).unwrap();
        }
        edit(&f);
    };
    folder("not-json", "tests/data/hf/gpt2", &|f| {
        std::fs::write(f.join("config.json"), "{not json").unwrap()
    });
    folder("zero-heads", "tests/data/hf/gpt2", &|f| {
        edit_json(&f.join("config.json"), |c| c["n_head"] = 0.into())
    });
    folder("no-weights", "tests/data/hf/gpt2", &|f| {
        std::fs::remove_file(f.join("model.safetensors")).unwrap()
    });
    folder("truncated-weights", "tests/data/hf/gpt2", &|f| {
        let b = std::fs::read(f.join("model.safetensors")).unwrap();
        std::fs::write(f.join("model.safetensors"), &b[..3000]).unwrap();
    });
    folder("huge-header", "tests/data/hf/gpt2", &|f| {
        let mut b = std::fs::read(f.join("model.safetensors")).unwrap();
        b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        std::fs::write(f.join("model.safetensors"), b).unwrap();
    });
    folder("five-heads", "tests/data/hf/gpt2", &|f| {
        edit_json(&f.join("config.json"), |c| c["n_head"] = 5.into())
    });
    folder("three-kv-heads", "tests/data/hf/llama", &|f| {
        edit_json(&f.join("config.json"), |c| {
            c["num_key_value_heads"] = 3.into()
        })
    });
    folder("other-modules", "tests/data/hf/llama_lora", &|f| {
        edit_json(&f.join("adapter_config.json"), |c| {
            c["target_modules"] = serde_json::json!(["nope"])
        })
    });
    std::fs::create_dir_all(dir.join("empty-dir")).unwrap();
    std::fs::write(dir.join("empty.kir"), "").unwrap();
    std::fs::write(dir.join("binary.kir"), [0xffu8, 0xfe, 0, 1, 2, 3]).unwrap();
    let art = d("gpt2.kiln");
    let (code, _, err) = outcome(&["compile", "tests/data/hf/gpt2", "-o", &art]);
    assert_eq!(code, 0, "{err}");
    let good = std::fs::read(&art).unwrap();
    std::fs::write(d("half.kiln"), &good[..good.len() / 2]).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 4;
    std::fs::write(d("flipped.kiln"), flipped).unwrap();

    let (l, b, g) = (
        "tests/data/hf/llama",
        "tests/data/hf/bert",
        "tests/data/hf/gpt2",
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        // Token inputs.
        (
            vec!["run", l, "--tokens", "1,x"],
            "`x` is not an integer token id",
        ),
        (
            vec!["run", l, "--tokens", "999999"],
            "token id 999999 is out of range (vocabulary size 101)",
        ),
        (
            vec!["run", l, "--tokens", "1,2", "--tokens", "3"],
            "--tokens row 1 has 1 entries but row 0 has 2",
        ),
        (
            vec!["run", b, "--tokens", "1,2", "--attention-mask", "1,2"],
            "--attention-mask row 0 has values other than 0 and 1",
        ),
        (
            vec!["run", b, "--tokens", "1,2", "--attention-mask", "0,0"],
            "--attention-mask row 0 masks every token",
        ),
        (
            vec!["run", b, "--tokens", "1,2", "--token-type-ids", "9,0"],
            "--token-type-ids row 0 has segment id 9",
        ),
        // Generation requests.
        (
            vec!["generate", l, "--tokens", "1", "--top-p", "2"],
            "--top-p must be in (0, 1], got 2",
        ),
        (
            vec!["generate", l, "--tokens", "1", "--temperature", "nan"],
            "--temperature must be positive, got NaN",
        ),
        (
            vec!["generate", b, "--tokens", "1"],
            "a Bert encoder does not generate tokens",
        ),
        (
            vec![
                "generate",
                l,
                "--tokens",
                "1",
                "--max-new-tokens",
                "18446744073709551615",
            ],
            "is too large",
        ),
        // Other flags.
        (
            vec!["run", l, "--tokens", "1", "--threads", "0"],
            "not a thread count from 1 to 1024",
        ),
        (
            vec!["ir", l, "--lowered", "--bind", "T=-1"],
            "a size cannot be negative",
        ),
        (
            vec!["ir", l, "--lowered", "--bind", "Q=1"],
            "no run-time symbol `Q` (it has B, T)",
        ),
        (vec!["ir", l, "--passes", "nope"], "unknown pass `nope`"),
        (
            vec!["compile", g, "-o", "/dev/null/x.kiln"],
            "cannot write /dev/null/x.kiln",
        ),
        (
            vec!["compile", g, "-o", &d("x.kiln"), "--target", "tpu"],
            "invalid value 'tpu' for '--target",
        ),
        // Files that are not what they claim.
        (
            vec!["check", "/dev/zero"],
            "is more than a text-IR file may be",
        ),
        (
            vec!["check", "/nonexistent/model"],
            "cannot read /nonexistent/model",
        ),
        (
            vec!["check", &d("empty-dir")],
            "is a directory without config.json",
        ),
        (
            vec!["check", &d("empty.kir")],
            "expected `func`, found end of input",
        ),
        (
            vec!["check", &d("binary.kir")],
            "not UTF-8 text (invalid byte at offset 0)",
        ),
        (
            vec!["run", "examples/gpt2_decoder.kir", "--tokens", "1"],
            "has no weights: pass a safetensors file with --weights",
        ),
        (
            vec!["run", g, "--weights", "/dev/zero", "--tokens", "1"],
            "not a valid safetensors file",
        ),
        (
            vec!["run", &d("not-json"), "--tokens", "1"],
            "config.json: not valid JSON",
        ),
        (
            vec!["run", &d("zero-heads"), "--tokens", "1"],
            "`n_head` must be a positive integer, got 0",
        ),
        (
            vec!["run", &d("no-weights"), "--tokens", "1"],
            "the folder has no model.safetensors",
        ),
        (
            vec!["run", &d("truncated-weights"), "--tokens", "1"],
            "lie outside the 416 bytes of data",
        ),
        (
            vec!["run", &d("huge-header"), "--tokens", "1"],
            "header too large",
        ),
        (
            vec!["run", l, "--adapter", &d("empty-dir"), "--tokens", "1"],
            "adapter_config.json",
        ),
        (
            vec!["run", l, "--adapter", &d("other-modules"), "--tokens", "1"],
            "`target_modules` [\"nope\"] does not select it",
        ),
        // Artifacts.
        (vec!["run", &d("half.kiln"), "--tokens", "1"], "truncated:"),
        (
            vec!["run", &d("flipped.kiln"), "--tokens", "1"],
            "section `packed` is corrupt at file offset",
        ),
        (
            vec!["run", &art, "--tokens", "1", "-O0"],
            "-O applies when compiling",
        ),
    ]
    .into_iter()
    .map(|(a, w)| (a.into_iter().map(String::from).collect(), w))
    .collect();
    // Config values that break a shape contract: exit 1, the file and keys named.
    for (folder, want) in [
        ("five-heads", "config.json: where dh = d / h: d / h: 32 is not divisible by 5 (d is `n_embd` = 32, h is `n_head` = 5)"),
        ("three-kv-heads", "4 is not divisible by 3 (h is `num_attention_heads` = 4, hk is `num_key_value_heads` = 3)"),
    ] {
        let (code, err) = bounded(&["check", &d(folder)], std::time::Duration::from_secs(30));
        assert_eq!(code, 1, "{folder}: {err}");
        assert!(err.contains("shape contract violated by ") && err.contains(want), "{err}");
    }
    for (args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = bounded(&args, std::time::Duration::from_secs(30));
        assert_eq!(code, 2, "kiln {args:?}: {err}");
        assert!(err.starts_with("error: "), "kiln {args:?}: {err}");
        assert!(
            err.len() < 4000,
            "kiln {args:?}: {} bytes of stderr",
            err.len()
        );
        assert!(
            err.contains(want),
            "kiln {args:?}: wanted `{want}` in\n{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
