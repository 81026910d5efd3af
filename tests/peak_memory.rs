//! Peak memory of a whole `kiln generate` process: at most the weight file
//! plus 25%. Weights are read in place from the mapped file, intermediates
//! live in planned arenas, and the KV cache is not copied per token, so a
//! model costs its weights and little more.
//!
//! The model is a LLaMA-shaped folder written here with seeded random weights
//! (no Python needed); the issue's 124.7M-parameter folder made by
//! `benches/make_models.py` gives the figure recorded in the closing note.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a LLaMA-shaped folder: hidden 512, 8 layers, 8 heads of 64, 2 KV
/// heads, intermediate 1536, vocab 16000 (40.4M parameters, 162 MB of f32).
fn write_llama(dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).expect("folder");
    let config = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
  "num_key_value_heads": 2, "intermediate_size": 1536, "vocab_size": 16000,
  "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
  "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
}"#;
    std::fs::write(dir.join("config.json"), config).expect("config");
    let (d, f, v, kv, layers) = (512usize, 1536usize, 16000usize, 128usize, 8);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, d]),
        ("model.norm.weight".into(), vec![d]),
        ("lm_head.weight".into(), vec![v, d]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![f, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![f, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, f]),
        ]);
    }
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            (0..n)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                    let x = if norm {
                        1.0
                    } else {
                        ((u * 2.0 - 1.0) * 0.05) as f32
                    };
                    x.to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("view");
            (name.clone(), view)
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).expect("write");
    std::fs::metadata(&path).expect("written").len()
}

/// Runs the kiln binary and returns its peak resident set in bytes.
fn peak_rss(args: &[&str]) -> u64 {
    // The child is reaped by wait4 below, which also reports its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("kiln starts");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for the
    // child we spawned and have not waited for yet.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "kiln failed: {status}"
    );
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn generate_peaks_at_the_weights_plus_a_quarter() {
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llama_512_rss");
    let file = write_llama(&dir);
    let tokens = "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16";
    let dir_s = dir.to_str().expect("utf-8 path");
    let peak = peak_rss(&[
        "generate",
        dir_s,
        "--tokens",
        tokens,
        "--max-new-tokens",
        "4",
        "--backend",
        "interp",
    ]);
    let ratio = peak as f64 / file as f64;
    println!(
        "interp: peak RSS {:.1} MB for {:.1} MB of weights ({ratio:.2}x)",
        peak as f64 / 1e6,
        file as f64 / 1e6
    );
    assert!(
        ratio <= 1.25,
        "peak RSS {peak} bytes is {ratio:.2}x the {file}-byte weight file"
    );
}
