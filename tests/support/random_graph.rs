//! A generator of random well-typed graphs, shared by the IR round-trip tests and
//! the pass tests (CSE, DCE, fusion) that run them through the interpreter.

use kiln_ir::{
    BinaryOp, DType, Dim, Graph, GraphBuilder, Op, ReduceKind, TensorType, UnaryOp, ValueId,
    WeightLayout,
};

fn sym(s: &str) -> Dim {
    Dim::sym(s)
}

/// The dtypes the interpreter computes in: it does not execute a cast to f16
/// or bf16 (the frontends widen 16-bit weights to f32 on load).
pub const INTERPRETED_DTYPES: [DType; 4] = [DType::F32, DType::I32, DType::I64, DType::Bool];

/// Builds a random well-typed graph by interpreting `ops` as instructions; each
/// instruction proposes an op on values picked from the pool and is kept only if
/// the shape rule accepts it. Casts go to any dtype.
pub fn random_graph(ops: &[u32], floats: &[f64]) -> Graph {
    random_graph_casting_to(ops, floats, &DType::ALL)
}

/// [`random_graph`] with casts only to [`INTERPRETED_DTYPES`], for the tests
/// that run the graphs: a graph the interpreter rejects tests nothing there.
pub fn random_interpretable_graph(ops: &[u32], floats: &[f64]) -> Graph {
    random_graph_casting_to(ops, floats, &INTERPRETED_DTYPES)
}

/// [`random_graph`] with casts only to `cast_targets`.
fn random_graph_casting_to(ops: &[u32], floats: &[f64], cast_targets: &[DType]) -> Graph {
    let mut b = GraphBuilder::new("random");
    b.bind("d", 8).unwrap();
    b.bind("h", 2).unwrap();
    b.bind("dh", sym("d").div(&sym("h")).unwrap()).unwrap();
    let bt = vec![sym("B"), sym("T"), sym("d")];
    let x = b.input("x", TensorType::new(DType::F32, bt.clone()));
    let ids = b.input("ids", TensorType::new(DType::I64, vec![sym("B"), sym("T")]));
    let mut pool: Vec<ValueId> = vec![x];
    let mut params = 0usize;
    let mut fl = floats.iter().copied().cycle();
    let mut next_float = move || fl.next().unwrap_or(0.5);
    // Attributes that must be finite (eps, theta, scale, alpha: the parser
    // refuses NaN and infinities there).
    fn finite(x: f64) -> f64 {
        if x.is_finite() {
            x
        } else {
            0.5
        }
    }
    for (i, &code) in ops.iter().enumerate() {
        let pick = |k: u32| pool[(k as usize) % pool.len()];
        let a = pick(code >> 8);
        let c = pick(code >> 16);
        let mut param = |b: &mut GraphBuilder, dims: Vec<Dim>| {
            params += 1;
            b.param(
                &format!("w{params}.weight"),
                TensorType::new(DType::F32, dims),
            )
        };
        let result = match code % 20 {
            0 => b.unary(UnaryOp::ALL[(code as usize >> 4) % 14], a),
            1 => b.binary(
                [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Max]
                    [(code as usize >> 4) % 4],
                a,
                c,
            ),
            2 => {
                let w = param(&mut b, vec![sym("d"), sym("d")]);
                b.matmul(a, w)
            }
            3 => b.op(Op::Softmax { axis: -1 }, &[a]),
            4 => {
                let w = param(&mut b, vec![sym("d")]);
                let bias = param(&mut b, vec![sym("d")]);
                b.op(
                    Op::LayerNorm {
                        eps: finite(next_float()).abs(),
                    },
                    &[a, w, bias],
                )
            }
            5 => b.reshape(a, vec![sym("B"), sym("T"), sym("h"), sym("dh")]),
            6 => {
                let r = b.ty(a).rank();
                let mut perm: Vec<usize> = (0..r).collect();
                perm.rotate_left((code as usize >> 4) % r.max(1));
                b.permute(a, &perm)
            }
            7 => b.op(
                Op::Reduce {
                    kind: [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max]
                        [(code as usize >> 4) % 3],
                    axes: vec![-1],
                    keepdim: code & 0x10000 != 0,
                },
                &[a],
            ),
            8 => b.op(
                Op::Constant {
                    value: next_float(),
                    dtype: DType::F32,
                    shape: vec![sym("d")],
                },
                &[],
            ),
            9 => b.op(
                Op::Slice {
                    axis: -1,
                    start: Dim::constant(0),
                    end: sym("dh"),
                },
                &[a],
            ),
            10 => b.op(Op::Concat { axis: -1 }, &[a, c]),
            11 => {
                let table = param(&mut b, vec![Dim::constant(50), sym("d")]);
                b.op(Op::Gather, &[table, ids])
            }
            12 => b.op(
                Op::Cast {
                    to: cast_targets[(code as usize >> 4) % cast_targets.len()],
                },
                &[a],
            ),
            13 => {
                let s = b.ty(a).shape.clone();
                let mut wider = vec![Dim::constant(2)];
                wider.extend(s);
                b.op(Op::Expand { shape: wider }, &[a])
            }
            14 => {
                let w = param(&mut b, vec![sym("d")]);
                b.op(
                    Op::RmsNorm {
                        eps: finite(next_float()).abs(),
                    },
                    &[a, w],
                )
            }
            15 => b.op(
                Op::Attention {
                    causal: code & 0x100 != 0,
                    scale: finite(next_float()),
                    alibi: false,
                    relative: None,
                },
                &[a, a, a],
            ),
            16 => {
                let m = b.op(
                    Op::CausalMask {
                        queries: sym("T"),
                        keys: sym("T"),
                    },
                    &[],
                );
                match m {
                    Ok(m) => b.op(Op::Where, &[m, a, c]),
                    Err(e) => Err(e),
                }
            }
            17 => {
                let pos = b.op(
                    Op::Arange {
                        start: Dim::constant(0),
                        len: sym("T"),
                        dtype: DType::I64,
                    },
                    &[],
                );
                match pos {
                    Ok(p) => b.op(
                        Op::Rope {
                            theta: finite(next_float().abs() + 1.0),
                        },
                        &[a, p],
                    ),
                    Err(e) => Err(e),
                }
            }
            18 => {
                let w = param(&mut b, vec![sym("d"), sym("d")]);
                let la = param(&mut b, vec![Dim::constant(4), sym("d")]);
                let lb = param(&mut b, vec![sym("d"), Dim::constant(4)]);
                b.op(
                    Op::LoraLinear {
                        alpha: finite(next_float()),
                        layout: WeightLayout::OutIn,
                    },
                    &[a, w, la, lb],
                )
            }
            _ => b.named(&format!("v{i}"), Op::Unary(UnaryOp::Tanh), &[a]),
        };
        if let Ok(v) = result {
            pool.push(v);
        }
    }
    let last = *pool.last().unwrap_or(&x);
    b.finish(&[("out", last), ("first", x)])
        .expect("every op was accepted by its shape rule")
}
