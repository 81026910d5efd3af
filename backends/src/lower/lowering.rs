//! Graph → [`Program`]: each IR op becomes at most a few steps of the eight
//! kernel kinds; movement ops become views.
//!
//! After the ops are lowered, two rewrites run on the Program: a `gemm` whose
//! result only one elementwise `loop` reads (directly, element for element)
//! absorbs that loop as its epilogue, and unreferenced buffers are dropped.
//! The memory plan's liveness is computed last (see [`super::plan`]).

use std::collections::HashMap;

use kiln_ir::shape::normalize_axis;
use kiln_ir::{
    BinaryOp, Dim, Graph, KernelOp, Namer, NodeKind, Op, ShapeCx, ValueId, WeightLayout,
};

use super::{
    Buffer, BufferId, BufferKind, FillOp, Kernel, Layout, Liveness, Program, RowOp, SizeCheck,
    State, Step,
};
use crate::RunError;

/// A lowered IR value: which root buffer holds it and how it is addressed.
#[derive(Clone, Debug)]
struct Val {
    root: BufferId,
    layout: Layout,
}

struct Lowerer<'g> {
    graph: &'g Graph,
    namer: Namer,
    cx: ShapeCx,
    buffers: Vec<Buffer>,
    steps: Vec<Step>,
    views: HashMap<(BufferId, Layout), BufferId>,
    vals: HashMap<ValueId, Val>,
    states: Vec<State>,
    checks: Vec<SizeCheck>,
    /// For each state, the layout of its output (the first `S + T` positions).
    state_outputs: Vec<Layout>,
    /// The cache layers already appended to in place, as (root, leading
    /// index): a second append there must copy.
    appended: Vec<(BufferId, i64)>,
}

/// Lowers one verified function to a [`Program`].
pub fn lower(graph: &Graph) -> Result<Program, RunError> {
    let cx = kiln_ir::verify(graph)?;
    let order = graph.topo_order().map_err(|v| RunError::Invalid {
        node: graph.describe(v),
        message: "the graph has a cycle through this node".into(),
    })?;
    let mut lw = Lowerer {
        graph,
        namer: Namer::new(graph),
        cx,
        buffers: Vec::new(),
        steps: Vec::new(),
        views: HashMap::new(),
        vals: HashMap::new(),
        states: Vec::new(),
        checks: Vec::new(),
        state_outputs: Vec::new(),
        appended: Vec::new(),
    };
    let capacity = lw.declare_states()?;
    let mut inputs = Vec::new();
    let mut params = Vec::new();
    for &v in &order {
        let kind = match &graph.node(v).kind {
            NodeKind::Input { .. } => {
                if let Some(view) = lw.cache_input(v, inputs.len())? {
                    inputs.push(view);
                    continue;
                }
                BufferKind::Input {
                    index: inputs.len(),
                }
            }
            NodeKind::Param { name } => BufferKind::Param { name: name.clone() },
            NodeKind::Op { op, .. } => {
                lw.lower_op(v, op)?;
                continue;
            }
        };
        let id = lw.new_buffer(v, kind)?;
        match graph.node(v).kind {
            NodeKind::Input { .. } => inputs.push(id),
            _ => params.push(id),
        }
    }
    let outputs = lw.lower_outputs()?;
    lw.eliminate_copies();
    lw.fuse_epilogues();
    let runtime_symbols = kiln_ir::verify::runtime_symbols(graph)
        .into_iter()
        .collect();
    let mut program = Program {
        name: graph.name.clone(),
        runtime_symbols,
        buffers: lw.buffers,
        steps: lw.steps,
        inputs,
        params,
        outputs,
        liveness: Liveness::default(),
        states: lw.states,
        checks: lw.checks,
        capacity,
    };
    compact(&mut program);
    program.liveness = Liveness::of(&program);
    Ok(program)
}

impl Lowerer<'_> {
    /// A buffer for each cache output, its length axis sized by a fresh
    /// capacity symbol (returned, when there are caches).
    fn declare_states(&mut self) -> Result<Option<String>, RunError> {
        let g = self.graph;
        if g.cache_outputs().is_empty() {
            return Ok(None);
        }
        let mut taken: Vec<String> = kiln_ir::verify::runtime_symbols(g).into_iter().collect();
        taken.extend(g.bindings().iter().map(|(n, _)| n.clone()));
        let mut capacity = "Smax".to_string();
        let mut k = 0;
        while taken.contains(&capacity) {
            k += 1;
            capacity = format!("Smax{k}");
        }
        for (index, (name, v)) in g.outputs().iter().enumerate() {
            let Some(axis) = g.cache_axis(name) else {
                continue;
            };
            let mut shape = self.shape_of(*v)?;
            let len = shape[axis].clone();
            shape[axis] = Dim::sym(&capacity);
            let whole = self.contiguous(*v, &shape)?;
            let out_layout = whole
                .slice(axis, &Dim::constant(0), &len)
                .map_err(|e| self.error(*v, e.to_string()))?;
            let root = self.push_buffer(Buffer {
                kind: BufferKind::State { name: name.clone() },
                dtype: g.ty(*v).dtype,
                shape,
                value: name.clone(),
            });
            self.states.push(State {
                name: name.clone(),
                root,
                axis,
                input: None,
                output: index,
            });
            self.state_outputs.push(out_layout);
        }
        Ok(Some(capacity))
    }

    /// For a `cache=` input: the view of its state's first positions.
    fn cache_input(&mut self, v: ValueId, index: usize) -> Result<Option<BufferId>, RunError> {
        let kiln_ir::InputRole::Cache { output } = self.graph.input_role(v) else {
            return Ok(None);
        };
        let k = self
            .states
            .iter()
            .position(|s| s.name == *output)
            .ok_or_else(|| self.error(v, format!("cache={output} names no cache output")))?;
        let (root, axis) = (self.states[k].root, self.states[k].axis);
        let shape = self.shape_of(v)?;
        let root_shape = self.buffers[root.index()].shape.clone();
        let whole = self.contiguous(v, &root_shape)?;
        let layout = whole
            .slice(axis, &Dim::constant(0), &shape[axis])
            .map_err(|e| self.error(v, e.to_string()))?;
        self.states[k].input = Some(index);
        let id = self.view(root, layout.clone());
        self.vals.insert(v, Val { root, layout });
        Ok(Some(id))
    }

    /// Where `v`'s result goes: its cache's output view when `v` is returned
    /// (once) as a cache output, else a new temporary.
    fn result_place(&mut self, v: ValueId, parts: &[Val], axis: usize) -> Result<Val, RunError> {
        let g = self.graph;
        let returned: Vec<&String> = g
            .outputs()
            .iter()
            .filter(|(_, o)| *o == v)
            .map(|(n, _)| n)
            .collect();
        let cache = match returned.as_slice() {
            [n] => self.states.iter().position(|s| s.name == **n),
            _ => None,
        };
        // Writing the parts straight into the cache is safe only when no part
        // reads the cache from elsewhere: either every part already sits where
        // it belongs (the layers a decode step appended in place), or no part
        // reads the cache at all (a prefill writing it from position 0).
        let cache = cache.filter(|&k| {
            let (root, whole) = (self.states[k].root, &self.state_outputs[k]);
            let mut at = Dim::constant(0);
            parts.iter().all(|part| {
                let Ok(end) = at.add(&part.layout.shape[axis]) else {
                    return false;
                };
                let in_place = whole
                    .slice(axis, &at, &end)
                    .is_ok_and(|d| d.normalized() == part.layout.normalized());
                at = end;
                part.root != root || in_place
            }) && (self.states[k].input.is_none() || parts.iter().all(|p| p.root == root))
        });
        let val = match cache {
            Some(k) => Val {
                root: self.states[k].root,
                layout: self.state_outputs[k].clone(),
            },
            None => {
                self.temp(v)?;
                self.val(v)?
            }
        };
        self.vals.insert(v, val.clone());
        Ok(val)
    }

    /// `concat(past, new)` where `past` is the first positions of a cache
    /// along its length axis, as the `cache=` input holds them: `new` is
    /// written after them in place, and the result is the longer view (no
    /// copy of the past). Any other concat returns `false`.
    fn append_in_place(&mut self, v: ValueId, axis: usize, args: &[Val]) -> Result<bool, RunError> {
        let [past, new] = args else {
            return Ok(false);
        };
        let Some(state) = self.states.iter().find(|s| s.root == past.root) else {
            return Ok(false);
        };
        let Some(input) = state.input else {
            return Ok(false);
        };
        let root_shape = self.buffers[state.root.index()].shape.clone();
        let state_axis = state.axis;
        let k = self
            .states
            .iter()
            .position(|s| s.root == past.root)
            .unwrap_or(0);
        let out_len = self.state_outputs[k].shape[state_axis].clone();
        let whole = self.contiguous(v, &root_shape)?;
        let input_len = self.graph.ty(self.graph.inputs()[input]).shape[state_axis].clone();
        let input_len = self.dim(v, &input_len)?;
        let n = past.layout.shape[axis].clone();
        let end = n
            .add(&new.layout.shape[axis])
            .map_err(|e| self.error(v, e.to_string()))?;
        // The past must be one layer's first positions (the leading index `c`
        // of the cache, every other axis stepping within a layer), appended to
        // once, and the append must end where the cache output ends (so it
        // fits the capacity). Anything else concatenates by copying.
        let Some(layer) = one_layer(&past.layout, &whole, state_axis) else {
            return Ok(false);
        };
        if past.layout.strides[axis] != whole.strides[state_axis]
            || past.layout.shape[axis] != input_len
            || end != out_len
            || self.appended.contains(&(past.root, layer))
        {
            return Ok(false);
        }
        let dst = past
            .layout
            .slice(axis, &n, &end)
            .map_err(|e| self.error(v, e.to_string()))?;
        let mut grown = past.layout.clone();
        grown.shape[axis] = end;
        self.appended.push((past.root, layer));
        let dst = self.view(past.root, dst);
        let src = self.view_of(new);
        self.emit(v, Kernel::Copy, vec![src], dst);
        self.vals.insert(
            v,
            Val {
                root: past.root,
                layout: grown,
            },
        );
        Ok(true)
    }

    fn header(&self, v: ValueId) -> String {
        let header = self.namer.node_header(self.graph, v);
        match self.graph.span(v) {
            Some(s) => format!("{header} (line {})", s.line),
            None => header,
        }
    }

    fn error(&self, v: ValueId, message: impl Into<String>) -> RunError {
        RunError::Lower {
            node: self.header(v),
            message: message.into(),
        }
    }

    /// `d` under the compile-time bindings (run-time symbols stay symbolic).
    fn dim(&self, v: ValueId, d: &Dim) -> Result<Dim, RunError> {
        self.cx
            .eval(d)
            .map_err(|e| self.error(v, format!("size `{d}`: {e}")))
    }

    fn dims(&self, v: ValueId, ds: &[Dim]) -> Result<Vec<Dim>, RunError> {
        ds.iter().map(|d| self.dim(v, d)).collect()
    }

    fn shape_of(&self, v: ValueId) -> Result<Vec<Dim>, RunError> {
        self.dims(v, &self.graph.ty(v).shape)
    }

    fn contiguous(&self, v: ValueId, shape: &[Dim]) -> Result<Layout, RunError> {
        Layout::contiguous(shape).map_err(|e| self.error(v, format!("strides: {e}")))
    }

    /// A new root buffer holding value `v` (its type evaluated).
    fn new_buffer(&mut self, v: ValueId, kind: BufferKind) -> Result<BufferId, RunError> {
        let shape = self.shape_of(v)?;
        let layout = self.contiguous(v, &shape)?;
        let id = self.push_buffer(Buffer {
            kind,
            dtype: self.graph.ty(v).dtype,
            shape,
            value: self.namer.name(v).to_string(),
        });
        self.vals.insert(v, Val { root: id, layout });
        Ok(id)
    }

    fn push_buffer(&mut self, b: Buffer) -> BufferId {
        self.buffers.push(b);
        BufferId(self.buffers.len() as u32 - 1)
    }

    /// A temporary for `v`'s result.
    fn temp(&mut self, v: ValueId) -> Result<BufferId, RunError> {
        self.new_buffer(v, BufferKind::Temp)
    }

    fn val(&self, v: ValueId) -> Result<Val, RunError> {
        self.vals
            .get(&v)
            .cloned()
            .ok_or_else(|| self.error(v, "an operand was not lowered before its use"))
    }

    /// The buffer addressing `layout` of `root`: the root itself when the
    /// layout is all of it, else a (shared) view.
    fn view(&mut self, root: BufferId, layout: Layout) -> BufferId {
        let b = &self.buffers[root.index()];
        if layout.shape == b.shape && layout.is_contiguous() {
            return root;
        }
        if let Some(&id) = self.views.get(&(root, layout.clone())) {
            return id;
        }
        let id = self.push_buffer(Buffer {
            kind: BufferKind::View {
                base: root,
                offset: layout.offset.clone(),
                strides: layout.strides.clone(),
            },
            dtype: b.dtype,
            shape: layout.shape.clone(),
            value: b.value.clone(),
        });
        self.views.insert((root, layout), id);
        id
    }

    fn view_of(&mut self, val: &Val) -> BufferId {
        self.view(val.root, val.layout.clone())
    }

    fn emit(&mut self, v: ValueId, kernel: Kernel, inputs: Vec<BufferId>, output: BufferId) {
        let origin = self.header(v);
        self.steps.push(Step {
            kernel,
            inputs,
            output,
            origin,
        });
    }

    fn operand_vals(&self, v: ValueId) -> Result<Vec<Val>, RunError> {
        self.graph
            .operands(v)
            .into_iter()
            .map(|o| self.val(o))
            .collect()
    }

    /// A `loop` step: the operands broadcast to the result's shape.
    fn lower_loop(&mut self, v: ValueId, body: Vec<KernelOp>) -> Result<(), RunError> {
        let shape = self.shape_of(v)?;
        let inputs = self
            .operand_vals(v)?
            .iter()
            .map(|o| {
                let l = o.layout.broadcast_to(&shape);
                self.view(o.root, l)
            })
            .collect();
        let out = self.temp(v)?;
        self.emit(v, Kernel::Loop { body }, inputs, out);
        Ok(())
    }

    fn lower_op(&mut self, v: ValueId, op: &Op) -> Result<(), RunError> {
        let args = self.operand_vals(v)?;
        let rank = |i: usize| args[i].layout.shape.len();
        match op {
            Op::Unary(u) => self.lower_loop(v, vec![KernelOp::Unary(*u, 0)]),
            Op::Binary(b) => self.lower_loop(v, vec![KernelOp::Binary(*b, 0, 1)]),
            Op::Where => self.lower_loop(v, vec![KernelOp::Where(0, 1, 2)]),
            Op::Cast { to } => self.lower_loop(v, vec![KernelOp::Cast(*to, 0)]),
            Op::Kernel { body } => self.lower_loop(v, body.clone()),
            Op::PaddingMask => {
                let shape = self.shape_of(v)?;
                let dtype = self.graph.ty(self.graph.operands(v)[0]).dtype;
                let m = args[0]
                    .layout
                    .reshape(&shape)
                    .ok_or_else(|| self.error(v, "the mask cannot be viewed as [B, 1, 1, S]"))?;
                let m = self.view(args[0].root, m);
                let out = self.temp(v)?;
                let body = vec![
                    KernelOp::Const(0.0, dtype),
                    KernelOp::Binary(BinaryOp::Ne, 0, 1),
                ];
                self.emit(v, Kernel::Loop { body }, vec![m], out);
                Ok(())
            }
            Op::Constant { value, .. } => self.fill(v, FillOp::Constant { value: *value }),
            Op::Arange { start, .. } => {
                let start = self.dim(v, start)?;
                self.fill(v, FillOp::Arange { start })
            }
            Op::CausalMask { .. } => self.fill(v, FillOp::CausalMask),
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let shape = self.shape_of(v)?;
                let r = shape.len();
                if r < 2 || rank(0) < 2 || rank(1) < 2 {
                    return Err(self.error(v, "matmul needs operands of rank 2 or more"));
                }
                let batch = &shape[..r - 2];
                let a = self.matrix(&args[0], *transpose_a, batch);
                let b = self.matrix(&args[1], *transpose_b, batch);
                let out = self.temp(v)?;
                self.emit(v, Kernel::Gemm { epilogue: vec![] }, vec![a, b], out);
                Ok(())
            }
            Op::Reduce { kind, axes, .. } => {
                let r = rank(0);
                let mut reduced = Vec::new();
                for &a in axes {
                    reduced.push(
                        normalize_axis("reduce", a, r).map_err(|e| self.error(v, e.to_string()))?,
                    );
                }
                reduced.sort_unstable();
                let mut perm: Vec<usize> = (0..r).filter(|i| !reduced.contains(i)).collect();
                let kept_shape: Vec<Dim> = perm
                    .iter()
                    .map(|&i| args[0].layout.shape[i].clone())
                    .collect();
                perm.extend(&reduced);
                let x = self.view(args[0].root, args[0].layout.permute(&perm));
                let out = self.temp(v)?;
                let out_view = self.contiguous(v, &kept_shape)?;
                let out_view = self.view(out, out_view);
                let row = RowOp::Reduce {
                    kind: *kind,
                    axes: reduced.len(),
                };
                self.emit(v, Kernel::Row(row), vec![x], out_view);
                Ok(())
            }
            Op::Softmax { axis } => {
                let r = rank(0);
                let a = normalize_axis("softmax", *axis, r)
                    .map_err(|e| self.error(v, e.to_string()))?;
                let mut perm: Vec<usize> = (0..r).filter(|&i| i != a).collect();
                perm.push(a);
                let x = self.view(args[0].root, args[0].layout.permute(&perm));
                let out = self.temp(v)?;
                let shape = self.shape_of(v)?;
                let out_layout = self.contiguous(v, &shape)?.permute(&perm);
                let out_view = self.view(out, out_layout);
                self.emit(v, Kernel::Row(RowOp::Softmax), vec![x], out_view);
                Ok(())
            }
            Op::LayerNorm { eps } => {
                self.as_is(v, Kernel::Row(RowOp::LayerNorm { eps: *eps }), &args)
            }
            Op::RmsNorm { eps } => self.as_is(v, Kernel::Row(RowOp::RmsNorm { eps: *eps }), &args),
            Op::Gather => self.as_is(v, Kernel::Gather, &args),
            Op::Reshape { .. } => {
                let shape = self.shape_of(v)?;
                match args[0].layout.reshape(&shape) {
                    Some(layout) => {
                        self.vals.insert(
                            v,
                            Val {
                                root: args[0].root,
                                layout,
                            },
                        );
                    }
                    None if shape.iter().any(|d| d.is_const(0)) => {
                        // No elements: any layout holds them; the fill writes none.
                        let out = self.temp(v)?;
                        self.emit(
                            v,
                            Kernel::Fill(FillOp::Constant { value: 0.0 }),
                            vec![],
                            out,
                        );
                    }
                    None => {
                        // The strides cannot express it: copy into a contiguous temporary.
                        let src = self.view_of(&args[0]);
                        let out = self.temp(v)?;
                        let dst = self
                            .contiguous(v, &shape)?
                            .reshape(&args[0].layout.shape)
                            .ok_or_else(|| {
                                self.error(v, "a contiguous buffer cannot be reshaped")
                            })?;
                        let dst = self.view(out, dst);
                        self.emit(v, Kernel::Copy, vec![src], dst);
                    }
                }
                Ok(())
            }
            Op::Permute { perm } => {
                let layout = args[0].layout.permute(perm);
                self.vals.insert(
                    v,
                    Val {
                        root: args[0].root,
                        layout,
                    },
                );
                Ok(())
            }
            Op::Expand { .. } => {
                let shape = self.shape_of(v)?;
                let layout = args[0].layout.broadcast_to(&shape);
                self.vals.insert(
                    v,
                    Val {
                        root: args[0].root,
                        layout,
                    },
                );
                Ok(())
            }
            Op::Slice { axis, start, end } => {
                let a = normalize_axis("slice", *axis, rank(0))
                    .map_err(|e| self.error(v, e.to_string()))?;
                let (s, e) = (self.dim(v, start)?, self.dim(v, end)?);
                // Symbolic bounds are checked when the symbols are bound:
                // 0 <= start <= end <= the axis.
                let size = args[0].layout.shape[a].clone();
                let what = self.header(v);
                for (lo, hi, name) in [
                    (Dim::constant(0), s.clone(), "start"),
                    (s.clone(), e.clone(), "end"),
                    (e.clone(), size, "end"),
                ] {
                    if lo.as_const().zip(hi.as_const()).is_none() {
                        self.checks.push(SizeCheck {
                            lhs: lo,
                            rhs: hi,
                            what: format!("{what}: slice {name}"),
                        });
                    }
                }
                let layout = args[0]
                    .layout
                    .slice(a, &s, &e)
                    .map_err(|err| self.error(v, format!("slice bounds: {err}")))?;
                self.vals.insert(
                    v,
                    Val {
                        root: args[0].root,
                        layout,
                    },
                );
                Ok(())
            }
            Op::Concat { axis } => {
                let shape = self.shape_of(v)?;
                let a = normalize_axis("concat", *axis, shape.len())
                    .map_err(|e| self.error(v, e.to_string()))?;
                if self.append_in_place(v, a, &args)? {
                    return Ok(());
                }
                let Val {
                    root: out,
                    layout: whole,
                } = self.result_place(v, &args, a)?;
                let mut at = Dim::constant(0);
                for part in &args {
                    let end = at
                        .add(&part.layout.shape[a])
                        .map_err(|e| self.error(v, e.to_string()))?;
                    let dst = whole
                        .slice(a, &at, &end)
                        .map_err(|e| self.error(v, e.to_string()))?;
                    // A part already in place (a cache layer) needs no copy.
                    if part.root == out && part.layout.normalized() == dst.normalized() {
                        at = end;
                        continue;
                    }
                    let dst = self.view(out, dst);
                    let src = self.view_of(part);
                    self.emit(v, Kernel::Copy, vec![src], dst);
                    at = end;
                }
                Ok(())
            }
            Op::Rope { theta } => {
                let r = rank(0);
                if r < 2 {
                    return Err(self.error(v, "rope needs [..., T, dh]"));
                }
                let x = self.view_of(&args[0]);
                let rows = &args[0].layout.shape[..r - 1];
                let p = &args[1].layout;
                let pos = match p.shape.len() {
                    1 => p.broadcast_to(rows),
                    2 => {
                        let mut strides = vec![Dim::constant(0); r - 1];
                        // For `x: [T, dh]` the batch axis is the token axis:
                        // position `(t, t)`, so the two strides add.
                        strides[0] = p.strides[0].clone();
                        strides[r - 2] = strides[r - 2]
                            .add(&p.strides[1])
                            .map_err(|e| self.error(v, e.to_string()))?;
                        Layout {
                            shape: rows.to_vec(),
                            strides,
                            offset: p.offset.clone(),
                        }
                    }
                    _ => return Err(self.error(v, "positions must be [T] or [B, T]")),
                };
                let pos = self.view(args[1].root, pos);
                let out = self.temp(v)?;
                self.emit(v, Kernel::Rope { theta: *theta }, vec![x, pos], out);
                Ok(())
            }
            Op::Attention {
                causal,
                scale,
                alibi,
                relative,
            } => {
                let shape = self.shape_of(v)?;
                let (mask, slopes) = op.attention_extras(args.len()).unwrap_or_default();
                let mut inputs: Vec<BufferId> = args[..3].iter().map(|a| self.view_of(a)).collect();
                if let Some(mask) = mask.map(|i| &args[i]) {
                    let mut scores = shape[..3].to_vec();
                    scores.push(args[1].layout.shape[2].clone());
                    let m = mask.layout.broadcast_to(&scores);
                    inputs.push(self.view(mask.root, m));
                }
                if let Some(slopes) = slopes.map(|i| &args[i]) {
                    inputs.push(self.view_of(slopes));
                }
                let out = self.temp(v)?;
                let kernel = Kernel::Attention {
                    causal: *causal,
                    scale: *scale,
                    alibi: *alibi,
                    relative: *relative,
                };
                self.emit(v, kernel, inputs, out);
                Ok(())
            }
            Op::LoraLinear { alpha, layout } => self.lower_lora(v, &args, *alpha, *layout),
            Op::Moe { top_k } => self.as_is(v, Kernel::Moe { top_k: *top_k }, &args),
        }
    }

    /// A kernel whose operands are the values as they are.
    fn as_is(&mut self, v: ValueId, kernel: Kernel, args: &[Val]) -> Result<(), RunError> {
        let inputs = args.iter().map(|a| self.view_of(a)).collect();
        let out = self.temp(v)?;
        self.emit(v, kernel, inputs, out);
        Ok(())
    }

    fn fill(&mut self, v: ValueId, op: FillOp) -> Result<(), RunError> {
        let out = self.temp(v)?;
        self.emit(v, Kernel::Fill(op), vec![], out);
        Ok(())
    }

    /// A gemm operand `[batch…, rows, cols]`: the last two axes swapped when
    /// `transpose`, the batch axes broadcast to `batch`.
    fn matrix(&mut self, x: &Val, transpose: bool, batch: &[Dim]) -> BufferId {
        let r = x.layout.shape.len();
        let mut layout = x.layout.clone();
        if transpose {
            let mut perm: Vec<usize> = (0..r).collect();
            perm.swap(r - 2, r - 1);
            layout = layout.permute(&perm);
        }
        let mut shape = batch.to_vec();
        shape.extend_from_slice(&layout.shape[r - 2..]);
        let layout = layout.broadcast_to(&shape);
        self.view(x.root, layout)
    }

    /// `x·w + (alpha / r)·(x·a)·b (+ bias)` as three gemms on `x` flattened to
    /// `[rows, in]`; the last one adds the scaled low-rank term to `x·w` (and
    /// the bias) in its epilogue.
    fn lower_lora(
        &mut self,
        v: ValueId,
        args: &[Val],
        alpha: f64,
        layout: WeightLayout,
    ) -> Result<(), RunError> {
        let shape = self.shape_of(v)?;
        let x = &args[0].layout;
        let d_in = x.shape.last().cloned().unwrap_or(Dim::constant(1));
        let d_out = shape.last().cloned().unwrap_or(Dim::constant(1));
        let mut rows = Dim::constant(1);
        for d in &x.shape[..x.shape.len().saturating_sub(1)] {
            rows = rows.mul(d).map_err(|e| self.error(v, e.to_string()))?;
        }
        // (in, out) of w, (in, r) of a, (r, out) of b, whatever the storage layout.
        let t = layout == WeightLayout::OutIn;
        let w = self.matrix(&args[1], t, &[]);
        let a = self.matrix(&args[2], t, &[]);
        let b = self.matrix(&args[3], t, &[]);
        let r_dim = self.buffers[a.index()].shape[1].clone();
        let rank = r_dim.as_const().ok_or_else(|| {
            self.error(
                v,
                format!("the LoRA rank `{r_dim}` must be a compile-time constant"),
            )
        })?;
        // With rank 0 the adapter term is an empty sum; skip it rather than form alpha / 0.
        let scale = if rank == 0 { 0.0 } else { alpha / rank as f64 };
        let x2 = match x.reshape(&[rows.clone(), d_in.clone()]) {
            Some(l) => self.view(args[0].root, l),
            None => {
                let src = self.view_of(&args[0]);
                let flat = self.push_buffer(Buffer {
                    kind: BufferKind::Temp,
                    dtype: self.graph.ty(v).dtype,
                    shape: vec![rows.clone(), d_in.clone()],
                    value: format!("{}.x", self.namer.name(v)),
                });
                let dst = self
                    .contiguous(v, &[rows.clone(), d_in.clone()])?
                    .reshape(&x.shape)
                    .ok_or_else(|| self.error(v, "a contiguous buffer cannot be reshaped"))?;
                let dst = self.view(flat, dst);
                self.emit(v, Kernel::Copy, vec![src], dst);
                flat
            }
        };
        let dtype = self.graph.ty(v).dtype;
        let name = self.namer.name(v).to_string();
        let part = |lw: &mut Self, suffix: &str, cols: Dim| {
            lw.push_buffer(Buffer {
                kind: BufferKind::Temp,
                dtype,
                shape: vec![rows.clone(), cols],
                value: format!("{name}.{suffix}"),
            })
        };
        let xa = part(self, "xa", r_dim);
        let xw = part(self, "xw", d_out.clone());
        self.emit(v, Kernel::Gemm { epilogue: vec![] }, vec![x2, a], xa);
        self.emit(v, Kernel::Gemm { epilogue: vec![] }, vec![x2, w], xw);
        let out = self.temp(v)?;
        let flat_out = self.contiguous(v, &[rows.clone(), d_out.clone()])?;
        let flat_out = self.view(out, flat_out);
        let mut inputs = vec![xa, b, xw];
        if let Some(bias) = args.get(4) {
            let l = bias.layout.broadcast_to(&[rows, d_out]);
            inputs.push(self.view(bias.root, l));
        }
        // Values: 0 the low-rank product, 1 x·w, (2 the bias,) then the
        // instructions: scale, scaled product, plus x·w (, plus the bias).
        let epilogue = if args.len() > 4 {
            vec![
                KernelOp::Const(scale, dtype),
                KernelOp::Binary(BinaryOp::Mul, 0, 3),
                KernelOp::Binary(BinaryOp::Add, 1, 4),
                KernelOp::Binary(BinaryOp::Add, 5, 2),
            ]
        } else {
            vec![
                KernelOp::Const(scale, dtype),
                KernelOp::Binary(BinaryOp::Mul, 0, 2),
                KernelOp::Binary(BinaryOp::Add, 1, 3),
            ]
        };
        self.emit(v, Kernel::Gemm { epilogue }, inputs, flat_out);
        Ok(())
    }

    /// Each output in a buffer of its own: a temporary that is all of its
    /// value becomes the output buffer; anything else (a view, an input, a
    /// weight, a value output twice) is copied.
    fn lower_outputs(&mut self) -> Result<Vec<(String, BufferId)>, RunError> {
        let mut out = Vec::new();
        // Caches last: a copy into a cache may overwrite positions another
        // output still reads (a value appended in place that is not the cache).
        let outputs = self.graph.outputs();
        let is_cache = |n: &String| self.states.iter().any(|s| s.name == *n);
        let order: Vec<usize> = (0..outputs.len())
            .filter(|&i| !is_cache(&outputs[i].0))
            .chain((0..outputs.len()).filter(|&i| is_cache(&outputs[i].0)))
            .collect();
        for index in order {
            let (name, v) = &outputs[index];
            let val = self.val(*v)?;
            if let Some(k) = self.states.iter().position(|s| s.name == *name) {
                let (root, layout) = (self.states[k].root, self.state_outputs[k].clone());
                let dst = self.view(root, layout.clone());
                if !(val.root == root && val.layout.normalized() == layout.normalized()) {
                    let src = self.view_of(&val);
                    self.emit(*v, Kernel::Copy, vec![src], dst);
                }
                out.push((name.clone(), dst));
                continue;
            }
            let root = &self.buffers[val.root.index()];
            let numel = |shape: &[Dim]| {
                shape
                    .iter()
                    .try_fold(Dim::constant(1), |acc, d| acc.mul(d))
                    .ok()
            };
            let whole =
                val.layout.is_contiguous() && numel(&val.layout.shape) == numel(&root.shape);
            if whole && root.kind == BufferKind::Temp {
                self.make_output(val.root, index, val.layout.shape.clone());
                out.push((name.clone(), val.root));
                continue;
            }
            let dst = self.push_buffer(Buffer {
                kind: BufferKind::Output { index },
                dtype: root.dtype,
                shape: val.layout.shape.clone(),
                value: root.value.clone(),
            });
            let src = self.view_of(&val);
            self.emit(*v, Kernel::Copy, vec![src], dst);
            out.push((name.clone(), dst));
        }
        // In signature order.
        let mut named: Vec<(usize, (String, BufferId))> = Vec::new();
        for (name, b) in out {
            let i = outputs
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap_or(usize::MAX);
            named.push((i, (name, b)));
        }
        named.sort_by_key(|(i, _)| *i);
        Ok(named.into_iter().map(|(_, o)| o).collect())
    }

    /// Turns temporary `r` into output `index` of `shape` (same elements, maybe
    /// another shape): steps that used `r` itself use a view of its old shape.
    fn make_output(&mut self, r: BufferId, index: usize, shape: Vec<Dim>) {
        let old = self.buffers[r.index()].shape.clone();
        self.buffers[r.index()].kind = BufferKind::Output { index };
        if old == shape {
            return;
        }
        self.buffers[r.index()].shape = shape;
        let Ok(layout) = Layout::contiguous(&old) else {
            return;
        };
        let as_before = self.view(r, layout);
        for st in &mut self.steps {
            if st.output == r {
                st.output = as_before;
            }
            st.inputs
                .iter_mut()
                .filter(|b| **b == r)
                .for_each(|b| *b = as_before);
        }
    }

    /// Removes each `copy` whose source is all of a temporary, read by that
    /// copy alone, in some axis order: the temporary's producer writes straight
    /// into the copy's destination instead (attention heads merged back into
    /// `[B, T, d]`, a concat part, an output that is a permuted view).
    fn eliminate_copies(&mut self) {
        let mut c = 0;
        while c < self.steps.len() {
            match self.redirect_for(c) {
                Some((w, out)) => {
                    self.steps[w].output = out;
                    self.steps.remove(c);
                }
                None => c += 1,
            }
        }
    }

    /// For copy step `c`: the producer step and the view it should write.
    fn redirect_for(&mut self, c: usize) -> Option<(usize, BufferId)> {
        let step = &self.steps[c];
        if step.kernel != Kernel::Copy {
            return None;
        }
        let (src, dst) = (step.inputs[0], step.output);
        let root = |b: BufferId| match &self.buffers[b.index()].kind {
            BufferKind::View { base, .. } => *base,
            _ => b,
        };
        let r = root(src);
        if self.buffers[r.index()].kind != BufferKind::Temp || root(dst) == r {
            return None;
        }
        let writers: Vec<usize> = (0..self.steps.len())
            .filter(|&i| root(self.steps[i].output) == r)
            .collect();
        let [w] = writers.as_slice() else {
            return None;
        };
        if *w >= c || self.steps[*w].output != r {
            return None;
        }
        let readers = self
            .steps
            .iter()
            .flat_map(|s| s.inputs.iter())
            .filter(|&&b| root(b) == r)
            .count();
        if readers != 1 {
            return None;
        }
        let dst_root = root(dst);
        if self.steps[*w].inputs.iter().any(|&b| root(b) == dst_root) {
            return None;
        }
        // Writing at the producer's step, earlier than the copy, must not
        // change what a step in between reads (a cache's past, another part).
        let read_between = self.steps[*w + 1..c]
            .iter()
            .any(|s| s.inputs.iter().any(|&b| root(b) == dst_root));
        if read_between {
            return None;
        }
        let rb = &self.buffers[r.index()];
        let whole = Layout::contiguous(&rb.shape).ok()?;
        let src_l = self.layout_of(src)?;
        let dst_l = self.layout_of(dst)?;
        let out = src_l.transfer(&whole, &dst_l)?;
        Some((*w, self.view(dst_root, out)))
    }

    fn layout_of(&self, b: BufferId) -> Option<Layout> {
        let buf = &self.buffers[b.index()];
        match &buf.kind {
            BufferKind::View {
                offset, strides, ..
            } => Some(Layout {
                shape: buf.shape.clone(),
                strides: strides.clone(),
                offset: offset.clone(),
            }),
            _ => Layout::contiguous(&buf.shape).ok(),
        }
    }

    /// Folds a `loop` into the `gemm` before it when the loop is the only
    /// reader of the gemm's result and reads it element for element.
    fn fuse_epilogues(&mut self) {
        let mut i = 0;
        while i < self.steps.len() {
            if let Some(t) = self.epilogue_reader(i) {
                let gemm = self.steps.remove(i);
                let t = t - 1;
                let loop_step = &self.steps[t];
                let Kernel::Loop { body } = &loop_step.kernel else {
                    i += 1;
                    continue;
                };
                let x = gemm.output;
                let p = loop_step.inputs.iter().position(|&b| b == x).unwrap_or(0);
                let remap = |q: usize| match q {
                    q if q == p => 0,
                    q if q < p => q + 1,
                    q => q,
                };
                let epilogue = body.iter().map(|k| remap_op(k, &remap)).collect();
                let mut inputs = gemm.inputs.clone();
                inputs.extend(loop_step.inputs.iter().filter(|&&b| b != x));
                let origin = format!("{}; epilogue {}", gemm.origin, loop_step.origin);
                let output = loop_step.output;
                self.steps[t] = Step {
                    kernel: Kernel::Gemm { epilogue },
                    inputs,
                    output,
                    origin,
                };
                continue;
            }
            i += 1;
        }
    }

    /// The index of the step that can become step `i`'s epilogue, if any.
    fn epilogue_reader(&self, i: usize) -> Option<usize> {
        let s = &self.steps[i];
        if !matches!(&s.kernel, Kernel::Gemm { epilogue } if epilogue.is_empty()) {
            return None;
        }
        let x = s.output;
        let xb = &self.buffers[x.index()];
        if xb.kind != BufferKind::Temp {
            return None;
        }
        // No view of the result may exist, and exactly one later step reads it.
        let viewed = self
            .buffers
            .iter()
            .any(|b| matches!(b.kind, BufferKind::View { base, .. } if base == x));
        if viewed {
            return None;
        }
        let readers: Vec<usize> = (0..self.steps.len())
            .filter(|&j| self.steps[j].inputs.contains(&x))
            .collect();
        let [t] = readers.as_slice() else {
            return None;
        };
        let ls = &self.steps[*t];
        let once = ls.inputs.iter().filter(|&&b| b == x).count() == 1;
        let writes_elsewhere = self.steps.iter().filter(|st| st.output == x).count() != 1;
        match &ls.kernel {
            Kernel::Loop { .. }
                if *t > i
                    && once
                    && !writes_elsewhere
                    && self.buffers[ls.output.index()].shape == xb.shape
                    && self.buffers[ls.output.index()].dtype == xb.dtype =>
            {
                Some(*t)
            }
            _ => None,
        }
    }
}

/// When `view` lies inside one index `c` of the leading axis of a cache laid
/// out as `whole` (its offset is `c` whole layers and no axis steps from one
/// layer to the next), `c`. The cache axis must not be the leading one.
fn one_layer(view: &Layout, whole: &Layout, cache_axis: usize) -> Option<i64> {
    if cache_axis == 0 || whole.shape.is_empty() {
        return None;
    }
    let layer = &whole.strides[0];
    let c = view.offset.div(layer).ok()?.as_const()?;
    if Dim::constant(c).mul(layer).ok()? != view.offset {
        return None;
    }
    let inner = &whole.strides[1..];
    let norm = view.normalized();
    let steps: Vec<&Dim> = norm.strides.iter().filter(|s| !s.is_const(0)).collect();
    let distinct = steps
        .iter()
        .enumerate()
        .all(|(i, s)| !steps[..i].contains(s));
    (distinct && steps.iter().all(|s| inner.contains(s))).then_some(c)
}

/// `k` with its value indices renamed by `f`.
fn remap_op(k: &KernelOp, f: &dyn Fn(usize) -> usize) -> KernelOp {
    k.try_map_args(|a| Some(f(a)))
        .expect("a renaming that names every value")
}

/// Drops buffers nothing refers to and renumbers the rest in order.
fn compact(p: &mut Program) {
    let mut used = vec![false; p.buffers.len()];
    for &b in p.inputs.iter().chain(&p.params) {
        used[b.index()] = true;
    }
    for (_, b) in &p.outputs {
        used[b.index()] = true;
    }
    for s in &p.steps {
        for &b in s.inputs.iter().chain(std::iter::once(&s.output)) {
            used[b.index()] = true;
        }
    }
    for i in 0..p.buffers.len() {
        if let (true, BufferKind::View { base, .. }) = (used[i], &p.buffers[i].kind) {
            used[base.index()] = true;
        }
    }
    let mut new_id = vec![BufferId(u32::MAX); p.buffers.len()];
    let mut buffers = Vec::new();
    for (i, b) in p.buffers.iter().enumerate() {
        if used[i] {
            new_id[i] = BufferId(buffers.len() as u32);
            buffers.push(b.clone());
        }
    }
    let map = |b: &mut BufferId| *b = new_id[b.index()];
    for b in &mut buffers {
        if let BufferKind::View { base, .. } = &mut b.kind {
            map(base);
        }
    }
    p.inputs.iter_mut().for_each(map);
    p.params.iter_mut().for_each(map);
    p.states.iter_mut().for_each(|s| map(&mut s.root));
    p.outputs.iter_mut().for_each(|(_, b)| map(b));
    for s in &mut p.steps {
        s.inputs.iter_mut().for_each(map);
        map(&mut s.output);
    }
    p.buffers = buffers;
}
