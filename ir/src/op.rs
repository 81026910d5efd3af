//! The closed set of ops, each with its attributes and its one shape rule.

use std::fmt;

use crate::dim::Dim;
use crate::shape::{normalize_axis, ShapeCx, ShapeError};
use crate::types::{shape_string, DType, TensorType};

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

    fn to_attr(&self) -> AttrValue {
        let ix = |i: &usize| AttrValue::Dim(Dim::constant(*i as i64));
        match self {
            KernelOp::Unary(u, a) => AttrValue::Call(u.name().into(), vec![ix(a)]),
            KernelOp::Binary(b, x, y) => AttrValue::Call(b.name().into(), vec![ix(x), ix(y)]),
            KernelOp::Where(c, a, b) => AttrValue::Call("where".into(), vec![ix(c), ix(a), ix(b)]),
            KernelOp::Cast(t, a) => AttrValue::Call("cast".into(), vec![ix(a), word(t.name())]),
            KernelOp::Const(v, t) => {
                AttrValue::Call("const".into(), vec![AttrValue::Float(*v), word(t.name())])
            }
        }
    }

    fn from_attr(v: &AttrValue) -> Result<KernelOp, String> {
        let bad = || {
            format!("kernel: `{v}` is not an instruction such as add(0, 1), const(0.5, f32) or cast(2, i64)")
        };
        let AttrValue::Call(name, args) = v else {
            return Err(bad());
        };
        let ix = |k: usize| -> Result<usize, String> {
            match args.get(k) {
                Some(AttrValue::Dim(d)) => d
                    .as_const()
                    .filter(|i| *i >= 0)
                    .map(|i| i as usize)
                    .ok_or_else(bad),
                _ => Err(bad()),
            }
        };
        let dtype = |k: usize| -> Result<DType, String> {
            match args.get(k) {
                Some(AttrValue::Dim(d)) => d.as_sym().and_then(DType::from_name).ok_or_else(bad),
                _ => Err(bad()),
            }
        };
        let arity = |n: usize| if args.len() == n { Ok(()) } else { Err(bad()) };
        if let Some((u, _)) = UNARY.iter().find(|(_, n)| n == name) {
            arity(1)?;
            return Ok(KernelOp::Unary(*u, ix(0)?));
        }
        if let Some((b, _)) = BINARY.iter().find(|(_, n)| n == name) {
            arity(2)?;
            return Ok(KernelOp::Binary(*b, ix(0)?, ix(1)?));
        }
        match name.as_str() {
            "where" => {
                arity(3)?;
                Ok(KernelOp::Where(ix(0)?, ix(1)?, ix(2)?))
            }
            "cast" => {
                arity(2)?;
                Ok(KernelOp::Cast(dtype(1)?, ix(0)?))
            }
            "const" => {
                arity(2)?;
                let value = match &args[0] {
                    AttrValue::Float(x) => *x,
                    AttrValue::Dim(d) => d.as_const().ok_or_else(bad)? as f64,
                    _ => return Err(bad()),
                };
                Ok(KernelOp::Const(value, dtype(1)?))
            }
            _ => Err(bad()),
        }
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
    /// `attention(q, k, v[, mask])` with `q: [B, h, T, dh]`, `k: [B, hk, S, dh]`,
    /// `v: [B, hk, S, dv]`, `h` a multiple of `hk` (GQA/MQA), mask bool
    /// broadcastable to `[B, h, T, S]`; `causal` hides keys after each query
    /// (aligned bottom-right when `S > T`).
    Attention { causal: bool, scale: f64 },
    /// `lora_linear(x, w, a, b[, bias])`: `x·w + (alpha / r)·(x·a)·b (+ bias)`.
    LoraLinear { alpha: f64, layout: WeightLayout },
    /// A fused chain of elementwise ops: the operands broadcast together and
    /// `body` runs per element; the result is the last instruction's value,
    /// broadcast to the operands' common shape.
    Kernel { body: Vec<KernelOp> },
}

/// An attribute value as written in the text IR.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// A literal with a `.`, an exponent, or `inf`/`nan`.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A size expression; also integers (`-1`) and words (`f32`, `tanh`).
    Dim(Dim),
    /// `[a, b, c]`.
    List(Vec<AttrValue>),
    /// `name(a, b)`: an instruction of a fused kernel's body.
    Call(String, Vec<AttrValue>),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Float(x) => write!(f, "{x:?}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Dim(d) => write!(f, "{d}"),
            AttrValue::List(items) => {
                let parts: Vec<String> = items.iter().map(|a| a.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
            AttrValue::Call(name, args) => {
                let parts: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                write!(f, "{name}({})", parts.join(", "))
            }
        }
    }
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

/// Op names other than the unary and binary ones.
const OTHER_OPS: [&str; 23] = [
    "where",
    "cast",
    "constant",
    "arange",
    "matmul",
    "reduce_sum",
    "reduce_mean",
    "reduce_max",
    "softmax",
    "layer_norm",
    "rms_norm",
    "reshape",
    "permute",
    "expand",
    "slice",
    "concat",
    "gather",
    "causal_mask",
    "padding_mask",
    "rope",
    "attention",
    "lora_linear",
    "kernel",
];

/// Names other frameworks use for kiln ops, for "did you mean" hints.
const ALIASES: [(&str, &str); 12] = [
    ("gelu_new", "gelu_tanh"),
    ("gelu_pytorch_tanh", "gelu_tanh"),
    ("swish", "silu"),
    ("linear", "matmul"),
    ("bmm", "matmul"),
    ("transpose", "permute"),
    ("embedding", "gather"),
    ("view", "reshape"),
    ("cat", "concat"),
    ("layernorm", "layer_norm"),
    ("rmsnorm", "rms_norm"),
    ("scaled_dot_product_attention", "attention"),
];

/// The candidate closest to `name` by edit distance, if it is close enough to be
/// a likely typo (or `name` is a prefix of it).
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let dist = |a: &str, b: &str| -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    };
    candidates
        .map(|c| {
            (
                if c.starts_with(name) {
                    1
                } else {
                    dist(name, c)
                },
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.len() / 3).max(1) + 1)
        .min()
        .map(|(_, c)| c)
}

/// Reads named attributes for one op and reports unknown or missing ones.
struct AttrReader<'a> {
    op: &'a str,
    items: &'a [(String, AttrValue)],
    used: Vec<bool>,
}

impl<'a> AttrReader<'a> {
    fn get(&mut self, name: &str) -> Option<&'a AttrValue> {
        let i = self.items.iter().position(|(n, _)| n == name)?;
        self.used[i] = true;
        Some(&self.items[i].1)
    }

    fn missing(&self, name: &str, kind: &str) -> String {
        format!("{} needs attribute `{name}` ({kind})", self.op)
    }

    fn bad(&self, name: &str, kind: &str, v: &AttrValue) -> String {
        format!("{}: attribute `{name}` must be {kind}, got `{v}`", self.op)
    }

    fn dim(&mut self, name: &str) -> Result<Dim, String> {
        match self.get(name) {
            Some(AttrValue::Dim(d)) => Ok(d.clone()),
            Some(v) => Err(self.bad(name, "a size expression", v)),
            None => Err(self.missing(name, "a size expression")),
        }
    }

    fn int(&mut self, name: &str) -> Result<i64, String> {
        match self.get(name) {
            Some(v @ AttrValue::Dim(d)) => {
                d.as_const().ok_or_else(|| self.bad(name, "an integer", v))
            }
            Some(v) => Err(self.bad(name, "an integer", v)),
            None => Err(self.missing(name, "an integer")),
        }
    }

    fn float(&mut self, name: &str) -> Result<f64, String> {
        match self.get(name) {
            Some(AttrValue::Float(x)) => Ok(*x),
            Some(v @ AttrValue::Dim(d)) => d
                .as_const()
                .map(|c| c as f64)
                .ok_or_else(|| self.bad(name, "a number", v)),
            Some(v) => Err(self.bad(name, "a number", v)),
            None => Err(self.missing(name, "a number")),
        }
    }

    fn flag(&mut self, name: &str) -> Result<bool, String> {
        match self.get(name) {
            Some(AttrValue::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(name, "true or false", v)),
            None => Ok(false),
        }
    }

    fn word(&mut self, name: &str, allowed: &[&str]) -> Result<String, String> {
        let kind = format!("one of {}", allowed.join(", "));
        match self.get(name) {
            Some(v @ AttrValue::Dim(d)) => match d.as_sym() {
                Some(s) if allowed.contains(&s) => Ok(s.to_string()),
                _ => Err(self.bad(name, &kind, v)),
            },
            Some(v) => Err(self.bad(name, &kind, v)),
            None => Err(self.missing(name, &kind)),
        }
    }

    fn dtype(&mut self, name: &str) -> Result<DType, String> {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        let w = self.word(name, &names)?;
        DType::from_name(&w).ok_or_else(|| self.missing(name, "a dtype"))
    }

    fn dims(&mut self, name: &str) -> Result<Vec<Dim>, String> {
        match self.get(name) {
            Some(v @ AttrValue::List(items)) => items
                .iter()
                .map(|i| match i {
                    AttrValue::Dim(d) => Ok(d.clone()),
                    _ => Err(self.bad(name, "a list of size expressions", v)),
                })
                .collect(),
            Some(v) => Err(self.bad(name, "a list of size expressions", v)),
            None => Err(self.missing(name, "a list of size expressions")),
        }
    }

    fn ints(&mut self, name: &str) -> Result<Vec<i64>, String> {
        match self.get(name) {
            Some(v @ AttrValue::List(items)) => items
                .iter()
                .map(|i| match i {
                    AttrValue::Dim(d) if d.as_const().is_some() => Ok(d.as_const().unwrap_or(0)),
                    _ => Err(self.bad(name, "a list of integers", v)),
                })
                .collect(),
            Some(v) => Err(self.bad(name, "a list of integers", v)),
            None => Err(self.missing(name, "a list of integers")),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.used.iter().position(|u| !u) {
            Some(i) => Err(format!(
                "{} has no attribute `{}`",
                self.op, self.items[i].0
            )),
            None => Ok(()),
        }
    }
}

fn int_list(v: &[i64]) -> AttrValue {
    AttrValue::List(
        v.iter()
            .map(|i| AttrValue::Dim(Dim::constant(*i)))
            .collect(),
    )
}

fn dim_list(v: &[Dim]) -> AttrValue {
    AttrValue::List(v.iter().cloned().map(AttrValue::Dim).collect())
}

fn word(s: &str) -> AttrValue {
    AttrValue::Dim(Dim::sym(s))
}

fn int(i: i64) -> AttrValue {
    AttrValue::Dim(Dim::constant(i))
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

    /// The attributes in canonical order, defaults omitted.
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        match self {
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Gather | Op::PaddingMask => vec![],
            Op::Cast { to } => vec![("to", word(to.name()))],
            Op::Constant {
                value,
                dtype,
                shape,
            } => vec![
                ("value", AttrValue::Float(*value)),
                ("dtype", word(dtype.name())),
                ("shape", dim_list(shape)),
            ],
            Op::Arange { start, len, dtype } => vec![
                ("start", AttrValue::Dim(start.clone())),
                ("len", AttrValue::Dim(len.clone())),
                ("dtype", word(dtype.name())),
            ],
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let mut v = vec![];
                if *transpose_a {
                    v.push(("transpose_a", AttrValue::Bool(true)));
                }
                if *transpose_b {
                    v.push(("transpose_b", AttrValue::Bool(true)));
                }
                v
            }
            Op::Reduce { axes, keepdim, .. } => {
                let mut v = vec![("axes", int_list(axes))];
                if *keepdim {
                    v.push(("keepdim", AttrValue::Bool(true)));
                }
                v
            }
            Op::Softmax { axis } => vec![("axis", int(*axis))],
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => vec![("eps", AttrValue::Float(*eps))],
            Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", dim_list(shape))],
            Op::Permute { perm } => {
                let p: Vec<i64> = perm.iter().map(|&x| x as i64).collect();
                vec![("perm", int_list(&p))]
            }
            Op::Slice { axis, start, end } => vec![
                ("axis", int(*axis)),
                ("start", AttrValue::Dim(start.clone())),
                ("end", AttrValue::Dim(end.clone())),
            ],
            Op::Concat { axis } => vec![("axis", int(*axis))],
            Op::CausalMask { queries, keys } => vec![
                ("queries", AttrValue::Dim(queries.clone())),
                ("keys", AttrValue::Dim(keys.clone())),
            ],
            Op::Rope { theta } => vec![("theta", AttrValue::Float(*theta))],
            Op::Attention { causal, scale } => {
                let mut v = vec![];
                if *causal {
                    v.push(("causal", AttrValue::Bool(true)));
                }
                v.push(("scale", AttrValue::Float(*scale)));
                v
            }
            Op::LoraLinear { alpha, layout } => vec![
                ("alpha", AttrValue::Float(*alpha)),
                ("layout", word(layout.name())),
            ],
            Op::Kernel { body } => vec![(
                "body",
                AttrValue::List(body.iter().map(KernelOp::to_attr).collect()),
            )],
        }
    }

    /// Builds an op from its text-IR name and attributes.
    pub fn from_parts(name: &str, attrs: &[(String, AttrValue)]) -> Result<Op, String> {
        let mut r = AttrReader {
            op: name,
            items: attrs,
            used: vec![false; attrs.len()],
        };
        let op = if let Some((u, _)) = UNARY.iter().find(|(_, n)| *n == name) {
            Op::Unary(*u)
        } else if let Some((b, _)) = BINARY.iter().find(|(_, n)| *n == name) {
            Op::Binary(*b)
        } else {
            match name {
                "where" => Op::Where,
                "cast" => Op::Cast { to: r.dtype("to")? },
                "constant" => Op::Constant {
                    value: r.float("value")?,
                    dtype: r.dtype("dtype")?,
                    shape: r.dims("shape")?,
                },
                "arange" => Op::Arange {
                    start: r.dim("start")?,
                    len: r.dim("len")?,
                    dtype: r.dtype("dtype")?,
                },
                "matmul" => Op::MatMul {
                    transpose_a: r.flag("transpose_a")?,
                    transpose_b: r.flag("transpose_b")?,
                },
                "reduce_sum" | "reduce_mean" | "reduce_max" => Op::Reduce {
                    kind: match name {
                        "reduce_sum" => ReduceKind::Sum,
                        "reduce_mean" => ReduceKind::Mean,
                        _ => ReduceKind::Max,
                    },
                    axes: r.ints("axes")?,
                    keepdim: r.flag("keepdim")?,
                },
                "softmax" => Op::Softmax {
                    axis: r.int("axis")?,
                },
                "layer_norm" => Op::LayerNorm {
                    eps: r.float("eps")?,
                },
                "rms_norm" => Op::RmsNorm {
                    eps: r.float("eps")?,
                },
                "reshape" => Op::Reshape {
                    shape: r.dims("shape")?,
                },
                "expand" => Op::Expand {
                    shape: r.dims("shape")?,
                },
                "permute" => {
                    let perm = r.ints("perm")?;
                    if perm.iter().any(|&p| p < 0) {
                        return Err("permute: `perm` entries must be non-negative".into());
                    }
                    Op::Permute {
                        perm: perm.into_iter().map(|p| p as usize).collect(),
                    }
                }
                "slice" => Op::Slice {
                    axis: r.int("axis")?,
                    start: r.dim("start")?,
                    end: r.dim("end")?,
                },
                "concat" => Op::Concat {
                    axis: r.int("axis")?,
                },
                "gather" => Op::Gather,
                "causal_mask" => Op::CausalMask {
                    queries: r.dim("queries")?,
                    keys: r.dim("keys")?,
                },
                "padding_mask" => Op::PaddingMask,
                "rope" => Op::Rope {
                    theta: r.float("theta")?,
                },
                "attention" => Op::Attention {
                    causal: r.flag("causal")?,
                    scale: r.float("scale")?,
                },
                "kernel" => match r.get("body") {
                    Some(AttrValue::List(items)) => Op::Kernel {
                        body: items
                            .iter()
                            .map(KernelOp::from_attr)
                            .collect::<Result<_, _>>()?,
                    },
                    Some(v) => {
                        return Err(format!(
                            "kernel: attribute `body` must be a list of instructions, got `{v}`"
                        ))
                    }
                    None => {
                        return Err("kernel needs attribute `body` (a list of instructions)".into())
                    }
                },
                "lora_linear" => Op::LoraLinear {
                    alpha: r.float("alpha")?,
                    layout: match r.word("layout", &["in_out", "out_in"])?.as_str() {
                        "in_out" => WeightLayout::InOut,
                        _ => WeightLayout::OutIn,
                    },
                },
                _ => {
                    let known = UNARY
                        .iter()
                        .map(|(_, n)| *n)
                        .chain(BINARY.iter().map(|(_, n)| *n))
                        .chain(OTHER_OPS);
                    let alias = ALIASES.iter().find(|(a, _)| *a == name).map(|(_, op)| *op);
                    return Err(match alias.or_else(|| closest(name, known)) {
                        Some(s) => format!("unknown op `{name}` (did you mean `{s}`?)"),
                        None => format!("unknown op `{name}`"),
                    });
                }
            }
        };
        r.finish()?;
        Ok(op)
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
            Op::Attention { .. } => (3, 4),
            Op::LoraLinear { .. } => (4, 5),
            Op::Constant { .. } | Op::Arange { .. } | Op::CausalMask { .. } => (0, 0),
            Op::Concat { .. } => (1, usize::MAX),
            Op::Kernel { .. } => (0, usize::MAX),
        }
    }

    /// The shape rule: the result type for operands of types `inputs`.
    pub fn infer(&self, inputs: &[TensorType], cx: &ShapeCx) -> Result<TensorType, ShapeError> {
        let (lo, hi) = self.arity();
        if inputs.len() < lo || inputs.len() > hi {
            let expected = match (lo, hi) {
                (l, h) if l == h => l.to_string(),
                (l, usize::MAX) => format!("at least {l}"),
                (l, h) => format!("{l} to {h}"),
            };
            return Err(ShapeError::Arity {
                expected,
                got: inputs.len(),
            });
        }
        match self {
            Op::Unary(u) => infer_unary(*u, &inputs[0]),
            Op::Binary(b) => infer_binary(*b, &inputs[0], &inputs[1], cx),
            Op::Where => {
                expect_dtype("condition of where", &inputs[0], "bool", |d| {
                    d == DType::Bool
                })?;
                same_dtype("where", &inputs[1], &inputs[2])?;
                let s = cx.broadcast(&inputs[0].shape, &inputs[1].shape)?;
                let s = cx.broadcast(&s, &inputs[2].shape)?;
                Ok(TensorType::new(inputs[1].dtype, s))
            }
            Op::Cast { to } => Ok(inputs[0].with_dtype(*to)),
            Op::Constant {
                value,
                dtype,
                shape,
            } => {
                check_constant(*value, *dtype)?;
                check_sizes(cx, shape)?;
                Ok(TensorType::new(*dtype, shape.clone()))
            }
            Op::Arange { start, len, dtype } => {
                if !dtype.is_int() && !dtype.is_float() {
                    return Err(ShapeError::Attribute(format!(
                        "arange cannot produce {dtype}"
                    )));
                }
                check_sizes(cx, std::slice::from_ref(len))?;
                cx.eval(start)?;
                Ok(TensorType::new(*dtype, vec![len.clone()]))
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => infer_matmul(&inputs[0], &inputs[1], *transpose_a, *transpose_b, cx),
            Op::Reduce {
                kind,
                axes,
                keepdim,
            } => {
                let x = &inputs[0];
                expect_numeric(kind.name(), x)?;
                let mut picked = vec![false; x.rank()];
                for &a in axes {
                    let i = normalize_axis(kind.name(), a, x.rank())?;
                    if picked[i] {
                        return Err(ShapeError::Attribute(format!(
                            "{}: axis {a} is listed twice",
                            kind.name()
                        )));
                    }
                    picked[i] = true;
                }
                if *kind == ReduceKind::Mean {
                    expect_float("input of reduce_mean", x)?;
                }
                let mut shape = Vec::new();
                for (i, d) in x.shape.iter().enumerate() {
                    if !picked[i] {
                        shape.push(d.clone());
                    } else if *keepdim {
                        shape.push(Dim::constant(1));
                    }
                }
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Softmax { axis } => {
                expect_float("input of softmax", &inputs[0])?;
                normalize_axis("softmax", *axis, inputs[0].rank())?;
                Ok(inputs[0].clone())
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let x = &inputs[0];
                let what = self.name();
                expect_float(&format!("input of {what}"), x)?;
                let Some(last) = x.shape.last() else {
                    return Err(rank_error(&format!("input of {what}"), "at least 1", x));
                };
                for (i, p) in inputs.iter().enumerate().skip(1) {
                    let role = if i == 1 { "weight" } else { "bias" };
                    let role = format!("{role} of {what}");
                    same_dtype(&role, x, p)?;
                    if p.rank() != 1 {
                        return Err(rank_error(&role, "1", p));
                    }
                    cx.expect_same(
                        &format!("{role} does not match the normalized (last) axis"),
                        &p.shape[0],
                        last,
                        p,
                        x,
                    )?;
                }
                Ok(x.clone())
            }
            Op::Reshape { shape } => {
                let x = &inputs[0];
                check_sizes(cx, shape)?;
                let from = cx.product(&x.shape)?;
                let to = cx.product(shape)?;
                if from != to {
                    return Err(ShapeError::ElementCount {
                        from: x.shape_string(),
                        to: shape_string(shape),
                        from_count: from.to_string(),
                        to_count: to.to_string(),
                    });
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Permute { perm } => {
                let x = &inputs[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank() {
                    return Err(ShapeError::Attribute(format!(
                        "permute: perm {perm:?} has {} entries for rank {} input {x}",
                        perm.len(),
                        x.rank()
                    )));
                }
                for &p in perm {
                    if p >= x.rank() || seen[p] {
                        return Err(ShapeError::Attribute(format!(
                            "permute: perm {perm:?} is not a permutation of 0..{}",
                            x.rank()
                        )));
                    }
                    seen[p] = true;
                }
                let shape = perm.iter().map(|&p| x.shape[p].clone()).collect();
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Expand { shape } => {
                let x = &inputs[0];
                check_sizes(cx, shape)?;
                if x.rank() > shape.len() {
                    return Err(rank_error(
                        "input of expand",
                        &format!("at most {}", shape.len()),
                        x,
                    ));
                }
                let offset = shape.len() - x.rank();
                for (i, d) in x.shape.iter().enumerate() {
                    let target = &shape[offset + i];
                    if !cx.same(d, target)? && !cx.is_const(d, 1)? {
                        return Err(ShapeError::Attribute(format!(
                            "cannot expand {} to {}: axis {} is {} vs {} (only size-1 axes can be expanded)",
                            x.shape_string(),
                            shape_string(shape),
                            offset + i,
                            cx.describe(d),
                            cx.describe(target)
                        )));
                    }
                }
                Ok(TensorType::new(x.dtype, shape.clone()))
            }
            Op::Slice { axis, start, end } => {
                let x = &inputs[0];
                let a = normalize_axis("slice", *axis, x.rank())?;
                let len = end.sub(start).map_err(|source| ShapeError::Dim {
                    expr: format!("{end} - {start}"),
                    source,
                })?;
                let (s, e, n) = (cx.eval(start)?, cx.eval(end)?, cx.eval(&x.shape[a])?);
                let bad = match (s.as_const(), e.as_const(), n.as_const()) {
                    (Some(s), _, _) if s < 0 => true,
                    (Some(s), Some(e), _) if e < s => true,
                    (_, Some(e), Some(n)) if e > n => true,
                    _ => {
                        // Symbolic bounds: out of range for every size of the symbols.
                        let past_end = n.sub(&e).map_err(|source| ShapeError::Dim {
                            expr: format!("{} - {}", x.shape[a], end),
                            source,
                        })?;
                        s.is_never_positive()
                            || cx.eval(&len)?.is_never_positive()
                            || past_end.is_never_positive()
                    }
                };
                if bad {
                    return Err(ShapeError::Attribute(format!(
                        "slice {}..{} is out of bounds for axis {axis} of size {} in {x}",
                        cx.describe(start),
                        cx.describe(end),
                        cx.describe(&x.shape[a])
                    )));
                }
                let mut shape = x.shape.clone();
                shape[a] = len;
                Ok(TensorType::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                let first = &inputs[0];
                let a = normalize_axis("concat", *axis, first.rank())?;
                let mut total = first.shape[a].clone();
                for x in &inputs[1..] {
                    same_dtype("concat operands", first, x)?;
                    if x.rank() != first.rank() {
                        return Err(rank_error("concat operands", &first.rank().to_string(), x));
                    }
                    for i in 0..x.rank() {
                        if i != a {
                            cx.expect_same(
                                &format!("concat along axis {axis}: axis {i} differs"),
                                &first.shape[i],
                                &x.shape[i],
                                first,
                                x,
                            )?;
                        }
                    }
                    total = total.add(&x.shape[a]).map_err(|source| ShapeError::Dim {
                        expr: "concatenated length".into(),
                        source,
                    })?;
                }
                let mut shape = first.shape.clone();
                shape[a] = total;
                Ok(TensorType::new(first.dtype, shape))
            }
            Op::Gather => {
                let (table, ids) = (&inputs[0], &inputs[1]);
                if table.rank() < 1 {
                    return Err(rank_error("table of gather", "at least 1", table));
                }
                expect_dtype("ids of gather", ids, "i32 or i64", DType::is_int)?;
                let mut shape = ids.shape.clone();
                shape.extend(table.shape[1..].iter().cloned());
                Ok(TensorType::new(table.dtype, shape))
            }
            Op::CausalMask { queries, keys } => {
                check_sizes(cx, &[queries.clone(), keys.clone()])?;
                Ok(TensorType::new(
                    DType::Bool,
                    vec![queries.clone(), keys.clone()],
                ))
            }
            Op::PaddingMask => {
                let m = &inputs[0];
                expect_dtype("attention mask", m, "an integer or bool type", |d| {
                    d.is_int() || d == DType::Bool
                })?;
                if m.rank() != 2 {
                    return Err(rank_error("attention mask [B, S]", "2", m));
                }
                let one = Dim::constant(1);
                Ok(TensorType::new(
                    DType::Bool,
                    vec![m.shape[0].clone(), one.clone(), one, m.shape[1].clone()],
                ))
            }
            Op::Rope { .. } => {
                let (x, pos) = (&inputs[0], &inputs[1]);
                expect_float("input of rope", x)?;
                expect_dtype("positions of rope", pos, "i32 or i64", DType::is_int)?;
                if x.rank() < 2 {
                    return Err(rank_error("input of rope [..., T, dh]", "at least 2", x));
                }
                let t = &x.shape[x.rank() - 2];
                let dh = cx.eval(&x.shape[x.rank() - 1])?;
                if dh.as_const().is_some_and(|c| c % 2 != 0) {
                    return Err(ShapeError::Attribute(format!(
                        "rope needs an even head dim, got {} in {x}",
                        cx.describe(&x.shape[x.rank() - 1])
                    )));
                }
                match pos.rank() {
                    1 => cx.expect_same(
                        "rope positions length differs from T",
                        &pos.shape[0],
                        t,
                        pos,
                        x,
                    )?,
                    2 => {
                        cx.expect_same(
                            "rope positions length differs from T",
                            &pos.shape[1],
                            t,
                            pos,
                            x,
                        )?;
                        cx.expect_same(
                            "rope positions batch differs",
                            &pos.shape[0],
                            &x.shape[0],
                            pos,
                            x,
                        )?;
                    }
                    _ => {
                        return Err(rank_error(
                            "positions of rope",
                            "1 ([T]) or 2 ([B, T])",
                            pos,
                        ))
                    }
                }
                Ok(x.clone())
            }
            Op::Attention { .. } => infer_attention(inputs, cx),
            Op::LoraLinear { layout, .. } => infer_lora(inputs, *layout, cx),
            Op::Kernel { body } => infer_kernel(inputs, body, cx),
        }
    }
}

fn rank_error(what: &str, expected: &str, ty: &TensorType) -> ShapeError {
    ShapeError::Rank {
        what: what.to_string(),
        expected: expected.to_string(),
        got: ty.rank(),
        ty: ty.to_string(),
    }
}

fn expect_dtype(
    what: &str,
    ty: &TensorType,
    expected: &str,
    ok: impl Fn(DType) -> bool,
) -> Result<(), ShapeError> {
    if ok(ty.dtype) {
        Ok(())
    } else {
        Err(ShapeError::DType {
            what: what.to_string(),
            expected: expected.to_string(),
            got: ty.dtype,
        })
    }
}

fn expect_float(what: &str, ty: &TensorType) -> Result<(), ShapeError> {
    expect_dtype(what, ty, "a float type", DType::is_float)
}

fn expect_numeric(what: &str, ty: &TensorType) -> Result<(), ShapeError> {
    expect_dtype(what, ty, "a numeric type", |d| d != DType::Bool)
}

fn same_dtype(what: &str, a: &TensorType, b: &TensorType) -> Result<(), ShapeError> {
    if a.dtype == b.dtype {
        return Ok(());
    }
    Err(ShapeError::DType {
        what: what.to_string(),
        expected: format!("{} like the first operand", a.dtype),
        got: b.dtype,
    })
}

/// A constant must be exactly representable in its dtype (integers: whole and
/// in range, i64 within ±2^53 so the f64 attribute is exact).
fn check_constant(value: f64, dtype: DType) -> Result<(), ShapeError> {
    let (lo, hi) = match dtype {
        DType::I32 => (i32::MIN as f64, i32::MAX as f64),
        DType::I64 => (-(2f64.powi(53)), 2f64.powi(53)),
        DType::Bool => (0.0, 1.0),
        DType::F32 | DType::F16 | DType::BF16 => return Ok(()),
    };
    if !value.is_finite() || value.fract() != 0.0 || value < lo || value > hi {
        return Err(ShapeError::Attribute(format!(
            "constant {value:?} is not representable as {dtype}"
        )));
    }
    Ok(())
}

/// Sizes must evaluate (exact divisions) and must not be negative constants.
fn check_sizes(cx: &ShapeCx, dims: &[Dim]) -> Result<(), ShapeError> {
    for d in dims {
        if cx.eval(d)?.is_never_positive() {
            return Err(ShapeError::Attribute(format!(
                "size {} is negative",
                cx.describe(d)
            )));
        }
    }
    Ok(())
}

fn infer_unary(u: UnaryOp, x: &TensorType) -> Result<TensorType, ShapeError> {
    let what = format!("input of {}", u.name());
    match u {
        UnaryOp::Not => expect_dtype(&what, x, "bool", |d| d == DType::Bool)?,
        UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu => expect_numeric(&what, x)?,
        _ => expect_float(&what, x)?,
    }
    Ok(x.clone())
}

fn infer_binary(
    b: BinaryOp,
    x: &TensorType,
    y: &TensorType,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    same_dtype(&format!("operands of {}", b.name()), x, y)?;
    let what = format!("operands of {}", b.name());
    match b {
        BinaryOp::And | BinaryOp::Or => expect_dtype(&what, x, "bool", |d| d == DType::Bool)?,
        BinaryOp::Eq | BinaryOp::Ne => {}
        BinaryOp::Pow => expect_float(&what, x)?,
        _ => expect_numeric(&what, x)?,
    }
    let shape = cx.broadcast(&x.shape, &y.shape)?;
    let dtype = if b.is_predicate() {
        DType::Bool
    } else {
        x.dtype
    };
    Ok(TensorType::new(dtype, shape))
}

fn infer_matmul(
    a: &TensorType,
    b: &TensorType,
    ta: bool,
    tb: bool,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    same_dtype("operands of matmul", a, b)?;
    expect_numeric("operands of matmul", a)?;
    if a.rank() < 2 {
        return Err(rank_error("lhs of matmul", "at least 2", a));
    }
    if b.rank() < 2 {
        return Err(rank_error("rhs of matmul", "at least 2", b));
    }
    let (ar, br) = (a.rank(), b.rank());
    let (m, ka) = if ta {
        (&a.shape[ar - 1], &a.shape[ar - 2])
    } else {
        (&a.shape[ar - 2], &a.shape[ar - 1])
    };
    let (kb, n) = if tb {
        (&b.shape[br - 1], &b.shape[br - 2])
    } else {
        (&b.shape[br - 2], &b.shape[br - 1])
    };
    cx.expect_same("inner dims differ", ka, kb, a, b)?;
    let mut shape = cx
        .broadcast(&a.shape[..ar - 2], &b.shape[..br - 2])
        .map_err(|e| match e {
            ShapeError::Broadcast {
                axis, a: x, b: y, ..
            } => ShapeError::Broadcast {
                lhs: a.shape_string(),
                rhs: b.shape_string(),
                axis: axis - 2,
                a: x,
                b: y,
            },
            other => other,
        })?;
    shape.push(m.clone());
    shape.push(n.clone());
    Ok(TensorType::new(a.dtype, shape))
}

fn infer_attention(inputs: &[TensorType], cx: &ShapeCx) -> Result<TensorType, ShapeError> {
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    for (role, t) in [("query", q), ("key", k), ("value", v)] {
        let what = format!("attention {role} [B, heads, len, head_dim]");
        if t.rank() != 4 {
            return Err(rank_error(&what, "4", t));
        }
        expect_float(&format!("attention {role}"), t)?;
    }
    same_dtype("attention key", q, k)?;
    same_dtype("attention value", q, v)?;
    cx.expect_same(
        "attention batch differs between query and key",
        &q.shape[0],
        &k.shape[0],
        q,
        k,
    )?;
    cx.expect_same(
        "attention batch differs between key and value",
        &k.shape[0],
        &v.shape[0],
        k,
        v,
    )?;
    cx.expect_same(
        "attention head dim differs between query and key",
        &q.shape[3],
        &k.shape[3],
        q,
        k,
    )?;
    cx.expect_same(
        "attention kv heads differ between key and value",
        &k.shape[1],
        &v.shape[1],
        k,
        v,
    )?;
    cx.expect_same(
        "attention key and value lengths differ",
        &k.shape[2],
        &v.shape[2],
        k,
        v,
    )?;
    let (h, hk) = (cx.eval(&q.shape[1])?, cx.eval(&k.shape[1])?);
    match h.div(&hk) {
        Ok(_) => {}
        Err(_) => {
            return Err(ShapeError::DimMismatch {
                what: "query heads are not a multiple of kv heads (GQA needs h % h_kv == 0)".into(),
                lhs: cx.describe(&q.shape[1]),
                rhs: cx.describe(&k.shape[1]),
                lhs_ty: q.to_string(),
                rhs_ty: k.to_string(),
            })
        }
    }
    if let Some(mask) = inputs.get(3) {
        expect_dtype("attention mask", mask, "bool", |d| d == DType::Bool)?;
        let scores = vec![
            q.shape[0].clone(),
            q.shape[1].clone(),
            q.shape[2].clone(),
            k.shape[2].clone(),
        ];
        if mask.rank() > 4 {
            return Err(rank_error("attention mask", "at most 4", mask));
        }
        let offset = 4 - mask.rank();
        for (i, d) in mask.shape.iter().enumerate() {
            let target = &scores[offset + i];
            if !cx.same(d, target)? && !cx.is_const(d, 1)? {
                return Err(ShapeError::Attribute(format!(
                    "attention mask {} does not broadcast to the scores {}: axis {} is {} vs {}",
                    mask.shape_string(),
                    shape_string(&scores),
                    offset + i,
                    cx.describe(d),
                    cx.describe(target)
                )));
            }
        }
    }
    Ok(TensorType::new(
        q.dtype,
        vec![
            q.shape[0].clone(),
            q.shape[1].clone(),
            q.shape[2].clone(),
            v.shape[3].clone(),
        ],
    ))
}

fn infer_lora(
    inputs: &[TensorType],
    layout: WeightLayout,
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    let (x, w, a, b) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
    expect_float("input of lora_linear", x)?;
    for (role, t) in [("weight", w), ("lora_a", a), ("lora_b", b)] {
        same_dtype(&format!("{role} of lora_linear"), x, t)?;
        if t.rank() != 2 {
            return Err(rank_error(&format!("{role} of lora_linear"), "2", t));
        }
    }
    let Some(x_in) = x.shape.last() else {
        return Err(rank_error("input of lora_linear", "at least 1", x));
    };
    // (in, out) of w, (in, r) of a, (r, out) of b, whatever the storage layout.
    let (w_in, w_out, a_in, a_r, b_r, b_out) = match layout {
        WeightLayout::InOut => (
            &w.shape[0],
            &w.shape[1],
            &a.shape[0],
            &a.shape[1],
            &b.shape[0],
            &b.shape[1],
        ),
        WeightLayout::OutIn => (
            &w.shape[1],
            &w.shape[0],
            &a.shape[1],
            &a.shape[0],
            &b.shape[1],
            &b.shape[0],
        ),
    };
    cx.expect_same(
        "lora_linear input width differs from the weight's in-features",
        x_in,
        w_in,
        x,
        w,
    )?;
    cx.expect_same(
        "lora_linear lora_a in-features differ from the weight's",
        a_in,
        w_in,
        a,
        w,
    )?;
    cx.expect_same(
        "lora_linear rank differs between lora_a and lora_b",
        a_r,
        b_r,
        a,
        b,
    )?;
    cx.expect_same(
        "lora_linear lora_b out-features differ from the weight's",
        b_out,
        w_out,
        b,
        w,
    )?;
    if let Some(bias) = inputs.get(4) {
        same_dtype("bias of lora_linear", x, bias)?;
        if bias.rank() != 1 {
            return Err(rank_error("bias of lora_linear", "1", bias));
        }
        cx.expect_same(
            "lora_linear bias length differs from out-features",
            &bias.shape[0],
            w_out,
            bias,
            w,
        )?;
    }
    let mut shape = x.shape.clone();
    let last = shape.len() - 1;
    shape[last] = w_out.clone();
    Ok(TensorType::new(x.dtype, shape))
}

fn infer_kernel(
    inputs: &[TensorType],
    body: &[KernelOp],
    cx: &ShapeCx,
) -> Result<TensorType, ShapeError> {
    if body.is_empty() {
        return Err(ShapeError::Attribute("kernel body is empty".into()));
    }
    let mut shape: Vec<Dim> = Vec::new();
    for t in inputs {
        shape = cx.broadcast(&shape, &t.shape)?;
    }
    // Scalar types of every kernel value: operands first, then instructions.
    let mut vals: Vec<TensorType> = inputs
        .iter()
        .map(|t| TensorType::new(t.dtype, vec![]))
        .collect();
    for (i, k) in body.iter().enumerate() {
        let at = |j: usize| -> Result<&TensorType, ShapeError> {
            if j >= vals.len() {
                return Err(ShapeError::Attribute(format!(
                    "kernel instruction {i} reads value {j}, but only {} are defined before it",
                    vals.len()
                )));
            }
            Ok(&vals[j])
        };
        let scalar_cx = ShapeCx::new();
        let ty = match k {
            KernelOp::Unary(u, a) => infer_unary(*u, at(*a)?)?,
            KernelOp::Binary(b, x, y) => infer_binary(*b, at(*x)?, at(*y)?, &scalar_cx)?,
            KernelOp::Where(c, a, b) => {
                let (c, a, b) = (at(*c)?, at(*a)?, at(*b)?);
                expect_dtype("condition of where", c, "bool", |d| d == DType::Bool)?;
                same_dtype("where", a, b)?;
                a.clone()
            }
            KernelOp::Cast(t, a) => at(*a)?.with_dtype(*t),
            KernelOp::Const(v, t) => {
                check_constant(*v, *t)?;
                TensorType::new(*t, vec![])
            }
        };
        vals.push(ty);
    }
    let dtype = vals.last().map_or(DType::F32, |t| t.dtype);
    Ok(TensorType::new(dtype, shape))
}
