//! Hugging Face folders with corrupted `config.json` values and truncated or
//! garbled weight files never make kiln panic: every case is a clean error or a
//! model that checks.

use std::path::Path;

use serde_json::Value;

/// Seeded xorshift, so the corruptions are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn replacement(rng: &mut Rng) -> Value {
    match rng.next() % 12 {
        0 => Value::Null,
        1 => Value::from(0),
        2 => Value::from(-1),
        3 => Value::from(i64::MAX),
        4 => Value::from(i64::MIN),
        5 => Value::from(1u64 << 40),
        6 => Value::from(0.5),
        7 => Value::from(f64::MAX),
        8 => Value::from("gelu"),
        9 => Value::from(true),
        10 => serde_json::json!([1, 2]),
        _ => Value::from(rng.next() % 7 + 1),
    }
}

fn check_load_never_panics(family: &str, cases: usize) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(family);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let keys: Vec<String> = config.as_object().unwrap().keys().cloned().collect();
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-{family}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ family.len() as u64);
    for case in 0..cases {
        let mut c = config.clone();
        for _ in 0..1 + rng.next() % 3 {
            let key = &keys[(rng.next() as usize) % keys.len()];
            c[key] = replacement(&mut rng);
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let result = std::panic::catch_unwind(|| {
            if let Ok(m) = kiln::Model::load(&dir) {
                let _ = m.check();
                let _ = m.run(&kiln::RunInputs::tokens(vec![vec![1, 2]]));
            }
        });
        assert!(
            result.is_ok(),
            "{family} case {case} panicked with config {c}"
        );
    }
    // Garbled weight files.
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let weights = std::fs::read(src.join("model.safetensors")).unwrap();
    for case in 0..cases {
        let mut bytes = weights.clone();
        match rng.next() % 3 {
            0 => bytes.truncate((rng.next() as usize) % bytes.len()),
            1 => {
                // Corrupt the JSON header (the first 8 bytes give its length).
                let at = 8 + (rng.next() as usize) % 200;
                bytes[at] = (rng.next() % 256) as u8;
            }
            _ => {
                let at = (rng.next() as usize) % 8;
                bytes[at] = (rng.next() % 256) as u8;
            }
        }
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        let result = std::panic::catch_unwind(|| {
            if let Ok(m) = kiln::Model::load(&dir) {
                let _ = m.run(&kiln::RunInputs::tokens(vec![vec![1, 2]]));
            }
        });
        assert!(result.is_ok(), "{family} weights case {case} panicked");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_configs_and_weights_never_panic() {
    for family in [
        "gpt2", "llama", "mixtral", "bloom", "bert", "bart", "marian", "t5",
    ] {
        check_load_never_panics(family, 60);
    }
}

#[test]
fn corrupted_adapter_configs_never_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf");
    let base = kiln::Model::load(root.join("gpt2")).unwrap();
    let src = root.join("gpt2_lora");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let keys: Vec<String> = config.as_object().unwrap().keys().cloned().collect();
    let dir = std::env::temp_dir().join(format!("kiln-fuzz-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..150 {
        let mut c = config.clone();
        for _ in 0..1 + rng.next() % 3 {
            let key = &keys[(rng.next() as usize) % keys.len()];
            c[key] = replacement(&mut rng);
        }
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        let result = std::panic::catch_unwind(|| {
            for mode in [
                kiln::adapter::LoraMode::Merged,
                kiln::adapter::LoraMode::Unmerged,
            ] {
                if let Ok(m) = base.with_adapters(&[&dir], mode) {
                    let _ = m.run(&kiln::RunInputs::tokens(vec![vec![1, 2]]));
                }
            }
        });
        assert!(
            result.is_ok(),
            "adapter case {case} panicked with config {c}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
