//! The memory plan lowering computes: valid for every family and random
//! graphs under many bindings (the Program verifier's overlap and bounds
//! checks), never larger than the intermediates laid end to end, never smaller
//! than what is live at once; the figures of GPT-2 small.

mod support;

use kiln::backends::lower::{self, verify, ArenaPlan, Program};
use kiln::frontends::gpt2::{build_gpt2, Gpt2Config};
use kiln::ir::{Dim, Graph, Module, ShapeCx};
use kiln::passes::PassContext;
use kiln::{OptLevel, PassManager};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};
use support::{check_property, hf_model, Case, FAMILIES};

fn binding(p: &Program, sizes: &[(&str, i64)]) -> ShapeCx {
    // Symbols not given (a cache length `S1`) take 5.
    let mut cx = ShapeCx::new();
    for n in &p.runtime_symbols {
        let v = sizes.iter().find(|(s, _)| s == n).map_or(5, |(_, v)| *v);
        cx.bind(n, &Dim::constant(v)).expect("bind");
    }
    p.bind_capacity(&cx, None).expect("capacity")
}

/// The most bytes of arena temporaries live at one step.
fn max_live_bytes(p: &Program, cx: &ShapeCx) -> u64 {
    let plan = ArenaPlan::place(p, cx).expect("plan");
    (0..p.steps.len())
        .map(|i| {
            p.liveness
                .slots
                .iter()
                .zip(&plan.sizes)
                .filter(|(s, _)| s.first <= i && i <= s.last)
                .map(|(_, b)| *b)
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

/// Plans `p` under `cx`, verifies it, and checks the bounds every plan keeps.
fn check_plan(p: &Program, cx: &ShapeCx) -> Result<ArenaPlan, String> {
    let plan = ArenaPlan::place(p, cx).map_err(|e| e.to_string())?;
    verify::verify_binding(p, cx, &plan).map_err(|e| e.to_string())?;
    let slack = lower::plan::ALIGNMENT * p.liveness.slots.len() as u64;
    if plan.peak_bytes > plan.total_bytes + slack {
        return Err(format!(
            "arena {} > intermediates {} (+{slack})",
            plan.peak_bytes, plan.total_bytes
        ));
    }
    let live = max_live_bytes(p, cx);
    if plan.peak_bytes < live {
        return Err(format!(
            "arena {} < {live} bytes live at once",
            plan.peak_bytes
        ));
    }
    Ok(plan)
}

#[test]
fn plans_are_valid_for_every_family_at_every_level_and_binding() {
    for family in FAMILIES {
        for level in [OptLevel::O0, OptLevel::O2] {
            let m = hf_model(family).optimize(level).expect("pipeline");
            let split = if family.starts_with("bert") {
                m.clone()
            } else {
                m.kv_split().expect("split")
            };
            for model in [&m, &split] {
                for p in model.lower().expect("lowers") {
                    for (b, t) in [(1, 1), (1, 16), (3, 7)] {
                        let cx = binding(&p, &[("B", b), ("T", t), ("S", 9)]);
                        check_plan(&p, &cx)
                            .unwrap_or_else(|e| panic!("{family} {level:?} @{}: {e}", p.name));
                    }
                }
            }
        }
    }
}

/// GPT-2 small (124M), B = 1, T = 128: the arena against one buffer per
/// intermediate, as built (-O0) and at -O2 (fusion, epilogues, in-place).
#[test]
fn memory_plan_of_gpt2_small() {
    let cfg = Gpt2Config {
        vocab_size: 50257,
        n_positions: 1024,
        n_embd: 768,
        n_layer: 12,
        n_head: 12,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        activation: kiln::ir::UnaryOp::GeluTanh,
    };
    let graph = build_gpt2(&cfg).expect("GPT-2 small builds");
    let mut report = String::new();
    for (label, level) in [("-O0", OptLevel::O0), ("-O2", OptLevel::O2)] {
        let mut module = Module {
            funcs: vec![graph.clone()],
        };
        PassManager::pipeline(level)
            .run(&mut module, &mut PassContext::new(None))
            .expect("passes");
        let p = lower::lower(&module.funcs[0]).expect("lowers");
        let cx = binding(&p, &[("B", 1), ("T", 128)]);
        let plan = check_plan(&p, &cx).expect("valid plan");
        let in_place = p.liveness.in_place_pairs().len();
        report.push_str(&format!(
            "{label}: {} steps, {} temporaries in {} slots ({in_place} written in place), peak arena {} bytes, {} without reuse\n",
            p.steps.len(),
            p.liveness.slots.iter().map(|s| s.buffers.len()).sum::<usize>(),
            p.liveness.slots.len(),
            plan.peak_bytes,
            plan.total_bytes,
        ));
    }
    println!("{report}");
    insta::assert_snapshot!(report);
}

fn float_attr() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), Just(-2.0), -4.0f64..4.0]
}

fn seeded(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

fn lowered_after(graph: &Graph, level: OptLevel) -> Result<Program, TestCaseError> {
    let mut module = Module {
        funcs: vec![graph.clone()],
    };
    PassManager::pipeline(level)
        .run(&mut module, &mut PassContext::new(None))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    lower::lower(&module.funcs[0]).map_err(|e| TestCaseError::fail(e.to_string()))
}

#[test]
fn plans_of_random_graphs_are_valid() {
    let strategy = (
        prop::collection::vec(any::<u32>(), 1..40),
        prop::collection::vec(float_attr(), 1..6),
        1i64..4,
        1i64..9,
    );
    check_property(
        "plans_of_random_graphs_are_valid",
        seeded(64, 0x6b69_6c6e_6d65_6d70),
        strategy,
        |(ops, floats, batch, len)| {
            let graph = support::random_graph::random_graph(&ops, &floats);
            for level in [OptLevel::O0, OptLevel::O2] {
                let p = lowered_after(&graph, level)?;
                let cx = binding(&p, &[("B", batch), ("T", len)]);
                if let Err(e) = check_plan(&p, &cx) {
                    // A slice `0..4` of a `T` axis is out of range for T < 4: the
                    // verifier must say so exactly when the graph cannot run.
                    let weights =
                        kiln::frontends::gpt2::random_weights(&graph, 1).expect("weights");
                    let runs = kiln::backends::Backend::compile(
                        &kiln::backends::Interpreter,
                        &graph,
                        &weights,
                    )
                    .and_then(|mut exe| exe.run(&support::random_inputs(&graph, batch, len, 1)));
                    let out_of_range = e.contains("view reaches") || e.contains("slice end");
                    if out_of_range && runs.is_err() {
                        return Ok(Case::Skipped("a slice is out of range under this binding"));
                    }
                    return Err(TestCaseError::fail(format!(
                        "{e}\n{}",
                        p.to_text(Some(&cx))
                    )));
                }
            }
            Ok(Case::Ran)
        },
    );
}

#[test]
fn cli_refuses_a_malformed_binding() {
    let (code, _, err) =
        support::kiln(&["ir", "tests/data/hf/gpt2", "--lowered", "--bind", "B=one"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`B=one` is not a binding such as T=128"),
        "{err}"
    );
    let (code, _, err) = support::kiln(&["ir", "tests/data/hf/gpt2", "--bind", "B=1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--lowered"), "{err}");
}
