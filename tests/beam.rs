//! Beam search against transformers' `generate(num_beams=K, do_sample=False)`
//! on the tiny gpt2 and llama references (`beam_reference.json`, made by
//! `scripts/make_references.py --only beams`): with EOS disabled and with it
//! (some beams end early), two length penalties, every backend.

mod support;

use kiln::beam::BeamOptions;
use kiln::{Model, OptLevel, RunInputs};
use serde_json::Value;
use support::{kiln, BACKENDS};

fn reference(name: &str) -> Value {
    let path = format!(
        "{}/tests/data/hf/{name}/beam_reference.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn check(name: &str) {
    let r = reference(name);
    let prompt = ids(&r["prompt"]);
    let base = support::hf_model(name);
    let config_eos = base.info().unwrap().eos_token_ids.clone();
    let mut cases = 0;
    for level in [OptLevel::O0, OptLevel::O2] {
        let model = base.optimize(level).unwrap();
        for case in r["cases"].as_array().unwrap() {
            let k = case["num_beams"].as_u64().unwrap() as usize;
            let lp = case["length_penalty"].as_f64().unwrap();
            let eos = &case["eos_token_ids"];
            let mut m: Model = model.clone();
            if let Some(list) = eos.as_array() {
                for id in list.iter().map(|v| v.as_i64().unwrap()) {
                    if !config_eos.contains(&id) {
                        m = m.with_stop_token(id);
                    }
                }
            }
            let want: Vec<Vec<i64>> = case["beams"].as_array().unwrap().iter().map(ids).collect();
            let want_scores: Vec<f64> = case["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for backend in BACKENDS {
                let opts = BeamOptions {
                    num_beams: k,
                    length_penalty: lp,
                    max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                    stop_at_eos: !eos.is_null(),
                    backend,
                };
                let got = m
                    .beam_search(&RunInputs::tokens(vec![prompt.clone()]), &opts)
                    .unwrap();
                let what = format!(
                    "{name} {level:?} K={k} lp={lp} eos={eos} on {}",
                    backend.name()
                );
                let beams: Vec<Vec<i64>> = got[0].iter().map(|b| b.tokens.clone()).collect();
                assert_eq!(beams, want, "{what}: beams differ from transformers");
                for (b, w) in got[0].iter().zip(&want_scores) {
                    assert!(b.score.is_finite(), "{what}");
                    // Scores are f32 sums of log-probabilities, as in transformers.
                    assert!(
                        (b.score - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{what}: score {} vs {w}",
                        b.score
                    );
                }
                cases += 1;
            }
        }
    }
    assert!(cases >= 8, "{name}: {cases} cases");
}

#[test]
fn gpt2_beams_match_transformers() {
    check("gpt2");
}

#[test]
fn llama_beams_match_transformers() {
    check("llama");
}

#[test]
fn the_cli_prints_every_beam_and_its_score() {
    let (code, out, err) = kiln(&[
        "generate",
        "tests/data/hf/llama",
        "--tokens",
        "11,73,4,58,90",
        "--num-beams",
        "4",
        "--max-new-tokens",
        "8",
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let want = &reference("llama")["cases"][2];
    assert_eq!(want["num_beams"], 4);
    assert_eq!(v["beams"], want["beams"]);
    assert_eq!(v["tokens"], want["beams"][0]);
    assert_eq!(v["scores"].as_array().unwrap().len(), 4);
    // The tokenizer's text of the best beam, as `tokenizer.decode(new_ids)`.
    assert!(v["text"].is_string(), "{out}");
}

#[test]
fn bad_beam_requests_are_clear_errors() {
    for (args, msg) in [
        (
            vec!["--num-beams", "0"],
            "--num-beams must be between 1 and 256, got 0",
        ),
        (
            vec!["--num-beams", "2", "--temperature", "0.5"],
            "cannot be used with",
        ),
        (vec!["--length-penalty", "2"], "--num-beams"),
    ] {
        let mut a = vec!["generate", "tests/data/hf/gpt2", "--tokens", "1,2"];
        a.extend(args);
        let (code, _, err) = kiln(&a);
        assert_ne!(code, 0);
        assert!(err.contains(msg), "{a:?}: {err}");
    }
}
