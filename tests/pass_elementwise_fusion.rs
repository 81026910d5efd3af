//! Elementwise fusion: IR snapshots and differential tests against the
//! interpreter (every family, random graphs). The memory plan, which lowering
//! computes, is tested in `tests/memory_plan.rs`.

mod support;

use kiln::backends::{Backend, Interpreter};
use kiln::frontends::gpt2::random_weights;
use kiln::ir::{Graph, Module, Op};
use kiln::passes::PassContext;
use kiln::{Model, OptLevel, PassManager, Tensor};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use support::random_graph::random_interpretable_graph;
use support::{
    check_outputs_finite, check_preserves, check_property, family_inputs, hf_model, named,
    outputs_deviation, random_inputs, Case, NonFinite, Side, Tolerance, FAMILIES,
};

/// Bias add → GELU → residual add whose result is also the matmul's input
/// (so it must stay materialized), then a scale and a second residual add.
const BLOCK_TAIL: &str =
    "func @block_tail(%x: f32[B, T, d], %resid: f32[B, T, d]) -> (out: f32[B, T, d])
    where d = 8 {
  param @fc.bias: f32[d]
  param @proj.weight: f32[d, d]
  %scale = constant() value=0.125 dtype=f32 shape=[] : f32[]
  %fc = add(%x, @fc.bias) : f32[B, T, d]
  %gelu = gelu_tanh(%fc) : f32[B, T, d]
  %h = add(%resid, %gelu) : f32[B, T, d]
  %proj = matmul(%h, @proj.weight) : f32[B, T, d]
  %scaled = mul(%proj, %scale) : f32[B, T, d]
  %out = add(%scaled, %h) : f32[B, T, d]
  return %out
}
";

fn fusion() -> PassManager {
    PassManager::from_names(&["elementwise-fusion", "dce"]).expect("known passes")
}

fn kernel_count(module: &Module) -> usize {
    module
        .funcs
        .iter()
        .flat_map(|g| g.node_ids().into_iter().map(move |v| g.op(v).cloned()))
        .filter(|op| matches!(op, Some(Op::Kernel { .. })))
        .count()
}

/// Runs `graph` on the interpreter; `Err` carries the interpreter's message.
fn interpret(
    graph: &Graph,
    weights: &kiln::Weights,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>, String> {
    Interpreter
        .compile(graph, weights)
        .and_then(|mut exe| exe.run(inputs))
        .map_err(|e| e.to_string())
}

/// Whether two runs of `graph` agree: non-float outputs equal, floats finite
/// and within `tol` of the reference's largest magnitude.
fn outputs_agree(
    graph: &Graph,
    before: &[Tensor],
    after: &[Tensor],
    tol: f64,
) -> Result<(), String> {
    outputs_deviation(
        &named(graph, after.to_vec()),
        &named(graph, before.to_vec()),
        &|_| NonFinite::Reject,
    )
    .and_then(|d| d.within(Tolerance::Relative(tol)))
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn seeded(cases: u32, seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn float_attr() -> impl Strategy<Value = f64> {
    prop_oneof![-4.0..4.0f64, Just(0.125), Just(1e-5), Just(2.0)]
}

// ----- elementwise fusion -----

#[test]
fn fusion_of_a_block_tail_snapshot() {
    let model = Model::from_text(BLOCK_TAIL, "block_tail.kir").expect("parses and verifies");
    let (after, cx) = model.apply_passes(&fusion()).expect("fusion runs");
    let notes: Vec<String> = cx
        .log
        .iter()
        .map(|r| {
            let what = if r.notes.is_empty() {
                "no change".to_string()
            } else {
                r.notes.join("; ")
            };
            format!("// {}: {what}", r.pass)
        })
        .collect();
    insta::assert_snapshot!(format!(
        "// ----- before -----\n{}\n// ----- after elementwise-fusion, dce -----\n{}\n{}\n",
        model.to_text(),
        after.to_text(),
        notes.join("\n")
    ));
    // The fused text round-trips and computes what the original computes.
    let reparsed = Model::from_text(&after.to_text(), "fused.kir").expect("fused IR reparses");
    assert_eq!(reparsed.module(), after.module());
    let graph = model.main().unwrap();
    let weights = random_weights(graph, 7).unwrap();
    let inputs = random_inputs(graph, 2, 3, 7);
    let before = interpret(graph, &weights, &inputs).unwrap();
    let fused = interpret(after.main().unwrap(), &weights, &inputs).unwrap();
    outputs_agree(graph, &before, &fused, 1e-5).unwrap();
}

/// A chain that reads only scalar constants becomes a kernel without
/// operands, whose result is a scalar like the chain's.
#[test]
fn constant_only_chains_fuse_into_a_kernel_without_operands() {
    let src = "func @f(%x: f32[3]) -> (y: f32[3], c: f32[]) {
  %two = constant() value=2.0 dtype=f32 shape=[] : f32[]
  %e = exp(%two) : f32[]
  %c = neg(%e) : f32[]
  %y = mul(%x, %two) : f32[3]
  return %y, %c
}";
    let model = Model::from_text(src, "consts.kir").unwrap();
    let (after, _) = model.apply_passes(&fusion()).unwrap();
    let text = after.to_text();
    assert!(
        text.contains("%c = kernel() body=[const(2.0, f32), exp(0), neg(1)] : f32[]"),
        "{text}"
    );
    assert!(text.contains("%y = mul(%x, %two) : f32[3]"), "{text}");
    let reparsed = Model::from_text(&text, "fused.kir").expect("fused IR reparses");
    assert_eq!(reparsed.module(), after.module());
    let inputs = [Tensor::f32(vec![3], vec![1.0, -2.0, 0.5]).unwrap()];
    let weights = kiln::Weights::new();
    let before = interpret(model.main().unwrap(), &weights, &inputs).unwrap();
    let fused = interpret(after.main().unwrap(), &weights, &inputs).unwrap();
    outputs_agree(model.main().unwrap(), &before, &fused, 0.0).unwrap();
}

#[test]
fn fusion_preserves_every_family() {
    let mut counts = Vec::new();
    for family in FAMILIES {
        let model = hf_model(family);
        let after = check_preserves(&model, &fusion(), &family_inputs(&model), 1e-5);
        let ops_before: usize = model.module().funcs.iter().map(Graph::op_count).sum();
        let ops_after: usize = after.module().funcs.iter().map(Graph::op_count).sum();
        let kernels = kernel_count(after.module());
        // T5 v1.0's only elementwise ops are lone: a ReLU after its matmul,
        // residual adds (mixtral's see the -O2 test below).
        assert!(
            kernels > 0 || family == "t5",
            "{family}: nothing fused\n{}",
            after.to_text()
        );
        let text = after.to_text();
        let reparsed = Model::from_text(&text, family).expect("fused IR reparses");
        assert_eq!(
            reparsed.module(),
            after.module(),
            "{family}: round trip\n{text}"
        );
        counts.push(format!(
            "{family}: {kernels} kernels, {ops_before} → {ops_after} ops"
        ));
    }
    println!("elementwise fusion per family:\n  {}", counts.join("\n  "));
}

#[test]
fn fusion_after_the_o2_pipeline_preserves_every_family() {
    for family in FAMILIES {
        let model = hf_model(family);
        let after = check_preserves(
            &model,
            &PassManager::pipeline(OptLevel::O2),
            &family_inputs(&model),
            1e-5,
        );
        // Mixtral's only elementwise ops are lone residual adds (its SwiGLU
        // is inside the moe op), T5 v1.0's lone ReLUs and adds: nothing to
        // chain.
        assert!(
            kernel_count(after.module()) > 0 || matches!(family, "mixtral" | "t5"),
            "{family}: -O2 fused nothing"
        );
    }
}

#[test]
fn fusion_preserves_random_graphs() {
    check_property(
        "fusion_preserves_random_graphs",
        seeded(64, 0x6b69_6c6e_6675_7365),
        (
            prop::collection::vec(any::<u32>(), 1..40),
            prop::collection::vec(float_attr(), 1..6),
            any::<u64>(),
        ),
        |(ops, floats, seed)| {
            let graph = random_interpretable_graph(&ops, &floats);
            check_fusion_preserves(&graph, seed).map(|(case, _)| case)
        },
    );
}

/// A random graph made mostly of elementwise chains (the shared generator
/// rarely chains elementwise ops): each instruction reads one of the three
/// newest values, so chains, values used twice, small `[d]` branches, scalar
/// and `[1, 1]` constants, comparisons feeding `where`, casts, existing
/// kernels and a few non-fusible ops (matmul, softmax) all appear.
fn elementwise_graph(codes: &[u32], floats: &[f64]) -> Graph {
    use kiln::ir::{BinaryOp, DType, Dim, GraphBuilder, KernelOp, TensorType, UnaryOp};
    let f32_ty =
        |dims: &[&str]| TensorType::new(DType::F32, dims.iter().map(|d| Dim::sym(d)).collect());
    let mut b = GraphBuilder::new("chains");
    b.bind("d", 4).unwrap();
    let x = b.input("x", f32_ty(&["B", "T", "d"]));
    let r = b.input("r", f32_ty(&["B", "T", "d"]));
    let bias = b.param("bias", f32_ty(&["d"]));
    let w = b.param("w", f32_ty(&["d", "d"]));
    let mut pool = vec![bias, x];
    let mut fl = floats.iter().copied().cycle();
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Abs,
        UnaryOp::Relu,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Gelu,
    ];
    let binary = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Max,
        BinaryOp::Min,
    ];
    for &code in codes {
        let recent = |k: u32| pool[pool.len() - 1 - (k as usize % pool.len().min(3))];
        let (a, c) = (recent(code >> 8), recent(code >> 12));
        let other = [r, bias, x, c][(code as usize >> 16) % 4];
        let value = fl.next().unwrap_or(0.5);
        let result = match code % 10 {
            0 | 1 => b.unary(unary[(code as usize >> 4) % unary.len()], a),
            2 | 3 => b.binary(binary[(code as usize >> 4) % binary.len()], a, other),
            4 => {
                let shape = if code & 0x10 == 0 {
                    vec![]
                } else {
                    vec![Dim::constant(1); 2]
                };
                let k = b
                    .op(
                        Op::Constant {
                            value,
                            dtype: DType::F32,
                            shape,
                        },
                        &[],
                    )
                    .unwrap();
                b.binary(binary[(code as usize >> 5) % binary.len()], a, k)
            }
            5 => {
                let cond = b.binary(BinaryOp::Gt, a, other).unwrap();
                if code & 0x10 == 0 {
                    b.op(Op::Where, &[cond, a, c])
                } else {
                    b.op(Op::Cast { to: DType::F32 }, &[cond])
                }
            }
            6 => b.op(
                Op::Kernel {
                    body: vec![
                        KernelOp::Binary(BinaryOp::Mul, 0, 1),
                        KernelOp::Const(value, DType::F32),
                        KernelOp::Binary(BinaryOp::Add, 2, 3),
                        KernelOp::Unary(UnaryOp::Tanh, 4),
                    ],
                },
                &[a, other],
            ),
            7 => b.binary(BinaryOp::Add, a, a),
            8 => b.matmul(a, w),
            _ => b.op(Op::Softmax { axis: -1 }, &[a]),
        };
        if let Ok(v) = result {
            pool.push(v);
        }
    }
    let last = *pool.last().unwrap();
    let mid = pool[pool.len() / 2];
    b.finish(&[("out", last), ("mid", mid)])
        .expect("well-typed")
}

/// Fusion on `graph`: the result verifies and the interpreter agrees. Returns
/// whether the outputs were compared, and the number of kernels.
fn check_fusion_preserves(graph: &Graph, seed: u64) -> Result<(Case, usize), TestCaseError> {
    let mut weights =
        random_weights(graph, seed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let inputs = random_inputs(graph, 2, 3, seed);
    let before = interpret(graph, &weights, &inputs);
    let mut module = Module {
        funcs: vec![graph.clone()],
    };
    fusion()
        .run(&mut module, &mut PassContext::new(Some(&mut weights)))
        .map_err(|e| TestCaseError::fail(format!("{e}\n{}", kiln::ir::print_graph(graph))))?;
    kiln::ir::verify_module(&module)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{}", kiln::ir::print_module(&module))))?;
    let fused = &module.funcs[0];
    let kernels = kernel_count(&module);
    // A graph the interpreter rejects before fusion (a slice past the end of
    // a dim that is only known at run time) says nothing about fusion.
    let Ok(before) = before else {
        return Ok((Case::Skipped("the interpreter rejects the graph"), kernels));
    };
    // Nor does one whose outputs are NaN or infinite before fusion.
    if check_outputs_finite(&named(graph, before.clone()), Side::Reference).is_err() {
        return Ok((Case::Skipped("the reference output is not finite"), kernels));
    }
    let after = interpret(fused, &weights, &inputs)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{}", kiln::ir::print_graph(fused))))?;
    outputs_agree(graph, &before, &after, 1e-5).map_err(|e| {
        TestCaseError::fail(format!(
            "{e}\nbefore:\n{}\nafter:\n{}",
            kiln::ir::print_graph(graph),
            kiln::ir::print_graph(fused)
        ))
    })?;
    Ok((Case::Ran, kernels))
}

#[test]
fn fusion_preserves_random_elementwise_chains() {
    check_property(
        "fusion_preserves_random_elementwise_chains",
        seeded(64, 0x6b69_6c6e_6368_6169),
        (
            prop::collection::vec(any::<u32>(), 1..30),
            prop::collection::vec(float_attr(), 1..6),
            any::<u64>(),
        ),
        |(codes, floats, seed)| {
            let graph = elementwise_graph(&codes, &floats);
            check_fusion_preserves(&graph, seed).map(|(case, _)| case)
        },
    );
}

/// The chain generator does exercise fusion: most seeded graphs get kernels.
#[test]
fn random_elementwise_chains_do_fuse() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut fused = 0;
    for case in 0..32 {
        let codes: Vec<u32> = (0..20).map(|_| next() as u32).collect();
        let graph = elementwise_graph(&codes, &[0.5, -1.25]);
        if check_fusion_preserves(&graph, case).unwrap().1 > 0 {
            fused += 1;
        }
    }
    assert!(fused >= 24, "only {fused} of 32 graphs fused");
}
