//! The attribute text codec: `AttrValue` and its text form, reading an op back
//! from its name and attributes (`Op::from_parts`), and writing its attributes
//! (`Op::attrs`).

use std::fmt;

use super::{KernelOp, Op, ReduceKind, WeightLayout, BINARY, UNARY};
use crate::dim::Dim;
use crate::types::DType;

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

impl KernelOp {
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

/// Op names other than the unary and binary ones.
const OTHER_OPS: [&str; 24] = [
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
    "moe",
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
    // The hint is for names a person typed: past MAX_HINT_CHARS none is
    // offered, and a candidate whose length alone puts it out of reach is
    // skipped without the distance table, so a huge file or identifier
    // costs a pass over the candidates, not a product of their lengths.
    const MAX_HINT_CHARS: usize = 64;
    let limit = |c: &str| (c.len() / 3).max(1) + 1;
    if name.len() > MAX_HINT_CHARS {
        return None;
    }
    candidates
        .filter_map(|c| {
            if c.starts_with(name) {
                return Some((1, c));
            }
            if c.len() > 2 * MAX_HINT_CHARS || c.len().abs_diff(name.len()) > limit(c) {
                return None;
            }
            Some((dist(name, c), c))
        })
        .filter(|(d, c)| *d <= limit(c))
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

    /// A number that must be finite and at least `min` (a NaN `eps` or
    /// `theta` would make every output NaN without a word).
    fn float_at_least(&mut self, name: &str, min: f64) -> Result<f64, String> {
        let x = self.float(name)?;
        if !x.is_finite() || x < min {
            let bound = if min > 0.0 {
                "positive".to_string()
            } else {
                format!("at least {min}")
            };
            return Err(format!(
                "{}: attribute `{name}` must be a finite number, {bound}, got {x}",
                self.op
            ));
        }
        Ok(x)
    }

    /// A number that must be finite.
    fn finite_float(&mut self, name: &str) -> Result<f64, String> {
        let x = self.float(name)?;
        if !x.is_finite() {
            return Err(format!(
                "{}: attribute `{name}` must be a finite number, got {x}",
                self.op
            ));
        }
        Ok(x)
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
            Op::Attention {
                causal,
                scale,
                alibi,
                relative,
            } => {
                let mut v = vec![];
                if *alibi {
                    v.push(("alibi", AttrValue::Bool(true)));
                }
                if let Some(r) = relative {
                    v.push(("rel_buckets", int(r.buckets as i64)));
                    v.push(("rel_max_distance", int(r.max_distance as i64)));
                    if r.bidirectional {
                        v.push(("rel_bidirectional", AttrValue::Bool(true)));
                    }
                }
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
            Op::Moe { top_k } => vec![("top_k", int(*top_k as i64))],
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
                    eps: r.float_at_least("eps", 0.0)?,
                },
                "rms_norm" => Op::RmsNorm {
                    eps: r.float_at_least("eps", 0.0)?,
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
                "moe" => {
                    let k = r.int("top_k")?;
                    if k < 1 {
                        return Err(format!("moe: `top_k` must be at least 1, got {k}"));
                    }
                    Op::Moe { top_k: k as usize }
                }
                "causal_mask" => Op::CausalMask {
                    queries: r.dim("queries")?,
                    keys: r.dim("keys")?,
                },
                "padding_mask" => Op::PaddingMask,
                "rope" => Op::Rope {
                    theta: r.float_at_least("theta", f64::MIN_POSITIVE)?,
                },
                "attention" => {
                    let alibi = r.flag("alibi")?;
                    let relative = match r.get("rel_buckets") {
                        None => {
                            if r.get("rel_max_distance").is_some() {
                                return Err(
                                    "attention: `rel_max_distance` needs `rel_buckets`".into()
                                );
                            }
                            None
                        }
                        Some(_) => {
                            let buckets = r.int("rel_buckets")?;
                            let max_distance = r.int("rel_max_distance")?;
                            if buckets < 1 || max_distance < 1 {
                                return Err(format!(
                                    "attention: `rel_buckets` and `rel_max_distance` must be positive, got {buckets} and {max_distance}"
                                ));
                            }
                            let rel = crate::op::RelativeBias {
                                buckets: buckets as usize,
                                max_distance: max_distance as usize,
                                bidirectional: r.flag("rel_bidirectional")?,
                            };
                            if let Some(p) = rel.problem() {
                                return Err(format!("attention: relative position bias: {p}"));
                            }
                            Some(rel)
                        }
                    };
                    if alibi && relative.is_some() {
                        return Err(
                            "attention takes ALiBi or a relative position bias, not both".into(),
                        );
                    }
                    Op::Attention {
                        causal: r.flag("causal")?,
                        scale: r.finite_float("scale")?,
                        alibi,
                        relative,
                    }
                }
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
                    alpha: r.finite_float("alpha")?,
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
}
