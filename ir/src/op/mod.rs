//! The closed set of ops: the `Op` enum and its parts, each op's name and arity.
//! The attribute text codec is in `attrs.rs`, the shape rules in `infer.rs`.

use crate::dim::Dim;
use crate::types::DType;

mod attrs;
mod infer;

pub use attrs::{closest, AttrValue};

/// Elementwise ops of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Abs,
    Recip,
    Erf,
    /// GELU, exact form `x * Φ(x)` with the error function.
    Gelu,
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    Silu,
    Relu,
    /// Logical not, on bool.
    Not,
}

/// Elementwise ops of two operands, broadcast numpy-style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// Reductions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
}

/// How a linear layer's weights are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `w: [in, out]`, `a: [in, r]`, `b: [r, out]` (GPT-2 `Conv1D`).
    InOut,
    /// `w: [out, in]`, `a: [r, in]`, `b: [out, r]` (`nn.Linear`, PEFT).
    OutIn,
}

/// T5's relative position bias of an [`Op::Attention`]: head `h`'s score of
/// key `j` for the query at position `i` gains `table[bucket(j − i), h]`,
/// with `table: [buckets, heads]` the op's last operand. Positions are
/// aligned bottom-right like the causal rule: query `t` of `T` sits at
/// position `t + S − T`, so a decode step over a cache sees the distances of
/// the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelativeBias {
    /// Rows of the table (`relative_attention_num_buckets`).
    pub buckets: usize,
    /// Distances at or beyond this share the last bucket
    /// (`relative_attention_max_distance`).
    pub max_distance: usize,
    /// Keys before and after the query get buckets of their own (an
    /// encoder); otherwise only keys at or before it count (a decoder).
    pub bidirectional: bool,
}

impl RelativeBias {
    /// Why these settings describe no bucketing, if they do not: every
    /// branch of [`RelativeBias::bucket`] needs at least one exact bucket
    /// and a maximum distance beyond them.
    pub fn problem(&self) -> Option<String> {
        let half = if self.bidirectional {
            self.buckets / 2
        } else {
            self.buckets
        };
        let exact = half / 2;
        if exact == 0 {
            return Some(format!(
                "{} buckets leave no exact bucket (need at least {})",
                self.buckets,
                if self.bidirectional { 4 } else { 2 }
            ));
        }
        if self.max_distance <= exact {
            return Some(format!(
                "max_distance {} must exceed the {exact} exact buckets",
                self.max_distance
            ));
        }
        None
    }

    /// The bucket of key minus query position `rel`, as transformers'
    /// `T5Attention._relative_position_bucket` computes it: exact buckets for
    /// the nearest half, then logarithmically wider ones up to
    /// `max_distance`, in f32 and truncated as there.
    pub fn bucket(&self, rel: i64) -> usize {
        let mut nb = self.buckets as i64;
        let mut bucket = 0i64;
        let dist = if self.bidirectional {
            nb /= 2;
            if rel > 0 {
                bucket += nb;
            }
            rel.abs()
        } else {
            (-rel).max(0)
        };
        let exact = nb / 2;
        if dist < exact {
            return (bucket + dist) as usize;
        }
        let log_ratio = ((self.max_distance as f64) / (exact as f64)).ln() as f32;
        let scaled = (dist as f32 / exact as f32).ln() / log_ratio * (nb - exact) as f32;
        let large = (exact + scaled as i64).min(nb - 1);
        (bucket + large) as usize
    }
}

/// One scalar instruction of a fused elementwise [`Op::Kernel`]. Arguments
/// index the kernel's values: its operands first (`0..n`), then the results of
/// earlier instructions (`n + i` for instruction `i`).
#[derive(Clone, Debug, PartialEq)]
pub enum KernelOp {
    /// An elementwise unary op.
    Unary(UnaryOp, usize),
    /// An elementwise binary op.
    Binary(BinaryOp, usize, usize),
    /// `where(cond, a, b)`.
    Where(usize, usize, usize),
    /// A dtype conversion.
    Cast(DType, usize),
    /// A scalar constant.
    Const(f64, DType),
}

impl KernelOp {
    /// The values this instruction reads.
    pub fn args(&self) -> Vec<usize> {
        match self {
            KernelOp::Unary(_, a) | KernelOp::Cast(_, a) => vec![*a],
            KernelOp::Binary(_, a, b) => vec![*a, *b],
            KernelOp::Where(c, a, b) => vec![*c, *a, *b],
            KernelOp::Const(..) => vec![],
        }
    }

    /// This instruction with each value it reads renamed by `f` (`None`
    /// when `f` has no name for one of them).
    pub fn try_map_args(&self, mut f: impl FnMut(usize) -> Option<usize>) -> Option<KernelOp> {
        Some(match *self {
            KernelOp::Unary(u, a) => KernelOp::Unary(u, f(a)?),
            KernelOp::Binary(b, x, y) => KernelOp::Binary(b, f(x)?, f(y)?),
            KernelOp::Where(c, a, b) => KernelOp::Where(f(c)?, f(a)?, f(b)?),
            KernelOp::Cast(t, a) => KernelOp::Cast(t, f(a)?),
            KernelOp::Const(v, t) => KernelOp::Const(v, t),
        })
    }
}

/// One operation. Every op produces exactly one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Elementwise unary op.
    Unary(UnaryOp),
    /// Elementwise binary op with broadcasting.
    Binary(BinaryOp),
    /// `where(cond, a, b)`: elementwise select, all three broadcast.
    Where,
    /// Elementwise dtype conversion.
    Cast { to: DType },
    /// A tensor filled with one value.
    Constant {
        value: f64,
        dtype: DType,
        shape: Vec<Dim>,
    },
    /// `start, start + 1, …, start + len - 1` (positions).
    Arange { start: Dim, len: Dim, dtype: DType },
    /// Batched matrix product; batch dims broadcast.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// Reduction over `axes`.
    Reduce {
        kind: ReduceKind,
        axes: Vec<i64>,
        keepdim: bool,
    },
    /// Softmax along `axis`.
    Softmax { axis: i64 },
    /// `layer_norm(x, weight[, bias])` over the last axis.
    LayerNorm { eps: f64 },
    /// `rms_norm(x, weight)` over the last axis.
    RmsNorm { eps: f64 },
    /// Reinterprets the dims; the element count must not change.
    Reshape { shape: Vec<Dim> },
    /// Reorders the axes: output axis `i` is input axis `perm[i]`.
    Permute { perm: Vec<usize> },
    /// Broadcasts to `shape` (size-1 axes stretch, new axes on the left).
    Expand { shape: Vec<Dim> },
    /// `start..end` along `axis`.
    Slice { axis: i64, start: Dim, end: Dim },
    /// Concatenation along `axis`.
    Concat { axis: i64 },
    /// `gather(table, ids)`: rows of `table` picked by integer `ids` (embedding).
    Gather,
    /// `bool[queries, keys]`, true where query `i` may see key `j`, i.e.
    /// `j <= i + keys - queries` (the queries are the last ones).
    CausalMask { queries: Dim, keys: Dim },
    /// `padding_mask(m: int[B, S])` → `bool[B, 1, 1, S]`, true where `m != 0`.
    PaddingMask,
    /// Rotary position embedding (rotate-half form) of `x[..., T, dh]` at
    /// integer positions `pos[T]` or `pos[B, T]`.
    Rope { theta: f64 },
    /// `attention(q, k, v[, mask][, slopes])` with `q: [B, h, T, dh]`,
    /// `k: [B, hk, S, dh]`, `v: [B, hk, S, dv]`, `h` a multiple of `hk`
    /// (GQA/MQA), mask bool broadcastable to `[B, h, T, S]`; `causal` hides
    /// keys after each query (aligned bottom-right when `S > T`). With
    /// `alibi`, the last operand is `slopes: [h]` and head `i`'s score of key
    /// `j` gains `slopes[i] · j` (ALiBi, as BLOOM adds it: the same as
    /// `−slopes[i] · (query − key)` up to a per-row constant, which the
    /// softmax ignores). With `relative`, the last operand is T5's bias
    /// table `[buckets, h]` (see [`RelativeBias`]); at most one of the two.
    Attention {
        causal: bool,
        scale: f64,
        alibi: bool,
        relative: Option<RelativeBias>,
    },
    /// `lora_linear(x, w, a, b[, bias])`: `x·w + (alpha / r)·(x·a)·b (+ bias)`.
    LoraLinear { alpha: f64, layout: WeightLayout },
    /// `moe(x, router, gate, up, down)`: a sparse mixture of SwiGLU experts
    /// (Mixtral). `x: [..., d]`, `router: [E, d]`, `gate` and `up: [E, f, d]`,
    /// `down: [E, d, f]` (`nn.Linear` layout, stacked over the experts).
    /// Per token: `p = softmax(router · x)`, the `top_k` largest `p` (exact ties
    /// to the lower expert index), their weights renormalised to sum to 1,
    /// and `Σ w_e · down_e(silu(gate_e · x) ⊙ (up_e · x))` over the chosen
    /// experts only. Output `[..., d]`; `1 <= top_k <= E`.
    Moe { top_k: usize },
    /// A fused chain of elementwise ops: the operands broadcast together and
    /// `body` runs per element; the result is the last instruction's value,
    /// broadcast to the operands' common shape.
    Kernel { body: Vec<KernelOp> },
}

const UNARY: [(UnaryOp, &str); 15] = [
    (UnaryOp::Neg, "neg"),
    (UnaryOp::Exp, "exp"),
    (UnaryOp::Log, "log"),
    (UnaryOp::Sqrt, "sqrt"),
    (UnaryOp::Rsqrt, "rsqrt"),
    (UnaryOp::Tanh, "tanh"),
    (UnaryOp::Sigmoid, "sigmoid"),
    (UnaryOp::Abs, "abs"),
    (UnaryOp::Recip, "recip"),
    (UnaryOp::Erf, "erf"),
    (UnaryOp::Gelu, "gelu"),
    (UnaryOp::GeluTanh, "gelu_tanh"),
    (UnaryOp::Silu, "silu"),
    (UnaryOp::Relu, "relu"),
    (UnaryOp::Not, "not"),
];

const BINARY: [(BinaryOp, &str); 15] = [
    (BinaryOp::Add, "add"),
    (BinaryOp::Sub, "sub"),
    (BinaryOp::Mul, "mul"),
    (BinaryOp::Div, "div"),
    (BinaryOp::Pow, "pow"),
    (BinaryOp::Max, "max"),
    (BinaryOp::Min, "min"),
    (BinaryOp::Eq, "eq"),
    (BinaryOp::Ne, "ne"),
    (BinaryOp::Lt, "lt"),
    (BinaryOp::Le, "le"),
    (BinaryOp::Gt, "gt"),
    (BinaryOp::Ge, "ge"),
    (BinaryOp::And, "and"),
    (BinaryOp::Or, "or"),
];

impl UnaryOp {
    /// Every unary op.
    pub const ALL: [UnaryOp; 15] = {
        let mut out = [UnaryOp::Neg; 15];
        let mut i = 0;
        while i < 15 {
            out[i] = UNARY[i].0;
            i += 1;
        }
        out
    };

    /// The text-IR name.
    pub fn name(self) -> &'static str {
        UNARY
            .iter()
            .find(|(op, _)| *op == self)
            .map_or("?", |(_, n)| n)
    }
}

impl UnaryOp {
    /// The op's meaning on one float, in f64 (`None` for `not`, which is bool
    /// only). The single definition the interpreter and constant folding share.
    pub fn float_fn(self) -> Option<fn(f64) -> f64> {
        use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_PI};
        fn sigmoid(x: f64) -> f64 {
            1.0 / (1.0 + (-x).exp())
        }
        Some(match self {
            UnaryOp::Neg => |x| -x,
            UnaryOp::Exp => f64::exp,
            UnaryOp::Log => f64::ln,
            UnaryOp::Sqrt => f64::sqrt,
            UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
            UnaryOp::Tanh => f64::tanh,
            UnaryOp::Sigmoid => sigmoid,
            UnaryOp::Abs => f64::abs,
            UnaryOp::Recip => |x| 1.0 / x,
            UnaryOp::Erf => libm::erf,
            UnaryOp::Gelu => |x| 0.5 * x * (1.0 + libm::erf(x * FRAC_1_SQRT_2)),
            UnaryOp::GeluTanh => {
                |x| 0.5 * x * (1.0 + (FRAC_2_PI.sqrt() * (x + 0.044715 * x * x * x)).tanh())
            }
            UnaryOp::Silu => |x| x * sigmoid(x),
            // `x < 0` is false for NaN, so NaN passes through as in PyTorch.
            UnaryOp::Relu => |x| if x < 0.0 { 0.0 } else { x },
            UnaryOp::Not => return None,
        })
    }
}

impl BinaryOp {
    /// Every binary op.
    pub const ALL: [BinaryOp; 15] = {
        let mut out = [BinaryOp::Add; 15];
        let mut i = 0;
        while i < 15 {
            out[i] = BINARY[i].0;
            i += 1;
        }
        out
    };

    /// The text-IR name.
    pub fn name(self) -> &'static str {
        BINARY
            .iter()
            .find(|(op, _)| *op == self)
            .map_or("?", |(_, n)| n)
    }

    /// Whether the result is bool (comparisons and logic).
    pub fn is_predicate(self) -> bool {
        use BinaryOp::*;
        matches!(self, Eq | Ne | Lt | Le | Gt | Ge | And | Or)
    }

    /// A comparison's result on the ordering of its operands (`None` when
    /// unordered: a NaN, which only `ne` holds for); `None` for other ops.
    /// The one definition every executor and constant folding share.
    pub fn compare(self, o: Option<std::cmp::Ordering>) -> Option<bool> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        Some(match self {
            BinaryOp::Eq => o == Some(Equal),
            BinaryOp::Ne => o != Some(Equal),
            BinaryOp::Lt => o == Some(Less),
            BinaryOp::Le => matches!(o, Some(Less | Equal)),
            BinaryOp::Gt => o == Some(Greater),
            BinaryOp::Ge => matches!(o, Some(Greater | Equal)),
            _ => return None,
        })
    }
}

impl ReduceKind {
    fn name(self) -> &'static str {
        match self {
            ReduceKind::Sum => "reduce_sum",
            ReduceKind::Mean => "reduce_mean",
            ReduceKind::Max => "reduce_max",
        }
    }
}

impl WeightLayout {
    fn name(self) -> &'static str {
        match self {
            WeightLayout::InOut => "in_out",
            WeightLayout::OutIn => "out_in",
        }
    }
}

impl Op {
    /// The text-IR name of the op.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::Constant { .. } => "constant",
            Op::Arange { .. } => "arange",
            Op::MatMul { .. } => "matmul",
            Op::Reduce { kind, .. } => kind.name(),
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "expand",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather => "gather",
            Op::CausalMask { .. } => "causal_mask",
            Op::PaddingMask => "padding_mask",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::LoraLinear { .. } => "lora_linear",
            Op::Moe { .. } => "moe",
            Op::Kernel { .. } => "kernel",
        }
    }

    /// Whether the op is elementwise (a candidate for fusion).
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. }
        )
    }

    /// Which operands of an `attention` op with `n` operands are the mask
    /// and the ALiBi slopes (`None` for other ops).
    pub fn attention_extras(&self, n: usize) -> Option<(Option<usize>, Option<usize>)> {
        match self {
            Op::Attention {
                alibi: false,
                relative: None,
                ..
            } => Some(((n > 3).then_some(3), None)),
            Op::Attention { .. } => Some(((n > 4).then_some(3), Some(n - 1))),
            _ => None,
        }
    }

    /// The number of operands the op takes, as a range.
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Unary(_) | Op::Cast { .. } | Op::Reduce { .. } | Op::Softmax { .. } => (1, 1),
            Op::Reshape { .. } | Op::Permute { .. } | Op::Expand { .. } | Op::Slice { .. } => {
                (1, 1)
            }
            Op::PaddingMask => (1, 1),
            Op::Binary(_) | Op::MatMul { .. } | Op::Gather | Op::RmsNorm { .. } => (2, 2),
            Op::Rope { .. } => (2, 2),
            Op::Where => (3, 3),
            Op::LayerNorm { .. } => (2, 3),
            Op::Attention {
                alibi: false,
                relative: None,
                ..
            } => (3, 4),
            Op::Attention { .. } => (4, 5),
            Op::LoraLinear { .. } => (4, 5),
            Op::Moe { .. } => (5, 5),
            Op::Constant { .. } | Op::Arange { .. } | Op::CausalMask { .. } => (0, 0),
            Op::Concat { .. } => (1, usize::MAX),
            Op::Kernel { .. } => (0, usize::MAX),
        }
    }
}
