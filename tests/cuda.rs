//! The CUDA backend without a GPU: the generated CUDA C of every family runs
//! on the emulated device (the same source built for the host, blocks on
//! host threads) through the same executor and must give the interpreter's
//! outputs; NVRTC must accept every module (required in CI, where `.ci/run`
//! installs it); and `--backend cuda` on a machine without a GPU is a clear
//! error. The GPU runs themselves are `benches/cuda/run.sh` on a lent H200.

mod support;

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
            println!("{family} {level:?}: {err:.1e}");
        }
    }
}
