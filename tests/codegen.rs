//! The CPU backend runs every step of every family with its own code:
//! Cranelift-generated kernels (loop, row, gather, rope, copy, fill, decode's
//! matrix–vector products), the GEMM library and the native attention kernel.
//! No step falls back to the reference kernels, with or without LoRA (merged
//! and unmerged), with or without the KV cache.

mod support;

use kiln::{Model, OptLevel, Target, Tensor};

const CPU: Target = Target::Cpu { threads: 0 };

/// Tests of this file run one at a time: one counts the kernels the
/// process-wide JIT compiles.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn assert_compiled(what: &str, model: &Model) {
    let inputs = support::family_inputs(model);
    let mut exe = model.compile(CPU).unwrap_or_else(|e| panic!("{what}: {e}"));
    model
        .run_with(exe.as_mut(), &inputs)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        exe.fallback_steps(),
        Vec::<String>::new(),
        "{what}: steps the CPU backend did not compile"
    );
}

#[test]
fn every_family_runs_without_a_fallback_step() {
    let _one = serial();
    for family in support::FAMILIES {
        let model = support::hf_model(family);
        assert_compiled(&format!("{family} -O0"), &model);
        let o2 = model.optimize(OptLevel::O2).expect("O2");
        assert_compiled(&format!("{family} -O2"), &o2);
    }
    for (lora, unmerged) in support::unmerged_loras() {
        assert_compiled(&format!("{lora} unmerged"), &unmerged);
        let merged = unmerged.merge_adapters().expect("merge");
        assert_compiled(
            &format!("{lora} merged"),
            &merged.optimize(OptLevel::O2).expect("O2"),
        );
    }
}

#[test]
fn sessions_decode_without_a_fallback_step() {
    let _one = serial();
    for family in ["gpt2", "llama", "llama_tied"] {
        let split = support::hf_model(family)
            .optimize(OptLevel::O2)
            .expect("O2")
            .kv_split()
            .expect("split");
        let mut session = split.session(CPU, 8).expect("session");
        let rows = Tensor::from_tokens(&[vec![5i64, 17, 42], vec![88, 12, 7]]).unwrap();
        session.call("prefill", &[rows]).expect("prefill");
        for next in [[3i64, 9], [60, 1]] {
            let t = Tensor::from_tokens(&[vec![next[0]], vec![next[1]]]).unwrap();
            session.call("decode", &[t]).expect("decode");
        }
        assert_eq!(
            session.fallback_steps(),
            Vec::<String>::new(),
            "{family}: decode steps the CPU backend did not compile"
        );
    }
}

#[test]
fn generation_runs_without_a_fallback_step_in_every_family() {
    // Whole generations, with and without the KV cache, as `kiln generate`
    // runs them: every entry point of every generative family (causal,
    // encoder–decoder, sparse experts, ALiBi), and LoRA unmerged. The
    // tokens are the interpreter's, and no step of any of them ran on the
    // reference kernels (the process-wide record of the fallback warning).
    use kiln::{GenerateOptions, RunInputs, Sampling};
    let _one = serial();
    let mut models: Vec<(String, Model)> = support::GENERATIVE
        .into_iter()
        .map(|f| (f.to_string(), support::hf_model(f)))
        .collect();
    for (lora, unmerged) in support::unmerged_loras() {
        models.push((format!("{lora} unmerged"), unmerged));
    }
    let prompt = RunInputs::tokens(vec![vec![5, 17, 42], vec![38, 12, 7]]);
    let opts = |kv_cache, backend| GenerateOptions {
        max_new_tokens: 5,
        sampling: Sampling::Greedy,
        stop_at_eos: false,
        kv_cache,
        backend,
    };
    for (name, model) in &models {
        let want = model
            .generate(&prompt, &opts(false, Target::Interp))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for kv_cache in [false, true] {
            let got = model
                .generate(&prompt, &opts(kv_cache, CPU))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name} (kv_cache: {kv_cache})");
        }
    }
    assert_eq!(
        kiln::backends::cpu::fallbacks_so_far(),
        Vec::<String>::new(),
        "steps the CPU backend did not compile"
    );
}

#[test]
fn generated_kernels_are_shared_between_entry_points() {
    let _one = serial();
    let split = support::hf_model("llama")
        .optimize(OptLevel::O2)
        .expect("O2")
        .kv_split()
        .expect("split");
    split.session(CPU, 8).expect("session");
    let after_first = kiln::backends::cpu::jit::kernels_compiled();
    // The same model again: every kernel is already compiled.
    split.session(CPU, 8).expect("session");
    assert_eq!(kiln::backends::cpu::jit::kernels_compiled(), after_first);
}

#[test]
fn identical_steps_of_different_layers_run_the_same_generated_kernels() {
    // Every layer of a model lowers to the same steps with other buffers:
    // sizes, strides and pointers are kernel arguments, so layer 1 runs
    // exactly the machine code layer 0 does (compiled once), and the
    // process compiles fewer kernels than the Program has steps.
    let _one = serial();
    for family in ["gpt2", "llama", "bert", "bart"] {
        let model = support::hf_model(family)
            .optimize(OptLevel::O2)
            .expect("O2");
        let mut exe = model.compile(CPU).expect("compiles");
        model
            .run_with(exe.as_mut(), &support::family_inputs(&model))
            .expect("runs");
        let addresses = exe.kernel_addresses();
        let programs = model.lower().expect("lowers");
        let program = programs.first().expect("one Program");
        assert_eq!(addresses.len(), program.steps.len(), "{family}");
        // The steps of layer `l`: kernel kind and generated kernels.
        let layer = |l: usize| -> Vec<(&str, &Vec<usize>)> {
            program
                .steps
                .iter()
                .zip(&addresses)
                .filter(|(s, _)| layer_of(&s.origin) == Some(l))
                .map(|(s, a)| (s.kernel.kind_name(), a))
                .collect()
        };
        let (first, second) = (layer(0), layer(1));
        assert!(
            first.len() > 5 && first.iter().filter(|(_, a)| !a.is_empty()).count() > 3,
            "{family}: layer 0's steps {first:?}"
        );
        // The last layer's count also takes the steps after it that read
        // its output (the final norm).
        assert!(
            second.len() >= first.len() && second.len() <= first.len() + 2,
            "{family}: {first:?}\n{second:?}"
        );
        assert_eq!(
            first,
            second[..first.len()],
            "{family}: layers 0 and 1 run different kernels"
        );
        let distinct: std::collections::BTreeSet<usize> =
            addresses.iter().flatten().copied().collect();
        let used = addresses.iter().filter(|a| !a.is_empty()).count();
        assert!(
            distinct.len() < used,
            "{family}: {} kernels for {used} steps",
            distinct.len()
        );
    }
}

#[test]
fn every_thread_count_computes_the_same_bits() {
    // Work is split over panels and blocks of rows, heads and rows, never
    // along a sum: each output element is summed in the same order by
    // whichever thread computes it, so 1, 2 and 3 threads agree exactly.
    use kiln::backends::{Backend, Cpu};
    let _one = serial();
    let (graph, weights) = linear_gelu_residual(800, 21);
    let inputs = vec![noise(vec![3, 401, 800], 23), noise(vec![3, 401, 70], 24)];
    let run = |threads| {
        let mut exe = Cpu { threads }.compile(&graph, &weights).expect("compiles");
        exe.run(&inputs).expect("runs")
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(run(threads) == one, "{threads} threads");
    }
    for family in ["gpt2", "llama", "mixtral", "bert", "bart"] {
        let model = support::hf_model(family)
            .optimize(OptLevel::O2)
            .expect("O2");
        let inputs = support::family_inputs(&model);
        let one = model
            .run_on(Target::Cpu { threads: 1 }, &inputs)
            .expect("1 thread");
        for threads in [2, 3] {
            let got = model
                .run_on(Target::Cpu { threads }, &inputs)
                .expect("threads");
            assert!(got == one, "{family}: {threads} threads");
        }
    }
}

/// Runs the ignored test `name` of this test binary in a child process with
/// `KILN_CPU=level`, which caps the instruction sets kiln's kernels use
/// (read once per process, so a process of its own).
fn run_capped(name: &str, level: &str) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_CPU", level)
        .output()
        .expect("the test binary runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "KILN_CPU={level} {name}:\n{stdout}\n{stderr}"
    );
}

#[test]
fn the_code_paths_of_hosts_without_avx512_or_fma_match_the_interpreter() {
    // An AVX2 host (the `gemm` crate for products, the generated
    // matrix–vector and row kernels, no packing, no tile unit) and an SSE
    // one (besides, Cranelift code without AVX or FMA), run on this host.
    for level in ["avx2", "baseline"] {
        run_capped("capped_instruction_sets_match_the_interpreter", level);
    }
}

#[test]
#[ignore = "run by the_code_paths_of_hosts_without_avx512_or_fma_match_the_interpreter, with KILN_CPU set"]
fn capped_instruction_sets_match_the_interpreter() {
    use kiln::backends::cpu::isa::{level, Level};
    assert_ne!(level(), Level::Host, "run with KILN_CPU=avx2 or baseline");
    assert!(!kiln::backends::cpu::packed_available());
    assert!(!kiln::backends::cpu::tile_unit_usable());
    // Every family's forward, against the interpreter.
    for family in support::FAMILIES {
        let model = support::hf_model(family)
            .optimize(OptLevel::O2)
            .expect("O2");
        let inputs = support::family_inputs(&model);
        let want = model.run(&inputs).expect("interp");
        let got = model.run_on(CPU, &inputs).expect("cpu");
        let d = support::outputs_deviation(&got, &want, &|_| support::NonFinite::Reject)
            .and_then(|d| d.within(support::Tolerance::Relative(1e-5)))
            .unwrap_or_else(|e| panic!("KILN_CPU={} {family}: {e}", level().name()));
        println!("KILN_CPU={} {family}: {d}", level().name());
    }
    // 16-bit weights: products widen blocks of the weight for the GEMM
    // library, decode's generated kernels widen as they read.
    for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
        let model = Model::load(support::sixteen_bit_copy("llama", dtype))
            .expect("loads")
            .optimize(OptLevel::O2)
            .expect("O2");
        let inputs = support::family_inputs(&model);
        let want = model.run(&inputs).expect("interp");
        let got = model.run_on(CPU, &inputs).expect("cpu");
        support::outputs_deviation(&got, &want, &|_| support::NonFinite::Reject)
            .and_then(|d| d.within(support::Tolerance::Relative(1e-5)))
            .unwrap_or_else(|e| panic!("KILN_CPU={} {dtype:?}: {e}", level().name()));
        let prompt = kiln::RunInputs::tokens(vec![vec![5, 17, 42], vec![38, 12, 7]]);
        let opts = |backend| kiln::GenerateOptions {
            max_new_tokens: 5,
            sampling: kiln::Sampling::Greedy,
            stop_at_eos: false,
            kv_cache: true,
            backend,
        };
        assert_eq!(
            model.generate(&prompt, &opts(CPU)).expect("cpu"),
            model
                .generate(&prompt, &opts(Target::Interp))
                .expect("interp"),
            "KILN_CPU={} {dtype:?}",
            level().name()
        );
    }
    // Products by 16-bit weights wider than one widened block (8 MiB of
    // f32: 2048 columns at depth 1024), with contiguous and strided
    // columns, and an f16 weight holding infinities and NaN.
    products_by_wide_sixteen_bit_weights_match_the_interpreter();
    // Whole generations (decode's matrix–vector products, the cache),
    // LoRA unmerged, and no step left to the reference kernels.
    generation_runs_without_a_fallback_step_in_every_family();
    every_family_runs_without_a_fallback_step();
    // The kernels' own edge cases: products past a chunk of rows with a
    // fused epilogue, attention over many tiles and every head width,
    // position biases, rope.
    packed_products_match_the_interpreter_past_a_chunk_of_rows();
    biases_and_residuals_added_by_the_packed_product_match_the_interpreter();
    tiled_attention_matches_the_interpreter_over_many_tiles();
    row_attention_matches_the_interpreter_for_every_head_width();
    position_biases_match_the_interpreter_on_every_attention_path();
    rope_matches_the_interpreter_at_any_position();
}

/// Products of 15 rows by 16-bit weights of 1024 × 2100, bound to f32
/// parameters (widened as they are read), in both layouts, against the
/// interpreter; on hosts without packing they run through blocks of widened
/// columns (run by the capped test above; on this host too, through the
/// packed path).
fn products_by_wide_sixteen_bit_weights_match_the_interpreter() {
    let (k, n) = (1024usize, 2100usize);
    let src = format!(
        "func @f(%x: f32[B, T, {k}]) -> (rows: f32[B, T, {n}], cols: f32[B, T, {n}]) {{\n  \
         param @wr: f32[{n}, {k}]\n  param @wc: f32[{k}, {n}]\n  \
         %rows = matmul(%x, @wr) transpose_b=true : f32[B, T, {n}]\n  \
         %cols = matmul(%x, @wc) : f32[B, T, {n}]\n  return %rows, %cols\n}}\n"
    );
    let graph = kiln::ir::parse_graph(&src).expect("parses");
    let values = |seed: u64| noise(vec![k * n], seed).as_f32().expect("f32").to_vec();
    let inputs = vec![noise(vec![3, 5, k], 33)];
    for special in [false, true] {
        let f16 = |seed| {
            let mut v: Vec<half::f16> = values(seed).into_iter().map(half::f16::from_f32).collect();
            if special {
                v[7] = half::f16::INFINITY;
                v[k * n - 3] = half::f16::NAN;
            }
            Tensor::from_vec(vec![n, k], v).expect("f16")
        };
        let bf16 = |seed| {
            let v: Vec<half::bf16> = values(seed).into_iter().map(half::bf16::from_f32).collect();
            Tensor::from_vec(vec![n, k], v).expect("bf16")
        };
        for (what, wr, wc) in [("f16", f16(31), f16(32)), ("bf16", bf16(31), bf16(32))] {
            if special && what == "bf16" {
                continue;
            }
            let mut weights = kiln::Weights::new();
            weights.insert("wr".into(), wr);
            weights.insert("wc".into(), wc.reshaped(vec![k, n]).expect("reshape"));
            use kiln::backends::{Backend, Cpu, Interpreter};
            let want = Interpreter
                .compile(&graph, &weights)
                .expect("compiles")
                .run(&inputs)
                .expect("runs");
            let mut exe = Cpu { threads: 0 }
                .compile(&graph, &weights)
                .expect("compiles");
            let got = exe.run(&inputs).expect("runs");
            assert!(exe.fallback_steps().is_empty());
            let named = |v: Vec<Tensor>| {
                vec![
                    ("rows".to_string(), v[0].clone()),
                    ("cols".to_string(), v[1].clone()),
                ]
            };
            let non_finite = if special {
                support::NonFinite::MatchReference
            } else {
                support::NonFinite::Reject
            };
            support::outputs_deviation(&named(got), &named(want), &|_| non_finite)
                .and_then(|d| d.within(support::Tolerance::Relative(1e-5)))
                .unwrap_or_else(|e| panic!("{what} (special values: {special}): {e}"));
        }
    }
}

#[test]
fn products_by_sixteen_bit_weights_match_the_interpreter() {
    let _one = serial();
    products_by_wide_sixteen_bit_weights_match_the_interpreter();
}

/// The layer a step belongs to: the highest layer its origin names, by
/// values (`%h0.ln_1`, `%l1.q`, `%enc0.…`) or weights (`…layers.1.…`); a
/// step of layer 1 reads layer 0's output.
fn layer_of(origin: &str) -> Option<usize> {
    let mut best = None;
    for prefix in ["%h", "%l", "%enc", "%dec", "."] {
        for (at, _) in origin.match_indices(prefix) {
            let rest = &origin[at + prefix.len()..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 && rest[digits..].starts_with('.') {
                let n: usize = rest[..digits].parse().expect("digits");
                best = best.max(Some(n));
            }
        }
    }
    best
}

/// A deterministic pseudo-random f32 tensor in [-2, 2).
fn noise(shape: Vec<usize>, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::f32(shape, data).unwrap()
}

/// Runs `graph` (one output, `out`) on the interpreter and on the CPU
/// backend, which must run every step with its own code, and compares them
/// within `tol` relative (NaN and infinities rejected).
fn cpu_matches_interpreter(
    graph: &kiln::ir::Graph,
    weights: &kiln::Weights,
    inputs: &[Tensor],
    tol: f64,
) -> Result<support::Deviation, support::Mismatch> {
    use kiln::backends::{Backend, Cpu, Interpreter};
    let want = Interpreter
        .compile(graph, weights)
        .unwrap()
        .run(inputs)
        .unwrap();
    let mut exe = Cpu { threads: 0 }.compile(graph, weights).unwrap();
    let got = exe.run(inputs).unwrap();
    assert!(exe.fallback_steps().is_empty());
    let named = |v: Vec<Tensor>| vec![("out".to_string(), v.into_iter().next().unwrap())];
    support::outputs_deviation(&named(got), &named(want), &|_| support::NonFinite::Reject)
        .and_then(|d| d.within(support::Tolerance::Relative(tol)))
}

#[test]
fn tiled_attention_matches_the_interpreter_over_many_tiles() {
    let _one = serial();
    // Query and key counts that span several tiles and end mid-tile; GQA
    // (4 query heads over 2 kv heads); causal with more keys than queries
    // (a cache), and non-causal with a padding mask hiding whole rows.
    // Head widths below one 32-column panel and across two that end
    // mid-panel.
    for (causal, t, s, masked, dh, dv) in [
        (true, 150, 150, false, 16, 8),
        (true, 70, 300, false, 16, 8),
        (false, 150, 300, true, 16, 8),
        (true, 130, 200, false, 72, 40),
    ] {
        let mask_param = if masked { ", %m: bool[B, 1, 1, S]" } else { "" };
        let mask_arg = if masked { ", %m" } else { "" };
        let src = format!(
            "func @att(%q: f32[B, 4, T, {dh}], %k: f32[B, 2, S, {dh}], %v: f32[B, 2, S, {dv}]{mask_param}) -> (out: f32[B, 4, T, {dv}]) {{\n  \
             %o = attention(%q, %k, %v{mask_arg}) causal={causal} scale=0.25 : f32[B, 4, T, {dv}]\n  return %o\n}}\n"
        );
        let graph = kiln::ir::parse_graph(&src).expect("parses");
        let mut inputs = vec![
            noise(vec![2, 4, t, dh], 1),
            noise(vec![2, 2, s, dh], 2),
            noise(vec![2, 2, s, dv], 3),
        ];
        if masked {
            // Row 1 sees only its first 37 keys.
            let m: Vec<bool> = (0..2 * s).map(|i| i < s || i % s < 37).collect();
            inputs.push(Tensor::bool(vec![2, 1, 1, s], m).unwrap());
        }
        let d = cpu_matches_interpreter(&graph, &kiln::Weights::new(), &inputs, 1e-5)
            .unwrap_or_else(|e| panic!("causal={causal} t={t} s={s}: {e}"));
        println!("causal={causal} t={t} s={s} masked={masked}: {d}");
    }
}

#[test]
fn row_attention_matches_the_interpreter_for_every_head_width() {
    let _one = serial();
    // Decode's row path (fewer queries than a tile): head widths the
    // inlined AVX-512 row kernel takes (16 to 128 lanes) and one it does
    // not (24); one key and many, causal (a cache longer than the queries)
    // and not; GQA (4 query heads over 2 kv heads).
    for dh in [16usize, 32, 64, 128, 24] {
        for (causal, t, s) in [(true, 1, 1), (true, 1, 90), (true, 3, 37), (false, 2, 64)] {
            let src = format!(
                "func @att(%q: f32[B, 4, T, {dh}], %k: f32[B, 2, S, {dh}], %v: f32[B, 2, S, {dh}]) -> (out: f32[B, 4, T, {dh}]) {{\n  \
                 %o = attention(%q, %k, %v) causal={causal} scale=0.125 : f32[B, 4, T, {dh}]\n  return %o\n}}\n"
            );
            let graph = kiln::ir::parse_graph(&src).expect("parses");
            let inputs = [
                noise(vec![2, 4, t, dh], 11),
                noise(vec![2, 2, s, dh], 12),
                noise(vec![2, 2, s, dh], 13),
            ];
            cpu_matches_interpreter(&graph, &kiln::Weights::new(), &inputs, 1e-5)
                .unwrap_or_else(|e| panic!("dh={dh} causal={causal} t={t} s={s}: {e}"));
        }
    }
    // A NaN in a visible key makes the rows that see it NaN, and only
    // those: key 5 of batch 1's first kv head, seen by its two query heads.
    let src = "func @att(%q: f32[B, 4, 1, 64], %k: f32[B, 2, S, 64], %v: f32[B, 2, S, 64]) -> (out: f32[B, 4, 1, 64]) {\n  \
               %o = attention(%q, %k, %v) causal=true scale=0.125 : f32[B, 4, 1, 64]\n  return %o\n}\n";
    let graph = kiln::ir::parse_graph(src).expect("parses");
    let mut k = noise(vec![2, 2, 9, 64], 12).as_f32().unwrap().to_vec();
    k[(2 * 9 + 5) * 64 + 3] = f32::NAN;
    let inputs = [
        noise(vec![2, 4, 1, 64], 11),
        Tensor::f32(vec![2, 2, 9, 64], k).unwrap(),
        noise(vec![2, 2, 9, 64], 13),
    ];
    use kiln::backends::{Backend, Cpu, Interpreter};
    let want = Interpreter
        .compile(&graph, &kiln::Weights::new())
        .unwrap()
        .run(&inputs)
        .unwrap();
    let got = Cpu { threads: 0 }
        .compile(&graph, &kiln::Weights::new())
        .unwrap()
        .run(&inputs)
        .unwrap();
    let nan_rows: Vec<bool> = got[0]
        .as_f32()
        .unwrap()
        .chunks(64)
        .map(|r| r.iter().all(|x| x.is_nan()))
        .collect();
    assert_eq!(
        nan_rows,
        [false, false, false, false, true, true, false, false]
    );
    let named = |v: Vec<Tensor>| vec![("out".to_string(), v.into_iter().next().unwrap())];
    support::outputs_deviation(&named(got), &named(want), &|_| {
        support::NonFinite::MatchReference
    })
    .and_then(|d| d.within(support::Tolerance::Relative(1e-5)))
    .unwrap_or_else(|e| panic!("NaN key: {e}"));
}

#[test]
fn position_biases_match_the_interpreter_on_every_attention_path() {
    let _one = serial();
    // ALiBi slopes and T5's relative buckets (encoder: bidirectional, no
    // causality; decoder: causal over a longer cache), on the tiled path
    // (many queries), the row path (few) and the strided one (q read
    // through a transposing view).
    let biases = [
        ("alibi=true", "%bias: f32[4]", noise(vec![4], 7)),
        (
            "rel_buckets=8 rel_max_distance=20 rel_bidirectional=true",
            "%bias: f32[8, 4]",
            noise(vec![8, 4], 8),
        ),
        (
            "rel_buckets=6 rel_max_distance=40",
            "%bias: f32[6, 4]",
            noise(vec![6, 4], 9),
        ),
    ];
    for (attrs, bias_param, bias) in &biases {
        for (causal, t, s, strided) in [
            (true, 150, 150, false),
            (false, 130, 130, false),
            (true, 3, 90, false),
            (true, 40, 64, true),
        ] {
            let (q_ty, q_use) = if strided {
                (
                    format!("f32[B, 4, 16, {t}]"),
                    format!("  %qt = permute(%q) perm=[0, 1, 3, 2] : f32[B, 4, {t}, 16]\n"),
                )
            } else {
                (format!("f32[B, 4, {t}, 16]"), String::new())
            };
            let q_name = if strided { "%qt" } else { "%q" };
            let src = format!(
                "func @att(%q: {q_ty}, %k: f32[B, 2, {s}, 16], %v: f32[B, 2, {s}, 8], {bias_param}) -> (out: f32[B, 4, {t}, 8]) {{\n\
                 {q_use}  %o = attention({q_name}, %k, %v, %bias) {attrs} causal={causal} scale=0.25 : f32[B, 4, {t}, 8]\n  return %o\n}}\n"
            );
            let graph = kiln::ir::parse_graph(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
            let q_shape = if strided {
                vec![2, 4, 16, t]
            } else {
                vec![2, 4, t, 16]
            };
            let inputs = vec![
                noise(q_shape, 1),
                noise(vec![2, 2, s, 16], 2),
                noise(vec![2, 2, s, 8], 3),
                bias.clone(),
            ];
            let d = cpu_matches_interpreter(&graph, &kiln::Weights::new(), &inputs, 1e-5)
                .unwrap_or_else(|e| panic!("{attrs} causal={causal} t={t} s={s}: {e}"));
            println!("{attrs} causal={causal} t={t} s={s} strided={strided}: {d}");
        }
    }
}

#[test]
fn rope_matches_the_interpreter_at_any_position() {
    let _one = serial();
    // Positions inside the shared table, far past its limit, and negative.
    let src = "func @r(%x: f32[B, 2, T, 10], %pos: i64[B, T]) -> (out: f32[B, 2, T, 10]) {\n  \
               %o = rope(%x, %pos) theta=10000.0 : f32[B, 2, T, 10]\n  return %o\n}\n";
    let graph = kiln::ir::parse_graph(src).expect("parses");
    let pos = Tensor::i64(vec![1, 5], vec![0, 7, 70_000, 1 << 40, -3]).unwrap();
    let inputs = vec![noise(vec![1, 2, 5, 10], 9), pos];
    cpu_matches_interpreter(&graph, &kiln::Weights::new(), &inputs, 1e-6)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A linear layer of depth `k` and width 70 (weight `w`, bias `b`), GELU,
/// then a residual: the epilogue the packed products fuse; with noise
/// weights from seeds `seed` (w) and `seed + 1` (b).
fn linear_gelu_residual(k: usize, seed: u64) -> (kiln::ir::Graph, kiln::Weights) {
    let src = format!(
        "func @ffn(%x: f32[B, T, {k}], %res: f32[B, T, 70]) -> (out: f32[B, T, 70]) {{\n  \
         param @w: f32[70, {k}]\n  param @b: f32[70]\n  \
         %h = matmul(%x, @w) transpose_b=true : f32[B, T, 70]\n  \
         %hb = add(%h, @b) : f32[B, T, 70]\n  \
         %g = gelu(%hb) : f32[B, T, 70]\n  \
         %o = add(%g, %res) : f32[B, T, 70]\n  return %o\n}}\n"
    );
    let mut weights = kiln::Weights::new();
    weights.insert("w".into(), noise(vec![70, k], seed));
    weights.insert("b".into(), noise(vec![70], seed + 1));
    (kiln::ir::parse_graph(&src).expect("parses"), weights)
}

#[test]
fn packed_products_match_the_interpreter_past_a_chunk_of_rows() {
    let _one = serial();
    // A linear layer with its bias, GELU and residual fused into the
    // product's epilogue, over more rows than the packed GEMM takes at a
    // time (960) and a row count that ends mid-tile, with a width that
    // ends mid-panel; then the same weights for one row (decode's
    // matrix-vector product).
    let (graph, weights) = linear_gelu_residual(40, 11);
    for (b, t) in [(3, 401), (1, 1)] {
        let inputs = vec![noise(vec![b, t, 40], 13), noise(vec![b, t, 70], 14)];
        cpu_matches_interpreter(&graph, &weights, &inputs, 1e-5)
            .unwrap_or_else(|e| panic!("{b}x{t}: {e}"));
    }
}

#[test]
fn products_on_the_tile_unit_match_the_interpreter() {
    let _one = serial();
    if !kiln::backends::cpu::tile_unit_usable() {
        println!("skipping: this host has no usable AMX tile unit");
        return;
    }
    // Rows enough for the AMX tile unit (f32 as three bf16 parts, six
    // tile products), in two chunks of rows (1536 at a time) and blocks
    // that end mid-tile; depth 800: two blocks of steps, the last one
    // short of a whole 32-step chunk; a width that ends mid-panel; the
    // bias and the residual added as the sums are stored, GELU after.
    let (graph, weights) = linear_gelu_residual(800, 31);
    for (b, t) in [(1, 128), (3, 601), (2, 1000)] {
        let inputs = vec![noise(vec![b, t, 800], 33), noise(vec![b, t, 70], 34)];
        let before = kiln::backends::cpu::tile_products();
        cpu_matches_interpreter(&graph, &weights, &inputs, 1e-5)
            .unwrap_or_else(|e| panic!("{b}x{t}: {e}"));
        assert!(
            kiln::backends::cpu::tile_products() > before,
            "{b}x{t}: no product ran on the tile unit"
        );
    }
    // An infinity in A cannot be split: that product runs on the f32
    // kernel and its infinities and NaN are the interpreter's.
    let mut x = noise(vec![2, 100, 800], 35).to_f32().unwrap().into_owned();
    x[150 * 800 + 7] = f32::INFINITY;
    let x = Tensor::f32(vec![2, 100, 800], x).unwrap();
    let inputs = vec![x, noise(vec![2, 100, 70], 36)];
    use kiln::backends::{Backend, Cpu, Interpreter};
    let want = Interpreter
        .compile(&graph, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let before = kiln::backends::cpu::tile_products();
    let got = Cpu { threads: 0 }
        .compile(&graph, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
    assert_eq!(kiln::backends::cpu::tile_products(), before);
    let named = |v: Vec<Tensor>| vec![("out".to_string(), v.into_iter().next().unwrap())];
    support::outputs_deviation(&named(got), &named(want), &|_| {
        support::NonFinite::MatchReference
    })
    .and_then(|d| d.within(support::Tolerance::Relative(1e-5)))
    .unwrap_or_else(|e| panic!("an infinity in A: {e}"));
}

#[test]
fn biases_and_residuals_added_by_the_packed_product_match_the_interpreter() {
    let _one = serial();
    if !kiln::backends::cpu::packed_available() {
        return;
    }
    // Depth 800: two blocks of inner steps, so the addends come in only
    // with the last one. Each body: the addends the GEMM adds as it
    // stores its sums, then what is left of the body over the stored sum.
    let bodies = [
        // bias, then residual: nothing left.
        ("kernel(%h, @b, %res) body=[add(0, 1), add(3, 2)]", 2),
        // the residual first, written the other way round, then the bias.
        ("kernel(%h, %res, @b) body=[add(1, 0), add(2, 3)]", 2),
        // the bias, then a rest that reads it again.
        ("kernel(%h, @b) body=[add(0, 1), mul(2, 1)]", 1),
        // the bias, then GELU over the stored sum.
        ("kernel(%h, @b) body=[add(0, 1), gelu(2)]", 1),
        // a residual broadcast over the batch is not rows at the output's
        // step: it stays in the rest of the body.
        ("kernel(%h, @b, %r1) body=[add(0, 1), add(3, 2)]", 1),
    ];
    for (body, fused) in bodies {
        let src = format!(
            "func @f(%x: f32[B, T, 800], %res: f32[B, T, 70], %r1: f32[T, 70]) -> (out: f32[B, T, 70]) {{\n  \
             param @w: f32[70, 800]\n  param @b: f32[70]\n  \
             %h = matmul(%x, @w) transpose_b=true : f32[B, T, 70]\n  \
             %o = {body} : f32[B, T, 70]\n  return %o\n}}\n"
        );
        let graph = kiln::ir::parse_graph(&src).expect("parses");
        let mut weights = kiln::Weights::new();
        weights.insert("w".into(), noise(vec![70, 800], 21));
        weights.insert("b".into(), noise(vec![70], 22));
        let inputs = vec![
            noise(vec![3, 37, 800], 23),
            noise(vec![3, 37, 70], 24),
            noise(vec![37, 70], 25),
        ];
        let before = kiln::backends::cpu::addends_fused();
        cpu_matches_interpreter(&graph, &weights, &inputs, 1e-5)
            .unwrap_or_else(|e| panic!("{body}: {e}"));
        assert!(
            kiln::backends::cpu::addends_fused() >= before + fused,
            "{body}: the GEMM added fewer than {fused} addends"
        );
    }
}
