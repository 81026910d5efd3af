//! The CUDA backend without a GPU: the generated CUDA C of every family runs
//! on the emulated device (the same source built for the host, blocks on
//! host threads) through the same executor and must give the interpreter's
//! outputs; NVRTC must accept every module (required in CI, where `.ci/run`
//! installs it); and `--backend cuda` on a machine without a GPU is a clear
//! error. The GPU runs themselves are `benches/cuda/run.sh` on a lent H200.

mod support;

use kiln::backends::cuda::CudaEmulated;
use kiln::backends::Backend;
use kiln::{OptLevel, Target};
use support::Tolerance;

/// Float GEMM and attention accumulate in f32 (the interpreter in f64);
/// the fused loop and row kernels compute as the interpreter does.
const TOL: f64 = 1e-5;

fn compare(name: &str, want: &[(String, kiln::Tensor)], got: &[(String, kiln::Tensor)]) -> f64 {
    support::outputs_deviation(got, want, &|_| support::NonFinite::Reject)
        .and_then(|d| d.within(Tolerance::Relative(TOL)))
        .map(|d| d.relative())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_family_runs_on_the_emulated_device_as_on_the_interpreter() {
    let blas_before = kiln::backends::cuda::emu::sgemm_calls();
    for family in support::FAMILIES {
        let model = support::hf_model(family);
        let inputs = support::family_inputs(&model);
        for level in [OptLevel::O0, OptLevel::O2] {
            let m = model.optimize(level).expect("optimize");
            let want = m.run_on(Target::Interp, &inputs).expect("interp");
            let got = m
                .run_on(Target::CudaEmulated, &inputs)
                .unwrap_or_else(|e| panic!("{family} {level:?}: {e}"));
            let err = compare(&format!("{family} {level:?}"), &want, &got);
            // Every product on the generated GEMM kernel instead of cuBLAS.
            let graph = m.main().unwrap();
            let tensors = m.prepare_inputs(&inputs).unwrap();
            let mut exe = CudaEmulated {
                blas: false,
                ..Default::default()
            }
            .compile(graph, m.weights().unwrap())
            .unwrap();
            let own = support::named(graph, exe.run(&tensors).unwrap());
            let err_own = compare(&format!("{family} {level:?} own GEMM"), &want, &own);
            println!("{family} {level:?}: {err:.1e} (cuBLAS path), {err_own:.1e} (own GEMM)");
        }
    }
    // The products took the (emulated) cuBLAS path where their layout allows.
    assert!(kiln::backends::cuda::emu::sgemm_calls() > blas_before + 100);
}

/// Where NVRTC is installed (CI: `.ci/run` puts the pip wheel's lib folder
/// on `LD_LIBRARY_PATH`), every module of every family — the main function
/// at -O0 and -O2, and the prefill and decode of the KV-cache split — compiles
/// to PTX for the H100/H200 (`compute_90`) with one entry per kernel.
#[test]
fn nvrtc_accepts_the_cuda_c_of_every_family() {
    use kiln::backends::cuda::{codegen, driver};
    if !driver::nvrtc_present() {
        assert!(
            !support::in_ci(),
            "CI installs NVRTC (nvidia-cuda-nvrtc) and puts it on LD_LIBRARY_PATH"
        );
        eprintln!("skipped: NVRTC (libnvrtc.so.13) is not on the library path");
        return;
    }
    let mut kernels = 0;
    for family in support::FAMILIES {
        let model = support::hf_model(family);
        let mut models = vec![
            model.optimize(OptLevel::O0).unwrap(),
            model.optimize(OptLevel::O2).unwrap(),
        ];
        if let Ok(split) = models[1].kv_split() {
            models.push(split);
        }
        for m in &models {
            for (name, module) in m.cuda_modules().unwrap() {
                let ptx = driver::compile_ptx(&codegen::cuda_source(&module), "compute_90")
                    .unwrap_or_else(|e| panic!("{family} @{name}: {e}"));
                for (k, _) in &module.kernels {
                    assert!(
                        ptx.contains(&format!(".entry {k}(")),
                        "{family} @{name}: {k} missing"
                    );
                }
                kernels += module.kernels.len();
            }
        }
    }
    println!("{kernels} kernels compiled by NVRTC");
}

/// The CUDA C of a small model, reviewed: one LLaMA layer at -O2 (fused
/// norms and SwiGLU, GEMMs with residual epilogues, rope, GQA attention).
#[test]
fn generated_cuda_c_of_a_llama_layer() {
    let text = std::fs::read_to_string("examples/llama_block.kir").unwrap();
    let model = kiln::Model::from_text(&text, "llama_block.kir")
        .unwrap()
        .optimize(OptLevel::O2)
        .unwrap();
    let programs = model.lower().unwrap();
    let p = &programs[0];
    let dtypes: Vec<_> = p.buffers.iter().map(|b| b.dtype).collect();
    let module = kiln::backends::cuda::codegen::generate(p, &dtypes).unwrap();
    let mut text = String::new();
    for (i, s) in module.steps.iter().enumerate() {
        let epilogue = s
            .epilogue
            .as_ref()
            .map(|(k, _)| match p.steps[i].kernel.kind_name() {
                "attention" => format!(" (split over keys: combine {})", module.kernels[*k].0),
                _ => format!(" (after cuBLAS: epilogue {})", module.kernels[*k].0),
            })
            .unwrap_or_default();
        text.push_str(&format!(
            "// s{i} {} -> {} {:?}{epilogue}\n",
            p.steps[i].kernel.kind_name(),
            module.kernels[s.kernel].0,
            s.grid
        ));
    }
    let body = module
        .source
        .split_once("\nextern \"C\"")
        .map(|(_, rest)| format!("extern \"C\"{rest}"))
        .unwrap_or_default();
    insta::assert_snapshot!(format!("{text}\n{body}"));
}

/// `--backend cuda` where there is no CUDA driver: one clear error, exit 2.
#[test]
fn without_a_gpu_the_cuda_backend_says_what_is_missing() {
    if kiln::backends::cuda::driver::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    for args in [
        &[
            "run",
            "tests/data/hf/gpt2",
            "--tokens",
            "1,2",
            "--backend",
            "cuda",
        ][..],
        &[
            "generate",
            "tests/data/hf/llama",
            "--tokens",
            "1,2",
            "--backend",
            "cuda",
        ][..],
        &["demo", "--backend", "cuda"][..],
        &[
            "bench",
            "tests/data/hf/llama",
            "--backend",
            "cuda",
            "--prompt-len",
            "8",
            "--decode",
            "4",
            "--output",
            "json",
        ][..],
    ] {
        let (code, out, err) = support::kiln(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.starts_with("error: the cuda backend: no CUDA driver: libcuda.so was not found"),
            "{err}"
        );
        assert!(out.is_empty(), "{out}");
    }
}

/// Greedy generation on the emulated device — its decode steps in a
/// session whose caches stay on the device — gives the interpreter's tokens
/// for every generative family, with and without the KV cache.
#[test]
fn generation_on_the_emulated_device_keeps_its_caches_and_gives_the_interpreters_tokens() {
    use kiln::generate::{GenerateOptions, Sampling};
    for family in [
        "gpt2", "llama", "mixtral", "bloom", "bart", "marian", "t5", "t5_v11",
    ] {
        let model = support::hf_model(family).optimize(OptLevel::O2).unwrap();
        let inputs = kiln::RunInputs::tokens(vec![vec![5, 17, 42, 99, 3], vec![8, 1, 4, 2, 6]]);
        let opts = |backend, kv_cache| GenerateOptions {
            max_new_tokens: 10,
            sampling: Sampling::Greedy,
            stop_at_eos: false,
            kv_cache,
            backend,
        };
        let want = model
            .generate(&inputs, &opts(Target::Interp, true))
            .unwrap();
        for kv in [true, false] {
            let got = model
                .generate(&inputs, &opts(Target::CudaEmulated, kv))
                .unwrap_or_else(|e| panic!("{family} kv={kv}: {e}"));
            assert_eq!(got, want, "{family} kv={kv}");
        }
    }
    // The decode steps of a session repeat the same launches with other
    // words: the second is recorded as a graph, every later one replays it.
    let opts = |backend| GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        stop_at_eos: false,
        kv_cache: true,
        backend,
    };
    for family in ["gpt2", "llama", "mixtral", "bloom", "bart", "t5"] {
        let model = support::hf_model(family).optimize(OptLevel::O2).unwrap();
        let inputs = kiln::RunInputs::tokens(vec![vec![5, 17, 42, 99, 3]]);
        let before = kiln::backends::cuda::graph_runs();
        let got = model
            .generate(&inputs, &opts(Target::CudaEmulated))
            .unwrap();
        let after = kiln::backends::cuda::graph_runs();
        let want = model.generate(&inputs, &opts(Target::Interp)).unwrap();
        assert_eq!(got, want, "{family}");
        // 10 tokens: a prefill and 9 decode steps, the first of which runs
        // launch by launch.
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 8),
            "{family}: graphs recorded and replayed"
        );
    }
    // The session keeps its caches on the device: a decode step after the
    // prefill reads them in place, and a step with another batch is refused.
    let split = support::hf_model("llama").kv_split().unwrap();
    let mut s = split.session(Target::CudaEmulated, 16).unwrap();
    let prompt = kiln::Tensor::i64(vec![1, 3], vec![5, 17, 42]).unwrap();
    s.call("prefill", &[prompt]).unwrap();
    assert_eq!(s.cache_len(), 3);
    let next = kiln::Tensor::i64(vec![1, 1], vec![7]).unwrap();
    s.call("decode", &[next]).unwrap();
    assert_eq!(s.cache_len(), 4);
    let two = kiln::Tensor::i64(vec![2, 1], vec![7, 8]).unwrap();
    let err = s.call("decode", &[two]).unwrap_err().to_string();
    assert!(err.contains("axis 1 is `B`, which is 2"), "{err}");
}

/// `kiln compile --target cuda`: the artifact records every function's CUDA
/// C (and its PTX for compute_80 where NVRTC is installed: one entry per
/// kernel), runs like its source, and a recorded kernel this kiln would not
/// generate is refused with the function named.
#[test]
fn cuda_artifacts_hold_the_kernels_and_run_like_their_source() {
    let dir = support::scratch_dir("cuda-artifact");
    let art = dir.join("llama.kiln");
    let art = art.to_str().unwrap();
    let (code, out, err) = support::kiln(&[
        "compile",
        "tests/data/hf/llama",
        "--target",
        "cuda",
        "-o",
        art,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut bytes = std::fs::read(art).unwrap();
    let (_, off, len, _) = support::artifact_sections(&bytes)[0].clone();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes[off..off + len]).unwrap();
    assert_eq!(manifest["target"], "cuda");
    let cuda = manifest["cuda"].as_array().unwrap();
    let functions: Vec<&str> = cuda
        .iter()
        .map(|c| c["function"].as_str().unwrap())
        .collect();
    assert_eq!(functions, ["llama", "prefill", "decode"]);
    for c in cuda {
        assert!(c["source"]
            .as_str()
            .unwrap()
            .contains("extern \"C\" __global__ void kiln_k0("));
        match c["ptx"].as_str() {
            Some(ptx) => {
                for k in c["kernels"].as_array().unwrap() {
                    assert!(ptx.contains(&format!(".entry {}(", k.as_str().unwrap())));
                }
            }
            None => assert!(
                !kiln::backends::cuda::driver::nvrtc_present(),
                "NVRTC is installed but no PTX was stored"
            ),
        }
    }
    let gen = |m: &str, backend: &str| {
        let (code, out, err) = support::kiln(&[
            "generate",
            m,
            "--tokens",
            "5,17,42",
            "--max-new-tokens",
            "6",
            "--backend",
            backend,
            "--output",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(gen(art, "cuda-emu"), gen("tests/data/hf/llama", "interp"));
    // A forged kernel (checksums recomputed): refused by name.
    let text = String::from_utf8(bytes[off..off + len].to_vec()).unwrap();
    let forged = text.replacen("kiln_k0(const KArgs", "kiln_k0(const  KArgs", 1);
    assert_eq!(forged.len(), text.len() + 1);
    let forged = forged.replacen("  \"kiln_version\"", " \"kiln_version\"", 1);
    assert_eq!(forged.len(), text.len(), "the edit keeps the length");
    bytes[off..off + len].copy_from_slice(forged.as_bytes());
    support::reseal_artifact(&mut bytes);
    std::fs::write(art, &bytes).unwrap();
    let (code, _, err) = support::kiln(&["run", art, "--tokens", "1,2"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the CUDA C of @llama differs from the one it records"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Attention split over key ranges (what a decode step over a long cache
/// does on a GPU), forced on tiny models by splitting past 2 keys: every
/// family's forward, and a llama session's prefill and decode steps, match
/// the interpreter.
#[test]
fn attention_split_over_key_ranges_matches_the_interpreter() {
    let split = CudaEmulated {
        blas: true,
        split_keys: 2,
    };
    let before = kiln::backends::cuda::split_attention_runs();
    for family in support::FAMILIES {
        let m = support::hf_model(family).optimize(OptLevel::O2).unwrap();
        let inputs = support::family_inputs(&m);
        let want = m.run_on(Target::Interp, &inputs).unwrap();
        let graph = m.main().unwrap();
        let tensors = m.prepare_inputs(&inputs).unwrap();
        let mut exe = split.compile(graph, m.weights().unwrap()).unwrap();
        let got = support::named(graph, exe.run(&tensors).unwrap());
        compare(&format!("{family} split"), &want, &got);
    }
    let m = support::hf_model("llama").kv_split().unwrap();
    let funcs = vec![
        m.function("prefill").unwrap().clone(),
        m.function("decode").unwrap().clone(),
    ];
    let mut gpu = split.session(&funcs, m.weights().unwrap(), 32).unwrap();
    let mut oracle = m.session(Target::Interp, 32).unwrap();
    let prompt = kiln::Tensor::i64(vec![2, 5], vec![5, 17, 42, 99, 3, 8, 1, 4, 2, 6]).unwrap();
    let mut call = |entry: &str, t: kiln::Tensor| {
        let want = oracle.call(entry, std::slice::from_ref(&t)).unwrap();
        let got = gpu.call(entry, &[t]).unwrap();
        compare(entry, &want, &got);
    };
    call("prefill", prompt);
    for step in 0..6 {
        call(
            "decode",
            kiln::Tensor::i64(vec![2, 1], vec![7 + step, 30 + step]).unwrap(),
        );
    }
    assert_eq!(gpu.cache_len(), 11);
    assert!(kiln::backends::cuda::split_attention_runs() > before + 20);
    // Split by the caches' capacity, the decode steps launch one grid: the
    // second is recorded, the other four replay it.
    let (recorded, replayed) = kiln::backends::cuda::graph_runs();
    assert_eq!((recorded, replayed), (1, 5));
}

/// Loading a CUDA artifact registers its stored PTX by source, so a GPU
/// loads the modules without NVRTC (the lookup, checked without a GPU).
#[test]
fn a_cuda_artifact_registers_its_ptx_for_the_gpu_to_load() {
    use kiln::backends::cuda::driver;
    if !driver::nvrtc_present() {
        assert!(!support::in_ci(), "CI installs NVRTC");
        eprintln!("skipped: NVRTC is not installed (the artifact holds no PTX)");
        return;
    }
    let dir = support::scratch_dir("cuda-ptx");
    let art = dir.join("gpt2.kiln");
    let (code, out, err) = support::kiln(&[
        "compile",
        "tests/data/hf/gpt2",
        "--target",
        "cuda",
        "-o",
        art.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let model = kiln::Model::load(&art).unwrap();
    for (name, module) in model.cuda_modules().unwrap() {
        let source = kiln::backends::cuda::codegen::cuda_source(&module);
        let ptx = driver::known_ptx(&source).unwrap_or_else(|| panic!("@{name}: no PTX"));
        assert!(ptx.contains(".target sm_80"), "@{name}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Non-finite scores propagate as in the interpreter: a NaN (or +inf) in a
/// query row makes that row NaN, a fully masked row is 0, on the one-tile
/// and the split paths.
#[test]
fn attention_propagates_nan_as_the_interpreter_does() {
    let src = "func @f(%q: f32[1, 2, 3, 4], %k: f32[1, 2, 5, 4], %v: f32[1, 2, 5, 4]) -> (o: f32[1, 2, 3, 4]) {\n  %o = attention(%q, %k, %v) causal=true scale=0.5 : f32[1, 2, 3, 4]\n  return %o\n}\n";
    let graph = kiln::ir::parse_graph(src).unwrap();
    let mut q: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
    q[5] = f32::NAN; // head 0, query 1
    q[16] = f32::INFINITY; // head 1, query 1
    let kv: Vec<f32> = (0..40).map(|i| (i as f32 * 0.21).cos()).collect();
    let inputs = vec![
        kiln::Tensor::f32(vec![1, 2, 3, 4], q).unwrap(),
        kiln::Tensor::f32(vec![1, 2, 5, 4], kv.clone()).unwrap(),
        kiln::Tensor::f32(vec![1, 2, 5, 4], kv.iter().map(|x| x * 2.0).collect()).unwrap(),
    ];
    let weights = kiln::backends::Weights::new();
    let want = kiln::backends::Interpreter
        .compile(&graph, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
    let want = want[0].as_f32().unwrap();
    assert!(want.iter().any(|x| x.is_nan()), "the case has NaN rows");
    for split_keys in [256, 2] {
        let got = CudaEmulated {
            blas: true,
            split_keys,
        }
        .compile(&graph, &weights)
        .unwrap()
        .run(&inputs)
        .unwrap();
        for (i, (g, w)) in got[0].as_f32().unwrap().iter().zip(want).enumerate() {
            assert!(
                (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "split_keys {split_keys}, element {i}: {g} vs {w}"
            );
        }
    }
}

/// 16-bit arithmetic rounds each double result once, as the reference
/// executor does (through float it would round twice and miss by an ulp about once
/// in 8k transcendental results; `half`'s own f64 conversion drops the low
/// 32 bits of a bf16 sum): divisions, sums and exponentials of f16 and bf16
/// values, bit for bit.
#[test]
fn sixteen_bit_results_round_once_as_the_reference_does() {
    let n = 1 << 16;
    for dt in ["f16", "bf16"] {
        let src = format!(
            "func @f(%a: f32[N], %b: f32[N]) -> (q: f32[N], s: f32[N], e: f32[N]) {{\n  %a16 = cast(%a) to={dt} : {dt}[N]\n  %b16 = cast(%b) to={dt} : {dt}[N]\n  %q16 = div(%a16, %b16) : {dt}[N]\n  %s16 = add(%a16, %b16) : {dt}[N]\n  %e16 = exp(%q16) : {dt}[N]\n  %q = cast(%q16) to=f32 : f32[N]\n  %s = cast(%s16) to=f32 : f32[N]\n  %e = cast(%e16) to=f32 : f32[N]\n  return %q, %s, %e\n}}\n"
        );
        let graph = kiln::ir::parse_graph(&src).unwrap();
        let val = |i: usize, salt: f64| {
            (((i as f64 * 0.7548776662 + salt).fract() - 0.5) * 2f64.powi((i % 23) as i32 - 11))
                as f32
        };
        let tensor =
            |salt: f64| kiln::Tensor::f32(vec![n], (0..n).map(|i| val(i, salt)).collect()).unwrap();
        let inputs = vec![tensor(0.1), tensor(0.37)];
        let weights = kiln::backends::Weights::new();
        // The interpreter takes no 16-bit values; the Program executor
        // rounds them by the interpreter's rule (`Scalar::to`).
        let want = Target::Reference
            .backend()
            .compile(&graph, &weights)
            .unwrap()
            .run(&inputs)
            .unwrap();
        let got = Target::CudaEmulated
            .backend()
            .compile(&graph, &weights)
            .unwrap()
            .run(&inputs)
            .unwrap();
        for (w, g) in want.iter().zip(&got) {
            let (w, g) = (w.as_f32().unwrap(), g.as_f32().unwrap());
            let bad = w
                .iter()
                .zip(g)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                bad, 0,
                "{dt}: {bad} of {n} results differ from the reference's"
            );
        }
    }
}
