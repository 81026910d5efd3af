//! The text form of a [`Program`]: deterministic, so it can be snapshot-tested.
//!
//! ```text
//! program @gpt2(b0: i64[B, T]) -> (logits: b41)
//!   buffers:
//!     b0 = input 0 %tokens: i64[B, T]
//!     b5 = temp %h: f32[B, T, 32]
//!     b6 = view b5 offset 0 strides [32 * T, 32, 8, 1] %h: f32[B, T, 4, 8]
//!   steps:
//!     s0 = gather(b1, b0) -> b5  # %h = gather(@wte, %tokens)
//!     s1 = row.layer_norm(b5, b2, b3) eps=1e-5 -> b7  # %ln = layer_norm(%h, @ln.weight, @ln.bias)
//!   arena (B=1, T=16): peak 12,352 bytes, 40,960 without reuse
//!     slot 0 @0 +4096 s0..s3: b5, b8 (in place)
//! ```

use std::fmt::Write;

use kiln_ir::types::shape_string;
use kiln_ir::{KernelOp, ShapeCx};

use super::{ArenaPlan, BufferKind, FillOp, Kernel, Program, RowOp};

/// One scalar instruction as written in kernel bodies: `add(0, 3)`.
pub fn kernel_op_text(k: &KernelOp) -> String {
    match k {
        KernelOp::Unary(u, a) => format!("{}({a})", u.name()),
        KernelOp::Binary(b, x, y) => format!("{}({x}, {y})", b.name()),
        KernelOp::Where(c, a, b) => format!("where({c}, {a}, {b})"),
        KernelOp::Cast(t, a) => format!("cast({a}, {t})"),
        KernelOp::Const(v, t) => format!("const({v:?}, {t})"),
    }
}

fn body_text(body: &[KernelOp]) -> String {
    let parts: Vec<String> = body.iter().map(kernel_op_text).collect();
    format!("[{}]", parts.join(", "))
}

/// The kernel's printed name (`row.softmax`, `fill.arange`) and its
/// attributes (`eps=1e-5`), empty when it has none.
pub fn kernel_text(k: &Kernel) -> (String, String) {
    let (name, attrs) = match k {
        Kernel::Loop { body } => ("loop".to_string(), format!("body={}", body_text(body))),
        Kernel::Row(r) => match r {
            RowOp::Reduce { kind, axes } => (
                format!("row.reduce_{}", format!("{kind:?}").to_lowercase()),
                format!("axes={axes}"),
            ),
            RowOp::Softmax => ("row.softmax".into(), String::new()),
            RowOp::LayerNorm { eps } => ("row.layer_norm".into(), format!("eps={eps:?}")),
            RowOp::RmsNorm { eps } => ("row.rms_norm".into(), format!("eps={eps:?}")),
        },
        Kernel::Gemm { epilogue } if epilogue.is_empty() => ("gemm".into(), String::new()),
        Kernel::Gemm { epilogue } => ("gemm".into(), format!("epilogue={}", body_text(epilogue))),
        Kernel::Attention {
            causal,
            scale,
            alibi,
            relative,
        } => {
            (
                "attention".into(),
                match (alibi, relative) {
                    (true, _) => format!("causal={causal} scale={scale:?} alibi"),
                    (false, Some(r)) => {
                        format!(
                    "causal={causal} scale={scale:?} relative(buckets={}, max_distance={}{})",
                    r.buckets,
                    r.max_distance,
                    if r.bidirectional { ", bidirectional" } else { "" }
                )
                    }
                    (false, None) => format!("causal={causal} scale={scale:?}"),
                },
            )
        }
        Kernel::Gather => ("gather".into(), String::new()),
        Kernel::Moe { top_k } => ("moe".into(), format!("top_k={top_k}")),
        Kernel::Rope { theta } => ("rope".into(), format!("theta={theta:?}")),
        Kernel::Copy => ("copy".into(), String::new()),
        Kernel::Fill(f) => match f {
            FillOp::Constant { value } => ("fill.constant".into(), format!("value={value:?}")),
            FillOp::Arange { start } => ("fill.arange".into(), format!("start={start}")),
            FillOp::CausalMask => ("fill.causal_mask".into(), String::new()),
        },
    };
    (name, attrs)
}

fn with_commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The whole Program; with `binding` (every run-time symbol bound), the arena
/// offsets and peak under it.
pub fn program_text(p: &Program, binding: Option<&ShapeCx>) -> String {
    let mut s = String::new();
    let ins: Vec<String> = p
        .inputs
        .iter()
        .map(|&b| {
            format!(
                "{b}: {}{}",
                p.buffer(b).dtype,
                shape_string(&p.buffer(b).shape)
            )
        })
        .collect();
    let outs: Vec<String> = p.outputs.iter().map(|(n, b)| format!("{n}: {b}")).collect();
    let _ = writeln!(
        s,
        "program @{}({}) -> ({})",
        p.name,
        ins.join(", "),
        outs.join(", ")
    );
    if !p.runtime_symbols.is_empty() {
        let _ = writeln!(s, "  run-time symbols: {}", p.runtime_symbols.join(", "));
    }
    for st in &p.states {
        let _ = writeln!(
            s,
            "  cache {} in {}: length axis {}, capacity {}{}",
            st.name,
            st.root,
            st.axis,
            p.capacity.as_deref().unwrap_or("?"),
            match st.input {
                Some(i) => format!(", read by input {i}, grown in place"),
                None => ", written from position 0".to_string(),
            }
        );
    }
    let _ = writeln!(s, "  buffers:");
    for (i, b) in p.buffers.iter().enumerate() {
        let ty = format!("{}{}", b.dtype, shape_string(&b.shape));
        let kind = match &b.kind {
            BufferKind::Input { index } => format!("input {index}"),
            BufferKind::Param { .. } => "param".to_string(),
            BufferKind::Output { index } => format!("output {index}"),
            BufferKind::Temp => "temp".to_string(),
            BufferKind::State { .. } => "cache".to_string(),
            BufferKind::View {
                base,
                offset,
                strides,
            } => format!(
                "view {base} offset {offset} strides {}",
                shape_string(strides)
            ),
        };
        let _ = writeln!(s, "    b{i} = {kind} {}: {ty}", b.value);
    }
    for c in &p.checks {
        let _ = writeln!(s, "  check {} <= {}  # {}", c.lhs, c.rhs, c.what);
    }
    let _ = writeln!(s, "  steps:");
    for (i, st) in p.steps.iter().enumerate() {
        let args: Vec<String> = st.inputs.iter().map(|b| b.to_string()).collect();
        let (name, attrs) = kernel_text(&st.kernel);
        let attrs = if attrs.is_empty() {
            attrs
        } else {
            format!(" {attrs}")
        };
        let _ = writeln!(
            s,
            "    s{i} = {name}({}){attrs} -> {}  # {}",
            args.join(", "),
            st.output,
            st.origin
        );
    }
    let live = &p.liveness;
    let plan = binding.map(|cx| ArenaPlan::place(p, cx));
    match &plan {
        None if !p.runtime_symbols.is_empty() => {
            let _ = writeln!(
                s,
                "  arena: planned per binding of {} (kiln ir --lowered --bind {})",
                p.runtime_symbols.join(", "),
                p.runtime_symbols
                    .iter()
                    .map(|n| format!("{n}=1"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        None => {
            let plan = ArenaPlan::place(p, &ShapeCx::new());
            write_plan(&mut s, p, "", plan);
            return s;
        }
        Some(_) => {}
    }
    if let (Some(plan), Some(cx)) = (plan, binding) {
        let names: Vec<String> = p
            .runtime_symbols
            .iter()
            .chain(p.capacity.iter())
            .map(|n| {
                let v = cx
                    .eval(&kiln_ir::Dim::sym(n))
                    .map_or("?".into(), |d| d.to_string());
                format!("{n}={v}")
            })
            .collect();
        write_plan(&mut s, p, &format!(" ({})", names.join(", ")), plan);
        return s;
    }
    for (k, slot) in live.slots.iter().enumerate() {
        let bufs: Vec<String> = slot.buffers.iter().map(|b| b.to_string()).collect();
        let _ = writeln!(
            s,
            "    slot {k} s{}..s{}: {}",
            slot.first,
            slot.last,
            bufs.join(", ")
        );
    }
    s
}

fn write_plan(s: &mut String, p: &Program, label: &str, plan: Result<ArenaPlan, crate::RunError>) {
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            let _ = writeln!(s, "  arena{label}: cannot be planned: {e}");
            return;
        }
    };
    let _ = writeln!(
        s,
        "  arena{label}: peak {} bytes, {} without reuse",
        with_commas(plan.peak_bytes),
        with_commas(plan.total_bytes)
    );
    for (k, slot) in p.liveness.slots.iter().enumerate() {
        let bufs: Vec<String> = slot.buffers.iter().map(|b| b.to_string()).collect();
        let in_place = if slot.buffers.len() > 1 {
            " (in place)"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "    slot {k} @{} +{} s{}..s{}: {}{in_place}",
            plan.offsets[k],
            plan.sizes[k],
            slot.first,
            slot.last,
            bufs.join(", ")
        );
    }
}
