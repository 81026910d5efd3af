//! Compiled artifacts (`kiln compile`): they run like their source with the
//! source deleted (bit-identical outputs on the CPU backend), keep an
//! unmerged adapter swappable, and are refused — exit code 2, the section
//! and offset named, no panic — when truncated, corrupt, or written for
//! another format version, kiln or target.

mod support;

use std::path::{Path, PathBuf};

use support::{kiln, scratch_copy};

fn scratch_dir(tag: &str) -> PathBuf {
    support::scratch_dir(&format!("art-{tag}"))
}

fn source(name: &str) -> String {
    format!("tests/data/hf/{name}")
}

/// Compiles `model` to `out`, asserting success.
fn compile(model: &str, out: &Path, extra: &[&str]) {
    let out_s = out.to_str().unwrap();
    let mut args = vec!["compile", model, "-o", out_s];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = kiln(&args);
    assert_eq!(code, 0, "compile {model}: {stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
}

/// The run arguments of each family's sample inputs.
fn run_args(family: &str) -> Vec<&'static str> {
    let mut a = vec!["--tokens", "5,17,42,99,3", "--tokens", "88,12,7,51,100"];
    match family {
        "bert" => a.extend([
            "--attention-mask",
            "1,1,1,1,1",
            "--attention-mask",
            "1,1,1,0,0",
        ]),
        "bart" => a.extend(["--decoder-tokens", "2,0,14", "--decoder-tokens", "2,0,60"]),
        "marian" => a.extend(["--decoder-tokens", "1,14", "--decoder-tokens", "1,60"]),
        "t5" | "t5_v11" => a.extend(["--decoder-tokens", "0,14", "--decoder-tokens", "0,60"]),
        _ => {}
    }
    a
}

#[test]
fn artifacts_run_like_their_source_with_the_source_deleted() {
    let dir = scratch_dir("families");
    for family in [
        "gpt2",
        "llama",
        "llama_tied",
        "mixtral",
        "bloom",
        "bert",
        "bart",
        "marian",
        "t5",
        "t5_v11",
    ] {
        // The whole folder (tokenizer files too), deleted after compiling.
        let copy = support::scratch_folder(family, &format!("art-src-{family}"));
        let art = dir.join(format!("{family}.kiln"));
        compile(copy.to_str().unwrap(), &art, &[]);
        std::fs::remove_dir_all(&copy).unwrap();
        let art_s = art.to_str().unwrap();
        let src = source(family);

        let mut from_src = vec!["run", src.as_str(), "--output", "json"];
        from_src.extend(run_args(family));
        let mut from_art = vec!["run", art_s, "--output", "json"];
        from_art.extend(run_args(family));
        let (c1, want, e1) = kiln(&from_src);
        let (c2, got, e2) = kiln(&from_art);
        assert_eq!((c1, c2), (0, 0), "{family}: {e1} {e2}");
        assert!(want.len() > 100);
        assert!(
            got == want,
            "{family}: run from the artifact differs from the source"
        );

        if family != "bert" {
            let gen = |m: &str| {
                kiln(&[
                    "generate",
                    m,
                    "--tokens",
                    "5,17,42",
                    "--tokens",
                    "88,12,7",
                    "--max-new-tokens",
                    "6",
                    "--ignore-eos",
                    "--output",
                    "json",
                ])
            };
            let (c1, want, e1) = gen(&src);
            let (c2, got, e2) = gen(art_s);
            assert_eq!((c1, c2), (0, 0), "{family}: {e1} {e2}");
            assert_eq!(got, want, "{family}: generate from the artifact");
        }

        let (code, out, err) = kiln(&["check", art_s]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("all shape contracts hold"), "{out}");
        let (code, ir, err) = kiln(&["ir", art_s]);
        assert_eq!(code, 0, "{err}");
        let (_, src_ir, _) = kiln(&["ir", &src]);
        assert!(
            ir.starts_with(src_ir.trim_end()),
            "{family}: the artifact's IR starts with the source's optimized IR"
        );
        let (code, lowered, err) = kiln(&["ir", art_s, "--lowered"]);
        assert_eq!(code, 0, "{err}");
        assert!(lowered.contains("gemm"), "{lowered}");
    }
    let (code, out, err) = kiln(&[
        "bench",
        dir.join("llama.kiln").to_str().unwrap(),
        "--output",
        "json",
        "--prompt-len",
        "8",
        "--decode",
        "4",
        "--reps",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"decode_tok_s\""), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kir_model_with_weights_compiles() {
    let dir = scratch_dir("kir");
    let (code, ir, err) = kiln(&["ir", &source("gpt2"), "-O0"]);
    assert_eq!(code, 0, "{err}");
    let kir = dir.join("gpt2.kir");
    std::fs::write(&kir, ir).unwrap();
    let weights = support::hf_dir("gpt2").join("model.safetensors");
    let art = dir.join("gpt2.kiln");
    compile(
        kir.to_str().unwrap(),
        &art,
        &["--weights", weights.to_str().unwrap()],
    );
    let run = |m: &str, w: Option<&str>| {
        let mut a = vec!["run", m, "--tokens", "1,2,3", "--output", "json"];
        if let Some(w) = w {
            a.extend(["--weights", w]);
        }
        kiln(&a)
    };
    let (c1, want, e1) = run(kir.to_str().unwrap(), weights.to_str());
    let (c2, got, e2) = run(art.to_str().unwrap(), None);
    assert_eq!((c1, c2), (0, 0), "{e1} {e2}");
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn optimization_flags_and_adapters_belong_to_compile() {
    let dir = scratch_dir("flags");
    let art = dir.join("llama.kiln");
    compile(&source("llama"), &art, &["-O1"]);
    let art_s = art.to_str().unwrap();
    for extra in [vec!["-O2"], vec!["--adapter", "tests/data/hf/llama_lora"]] {
        let mut a = vec!["run", art_s, "--tokens", "1,2"];
        a.extend(extra.iter().copied());
        let (code, _, err) = kiln(&a);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("is a compiled artifact (-O1, adapters: none)")
                && err.contains("applies when compiling"),
            "{err}"
        );
    }
    let (code, _, err) = kiln(&[
        "compile",
        art_s,
        "-o",
        dir.join("again.kiln").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already a compiled artifact"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unmerged_adapter_artifact_still_swaps_adapters_of_the_same_rank() {
    let dir = scratch_dir("lora");
    let art = dir.join("lora.kiln");
    compile(
        &source("llama"),
        &art,
        &[
            "--adapter",
            "tests/data/hf/llama_lora",
            "--lora-mode",
            "unmerged",
        ],
    );
    // The same adapter at twice the scale: same modules and rank.
    let rescaled = dir.join("rescaled");
    std::fs::create_dir_all(&rescaled).unwrap();
    let lora = support::hf_dir("llama_lora");
    std::fs::copy(
        lora.join("adapter_model.safetensors"),
        rescaled.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap())
            .unwrap();
    let alpha = cfg["lora_alpha"].as_f64().unwrap();
    cfg["lora_alpha"] = (alpha * 2.0).into();
    std::fs::write(rescaled.join("adapter_config.json"), cfg.to_string()).unwrap();

    let inputs = kiln::RunInputs::tokens(vec![vec![5, 17, 42, 99, 3]]);
    let target = kiln::Target::Cpu { threads: 0 };
    let loaded = kiln::Model::load(&art).expect("loads");
    assert!(loaded.artifact().is_some());
    let slot = loaded
        .weights()
        .unwrap()
        .keys()
        .find_map(|n| n.split(".lora_A.").nth(1))
        .map(|rest| rest.split('.').next().unwrap_or(rest).to_string())
        .expect("a LoRA factor");
    // Compiling from the artifact packs nothing: every packing of its
    // weights is the artifact's, read in place.
    if kiln::backends::cpu::packed_available() {
        let exe = loaded.compile(target).expect("compiles");
        let mine: std::collections::BTreeSet<usize> = loaded
            .weights()
            .unwrap()
            .values()
            .map(|t| t.bytes().as_ptr() as usize)
            .collect();
        let packings: Vec<_> = kiln::backends::cpu::packed_weights()
            .into_iter()
            .filter(|p| mine.contains(&p.weight_addr))
            .collect();
        assert!(packings.len() >= 7, "{} packings", packings.len());
        assert!(packings.iter().all(|p| p.is_mapped()), "{packings:?}");
        drop(exe);
    }
    let swapped = loaded.swap_adapter(&slot, &rescaled).expect("swaps");
    let got = swapped.run_on(target, &inputs).expect("runs");

    // The same swap on the source model, compiled the same way.
    let src = kiln::Model::load(source("llama"))
        .unwrap()
        .with_adapters(
            &[support::hf_dir("llama_lora")],
            kiln::adapter::LoraMode::Unmerged,
        )
        .unwrap()
        .apply_passes(
            &kiln::adapter::pipeline(kiln::OptLevel::O2, kiln::adapter::LoraMode::Unmerged)
                .unwrap(),
        )
        .unwrap()
        .0
        .swap_adapter(&slot, &rescaled)
        .unwrap();
    let want = src.run_on(target, &inputs).unwrap();
    assert_eq!(got, want, "swapped into the artifact vs into the source");
    let before = loaded.run_on(target, &inputs).unwrap();
    assert_ne!(before, got, "the swap changed the outputs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_or_foreign_artifacts_are_refused_with_section_and_offset() {
    let dir = scratch_dir("damaged");
    let art = dir.join("gpt2.kiln");
    compile(&source("gpt2"), &art, &[]);
    let good = std::fs::read(&art).unwrap();
    let secs = support::artifact_sections(&good);
    let names: Vec<&str> = secs.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["manifest", "ir", "weights", "packed"]);

    let mut cases: Vec<(String, Vec<u8>, Vec<String>)> = Vec::new();
    for len in [0usize, 10, 39, 40, 500, good.len() / 2, good.len() - 1] {
        cases.push((
            format!("truncated to {len}"),
            good[..len].to_vec(),
            vec!["truncated".into()],
        ));
    }
    let mut appended = good.clone();
    appended.extend_from_slice(b"junk");
    cases.push((
        "bytes appended".into(),
        appended,
        vec![format!("bytes appended from offset {}", good.len())],
    ));
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x10;
        b
    };
    cases.push((
        "header flipped".into(),
        flip(30),
        vec!["the header (offset 0..40) is corrupt".into()],
    ));
    cases.push((
        "table flipped".into(),
        flip(60),
        vec!["the section table (offset 40..".into()],
    ));
    for (name, off, len, _) in &secs {
        if *len == 0 {
            continue;
        }
        let at = off + len / 2;
        cases.push((
            format!("{name} flipped at {at}"),
            flip(at),
            vec![
                format!("section `{name}` is corrupt at file offset"),
                format!("{}..", off + (at - off) / (1 << 20) * (1 << 20)),
            ],
        ));
    }
    let mut version = good.clone();
    version[8..12].copy_from_slice(&7u32.to_le_bytes());
    cases.push((
        "other format version".into(),
        version,
        vec![
            "artifact format version 7 (header, offset 8)".into(),
            "reads version 1".into(),
        ],
    ));
    let manifest = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        let mut b = good.clone();
        let (_, off, len, _) = secs[0].clone();
        let text = String::from_utf8(b[off..off + len].to_vec()).unwrap();
        assert!(text.contains(from), "{from}");
        let text = text.replacen(from, to, 1);
        b[off..off + len].copy_from_slice(text.as_bytes());
        support::reseal_artifact(&mut b);
        b
    };
    cases.push((
        "other target".into(),
        manifest("\"target\": \"cpu\"", "\"target\": \"gpu\""),
        vec!["compiled for target `gpu`; this kiln loads `cpu` and `cuda` artifacts".into()],
    ));
    let here = env!("CARGO_PKG_VERSION");
    let other = "9".repeat(here.len());
    cases.push((
        "other kiln".into(),
        manifest(
            &format!("\"kiln_version\": \"{here}\""),
            &format!("\"kiln_version\": \"{other}\""),
        ),
        vec![format!("compiled by kiln {other}; this is kiln {here}")],
    ));
    cases.push((
        "broken manifest".into(),
        manifest("\"weights\": [", "\"weights\": {"),
        vec![
            "section `manifest` (offset".into(),
            "is not a valid manifest".into(),
        ],
    ));

    let bad = dir.join("bad.kiln");
    for (what, bytes, want) in &cases {
        std::fs::write(&bad, bytes).unwrap();
        for cmd in ["run", "check"] {
            let mut args = vec![cmd, bad.to_str().unwrap()];
            if cmd == "run" {
                args.extend(["--tokens", "1,2"]);
            }
            let (code, _, err) = kiln(&args);
            assert!(!err.contains("panicked"), "{what}: {err}");
            // Very short files are not recognised as artifacts at all (no
            // magic): they fail as unreadable text IR, still exit 2.
            assert_eq!(code, 2, "{what}: {err}");
            if bytes.len() >= 8 {
                for w in want {
                    assert!(err.contains(w.as_str()), "{what}: wanted `{w}` in: {err}");
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_compile_leaves_no_file() {
    let dir = scratch_dir("failed");
    // A model whose config is broken, and an output in a missing folder.
    let copy = scratch_copy("gpt2", "art-broken");
    std::fs::write(copy.join("config.json"), "{\"model_type\": \"gpt2\"").unwrap();
    let out = dir.join("broken.kiln");
    let (code, _, err) = kiln(&[
        "compile",
        copy.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    let missing = dir.join("no/such/dir/x.kiln");
    let (code, _, err) = kiln(&["compile", &source("gpt2"), "-o", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no/such/dir/x.kiln"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&copy);
}
