//! Every family on the CPU backend with every heap allocation of the
//! process placed against an inaccessible page: a kernel that reads or
//! writes one element past the end of a buffer it was given (a weight, read
//! into memory of its own for this, f32 or 16-bit; a packed panel, an
//! input, the arena, a KV cache, an output) faults, and the test binary
//! dies. Valgrind (`tests/memcheck.rs`) runs no AVX-512, so
//! this is where the AVX-512 paths are checked on a host that has them:
//! the packed products and their fused epilogues, the matrix–vector
//! products of decode, the norms and the attention's softmax passes.
//!
//! What it cannot see: an access that stays inside one allocation, such as
//! one buffer of the arena running into the next (the kernels' debug
//! assertions cover those), or the bytes between a buffer's end and its
//! alignment.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};

use kiln::{GenerateOptions, OptLevel, Sampling, Target};

/// Places each allocation so that it ends where a `PROT_NONE` page begins.
struct GuardAlloc;

const PAGE: usize = 4096;

/// The mapping of an allocation of `layout`: its length (the guard page
/// included) and the allocation's offset in it.
fn placement(layout: Layout) -> (usize, usize) {
    let size = layout.size().max(1);
    let pages = size.div_ceil(PAGE) * PAGE;
    let used = size.div_ceil(layout.align()) * layout.align();
    (pages + PAGE, pages - used)
}

/// Allocations smaller than this go to the system allocator: each guarded
/// one is two mappings, and the process may hold about 65,000.
const MIN_GUARDED: usize = 64;

/// Whether `layout` is placed by [`GuardAlloc`] (else by the system
/// allocator).
fn guarded(layout: Layout) -> bool {
    layout.size() >= MIN_GUARDED && layout.align() <= PAGE
}

unsafe impl GlobalAlloc for GuardAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !guarded(layout) {
            // SAFETY: forwarded.
            return unsafe { System.alloc(layout) };
        }
        let (len, offset) = placement(layout);
        // SAFETY: a fresh anonymous mapping; its last page is made
        // inaccessible.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            let base = base.cast::<u8>();
            if libc::mprotect(base.add(len - PAGE).cast(), PAGE, libc::PROT_NONE) != 0 {
                libc::munmap(base.cast(), len);
                return std::ptr::null_mut();
            }
            base.add(offset)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !guarded(layout) {
            // SAFETY: forwarded.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let (len, offset) = placement(layout);
        // SAFETY: the mapping `alloc` made for this layout.
        unsafe { libc::munmap(ptr.sub(offset).cast(), len) };
    }
}

#[global_allocator]
static ALLOC: GuardAlloc = GuardAlloc;

const CPU: Target = Target::Cpu { threads: 2 };

#[test]
fn allocations_end_where_their_guard_page_begins() {
    // The placement itself: a Vec's last element ends at the guard page.
    for n in [16usize, 33, 1000, 1024, 4097] {
        let v = vec![0f32; n];
        let end = v.as_ptr() as usize + n * 4;
        assert_eq!(end % PAGE, 0, "{n} f32 end at a page boundary");
    }
}

#[test]
fn every_family_runs_and_generates_inside_its_buffers() {
    let sixteen_bit = [
        ("llama f16", safetensors::Dtype::F16),
        ("llama bf16", safetensors::Dtype::BF16),
    ]
    .map(|(name, dtype)| {
        let dir = support::sixteen_bit_copy("llama", dtype);
        (name, kiln::Model::load(&dir).expect("loads"))
    });
    let models = support::FAMILIES
        .map(|f| (f, support::hf_model(f)))
        .into_iter()
        .chain(sixteen_bit);
    for (family, model) in models {
        // Weights read into allocations of their own, each against its
        // guard page (mapped from the file, a weight's end is the next
        // one's start).
        let model = model.with_weights_in_memory();
        let weights = model.weights().expect("weights");
        for (name, t) in weights {
            let b = t.bytes();
            assert!(
                !t.is_mapped()
                    && (b.len() < MIN_GUARDED
                        || (b.as_ptr() as usize + b.len()).is_multiple_of(PAGE)),
                "{family}: {name} does not end at its guard page"
            );
        }
        let inputs = support::family_inputs(&model);
        for (level, m) in [
            ("-O0", model.clone()),
            ("-O2", model.optimize(OptLevel::O2).expect("O2")),
        ] {
            m.run_on(CPU, &inputs)
                .unwrap_or_else(|e| panic!("{family} {level}: {e}"));
            let encoder = matches!(m.info().map(|i| i.family), Some(kiln::Family::Bert));
            if encoder {
                continue;
            }
            for kv_cache in [false, true] {
                let opts = GenerateOptions {
                    max_new_tokens: 3,
                    sampling: Sampling::Greedy,
                    stop_at_eos: false,
                    kv_cache,
                    backend: CPU,
                };
                let prompt = kiln::RunInputs::tokens(vec![vec![5, 17, 42]]);
                m.generate(&prompt, &opts)
                    .unwrap_or_else(|e| panic!("{family} {level} kv {kv_cache}: {e}"));
            }
        }
    }
}

#[test]
fn lora_runs_and_generates_inside_its_buffers_merged_and_unmerged() {
    for (lora, unmerged) in support::unmerged_loras() {
        let merged = unmerged
            .merge_adapters()
            .expect("merge")
            .optimize(OptLevel::O2)
            .expect("O2");
        for m in [
            unmerged.with_weights_in_memory(),
            merged.with_weights_in_memory(),
        ] {
            let inputs = support::family_inputs(&m);
            m.run_on(CPU, &inputs)
                .unwrap_or_else(|e| panic!("{lora}: {e}"));
            let opts = GenerateOptions {
                max_new_tokens: 3,
                sampling: Sampling::Greedy,
                stop_at_eos: false,
                kv_cache: true,
                backend: CPU,
            };
            let prompt = kiln::RunInputs::tokens(vec![vec![5, 17, 42]]);
            m.generate(&prompt, &opts)
                .unwrap_or_else(|e| panic!("{lora} generate: {e}"));
        }
    }
}
