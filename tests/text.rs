//! Text in and out (`--prompt`, generated text) against what transformers
//! does with the same tokenizer: `scripts/make_tokenizers.py` wrote a tiny
//! WordPiece `tokenizer.json` into the test model folders and recorded
//! `tokenizer(text)`, greedy `model.generate` from the text and
//! `tokenizer.decode(new_ids)` in `tokenizer_reference.json`.

mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::kiln;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir(name).join("tokenizer_reference.json")).unwrap(),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn prompts_encode_and_ids_decode_as_transformers_does() {
    for name in ["gpt2", "llama", "bert", "bert_mlm"] {
        let r = reference(name);
        let model = kiln::Model::load(dir(name)).unwrap();
        let tok = model.tokenizer().expect("the folder has tokenizer.json");
        for (p, want) in r["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(r["encode"].as_array().unwrap())
        {
            assert_eq!(
                tok.encode(p.as_str().unwrap()).unwrap(),
                ids(want),
                "{name}: {p}"
            );
        }
        for case in r["decode"].as_array().unwrap() {
            assert_eq!(
                tok.decode(&ids(&case["ids"])).unwrap(),
                case["text"].as_str().unwrap(),
                "{name}: decode {}",
                case["ids"]
            );
        }
    }
}

#[test]
fn generate_from_a_prompt_prints_the_text_transformers_generates() {
    for name in ["gpt2", "llama"] {
        let r = reference(name);
        let n = r["generate"]["max_new_tokens"]
            .as_u64()
            .unwrap()
            .to_string();
        let prompts: Vec<&str> = r["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let rows = r["generate"]["rows"].as_array().unwrap();
        let m = dir(name);
        let m = m.to_str().unwrap();
        // One prompt at a time.
        for (p, want) in prompts.iter().zip(rows) {
            let (code, out, err) = kiln(&[
                "generate",
                m,
                "--prompt",
                p,
                "--max-new-tokens",
                &n,
                "--ignore-eos",
                "--output",
                "json",
            ]);
            assert_eq!(code, 0, "{err}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(ids(&v["tokens"]), ids(&want["new_ids"]), "{name}: {p}");
            assert_eq!(v["text"], want["text"], "{name}: {p}");
        }
        // Both as one batch (they encode to the same length): one text per row.
        let (code, out, err) = kiln(&[
            "generate",
            m,
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--max-new-tokens",
            &n,
            "--ignore-eos",
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let texts: Vec<&Value> = rows.iter().map(|r| &r["text"]).collect();
        assert_eq!(
            v["text"].as_array().unwrap().iter().collect::<Vec<_>>(),
            texts,
            "{name}"
        );
        // The summary prints the text too.
        let (code, out, _) = kiln(&[
            "generate",
            m,
            "--prompt",
            prompts[0],
            "--max-new-tokens",
            &n,
            "--ignore-eos",
        ]);
        assert_eq!(code, 0);
        assert!(
            out.contains(&format!("new text: {}", rows[0]["text"].as_str().unwrap())),
            "{out}"
        );
    }
}

#[test]
fn encoder_prompts_of_different_lengths_are_padded_and_masked() {
    let m = dir("bert");
    let m = m.to_str().unwrap();
    let model = kiln::Model::load(m).unwrap();
    let tok = model.tokenizer().unwrap();
    let (a, b) = ("hello world", "the cat sat on the mat.");
    let (ea, eb) = (tok.encode(a).unwrap(), tok.encode(b).unwrap());
    assert!(ea.len() < eb.len());
    let mut padded = ea.clone();
    padded.resize(eb.len(), tok.pad_id().unwrap());
    let mask: Vec<i64> = (0..eb.len()).map(|i| (i < ea.len()) as i64).collect();
    let join = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let (c1, from_text, e1) = kiln(&["run", m, "--prompt", a, "--prompt", b, "--output", "json"]);
    let (c2, from_ids, e2) = kiln(&[
        "run",
        m,
        "--tokens",
        &join(&padded),
        "--tokens",
        &join(&eb),
        "--attention-mask",
        &join(&mask),
        "--attention-mask",
        &join(&vec![1; eb.len()]),
        "--output",
        "json",
    ]);
    assert_eq!((c1, c2), (0, 0), "{e1} {e2}");
    assert_eq!(from_text, from_ids);
}

#[test]
fn prompts_need_a_tokenizer_and_run_takes_decoder_rows_of_one_length() {
    let copy = support::scratch_copy("gpt2", "no-tokenizer");
    let (code, _, err) = kiln(&["run", copy.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("has no tokenizer.json: --prompt needs one"),
        "{err}"
    );
    let (code, _, err) = kiln(&[
        "run",
        "tests/data/hf/llama",
        "--prompt",
        "hello",
        "--prompt",
        "the cat",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("the prompts encode to 1, 2 tokens: a decoder's rows are not padded, so this command takes prompts of one length (generate takes prompts of any lengths)"),
        "{err}"
    );
    let (code, _, err) = kiln(&[
        "run",
        "tests/data/hf/llama",
        "--prompt",
        "hi",
        "--tokens",
        "1",
    ]);
    assert_eq!(code, 2, "{err}");
    let _ = std::fs::remove_dir_all(copy);
}

#[test]
fn an_artifact_keeps_its_tokenizer() {
    let src = support::scratch_folder("gpt2", "text-art-src");
    let art = std::env::temp_dir().join(format!("kiln-text-{}.kiln", std::process::id()));
    let (code, _, err) = kiln(&[
        "compile",
        src.to_str().unwrap(),
        "-o",
        art.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&src).unwrap();
    let r = reference("gpt2");
    let p = r["prompts"][0].as_str().unwrap();
    let (code, out, err) = kiln(&[
        "generate",
        art.to_str().unwrap(),
        "--prompt",
        p,
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["text"], r["generate"]["rows"][0]["text"]);
    let _ = std::fs::remove_file(art);
}

#[test]
fn on_a_terminal_the_text_streams_once() {
    // `script` gives the child a pseudo-terminal (util-linux, on every
    // Debian); skipped where it is missing.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipping: no `script` to make a terminal");
        return;
    }
    let r = reference("gpt2");
    let p = r["prompts"][0].as_str().unwrap();
    let want = r["generate"]["rows"][0]["text"].as_str().unwrap();
    let cmd = format!(
        "{} generate {} --prompt '{p}' --max-new-tokens 8 --ignore-eos 2>/dev/null",
        env!("CARGO_BIN_EXE_kiln"),
        dir("gpt2").display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success(), "{text}");
    // The text once (streamed, then the ids), not again as `new text:`.
    assert!(
        text.starts_with(&format!("{want}\nnew tokens: [")),
        "{text:?}"
    );
    assert!(!text.contains("new text:"), "{text:?}");
}

#[test]
fn embed_pools_and_normalises_as_the_modules_say() {
    let m = dir("bert");
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    // The same two rows (the second padded) for `run` and `embed`.
    let json_of = |cmd: &str, folder: &Path| -> Value {
        let (code, out, err) = kiln(&[
            cmd,
            folder.to_str().unwrap(),
            "--tokens",
            "5,17,42,99",
            "--tokens",
            "88,12,7,0",
            "--attention-mask",
            "1,1,1,1",
            "--attention-mask",
            "1,1,1,0",
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let outs = json_of("run", &m);
    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                "{what}: {x} vs {y}"
            );
        }
    };
    // No modules.json: the masked mean, as the `pooled` output.
    let e = json_of("embed", &m);
    for r in 0..2 {
        close(
            &floats(&e["embeddings"][r]),
            &floats(&outs["pooled"][r]),
            "mean",
        );
    }
    // CLS, then max, with Normalize.
    let copy = support::scratch_copy("bert", "embed-modules");
    std::fs::create_dir_all(copy.join("1_Pooling")).unwrap();
    std::fs::write(
        copy.join("modules.json"),
        r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
           {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
           {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    let states = &outs["last_hidden_state"];
    for (mode, pick) in [
        ("pooling_mode_cls_token", 0usize),
        ("pooling_mode_max_tokens", 1),
    ] {
        std::fs::write(
            copy.join("1_Pooling/config.json"),
            format!(r#"{{"word_embedding_dimension": 32, "{mode}": true}}"#),
        )
        .unwrap();
        let e = json_of("embed", &copy);
        for r in 0..2 {
            let rows: Vec<Vec<f64>> = (0..4).map(|t| floats(&states[r][t])).collect();
            let seen = if r == 0 { 4 } else { 3 };
            let mut want: Vec<f64> = if pick == 0 {
                rows[0].clone()
            } else {
                (0..32)
                    .map(|c| {
                        (0..seen)
                            .map(|t| rows[t][c])
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .collect()
            };
            let n = want.iter().map(|x| x * x).sum::<f64>().sqrt();
            want.iter_mut().for_each(|x| *x /= n);
            close(&floats(&e["embeddings"][r]), &want, mode);
        }
    }
    // Two modes at once is refused by name.
    std::fs::write(
        copy.join("1_Pooling/config.json"),
        r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    let (code, _, err) = kiln(&["embed", copy.to_str().unwrap(), "--tokens", "1,2"]);
    assert_eq!(code, 2);
    assert!(err.contains("several pooling modes at once"), "{err}");
    let _ = std::fs::remove_dir_all(copy);
}

#[test]
fn chat_templates_render_encode_and_stop_as_transformers_does() {
    for name in ["gpt2", "llama"] {
        let r = reference(name);
        let model = kiln::Model::load(dir(name)).unwrap();
        let tok = model.tokenizer().unwrap();
        let m = dir(name);
        let m = m.to_str().unwrap();
        for case in r["chat"]["cases"].as_array().unwrap() {
            let messages: Vec<(&str, &str)> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| (x["role"].as_str().unwrap(), x["content"].as_str().unwrap()))
                .collect();
            let (text, ids_) = tok.chat(&messages).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{name}: rendered");
            assert_eq!(ids_, ids(&case["ids"]), "{name}: encoded");
            let mut args = vec![
                "generate",
                m,
                "--chat",
                "--max-new-tokens",
                "16",
                "--output",
                "json",
            ];
            if let [("system", s), ..] = messages[..] {
                args.extend(["--system", s]);
            }
            let user = messages.last().unwrap().1;
            args.extend(["--prompt", user]);
            let (code, out, err) = kiln(&args);
            assert_eq!(code, 0, "{err}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                ids(&v["tokens"]),
                ids(&case["new_ids"]),
                "{name}: {messages:?}"
            );
            assert_eq!(v["text"], case["new_text"], "{name}");
        }
    }
    // No template, or several prompts: clear errors.
    let copy = support::scratch_folder("gpt2", "no-chat");
    std::fs::remove_file(copy.join("chat_template.jinja")).unwrap();
    let (code, _, err) = kiln(&[
        "generate",
        copy.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hi",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("has no chat template"), "{err}");
    let (code, _, err) = kiln(&[
        "generate",
        "tests/data/hf/gpt2",
        "--chat",
        "--prompt",
        "a",
        "--prompt",
        "b",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--chat takes one --prompt"), "{err}");
    let _ = std::fs::remove_dir_all(copy);
}

#[test]
fn fill_mask_gives_what_the_transformers_pipeline_gives() {
    let r = reference("bert_mlm");
    let m = dir("bert_mlm");
    let m = m.to_str().unwrap();
    for case in r["fill_mask"].as_array().unwrap() {
        let p = case["prompt"].as_str().unwrap();
        let (code, out, err) = kiln(&["fill-mask", m, "--prompt", p, "--output", "json"]);
        assert_eq!(code, 0, "{err}");
        let got: Value = serde_json::from_str(&out).unwrap();
        let (got, want) = (got.as_array().unwrap(), case["result"].as_array().unwrap());
        assert_eq!(got.len(), want.len(), "{p}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["token"], w["token"], "{p}");
            assert_eq!(g["token_str"], w["token_str"], "{p}");
            assert_eq!(g["sequence"], w["sequence"], "{p}");
            let (gs, ws) = (g["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
            assert!(
                gs.is_finite() && ((gs - ws) / ws).abs() < 1e-5,
                "{p}: score {gs} vs {ws}"
            );
        }
    }
    let (code, _, err) = kiln(&["fill-mask", m, "--prompt", "no mask here."]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--prompt has no mask token `[MASK]` to fill"),
        "{err}"
    );
    let (code, _, err) = kiln(&["fill-mask", "tests/data/hf/bert", "--prompt", "a [MASK] b"]);
    assert_eq!(code, 2);
    assert!(err.contains("fill-mask needs a masked-LM"), "{err}");
}

/// Text's bad input: each a clear error (exit 2) naming the flag or the
/// file — an empty prompt, a prompt longer than the model's positions (as
/// text and through a chat template), a template using a special token the
/// vocabulary lacks, an end-of-turn token it lacks, and templates that fail
/// to render (a syntax error, `raise_exception`).
#[test]
fn text_bad_input_names_the_flag_or_the_file() {
    let g = "tests/data/hf/gpt2";
    let long = "hello ".repeat(200);
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["generate", g, "--prompt", "hi", "--prompt", ""],
            "--prompt 1 is empty: give the text to start from".into(),
        ),
        (
            vec!["run", g, "--prompt", ""],
            "--prompt 0 is empty".into(),
        ),
        (
            vec!["generate", g, "--chat", "--prompt", ""],
            "--prompt is empty: --chat needs the user's message".into(),
        ),
        (
            vec!["generate", g, "--prompt", &long],
            "--prompt 0 encodes to 200 tokens, more than the model's 64 positions (n_positions in config.json)".into(),
        ),
        (
            vec!["run", g, "--prompt", "hi", "--prompt", &long],
            "--prompt 1 encodes to 200 tokens, more than the model's 64 positions".into(),
        ),
        (
            vec!["generate", g, "--chat", "--prompt", &long],
            "--chat (the rendered template) encodes to 2".into(),
        ),
    ];
    for (args, want) in &cases {
        let (code, out, err) = kiln(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.starts_with("error: ") && err.contains(want.as_str()),
            "{args:?}: {err}"
        );
        assert!(err.len() < 400, "{err}");
    }

    // Templates: written into a copy of the folder, named in the message.
    let copy = support::scratch_folder("gpt2", "bad-templates");
    let c = copy.to_str().unwrap();
    let jinja = copy.join("chat_template.jinja");
    let jinja_name = jinja.display().to_string();
    let templates = [
        (
            "<|im_start|>user {{ messages[0]['content'] }}<|im_end|>",
            format!("the chat template {jinja_name} uses the special token \"<|im_start|>\", which"),
        ),
        (
            "{% for m in messages %}{{ m.content }",
            format!("the chat template {jinja_name} fails to render: syntax error"),
        ),
        (
            "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversations must start with a system message') }}{% endif %}",
            format!("{jinja_name} fails to render: invalid operation: Conversations must start with a system message"),
        ),
    ];
    for (template, want) in &templates {
        std::fs::write(&jinja, template).unwrap();
        let (code, _, err) = kiln(&["generate", c, "--chat", "--prompt", "hi"]);
        assert_eq!(code, 2, "{template}: {err}");
        assert!(err.contains(want.as_str()), "{template}: {err}");
    }
    // An end-of-turn token the vocabulary lacks: the chat could never stop.
    std::fs::copy(std::path::Path::new(g).join("chat_template.jinja"), &jinja).unwrap();
    let config = copy.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["eos_token"] = "<|eot|>".into();
    std::fs::write(&config, v.to_string()).unwrap();
    let (code, _, err) = kiln(&["generate", c, "--chat", "--prompt", "hi"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--chat: tokenizer_config.json names eos_token \"<|eot|>\", which")
            && err.contains("does not have as a token"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(copy);
}

/// Prompts of unequal lengths in one `generate` give what transformers gives
/// for the left-padded batch, on every backend, greedy and beam search (one
/// beam is greedy), with and without the KV cache.
#[test]
fn generate_takes_prompts_of_unequal_lengths_as_transformers_left_pads_them() {
    for name in ["gpt2", "llama"] {
        let r = &reference(name)["generate_ragged"];
        let m = dir(name);
        let want: Vec<Vec<i64>> = r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| ids(&row["new_ids"]))
            .collect();
        let texts: Vec<&str> = r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["text"].as_str().unwrap())
            .collect();
        for backend in ["interp", "reference", "cpu"] {
            for extra in [&[][..], &["--no-kv-cache"][..], &["--num-beams", "1"][..]] {
                let mut args = vec![
                    "generate",
                    m.to_str().unwrap(),
                    "--max-new-tokens",
                    "8",
                    "--ignore-eos",
                    "--backend",
                    backend,
                    "--output",
                    "json",
                ];
                for p in r["prompts"].as_array().unwrap() {
                    args.extend(["--prompt", p.as_str().unwrap()]);
                }
                args.extend(extra);
                let (code, out, err) = kiln(&args);
                assert_eq!(code, 0, "{name} {backend} {extra:?}: {err}");
                let v: Value = serde_json::from_str(&out).unwrap();
                let got: Vec<Vec<i64>> = v["tokens"].as_array().unwrap().iter().map(ids).collect();
                assert_eq!(got, want, "{name} {backend} {extra:?}");
                assert_eq!(
                    v["text"],
                    serde_json::json!(texts),
                    "{name} {backend} {extra:?}"
                );
            }
        }
    }
}
