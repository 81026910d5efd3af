//! The lowering layer against the oracle: every family at every pipeline, LoRA
//! merged and unmerged, prefill and decode, and random graphs run as lowered
//! Programs by the reference executor give the graph interpreter's outputs.
//! Also: the Program text of each family (snapshots), views instead of copies,
//! in-place writes, and the Program verifier catching broken Programs.

mod support;

use std::path::{Path, PathBuf};

use kiln::adapter::LoraMode;
use kiln::backends::lower::{self, verify, ArenaPlan, BufferKind, Kernel};
use kiln::backends::{Backend, Interpreter, Reference};
use kiln::ir::{Graph, ShapeCx};
use kiln::{Model, OptLevel, RunInputs, Tensor};
use proptest::prelude::*;
use support::{check_property, Case, NonFinite, Tolerance, BACKENDS};

/// How far `got` is from the interpreter's `want` (outputs of `graph`):
/// NaN and infinities fail, or with [`NonFinite::MatchReference`] must be
/// where the reference has them; the relative error must be within `rel_tol`.
fn compare(
    graph: &Graph,
    want: Vec<Tensor>,
    got: Vec<Tensor>,
    rel_tol: f64,
    policy: NonFinite,
) -> Result<f64, String> {
    let (want, got) = (support::named(graph, want), support::named(graph, got));
    support::outputs_deviation(&got, &want, &|_| policy)
        .and_then(|d| d.within(Tolerance::Relative(rel_tol)))
        .map(|d| d.relative())
        .map_err(|e| e.to_string())
}

/// Runs `model`'s function `name` on the interpreter (the oracle) and on
/// every other backend, and checks each against it.
fn check_backends(model: &Model, name: &str, inputs: &[Tensor], rel_tol: f64, what: &str) -> f64 {
    let graph = model.function(name).expect("function");
    let mut oracle = model
        .compile_function(name, BACKENDS[0])
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = oracle
        .run(inputs)
        .unwrap_or_else(|e| panic!("{what}: interp: {e}"));
    let mut worst = 0f64;
    for backend in &BACKENDS[1..] {
        let b = backend.name();
        let mut exe = model
            .compile_function(name, *backend)
            .unwrap_or_else(|e| panic!("{what} @{name} on {b}: {e}"));
        let got = exe
            .run(inputs)
            .unwrap_or_else(|e| panic!("{what} @{name} on {b}: {e}"));
        let tol = rel_tol.max(support::tolerance_vs_oracle(*backend));
        let err = compare(graph, want.clone(), got, tol, NonFinite::Reject)
            .unwrap_or_else(|e| panic!("{what} @{name} on {b}: {e}"));
        worst = worst.max(err);
    }
    worst
}

/// Every backend matches the interpreter on `model`'s main function. The
/// tolerance is 0 where a Program computes exactly what the graph says (same
/// f64 sums, same per-op rounding); LoRA's unmerged form rounds `x·a` and
/// `x·w` to f32 before adding them, where the interpreter keeps f64.
fn check_program(model: &Model, inputs: &RunInputs, rel_tol: f64, what: &str) -> f64 {
    let tensors = model.prepare_inputs(inputs).expect("inputs");
    let name = model.main().expect("main").name.clone();
    check_backends(model, &name, &tensors, rel_tol, what)
}

#[test]
fn programs_match_the_interpreter_on_every_family_and_pipeline() {
    for family in support::FAMILIES {
        let model = support::hf_model(family);
        let inputs = support::family_inputs(&model);
        for level in [OptLevel::O0, OptLevel::O1, OptLevel::O2] {
            let m = model.optimize(level).expect("optimize");
            let err = check_program(&m, &inputs, 0.0, &format!("{family} {level:?}"));
            println!("{family} {level:?}: {err:.1e}");
        }
    }
}

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

#[test]
fn programs_match_the_interpreter_with_lora_merged_and_unmerged() {
    for (base, adapters) in [
        ("gpt2", vec!["gpt2_lora"]),
        ("llama", vec!["llama_lora"]),
        ("llama", vec!["llama_lora", "llama_lora2"]),
    ] {
        let dirs: Vec<PathBuf> = adapters.iter().map(|a| data_dir(a)).collect();
        for mode in [LoraMode::Unmerged, LoraMode::Merged] {
            let model = support::hf_model(base)
                .with_adapters(&dirs, mode)
                .expect("adapters");
            let inputs = support::family_inputs(&model);
            let pipeline = kiln::adapter::pipeline(OptLevel::O2, mode).expect("pipeline");
            let (m, _) = model.apply_passes(&pipeline).expect("optimize");
            if mode == LoraMode::Unmerged {
                assert!(m.to_text().contains("lora_linear"));
            }
            let err = check_program(&m, &inputs, 1e-6, &format!("{base}+{adapters:?} {mode}"));
            println!("{base}+{adapters:?} {mode}: {err:.1e}");
        }
    }
}

#[test]
fn prefill_and_decode_programs_match_the_interpreter() {
    for family in support::GENERATIVE {
        let model = support::hf_model(family)
            .optimize(OptLevel::O2)
            .expect("O2");
        let split = model.kv_split().expect("kv split");
        let mut inputs = support::family_inputs(&model);
        let seq2seq = matches!(family, "bart" | "marian" | "t5" | "t5_v11");
        if family == "bart" {
            inputs.decoder_tokens = Some(vec![vec![2, 0, 14], vec![2, 0, 60]]);
        }
        let prefill_inputs = split.prepare_inputs(&inputs).expect("inputs");
        check_backends(&split, "prefill", &prefill_inputs, 0.0, family);
        let x = split
            .compile_function("prefill", BACKENDS[0])
            .and_then(|mut e| Ok(e.run(&prefill_inputs)?))
            .expect("prefill");
        // One decode step on the prefill's outputs, by input name.
        let decode = split.function("decode").expect("decode");
        let prefill = split.function("prefill").expect("prefill");
        let out_names: Vec<&str> = prefill.outputs().iter().map(|(n, _)| n.as_str()).collect();
        let in_names: Vec<String> = prefill
            .inputs()
            .iter()
            .map(|&v| match &prefill.node(v).kind {
                kiln::ir::NodeKind::Input { name } => name.clone(),
                _ => String::new(),
            })
            .collect();
        let growing = if seq2seq { "decoder_tokens" } else { "tokens" };
        let step_inputs: Vec<Tensor> = decode
            .inputs()
            .iter()
            .map(|&v| {
                let kiln::ir::NodeKind::Input { name } = &decode.node(v).kind else {
                    unreachable!("inputs are inputs")
                };
                match name.as_str() {
                    "past_keys" => {
                        x[out_names.iter().position(|n| *n == "key_cache").unwrap()].clone()
                    }
                    "past_values" => {
                        x[out_names.iter().position(|n| *n == "value_cache").unwrap()].clone()
                    }
                    n if n == growing => Tensor::from_tokens(&[[7i64], [9]]).unwrap(),
                    n => match out_names.iter().position(|o| o == &n) {
                        Some(i) => x[i].clone(),
                        None => {
                            prefill_inputs[in_names.iter().position(|i| i == n).unwrap()].clone()
                        }
                    },
                }
            })
            .collect();
        check_backends(&split, "decode", &step_inputs, 0.0, family);
    }
}

#[test]
fn the_real_minilm_program_matches_when_its_weights_are_present() {
    let Some(dir) = std::env::var_os("KILN_MINILM_DIR").map(PathBuf::from) else {
        assert!(!support::in_ci(), "CI sets KILN_MINILM_DIR (.ci/run)");
        println!("skipping: KILN_MINILM_DIR is not set; the family tests cover BERT");
        return;
    };
    let model = Model::load(&dir).expect("minilm");
    let mut inputs = RunInputs::tokens(vec![
        vec![101, 7592, 2088, 102, 0],
        vec![101, 2088, 102, 0, 0],
    ]);
    inputs.attention_mask = Some(vec![vec![1, 1, 1, 1, 0], vec![1, 1, 1, 0, 0]]);
    let m = model.optimize(OptLevel::O2).expect("O2");
    check_program(&m, &inputs, 0.0, "minilm");
}

/// `B=1, T=4`, and `S=5` for the encoder length of BART and Marian.
fn binding(family: &str) -> Vec<(String, i64)> {
    let mut b = vec![("B".to_string(), 1), ("T".to_string(), 4)];
    if matches!(family, "bart" | "marian" | "t5" | "t5_v11") {
        b.push(("S".to_string(), 5));
    }
    b
}

/// The Program text of a family at -O2 under [`binding`].
fn lowered(family: &str) -> String {
    support::hf_model(family)
        .optimize(OptLevel::O2)
        .expect("O2")
        .lowered_text(&binding(family))
        .expect("lowered text")
}

#[test]
fn lowered_programs_of_every_family() {
    for family in support::FAMILIES {
        insta::assert_snapshot!(format!("lowered_{family}"), lowered(family));
    }
}

#[test]
fn lowered_decode_program_of_llama() {
    let split = support::hf_model("llama")
        .optimize(OptLevel::O2)
        .unwrap()
        .kv_split()
        .unwrap();
    let text = split
        .lowered_text(&[("B".into(), 1), ("T".into(), 1), ("S".into(), 8)])
        .expect("lowered");
    insta::assert_snapshot!(text);
}

fn graph(text: &str) -> Graph {
    kiln::ir::parse_graph(text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn movement_becomes_views_and_loops_write_in_place() {
    let g = graph(
        "func @f(%x: f32[B, T, 8]) -> (y: f32[B, 4, T, 2]) {
  %a = exp(%x) : f32[B, T, 8]
  %b = neg(%a) : f32[B, T, 8]
  %r = reshape(%b) shape=[B, T, 4, 2] : f32[B, T, 4, 2]
  %p = permute(%r) perm=[0, 2, 1, 3] : f32[B, 4, T, 2]
  %s = slice(%p) axis=3 start=0 end=2 : f32[B, 4, T, 2]
  %y = tanh(%s) : f32[B, 4, T, 2]
  return %y
}",
    );
    let p = lower::lower(&g).expect("lowers");
    verify::verify_structure(&p).expect("verifies");
    let kinds: Vec<&str> = p.steps.iter().map(|s| s.kernel.kind_name()).collect();
    assert_eq!(kinds, ["loop", "loop", "loop"], "{}", p.to_text(None));
    // %b overwrites %a (it dies there, same size, element for element).
    assert_eq!(p.liveness.in_place_pairs().len(), 1, "{}", p.to_text(None));
    let mut exe = Reference.compile(&g, &Default::default()).unwrap();
    let x = Tensor::f32(
        vec![2, 3, 8],
        (0..48).map(|i| i as f32 / 10.0 - 2.0).collect(),
    )
    .unwrap();
    let mut oracle = Interpreter.compile(&g, &Default::default()).unwrap();
    let (want, got) = (
        oracle.run(std::slice::from_ref(&x)).unwrap(),
        exe.run(&[x]).unwrap(),
    );
    compare(&g, want, got, 0.0, NonFinite::Reject).unwrap();
}

#[test]
fn a_transposed_merge_copies_once_and_concat_parts_are_written_in_place() {
    let g = graph(
        "func @f(%x: f32[B, T, 8], %z: f32[B, 2, 8]) -> (y: f32[T, B, 8], c: f32[B, T + 2, 8]) {
  %p = permute(%x) perm=[1, 0, 2] : f32[T, B, 8]
  %m = reshape(%p) shape=[T * B, 8] : f32[T * B, 8]
  %y = reshape(%m) shape=[T, B, 8] : f32[T, B, 8]
  %e = exp(%x) : f32[B, T, 8]
  %c = concat(%e, %z) axis=1 : f32[B, T + 2, 8]
  return %y, %c
}",
    );
    let p = lower::lower(&g).expect("lowers");
    let text = p.to_text(None);
    let copies = p.steps.iter().filter(|s| s.kernel == Kernel::Copy).count();
    // One copy for the transposed merge, one for the input part of the
    // concat; `exp` writes its part of the concat directly.
    assert_eq!(copies, 2, "{text}");
    let mut exe = Reference.compile(&g, &Default::default()).unwrap();
    let mut oracle = Interpreter.compile(&g, &Default::default()).unwrap();
    let inputs = support::random_inputs(&g, 2, 3, 5);
    let (want, got) = (oracle.run(&inputs).unwrap(), exe.run(&inputs).unwrap());
    compare(&g, want, got, 0.0, NonFinite::Reject).unwrap();
}

fn small_program() -> (lower::Program, ShapeCx) {
    let g = graph(
        "func @f(%x: f32[B, 4]) -> (y: f32[B, 4]) {
  %a = exp(%x) : f32[B, 4]
  %s = reduce_sum(%a) axes=[1] keepdim=true : f32[B, 1]
  %y = div(%a, %s) : f32[B, 4]
  return %y
}",
    );
    let p = lower::lower(&g).expect("lowers");
    let mut cx = ShapeCx::new();
    cx.bind("B", &kiln::ir::Dim::constant(3)).unwrap();
    (p, cx)
}

#[test]
fn the_program_verifier_reports_reads_before_writes() {
    let (mut p, _) = small_program();
    p.steps.swap(0, 1);
    let err = verify::verify_structure(&p).unwrap_err().to_string();
    insta::assert_snapshot!(err);
}

#[test]
fn the_program_verifier_reports_views_out_of_bounds() {
    let (mut p, cx) = small_program();
    let view = p
        .buffers
        .iter()
        .position(|b| matches!(b.kind, BufferKind::View { .. }))
        .expect("a view");
    if let BufferKind::View { offset, .. } = &mut p.buffers[view].kind {
        *offset = kiln::ir::Dim::constant(2);
    }
    let plan = ArenaPlan::place(&p, &cx).unwrap();
    let err = verify::verify_binding(&p, &cx, &plan)
        .unwrap_err()
        .to_string();
    insta::assert_snapshot!(err);
}

#[test]
fn the_program_verifier_reports_overlapping_live_buffers() {
    let (p, cx) = small_program();
    let mut plan = ArenaPlan::place(&p, &cx).unwrap();
    verify::verify_binding(&p, &cx, &plan).expect("a good plan verifies");
    assert!(plan.offsets.len() >= 2, "{}", p.to_text(Some(&cx)));
    plan.offsets.iter_mut().for_each(|o| *o = 0);
    let err = verify::verify_binding(&p, &cx, &plan)
        .unwrap_err()
        .to_string();
    insta::assert_snapshot!(err);
}

#[test]
fn cli_prints_the_lowered_program_with_its_arena() {
    let (code, out, err) = support::kiln(&[
        "ir",
        "tests/data/hf/gpt2",
        "--lowered",
        "--bind",
        "B=1,T=16",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("program @gpt2("), "{out}");
    assert!(out.contains("arena (B=1, T=16): peak "), "{out}");
    let (code, out, _) = support::kiln(&["ir", "tests/data/hf/gpt2", "--lowered"]);
    assert_eq!(code, 0);
    assert!(out.contains("arena: planned per binding of B, T"), "{out}");
    let (code, _, err) = support::kiln(&["ir", "tests/data/hf/gpt2", "--lowered", "--bind", "B=1"]);
    assert_eq!(code, 2);
    assert!(err.contains("`T`, which needs a value"), "{err}");
    let (code, _, err) = support::kiln(&["ir", "tests/data/hf/gpt2", "--lowered", "--bind", "Q=1"]);
    assert_eq!(code, 2);
    assert!(err.contains("no run-time symbol `Q`"), "{err}");
}

#[test]
fn the_reference_backend_runs_from_the_cli() {
    let args = |backend: &str| {
        support::kiln(&[
            "run",
            "tests/data/hf/llama",
            "--tokens",
            "5,17,42",
            "--backend",
            backend,
            "--output",
            "json",
        ])
    };
    let (a, b) = (args("interp"), args("reference"));
    assert_eq!(a.0, 0, "{}", a.2);
    assert_eq!(b.0, 0, "{}", b.2);
    assert_eq!(a.1, b.1);
}

fn interesting_float() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(-0.0), Just(1.0), Just(-2.0), -4.0f64..4.0]
}

/// One random graph, optionally through -O2, run on the interpreter and on
/// every other backend; skipped when the interpreter cannot run it (a cast
/// to f16), which says nothing about the lowering.
fn random_case(ops: &[u32], floats: &[f64], seed: u64, fused: bool) -> Result<Case, TestCaseError> {
    let mut graph = support::random_graph::random_graph(ops, floats);
    let mut weights = kiln::frontends::gpt2::random_weights(&graph, seed).expect("weights");
    if fused {
        let mut module = kiln::ir::Module {
            funcs: vec![graph.clone()],
        };
        let mut cx = kiln::passes::PassContext::new(Some(&mut weights));
        kiln::PassManager::pipeline(OptLevel::O2)
            .run(&mut module, &mut cx)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        graph = module.funcs.remove(0);
    }
    let inputs = support::random_inputs(&graph, 2, 3, seed);
    let Ok(want) = Interpreter
        .compile(&graph, &weights)
        .and_then(|mut e| e.run(&inputs))
    else {
        return Ok(Case::Skipped("the interpreter cannot run it"));
    };
    let text = kiln::ir::print_graph(&graph);
    let mut exe = Reference
        .compile(&graph, &weights)
        .map_err(|e| TestCaseError::fail(format!("lowering: {e}\n{text}")))?;
    let got = exe
        .run(&inputs)
        .map_err(|e| TestCaseError::fail(format!("program: {e}\n{text}")))?;
    compare(&graph, want, got, 1e-6, NonFinite::MatchReference).map_err(|e| {
        let program = lower::lower(&graph)
            .map(|p| p.to_text(None))
            .unwrap_or_default();
        TestCaseError::fail(format!("{e}\n{text}\n{program}"))
    })?;
    Ok(Case::Ran)
}

#[test]
fn random_graphs_run_the_same_as_programs() {
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed};
    let config = Config {
        cases: 128,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x6c6f_7765_7269_6e67),
        failure_persistence: None,
        ..Config::default()
    };
    let strategy = (
        prop::collection::vec(any::<u32>(), 1..30),
        prop::collection::vec(interesting_float(), 1..8),
        any::<u64>(),
        any::<bool>(),
    );
    check_property(
        "random_graphs_run_the_same_as_programs",
        config,
        strategy,
        |(ops, floats, seed, fused)| random_case(&ops, &floats, seed, fused),
    );
}

#[test]
fn an_op_that_cannot_lower_is_an_error_naming_it() {
    // A LoRA rank known only at run time: the scale alpha / r cannot be folded.
    let g = graph(
        "func @f(%x: f32[B, 8], %a: f32[8, R], %b: f32[R, 4]) -> (y: f32[B, 4]) {
  param @w: f32[8, 4]
  %y = lora_linear(%x, @w, %a, %b) alpha=16.0 layout=in_out : f32[B, 4]
  return %y
}",
    );
    let err = lower::lower(&g).unwrap_err().to_string();
    insta::assert_snapshot!(err, @"%y = lora_linear(%x, @w, %a, %b) (line 3): cannot lower: the LoRA rank `R` must be a compile-time constant");
}
