//! Mutation fuzzing on stable Rust, one target per input kiln reads: the
//! text-IR parser, `config.json`, `model.safetensors`, PEFT adapters and
//! compiled artifacts. Each target mutates seed files (bit flips, byte
//! writes, truncations, insertions, deletions, splices of the seed with
//! itself, interesting integers, and — for JSON and artifacts — structural
//! edits that keep the file well-formed or its checksums valid, so the
//! mutations reach past the first check) and requires every input to load
//! or fail with an error: no panic, and each input within a time bound.
//!
//! CI runs `KILN_FUZZ_ITERS` inputs per target (default 150). A longer run:
//! `KILN_FUZZ_ITERS=5000 cargo test --release --test fuzz -- --nocapture`
//! prints the executions per target. A panicking input is written to
//! `target/fuzz-crashes/<target>-<n>` before the test fails; each one
//! found becomes a regression test.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iterations() -> usize {
    std::env::var("KILN_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn scratch(tag: &str) -> PathBuf {
    support::scratch_dir(&format!("fuzz2-{tag}"))
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
    4096,
];

/// One byte-level mutation of `b` (at least one change, length may change).
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, focus: usize) {
    // `focus`: mutations land in the first `focus` bytes half the time
    // (headers), anywhere the rest.
    let pick = |rng: &mut Rng, len: usize| {
        if len == 0 {
            0
        } else if rng.next().is_multiple_of(2) {
            rng.below(len.min(focus.max(1)))
        } else {
            rng.below(len)
        }
    };
    match rng.next() % 8 {
        0 if !b.is_empty() => {
            let at = pick(rng, b.len());
            b[at] ^= 1 << rng.below(8);
        }
        1 if !b.is_empty() => {
            let at = pick(rng, b.len());
            b[at] = rng.next() as u8;
        }
        2 => {
            let len = rng.below(b.len() + 1);
            b.truncate(len);
        }
        3 => {
            let at = pick(rng, b.len() + 1).min(b.len());
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            b.splice(at..at, bytes);
        }
        4 if !b.is_empty() => {
            let at = pick(rng, b.len());
            let n = (1 + rng.below(64)).min(b.len() - at);
            b.drain(at..at + n);
        }
        5 if b.len() > 8 => {
            let at = pick(rng, b.len() - 8);
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let w = 1 << rng.below(4);
            b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
        }
        6 if b.len() > 2 => {
            // Splice: a copy of one range over another.
            let (from, to) = (rng.below(b.len()), pick(rng, b.len()));
            let n = (1 + rng.below(256)).min(b.len() - from).min(b.len() - to);
            let chunk = b[from..from + n].to_vec();
            b[to..to + n].copy_from_slice(&chunk);
        }
        _ => {
            let at = pick(rng, b.len() + 1).min(b.len());
            b.insert(at, rng.next() as u8);
        }
    }
}

/// A JSON value replaced somewhere inside `v` (any depth).
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let replacement = |rng: &mut Rng| match rng.next() % 12 {
        0 => Value::Null,
        1 => Value::from(0),
        2 => Value::from(-1),
        3 => Value::from(i64::MAX),
        4 => Value::from(u64::MAX),
        5 => Value::from(1e300),
        6 => Value::from(0.5),
        7 => Value::from("x".repeat(rng.below(5000))),
        8 => Value::from(true),
        9 => serde_json::json!([1, 2, [3]]),
        10 => serde_json::json!({"a": 1}),
        _ => Value::from(rng.below(70) as u64),
    };
    match v {
        Value::Object(m) if !m.is_empty() && !rng.next().is_multiple_of(4) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.below(keys.len())];
            if rng.next().is_multiple_of(8) {
                m.remove(k);
            } else {
                mutate_json(rng, m.get_mut(k).unwrap());
            }
        }
        Value::Array(a) if !a.is_empty() && !rng.next().is_multiple_of(4) => {
            let i = rng.below(a.len());
            mutate_json(rng, &mut a[i]);
        }
        _ => *v = replacement(rng),
    }
}

/// One to three [`mutate_json`] edits of a JSON file's text.
fn mutate_json_text(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(text).unwrap();
    for _ in 0..1 + rng.below(3) {
        mutate_json(rng, &mut v);
    }
    v.to_string().into_bytes()
}

/// One to three byte mutations of a safetensors file, half of them in its
/// header.
fn mutate_safetensors(rng: &mut Rng, w: &mut Vec<u8>) {
    let header = 8 + u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
    for _ in 0..1 + rng.below(3) {
        mutate_bytes(rng, w, header);
    }
}

/// Runs `f` on one input; a panic saves the input and fails the test, and
/// an input slower than `limit` fails it too.
fn exercise(target: &str, case: usize, input: &[u8], limit: Duration, f: impl FnOnce()) {
    let started = Instant::now();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
    if !ok {
        let dir = root().join("target/fuzz-crashes");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{target}-{case}"));
        let _ = std::fs::write(&file, input);
        panic!(
            "{target}: input {case} panicked (saved to {})",
            file.display()
        );
    }
    let took = started.elapsed();
    assert!(took < limit, "{target}: input {case} took {took:?}");
}

/// What a loaded model is asked to do: check it, and run it on two tokens.
fn use_model(m: &kiln::Model) {
    let _ = m.check();
    let _ = m.run_on(
        kiln::Target::Cpu { threads: 1 },
        &kiln::RunInputs::tokens(vec![vec![1, 2]]),
    );
}

#[test]
fn fuzz_text_ir_parser() {
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "kir"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert!(seeds.len() >= 5);
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let n = iterations() * 4;
    for case in 0..n {
        let mut b = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            mutate_bytes(&mut rng, &mut b, 4096);
        }
        let text = String::from_utf8_lossy(&b).to_string();
        exercise("ir", case, &b, Duration::from_secs(10), || {
            if let Ok(m) = kiln::Model::from_text(&text, "<fuzz>") {
                let _ = m.check();
                let _ = m.optimize(kiln::OptLevel::O2);
            }
        });
    }
    println!("fuzz ir: {n} executions, no crash");
}

#[test]
fn fuzz_config_and_safetensors_loaders() {
    let mut rng = Rng(0x0DDB_1A5E_5BAD_5EED);
    let n = iterations();
    for family in ["gpt2", "llama", "bert", "bart"] {
        let src = root().join("tests/data/hf").join(family);
        let config = std::fs::read(src.join("config.json")).unwrap();
        let weights = std::fs::read(src.join("model.safetensors")).unwrap();
        let dir = scratch(&format!("hf-{family}"));
        for case in 0..n {
            // Half the cases break the config (as JSON or as bytes), half
            // the weights (mostly the header).
            let (mut c, mut w) = (config.clone(), weights.clone());
            if case.is_multiple_of(2) {
                if rng.next().is_multiple_of(3) {
                    mutate_bytes(&mut rng, &mut c, 1 << 20);
                } else {
                    c = mutate_json_text(&mut rng, &c);
                }
            } else {
                mutate_safetensors(&mut rng, &mut w);
            }
            std::fs::write(dir.join("config.json"), &c).unwrap();
            std::fs::write(dir.join("model.safetensors"), &w).unwrap();
            let input = [c.as_slice(), b"\n--\n", w.as_slice()].concat();
            exercise(
                &format!("hf-{family}"),
                case,
                &input,
                Duration::from_secs(20),
                || {
                    if let Ok(m) = kiln::Model::load(&dir) {
                        use_model(&m);
                    }
                },
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("fuzz config+safetensors: {} executions, no crash", 4 * n);
}

#[test]
fn fuzz_adapter_loader() {
    let mut rng = Rng(0xADA9_7E55_0123_4567);
    let n = iterations();
    let base = kiln::Model::load(root().join("tests/data/hf/llama")).unwrap();
    let src = root().join("tests/data/hf/llama_lora");
    let config = std::fs::read(src.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let dir = scratch("adapter");
    for case in 0..n {
        let (mut c, mut w) = (config.clone(), weights.clone());
        if case.is_multiple_of(2) {
            c = mutate_json_text(&mut rng, &c);
        } else {
            mutate_safetensors(&mut rng, &mut w);
        }
        std::fs::write(dir.join("adapter_config.json"), &c).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), &w).unwrap();
        let input = [c.as_slice(), b"\n--\n", w.as_slice()].concat();
        exercise("adapter", case, &input, Duration::from_secs(20), || {
            for mode in [
                kiln::adapter::LoraMode::Merged,
                kiln::adapter::LoraMode::Unmerged,
            ] {
                if let Ok(m) = base.with_adapters(&[&dir], mode) {
                    use_model(&m);
                }
            }
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("fuzz adapter: {n} executions, no crash");
}

#[test]
fn fuzz_artifact_loader() {
    let dir = scratch("artifact");
    let mut seeds = Vec::new();
    for family in ["gpt2", "llama", "bert"] {
        let out = dir.join(format!("{family}.kiln"));
        let (code, _, err) = support::kiln(&[
            "compile",
            &format!("tests/data/hf/{family}"),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        seeds.push(std::fs::read(&out).unwrap());
    }
    let mut rng = Rng(0xA27F_AC75_0F00_D123);
    let n = iterations() * 2;
    let file = dir.join("case.kiln");
    let mut resealed = 0;
    for case in 0..n {
        let mut b = seeds[rng.below(seeds.len())].clone();
        match case % 3 {
            // Raw damage: caught by the header, table and chunk checks.
            0 => {
                for _ in 0..1 + rng.below(3) {
                    mutate_bytes(&mut rng, &mut b, 4096);
                }
            }
            // Damage inside a section with the checksums redone, so the
            // manifest, IR, weight and packed records are parsed as given.
            _ => {
                let secs = support::artifact_sections(&b);
                let (name, off, len, _) = secs[rng.below(secs.len())].clone();
                if len == 0 {
                    continue;
                }
                let mut body = b[off..off + len].to_vec();
                if name == "manifest" && rng.next().is_multiple_of(2) {
                    body = mutate_json_text(&mut rng, &body);
                } else {
                    mutate_bytes(&mut rng, &mut body, 1 << 20);
                }
                // Same length, so the table still fits: pad or cut.
                body.resize(len, b' ');
                b[off..off + len].copy_from_slice(&body);
                support::reseal_artifact(&mut b);
                resealed += 1;
            }
        }
        std::fs::write(&file, &b).unwrap();
        exercise("artifact", case, &b, Duration::from_secs(20), || {
            if let Ok(m) = kiln::Model::load(&file) {
                use_model(&m);
            }
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("fuzz artifact: {n} executions ({resealed} with checksums redone), no crash");
}
