//! Weights as bytes: safetensors weights are read in place from the mapped
//! file (never copied), and f16/bf16 checkpoints stay 16-bit in memory while
//! every backend widens them as it reads.

mod support;

use kiln::ir::DType;
use kiln::{Model, OptLevel, Target};
use safetensors::Dtype;
use support::{outputs_deviation, NonFinite, Tolerance, BACKENDS};

#[test]
fn weights_are_read_in_place_from_the_mapped_file() {
    for family in support::FAMILIES {
        let model = support::hf_model(family);
        let weights = model.weights().expect("weights");
        // Mixtral's experts are stored one tensor per expert and stacked
        // `[E, …]` at load (one copy, in the file's dtype); BLOOM's slopes and
        // Marian's position tables are computed, not read.
        let made = |n: &str| {
            n.contains("block_sparse_moe.experts.")
                || n == "alibi_slopes"
                || n.ends_with("embed_positions.weight") && family == "marian"
        };
        let copied: Vec<&String> = weights
            .iter()
            .filter(|(n, t)| !t.is_mapped() && !made(n))
            .map(|(n, _)| n)
            .collect();
        assert!(
            copied.is_empty(),
            "{family}: copied instead of mapped: {copied:?}"
        );
    }
}

#[test]
fn sixteen_bit_checkpoints_stay_sixteen_bit_and_run_on_every_backend() {
    for (st_dtype, dtype) in [(Dtype::F16, DType::F16), (Dtype::BF16, DType::BF16)] {
        let dir = support::sixteen_bit_copy("llama", st_dtype);
        let model = Model::load(&dir).expect("loads");
        let weights = model.weights().expect("weights");
        assert!(
            weights
                .values()
                .all(|t| t.dtype() == dtype && t.is_mapped()),
            "{dtype}: every weight stays {dtype} and mapped"
        );
        let f32_model = support::hf_model("llama");
        let inputs = support::family_inputs(&f32_model);
        let want = f32_model.run(&inputs).expect("f32 runs");
        let m = model.optimize(OptLevel::O2).expect("O2");
        let mut first: Option<Vec<(String, kiln::Tensor)>> = None;
        for backend in BACKENDS {
            let got = m
                .run_on(backend, &inputs)
                .unwrap_or_else(|e| panic!("{dtype} on {}: {e}", backend.name()));
            // Rounding the weights to 16 bits moves the logits by about the
            // format's precision (2^-11 for f16, 2^-8 for bf16) relative.
            let tol = if dtype == DType::F16 { 1e-2 } else { 5e-2 };
            let d = outputs_deviation(&got, &want, &|_| NonFinite::Reject)
                .and_then(|d| d.within(Tolerance::Relative(tol)))
                .unwrap_or_else(|e| panic!("{dtype} on {}: {e}", backend.name()));
            println!("{dtype} weights on {}: {d}", backend.name());
            // Every backend widens the same 16-bit values: the interpreter's
            // results, within what the backend's own arithmetic allows.
            match &first {
                None => first = Some(got),
                Some(f) => {
                    let tol = support::tolerance_vs_oracle(backend);
                    outputs_deviation(&got, f, &|_| NonFinite::Reject)
                        .and_then(|d| d.within(Tolerance::Relative(tol)))
                        .unwrap_or_else(|e| panic!("{dtype} on {}: {e}", backend.name()));
                }
            }
        }
        assert_eq!(BACKENDS[0], Target::Interp);
        // Generation with the KV cache on the CPU backend gives the
        // interpreter's tokens, with every step compiled: 16-bit weights are
        // widened inside the kernels, never left to the reference ones.
        let prompt = kiln::RunInputs::tokens(vec![vec![5, 17, 42], vec![38, 12, 7]]);
        let opts = |kv_cache, backend| kiln::GenerateOptions {
            max_new_tokens: 5,
            sampling: kiln::Sampling::Greedy,
            stop_at_eos: false,
            kv_cache,
            backend,
        };
        let want = model
            .generate(&prompt, &opts(false, Target::Interp))
            .expect("interp");
        let cpu = Target::Cpu { threads: 0 };
        for kv_cache in [false, true] {
            let got = model.generate(&prompt, &opts(kv_cache, cpu)).expect("cpu");
            assert_eq!(got, want, "{dtype} (kv_cache: {kv_cache})");
        }
        assert_eq!(
            kiln::backends::cpu::fallbacks_so_far(),
            Vec::<String>::new(),
            "{dtype}: steps the CPU backend did not compile"
        );
    }
}
