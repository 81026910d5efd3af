//! The cleanup passes: canonicalize, constant folding and CSE (each with DCE).
//!
//! Each pass has a snapshot of the IR before and after on a small hand-written
//! model that exercises every rule (and, where a rule must not fire, a case that
//! shows it does not); the interpreter's outputs on those models are compared
//! before and after. Then every model family goes through each pass with the
//! differential check, and random well-typed graphs go through the pipelines
//! (proptest): outputs equal bit for bit, since every rewrite of these passes
//! is exact, and the result verifies. Outputs must be finite, except those a
//! snapshot graph is built to make NaN or infinite, where the NaN and
//! infinities must be reproduced; a random graph whose outputs are not finite
//! before the passes is skipped, and counted.

mod support;

use kiln::backends::{Backend, Interpreter};
use kiln::ir::{print_graph, Graph, Module, Tensor, TensorData, Weights};
use kiln::passes::{Changed, PassContext};
use kiln::PassManager;
use proptest::prelude::*;
use support::random_graph::random_interpretable_graph;
use support::{
    check_outputs_finite, check_preserves, check_property, family_inputs, hf_model, named,
    outputs_deviation, random_inputs, Case, NonFinite, Side, Tolerance, FAMILIES,
};

/// The cleanup pipeline, `-O1`.
const CLEANUP: [&str; 4] = ["canonicalize", "constant-folding", "cse", "dce"];

/// Runs the passes `names` on a copy of `graph` with `weights`; returns the new
/// graph and one `pass: note; note` line per pass that noted something.
fn run_passes(graph: &Graph, weights: &mut Weights, names: &[&str]) -> (Graph, Vec<String>) {
    let mut module = Module {
        funcs: vec![graph.clone()],
    };
    let mut cx = PassContext::new(Some(weights));
    PassManager::from_names(names)
        .expect("known passes")
        .run(&mut module, &mut cx)
        .unwrap_or_else(|e| panic!("passes {names:?}: {e}\n{}", print_graph(graph)));
    let notes = cx
        .log
        .iter()
        .filter(|r| !r.notes.is_empty())
        .map(|r| format!("{}: {}", r.pass, r.notes.join("; ")))
        .collect();
    let out = module.funcs.pop().expect("one function");
    kiln::ir::verify(&out).unwrap_or_else(|e| panic!("{e}\n{}", print_graph(&out)));
    (out, notes)
}

/// The interpreter's outputs of `graph` on `inputs`.
fn interpret(graph: &Graph, weights: &Weights, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    Interpreter
        .compile(graph, weights)
        .and_then(|mut exe| exe.run(inputs))
        .map_err(|e| e.to_string())
}

/// Asserts that two runs of `graph` agree bit for bit (NaN matching NaN,
/// whatever its payload), every element finite except in the outputs
/// `non_finite_outputs`, which the graph is built to make NaN or infinite:
/// there the reference's NaN and infinities must be reproduced.
fn assert_same_outputs(
    graph: &Graph,
    before: &[Tensor],
    after: &[Tensor],
    non_finite_outputs: &[&str],
    what: &str,
) {
    let (before, after) = (named(graph, before.to_vec()), named(graph, after.to_vec()));
    let policy = |name: &str| {
        if non_finite_outputs.contains(&name) {
            NonFinite::MatchReference
        } else {
            NonFinite::Reject
        }
    };
    outputs_deviation(&after, &before, &policy)
        .and_then(|d| d.within(Tolerance::Absolute(0.0)))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    // Equal values can still differ in the sign of a zero.
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        if let (TensorData::F32(x), TensorData::F32(y)) = (a.data(), b.data()) {
            for (k, (p, q)) in x.iter().zip(y.iter()).enumerate() {
                let same_bits = (p.is_nan() && q.is_nan()) || p.to_bits() == q.to_bits();
                assert!(
                    same_bits,
                    "{what}: {name}[{k}]: {p:e} vs {q:e} differ in their bits"
                );
            }
        }
    }
}

/// Runs `names` on `src`, checks the interpreter's outputs are unchanged on
/// seeded random inputs (`B = 2`, `T = 3`), and renders the snapshot text: the
/// IR before, the notes, the IR after.
fn cleanup_snapshot(src: &str, names: &[&str], non_finite_outputs: &[&str]) -> String {
    let graph = kiln::ir::parse_graph(src).unwrap_or_else(|e| panic!("{e}"));
    kiln::ir::verify(&graph).unwrap_or_else(|e| panic!("{e}"));
    let mut weights = kiln::frontends::gpt2::random_weights(&graph, 7).expect("weights");
    let inputs = random_inputs(&graph, 2, 3, 11);
    let before = interpret(&graph, &weights, &inputs).expect("runs before");
    let (after_graph, notes) = run_passes(&graph, &mut weights, names);
    let after = interpret(&after_graph, &weights, &inputs).expect("runs after");
    assert_same_outputs(
        &graph,
        &before,
        &after,
        non_finite_outputs,
        &names.join(","),
    );
    format!(
        "// before\n{}\n// after {}\n// {}\n{}",
        print_graph(&graph),
        names.join(","),
        notes.join("\n// "),
        print_graph(&after_graph)
    )
}

const CANONICALIZE_SRC: &str = "
func @canon(%x: f32[B, T, d], %ids: i64[B, T]) -> (heads: f32[B, h, T, dh], back: f32[B, T, d], bias: f32[B, T, d], full: f32[B, T, d], part: f32[B, T, dh], cast_same: f32[B, T, d], cast_other: i32[B, T], negneg: f32[B, T, d], by_one: f32[B, T, d], one_by: f32[B, T, d], broadcast: f32[2, B, T, d], div_one: f32[B, T, d], plus_neg_zero: f32[B, T, d], plus_zero: f32[B, T, d], minus_zero: f32[B, T, d], ids_plus_zero: i64[B, T], swapped: f32[B, T, dh], max_zero: f32[B, T, d], min_one: f32[B, T, d], ids_eq: bool[B, T])
    where d = 8, h = 2, dh = d / h {
  param @bias: f32[d]
  %one = constant() value=1.0 dtype=f32 shape=[] : f32[]
  %wide_one = constant() value=1.0 dtype=f32 shape=[2, 1, 1, 1] : f32[2, 1, 1, 1]
  %zero = constant() value=0.0 dtype=f32 shape=[] : f32[]
  %neg_zero = constant() value=-0.0 dtype=f32 shape=[] : f32[]
  %izero = constant() value=0 dtype=i64 shape=[] : i64[]
  %same = reshape(%x) shape=[B, T, 8] : f32[B, T, 8]
  %split = reshape(%same) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %flat = reshape(%split) shape=[B, T * h, dh] : f32[B, T * h, dh]
  %split2 = reshape(%flat) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %p1 = permute(%split2) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %p2 = permute(%p1) perm=[0, 1, 3, 2] : f32[B, h, dh, T]
  %heads = permute(%p2) perm=[0, 1, 3, 2] : f32[B, h, T, dh]
  %unheads = permute(%heads) perm=[0, 2, 1, 3] : f32[B, T, h, dh]
  %back = reshape(%unheads) shape=[B, T, d] : f32[B, T, d]
  %row = reshape(@bias) shape=[1, d] : f32[1, d]
  %rows = expand(%row) shape=[T, d] : f32[T, d]
  %batch = expand(%rows) shape=[B, T, d] : f32[B, T, d]
  %noop = expand(%x) shape=[B, T, d] : f32[B, T, d]
  %biased = add(%noop, %batch) : f32[B, T, d]
  %full = slice(%x) axis=-1 start=0 end=d : f32[B, T, d]
  %part = slice(%x) axis=-1 start=0 end=dh : f32[B, T, dh]
  %cast_same = cast(%x) to=f32 : f32[B, T, d]
  %cast_other = cast(%ids) to=i32 : i32[B, T]
  %n1 = neg(%x) : f32[B, T, d]
  %negneg = neg(%n1) : f32[B, T, d]
  %by_one = mul(%x, %one) : f32[B, T, d]
  %one_by = mul(%one, %x) : f32[B, T, d]
  %broadcast = mul(%x, %wide_one) : f32[2, B, T, d]
  %div_one = div(%x, %one) : f32[B, T, d]
  %plus_neg_zero = add(%x, %neg_zero) : f32[B, T, d]
  %plus_zero = add(%x, %zero) : f32[B, T, d]
  %minus_zero = sub(%x, %zero) : f32[B, T, d]
  %ids_plus_zero = add(%izero, %ids) : i64[B, T]
  %swapped = add(%zero, %part) : f32[B, T, dh]
  %max_zero = max(%zero, %x) : f32[B, T, d]
  %min_one = min(%one, %x) : f32[B, T, d]
  %ids_eq = eq(%izero, %ids) : bool[B, T]
  return %heads, %back, %biased, %full, %part, %cast_same, %cast_other, %negneg, %by_one, %one_by, %broadcast, %div_one, %plus_neg_zero, %plus_zero, %minus_zero, %ids_plus_zero, %swapped, %max_zero, %min_one, %ids_eq
}
";

const CONSTANT_FOLDING_SRC: &str = "
func @fold(%x: f32[B, T, d], %ids: i64[B, T]) -> (scores: f32[B, T, d], shifted: f32[B, T, d], ids_scaled: i64[B, T], wrapped: i32[], chosen: f32[], truncated: i64[], not_a_number: f32[], erf_folded: f32[], cat: f32[2], tiled: f32[B, T, d])
    where d = 8 {
  %head_dim = constant() value=8.0 dtype=f32 shape=[] : f32[]
  %root = sqrt(%head_dim) : f32[]
  %scale = recip(%root) : f32[]
  %scores = mul(%x, %scale) : f32[B, T, d]
  %neg_inf = constant() value=-inf dtype=f32 shape=[] : f32[]
  %pos_inf = neg(%neg_inf) : f32[]
  %tenth = constant() value=0.1 dtype=f32 shape=[] : f32[]
  %fifth = add(%tenth, %tenth) : f32[]
  %limit = min(%pos_inf, %fifth) : f32[]
  %row = expand(%limit) shape=[d] : f32[d]
  %shifted = add(%x, %row) : f32[B, T, d]
  %seven = constant() value=7 dtype=i64 shape=[] : i64[]
  %two = constant() value=2 dtype=i64 shape=[] : i64[]
  %three = div(%seven, %two) : i64[]
  %ids_scaled = mul(%ids, %three) : i64[B, T]
  %imax = constant() value=2147483647 dtype=i32 shape=[] : i32[]
  %ione = constant() value=1 dtype=i32 shape=[] : i32[]
  %wrapped = add(%imax, %ione) : i32[]
  %small = lt(%three, %two) : bool[]
  %chosen = where(%small, %tenth, %fifth) : f32[]
  %minus = constant() value=-2.7 dtype=f32 shape=[] : f32[]
  %truncated = cast(%minus) to=i64 : i64[]
  %not_a_number = log(%minus) : f32[]
  %erf_folded = erf(%tenth) : f32[]
  %t2 = reshape(%tenth) shape=[1] : f32[1]
  %cat = concat(%t2, %t2) axis=0 : f32[2]
  %tiled0 = expand(%scale) shape=[B, T, d] : f32[B, T, d]
  %tiled = permute(%tiled0) perm=[0, 1, 2] : f32[B, T, d]
  return %scores, %shifted, %ids_scaled, %wrapped, %chosen, %truncated, %not_a_number, %erf_folded, %cat, %tiled
}
";

const CSE_SRC: &str = "
func @cse(%x: f32[B, T, d], %y: f32[B, T, d]) -> (scores: f32[B, h, T, T], masked: f32[B, h, T, T], zeros: f32[B, T, d], nans: f32[B, T, d], order: f32[B, T, d], types: f32[B, T, 2, dh], named: f32[B, T, d])
    where d = 8, h = 2, dh = d / h {
  param @w: f32[d, d]
  %q = matmul(%x, @w) : f32[B, T, d]
  %k = matmul(%x, @w) : f32[B, T, d]
  %qh = reshape(%q) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %kh = reshape(%k) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %qp = permute(%qh) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %kp = permute(%kh) perm=[0, 2, 1, 3] : f32[B, h, T, dh]
  %scores = matmul(%qp, %kp) transpose_b=true : f32[B, h, T, T]
  %causal = causal_mask() queries=T keys=T : bool[T, T]
  %causal2 = causal_mask() queries=T keys=T : bool[T, T]
  %neg_inf = constant() value=-inf dtype=f32 shape=[] : f32[]
  %neg_inf2 = constant() value=-inf dtype=f32 shape=[] : f32[]
  %m1 = where(%causal, %scores, %neg_inf) : f32[B, h, T, T]
  %m2 = where(%causal2, %scores, %neg_inf2) : f32[B, h, T, T]
  %masked = add(%m1, %m2) : f32[B, h, T, T]
  %zero = constant() value=0.0 dtype=f32 shape=[] : f32[]
  %neg_zero = constant() value=-0.0 dtype=f32 shape=[] : f32[]
  %z1 = mul(%x, %zero) : f32[B, T, d]
  %z2 = mul(%x, %neg_zero) : f32[B, T, d]
  %zeros = sub(%z1, %z2) : f32[B, T, d]
  %nan = constant() value=nan dtype=f32 shape=[] : f32[]
  %nan2 = constant() value=nan dtype=f32 shape=[] : f32[]
  %n1 = add(%x, %nan) : f32[B, T, d]
  %n2 = add(%x, %nan2) : f32[B, T, d]
  %nans = max(%n1, %n2) : f32[B, T, d]
  %xy = sub(%x, %y) : f32[B, T, d]
  %yx = sub(%y, %x) : f32[B, T, d]
  %order = mul(%xy, %yx) : f32[B, T, d]
  %r1 = reshape(%x) shape=[B, T, 2, dh] : f32[B, T, 2, dh]
  %r2 = reshape(%x) shape=[B, T, h, dh] : f32[B, T, h, dh]
  %types = add(%r1, %r2) : f32[B, T, 2, dh]
  %unnamed = tanh(%y) : f32[B, T, d]
  %named = tanh(%y) : f32[B, T, d]
  %both = add(%unnamed, %named) : f32[B, T, d]
  return %scores, %masked, %zeros, %nans, %order, %types, %both
}
";

#[test]
fn canonicalize_snapshot() {
    insta::assert_snapshot!(
        "canonicalize",
        cleanup_snapshot(CANONICALIZE_SRC, &["canonicalize", "dce"], &[])
    );
}

#[test]
fn constant_folding_snapshot() {
    insta::assert_snapshot!(
        "constant_folding",
        cleanup_snapshot(
            CONSTANT_FOLDING_SRC,
            &["constant-folding", "dce"],
            &["not_a_number"]
        )
    );
}

#[test]
fn cse_snapshot() {
    insta::assert_snapshot!(
        "cse",
        cleanup_snapshot(CSE_SRC, &["cse", "dce"], &["masked", "nans"])
    );
}

#[test]
fn cleanup_pipeline_snapshot_of_the_canonicalize_model() {
    // Canonicalize leaves `heads` as a second copy of `p1`; CSE merges them.
    insta::assert_snapshot!(
        "cleanup_pipeline",
        cleanup_snapshot(CANONICALIZE_SRC, &CLEANUP, &[])
    );
}

#[test]
fn attention_scale_folds_to_the_f32_the_interpreter_computes() {
    let src = "func @f(%x: f32[N]) -> (y: f32[N]) {
  %dh = constant() value=64.0 dtype=f32 shape=[] : f32[]
  %root = sqrt(%dh) : f32[]
  %scale = recip(%root) : f32[]
  %y = mul(%x, %scale) : f32[N]
  return %y
}";
    let graph = kiln::ir::parse_graph(src).unwrap();
    let (after, notes) = run_passes(&graph, &mut Weights::new(), &["constant-folding", "dce"]);
    insta::assert_snapshot!(print_graph(&after), @r"
    func @f(%x: f32[N]) -> (y: f32[N]) {
      %scale = constant() value=0.125 dtype=f32 shape=[] : f32[]
      %y = mul(%x, %scale) : f32[N]
      return %y
    }
    ");
    assert_eq!(
        notes,
        vec![
            "constant-folding: folded 2 constants".to_string(),
            "dce: removed 2 dead nodes".to_string()
        ]
    );
}

#[test]
fn integer_division_by_zero_is_not_folded() {
    // Folding would turn a run-time error into a value.
    let src = "func @f(%x: i64[N]) -> (y: i64[N]) {
  %seven = constant() value=7 dtype=i64 shape=[] : i64[]
  %zero = constant() value=0 dtype=i64 shape=[] : i64[]
  %q = div(%seven, %zero) : i64[]
  %y = add(%x, %q) : i64[N]
  return %y
}";
    let graph = kiln::ir::parse_graph(src).unwrap();
    let (after, notes) = run_passes(&graph, &mut Weights::new(), &["constant-folding"]);
    assert_eq!(print_graph(&after), print_graph(&graph));
    assert!(notes.is_empty(), "{notes:?}");
    let x = Tensor::i64(vec![2], vec![1, 2]).unwrap();
    let err = interpret(&after, &Weights::new(), &[x]).unwrap_err();
    assert!(err.contains("integer division by zero"), "{err}");
}

#[test]
fn canonicalize_keeps_broadcasting_neutral_ops() {
    // `x * 1` where the 1 is wider than `x` broadcasts `x`: not a no-op.
    let src = "func @f(%x: f32[N]) -> (y: f32[M, N]) where M = 3 {
  %one = constant() value=1.0 dtype=f32 shape=[M, 1] : f32[M, 1]
  %y = mul(%x, %one) : f32[M, N]
  return %y
}";
    let graph = kiln::ir::parse_graph(src).unwrap();
    let (after, notes) = run_passes(&graph, &mut Weights::new(), &["canonicalize"]);
    assert_eq!(print_graph(&after), print_graph(&graph));
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn each_cleanup_pass_preserves_every_family() {
    for family in FAMILIES {
        let model = hf_model(family);
        let inputs = family_inputs(&model);
        for pass in ["canonicalize", "constant-folding", "cse"] {
            let passes = PassManager::from_names(&[pass, "dce"]).unwrap();
            check_preserves(&model, &passes, &inputs, 1e-5);
        }
        check_preserves(
            &model,
            &PassManager::from_names(&CLEANUP).unwrap(),
            &inputs,
            1e-5,
        );
    }
}

#[test]
fn cleanup_node_counts_on_every_family() {
    let mut report = Vec::new();
    for family in FAMILIES {
        let model = hf_model(family);
        let before = model.main().unwrap().op_count();
        let (after, cx) = model
            .apply_passes(&PassManager::from_names(&CLEANUP).unwrap())
            .unwrap();
        let after_count = after.main().unwrap().op_count();
        let notes: Vec<String> = cx
            .log
            .iter()
            .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.pass)))
            .collect();
        println!("{family}: {before} -> {after_count} op nodes ({notes:?})");
        assert!(after_count <= before, "{family}: {before} -> {after_count}");
        report.push((family, before, after_count));
    }
    // The frontends already share masks and scales within a stack, but BART
    // builds its attention scale once for the encoder and once for the decoder.
    let bart = report.iter().find(|(f, ..)| *f == "bart").unwrap();
    assert!(bart.2 < bart.1, "bart: {bart:?}");
}

#[test]
fn dce_and_cse_on_gpt2_never_grow_the_graph_and_reach_a_fixed_point() {
    let model = hf_model("gpt2");
    let graph = model.main().unwrap().clone();
    let mut weights = model.weights().unwrap().clone();
    let (after, notes) = run_passes(&graph, &mut weights, &["cse", "dce"]);
    println!(
        "gpt2: {} -> {} op nodes after cse,dce ({notes:?})",
        graph.op_count(),
        after.op_count()
    );
    assert!(after.op_count() <= graph.op_count());
    let (again, notes) = run_passes(&after, &mut weights, &["cse", "dce"]);
    assert!(
        notes.is_empty(),
        "a second cse,dce changed something: {notes:?}"
    );
    assert_eq!(print_graph(&again), print_graph(&after));
}

#[test]
fn cse_is_deterministic_and_reaches_a_fixed_point() {
    let graph = kiln::ir::parse_graph(CSE_SRC).unwrap();
    let runs: Vec<String> = (0..3)
        .map(|_| print_graph(&run_passes(&graph, &mut Weights::new(), &["cse"]).0))
        .collect();
    assert!(
        runs.iter().all(|r| *r == runs[0]),
        "cse output differs between runs"
    );
    let (once, notes) = run_passes(&graph, &mut Weights::new(), &["cse"]);
    // q/k, their reshapes and permutes, the two masks, the two -inf and the two
    // NaN constants, and the two tanh: the merges cascade through one sweep.
    assert_eq!(notes, vec!["cse: merged 9 duplicate nodes".to_string()]);
    let mut module = Module { funcs: vec![once] };
    let mut cx = PassContext::new(None);
    let changed = kiln::passes::pass_by_name("cse")
        .unwrap()
        .run(&mut module, &mut cx)
        .unwrap();
    assert_eq!(changed, Changed::No, "cse is not at a fixed point");
}

/// Floats for the random graphs' constants and attributes: the neutral
/// elements and signed zeros the rules look at, and ordinary values.
fn interesting_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(-0.0),
        Just(1.0),
        Just(0.5),
        Just(-2.0),
        -4.0f64..4.0,
    ]
}

#[test]
fn cleanup_pipelines_preserve_random_graphs() {
    let config = ProptestConfig {
        cases: 64,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6b69_6c6e_636c_6e70),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let cases = (
        prop::collection::vec(any::<u32>(), 1..30),
        prop::collection::vec(interesting_float(), 1..8),
        any::<u64>(),
    );
    check_property(
        "cleanup_pipelines_preserve_random_graphs",
        config,
        cases,
        |(ops, floats, seed)| {
            let graph = random_interpretable_graph(&ops, &floats);
            let weights = kiln::frontends::gpt2::random_weights(&graph, seed).expect("weights");
            let inputs = random_inputs(&graph, 2, 3, seed);
            // A graph the interpreter rejects at run time (a slice past the end
            // of a dim that is only known then) says nothing about the passes.
            let Ok(before) = interpret(&graph, &weights, &inputs) else {
                return Ok(Case::Skipped("the interpreter rejects the graph"));
            };
            // Nor does one whose outputs are NaN or infinite before any pass.
            if check_outputs_finite(&named(&graph, before.clone()), Side::Reference).is_err() {
                return Ok(Case::Skipped("the reference output is not finite"));
            }
            let pipelines: [&[&str]; 5] = [
                &["cse", "dce"],
                &["canonicalize", "dce"],
                &["constant-folding", "dce"],
                &CLEANUP,
                &[
                    "canonicalize",
                    "constant-folding",
                    "cse",
                    "dce",
                    "canonicalize",
                    "constant-folding",
                    "cse",
                    "dce",
                ],
            ];
            for names in pipelines {
                let mut w = weights.clone();
                let (after_graph, _) = run_passes(&graph, &mut w, names);
                prop_assert!(after_graph.op_count() <= graph.op_count());
                let after = interpret(&after_graph, &w, &inputs).unwrap_or_else(|e| {
                    panic!(
                        "{names:?}: {e}\nbefore:\n{}\nafter:\n{}",
                        print_graph(&graph),
                        print_graph(&after_graph)
                    )
                });
                assert_same_outputs(
                    &graph,
                    &before,
                    &after,
                    &[],
                    &format!("{names:?} on\n{}", print_graph(&graph)),
                );
            }
            // CSE is deterministic and leaves nothing to merge.
            let (once, _) = run_passes(&graph, &mut weights.clone(), &["cse"]);
            let (twice, notes) = run_passes(&once, &mut weights.clone(), &["cse"]);
            prop_assert!(notes.is_empty(), "second cse: {:?}", notes);
            prop_assert_eq!(print_graph(&once), print_graph(&twice));
            Ok(Case::Ran)
        },
    );
}
