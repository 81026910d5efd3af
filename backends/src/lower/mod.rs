//! The lowering layer: one [`Program`] per entry point, the description every
//! backend reads.
//!
//! A Program is a list of *buffers* (inputs, parameters, outputs, arena
//! temporaries, and views of those) and a list of *steps*, each one kernel of
//! one of nine kinds reading operand buffers and writing one buffer. A
//! backend implements the nine kernel kinds, not every IR op:
//!
//! | kind | what it computes | from |
//! |---|---|---|
//! | `loop` | a scalar body per element, operands broadcast by their views | unary, binary, where, cast, fused `kernel`, padding_mask |
//! | `row` | per row: reduce, softmax, layer_norm, rms_norm | reduce_*, softmax, layer_norm, rms_norm |
//! | `gemm` | batched `A·B` (transposes and broadcasts are strides), optional elementwise epilogue | matmul, lora_linear, a matmul followed by its only elementwise user |
//! | `attention` | softmax(scale·q·kᵀ (+ ALiBi), causal, mask)·v with GQA | attention |
//! | `moe` | per token, the router's top-k SwiGLU experts, only those | moe |
//! | `gather` | rows of a table by ids | gather |
//! | `rope` | rotary embedding at positions | rope |
//! | `copy` | a strided copy | concat, reshapes the strides do not allow, outputs that are views |
//! | `fill` | a constant, an arange, a causal mask | constant, arange, causal_mask |
//!
//! Reshape, permute, slice and expand produce no step: they become views
//! (offset and strides as symbolic dims over the run-time symbols), except a
//! reshape whose strides cannot express it, which copies first.
//!
//! Architecture invariant: every dim in a Program mentions run-time symbols
//! only (compile-time `where` bindings are substituted), so a Program is
//! checked, planned and run without its graph; the arena is planned per
//! binding of the run-time symbols ([`plan`]).

mod layout;
mod lowering;
pub mod plan;
mod print;
pub mod verify;

use std::fmt;

use kiln_ir::{DType, Dim, KernelOp, ReduceKind};

pub use layout::{contiguous_strides, Layout};
pub use lowering::lower;
pub use plan::{ArenaPlan, Liveness};

/// A buffer of a [`Program`], printed `b3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BufferId(pub u32);

impl BufferId {
    /// The index in [`Program::buffers`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BufferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b{}", self.0)
    }
}

/// Where a buffer's memory comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum BufferKind {
    /// Input `index` of the entry point, owned by the caller.
    Input {
        /// Position in the signature.
        index: usize,
    },
    /// A weight, bound at compile time.
    Param {
        /// The parameter name, without `@`.
        name: String,
    },
    /// Output `index`, allocated per run and handed to the caller.
    Output {
        /// Position in the signature.
        index: usize,
    },
    /// An intermediate placed in the arena by the memory plan.
    Temp,
    /// A cache that lives between calls (see [`State`]): its length axis has
    /// the capacity symbol as its size, and the calls read and write views of it.
    State {
        /// The cache output's name (`key_cache`).
        name: String,
    },
    /// A strided view of another (never a view) buffer: no memory of its own.
    View {
        /// The buffer viewed.
        base: BufferId,
        /// Element offset into `base`.
        offset: Dim,
        /// Element strides, one per axis (0 on a broadcast axis).
        strides: Vec<Dim>,
    },
}

/// One buffer: its kind, element type and shape (over run-time symbols).
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// Where its memory comes from.
    pub kind: BufferKind,
    /// The element type.
    pub dtype: DType,
    /// The shape.
    pub shape: Vec<Dim>,
    /// The IR value it holds, as printed (`%h0.fc`, `@wte`), for messages.
    pub value: String,
}

/// What a `row` kernel does to each row.
#[derive(Clone, Debug, PartialEq)]
pub enum RowOp {
    /// Reduce the last `axes` axes of the input (the output has the others).
    Reduce {
        /// Sum, mean or max.
        kind: ReduceKind,
        /// How many trailing axes form the row.
        axes: usize,
    },
    /// Softmax over the last axis.
    Softmax,
    /// `(x - mean) / sqrt(var + eps) · weight (+ bias)` over the last axis.
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// `x / sqrt(mean(x²) + eps) · weight` over the last axis.
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
}

/// What a `fill` kernel writes.
#[derive(Clone, Debug, PartialEq)]
pub enum FillOp {
    /// One value everywhere.
    Constant {
        /// The value, converted to the output dtype.
        value: f64,
    },
    /// `start, start + 1, …` along the (only) axis.
    Arange {
        /// The first value (may mention run-time symbols, e.g. the cache length).
        start: Dim,
    },
    /// `out[i, j] = j <= i + keys - queries` over `[queries, keys]`.
    CausalMask,
}

/// The kernel of one step; the operand roles are listed per kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Kernel {
    /// Operands are views of the output's shape; `body` runs per element as in
    /// [`kiln_ir::Op::Kernel`].
    Loop {
        /// The scalar instructions; the last one's value is written.
        body: Vec<KernelOp>,
    },
    /// Operands: the input `[outer…, row…]` (then weight and bias for norms);
    /// output `[outer…]` for reductions, else the input's shape.
    Row(RowOp),
    /// Operands: `A [batch…, M, K]`, `B [batch…, K, N]`, then the epilogue's
    /// extra operands (views of the output's shape). Output `[batch…, M, N]`.
    Gemm {
        /// Runs per output element on the product rounded to the output dtype
        /// (value 0) and the extra operands (values 1…); empty: the product.
        epilogue: Vec<KernelOp>,
    },
    /// Operands: `q [B, h, T, dh]`, `k [B, hk, S, dh]`, `v [B, hk, S, dv]`,
    /// optionally a bool mask viewed as `[B, h, T, S]`, then with `alibi` the
    /// slopes `[h]`; output `[B, h, T, dv]`.
    Attention {
        /// Hide keys after each query (aligned bottom-right).
        causal: bool,
        /// Multiplies the scores.
        scale: f64,
        /// The last operand holds one ALiBi slope per head: the score of key
        /// `j` gains `slope · j`.
        alibi: bool,
        /// The last operand is T5's bias table `[buckets, h]`, read at each
        /// (query, key) distance's bucket.
        relative: Option<kiln_ir::RelativeBias>,
    },
    /// Operands: `table [R, rest…]`, integer `ids [idx…]`; output `[idx…, rest…]`.
    Gather,
    /// Operands: `x […, d]`, `router [E, d]`, `gate [E, f, d]`, `up [E, f, d]`,
    /// `down [E, d, f]`; output of `x`'s shape: per token, the `top_k` experts
    /// the router picks, only theirs computed (see [`kiln_ir::Op::Moe`]).
    Moe {
        /// Experts per token.
        top_k: usize,
    },
    /// Operands: `x […, dh]`, integer positions viewed as `x`'s shape without
    /// its last axis; output of `x`'s shape.
    Rope {
        /// The frequency base.
        theta: f64,
    },
    /// Operand: the source, a view of the output's shape.
    Copy,
    /// No operands.
    Fill(FillOp),
}

impl Kernel {
    /// The kind's name as printed (`loop`, `gemm`, …).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Kernel::Loop { .. } => "loop",
            Kernel::Row(_) => "row",
            Kernel::Gemm { .. } => "gemm",
            Kernel::Attention { .. } => "attention",
            Kernel::Gather => "gather",
            Kernel::Moe { .. } => "moe",
            Kernel::Rope { .. } => "rope",
            Kernel::Copy => "copy",
            Kernel::Fill(_) => "fill",
        }
    }
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What runs.
    pub kernel: Kernel,
    /// The operand buffers, in the kernel's order.
    pub inputs: Vec<BufferId>,
    /// The buffer written (an output, a temporary or a view of one).
    pub output: BufferId,
    /// The IR node it came from, as printed (`%7 = matmul(%6, @w) (line 14)`).
    pub origin: String,
}

/// A cache kept in place between calls: the `cache=NAME` input is a view of
/// its first `S` positions, the `NAME … cache_axis=N` output a view of the
/// first `S + T`; a decode step writes only the new positions.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The cache output's name.
    pub name: String,
    /// Its buffer (of kind [`BufferKind::State`]).
    pub root: BufferId,
    /// The length axis.
    pub axis: usize,
    /// The position of its `cache=` input in [`Program::inputs`], if any.
    pub input: Option<usize>,
    /// The position of its output in [`Program::outputs`].
    pub output: usize,
}

/// One entry point, lowered.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    /// The function name (`forward`, `prefill`, `decode`, …).
    pub name: String,
    /// The symbols bound from the input shapes at run time.
    pub runtime_symbols: Vec<String>,
    /// Every buffer; [`BufferId`] indexes this.
    pub buffers: Vec<Buffer>,
    /// The steps, in execution order.
    pub steps: Vec<Step>,
    /// The input buffers, in signature order.
    pub inputs: Vec<BufferId>,
    /// The parameter buffers, in declaration order.
    pub params: Vec<BufferId>,
    /// The outputs by name, in signature order.
    pub outputs: Vec<(String, BufferId)>,
    /// When each arena buffer lives, and which share memory.
    pub liveness: Liveness,
    /// The caches kept in place between calls.
    pub states: Vec<State>,
    /// The run-time symbol sizing every cache's length axis (its capacity),
    /// when there are caches.
    pub capacity: Option<String>,
    /// Size relations the Program relies on that only a binding can decide
    /// (a slice whose end is symbolic stays inside its axis).
    pub checks: Vec<SizeCheck>,
}

/// `lhs <= rhs` must hold under a binding (checked before a run).
#[derive(Clone, Debug, PartialEq)]
pub struct SizeCheck {
    /// The smaller side.
    pub lhs: Dim,
    /// The larger side.
    pub rhs: Dim,
    /// Where it comes from: the node and what it bounds.
    pub what: String,
}

impl Program {
    /// The buffer `id`.
    pub fn buffer(&self, id: BufferId) -> &Buffer {
        &self.buffers[id.index()]
    }

    /// The buffer whose memory `id` uses (itself unless it is a view).
    pub fn root(&self, id: BufferId) -> BufferId {
        match &self.buffer(id).kind {
            BufferKind::View { base, .. } => *base,
            _ => id,
        }
    }

    /// How `id` addresses its root's memory.
    pub fn layout(&self, id: BufferId) -> Result<Layout, kiln_ir::DimError> {
        let b = self.buffer(id);
        match &b.kind {
            BufferKind::View {
                offset, strides, ..
            } => Ok(Layout {
                shape: b.shape.clone(),
                strides: strides.clone(),
                offset: offset.clone(),
            }),
            _ => Layout::contiguous(&b.shape),
        }
    }

    /// The cache length a call under `cx` needs: the longest cache output.
    pub fn cache_need(&self, cx: &kiln_ir::ShapeCx) -> Result<usize, crate::RunError> {
        let mut need = 0;
        for st in &self.states {
            // The cache holds its input's positions and its output's.
            let mut views = vec![self.outputs[st.output].1];
            views.extend(st.input.map(|i| self.inputs[i]));
            for b in views {
                let d = &self.buffer(b).shape[st.axis];
                let what = format!("the cache {}", st.name);
                need = need.max(crate::eval_size_in(cx, d, &what)?);
            }
        }
        Ok(need)
    }

    /// `cx` with the capacity symbol bound to `capacity`, or when `None`, to
    /// what the call needs ([`Program::cache_need`]).
    pub fn bind_capacity(
        &self,
        cx: &kiln_ir::ShapeCx,
        capacity: Option<usize>,
    ) -> Result<kiln_ir::ShapeCx, crate::RunError> {
        let mut cx = cx.clone();
        if let Some(cap) = &self.capacity {
            let need = self.cache_need(&cx)?;
            let value = capacity.unwrap_or(need);
            if value < need {
                return Err(crate::RunError::CacheFull {
                    capacity: value,
                    needed: need,
                });
            }
            cx.bind(cap, &Dim::constant(value as i64))
                .map_err(|e| crate::RunError::Binding {
                    name: cap.clone(),
                    value: value.to_string(),
                    source: Box::new(e),
                })?;
        }
        Ok(cx)
    }

    /// The text form (see [`print`]); with `binding`, also the arena plan.
    pub fn to_text(&self, binding: Option<&kiln_ir::ShapeCx>) -> String {
        print::program_text(self, binding)
    }
}
