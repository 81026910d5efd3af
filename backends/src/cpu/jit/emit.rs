//! Instruction helpers shared by the kernel builders: constants, selects,
//! loops, loads and stores that convert the stored dtype, and the inline
//! math functions. Float helpers work on `f32` or `f32x4` alike (the type of
//! their argument), so a body is emitted once per lane width.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{self, Type};
use cranelift_codegen::ir::{Endianness, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;
use kiln_ir::DType;

use super::Tools;

/// `erf`'s argument clamp: f32's `erf` is ±1 from 3.92 on.
pub(crate) const ERF_LIMIT: f32 = 4.0;
/// `erf(x) = x·P(x²)/Q(x²)` (see [`E::erf`]), highest degree first.
pub(crate) const ERF_P: [f32; 6] = [
    2.049_999_5e-6,
    2.848_565_3e-4,
    3.765_039e-3,
    5.274_685e-2,
    1.903_948_3e-1,
    // Fitted, one ulp below f32's 2/√π.
    f32::from_bits(0x3f90_6eba),
];
/// The denominator of [`ERF_P`].
pub(crate) const ERF_Q: [f32; 6] = [
    3.808_944e-5,
    1.162_371_6e-3,
    1.496_805_3e-2,
    1.141_04e-1,
    5.020_658e-1,
    1.0,
];
/// `tanh(x) = x + x·z·P(z)`, `z = x²`, below 0.625 (cephes tanhf).
pub(crate) const TANH_P: [f32; 5] = [
    -5.704_988_7e-3,
    0.020_639_09,
    -5.373_971_6e-2,
    1.333_144_2e-1,
    -0.333_332_8,
];

/// `exp`'s bounds: `+inf` above `EXP_HI` (ln f32::MAX), 0 below `EXP_LO`.
pub(crate) const EXP_HI: f32 = 88.722_83;
/// See [`EXP_HI`].
pub(crate) const EXP_LO: f32 = -86.6;
/// ln 2 as `LN2_HI + LN2_LO`, the first part short so that `n·LN2_HI` is
/// exact for the integer `n` of `exp`'s and `log`'s range reductions.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
/// See [`LN2_HI`].
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// `exp(r) = 1 + r + r²·P(r)` on the reduced argument (cephes expf),
/// highest degree first.
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Plain memory access: unaligned allowed, never traps (every address was
/// proved inside its buffer before the kernel runs).
pub(crate) fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Lane-order flags a bitcast between vector types needs.
fn lanes() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// The emitter: a builder and the host's tools.
pub(crate) struct E<'a, 'b> {
    pub(crate) b: &'a mut FunctionBuilder<'b>,
    pub(crate) t: &'a Tools,
}

impl E<'_, '_> {
    /// The integer type of the same lanes as float type `ty`.
    pub(crate) fn int_of(ty: Type) -> Type {
        if ty.is_vector() {
            types::I32X4
        } else {
            types::I32
        }
    }

    /// `v` as an `ty` constant (splat for vectors).
    pub(crate) fn f(&mut self, ty: Type, v: f32) -> Value {
        let s = self.b.ins().f32const(v);
        if ty.is_vector() {
            self.b.ins().splat(ty, s)
        } else {
            s
        }
    }

    /// An i32 constant of the lanes of float type `ty`.
    pub(crate) fn i(&mut self, ty: Type, v: i64) -> Value {
        let s = self.b.ins().iconst(types::I32, v);
        if ty.is_vector() {
            self.b.ins().splat(types::I32X4, s)
        } else {
            s
        }
    }

    /// Reinterprets bits as `to` (same width).
    pub(crate) fn cast_bits(&mut self, to: Type, v: Value) -> Value {
        if to.is_vector() {
            self.b.ins().bitcast(to, lanes(), v)
        } else {
            self.b.ins().bitcast(to, MemFlagsData::new(), v)
        }
    }

    /// A float comparison: `i8` 0/1 for scalars, an all-ones lane mask
    /// (`i32x4`) for vectors.
    pub(crate) fn fcmp(&mut self, cc: FloatCC, a: Value, b: Value) -> Value {
        self.b.ins().fcmp(cc, a, b)
    }

    /// `c ? a : b` for a condition from [`E::fcmp`] or [`E::icmp_lanes`]
    /// and float or integer values of the same lanes.
    pub(crate) fn sel(&mut self, c: Value, a: Value, b: Value) -> Value {
        let ty = self.b.func.dfg.value_type(a);
        if ty.is_vector() {
            let c = if self.b.func.dfg.value_type(c) == ty {
                c
            } else {
                self.cast_bits(ty, c)
            };
            self.b.ins().bitselect(c, a, b)
        } else {
            self.b.ins().select(c, a, b)
        }
    }

    /// An integer comparison of i32 lanes (a mask for vectors).
    pub(crate) fn icmp_lanes(&mut self, cc: IntCC, a: Value, b: Value) -> Value {
        self.b.ins().icmp(cc, a, b)
    }

    pub(crate) fn add(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fadd(a, b)
    }
    pub(crate) fn sub(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fsub(a, b)
    }
    pub(crate) fn mul(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fmul(a, b)
    }
    pub(crate) fn div(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().fdiv(a, b)
    }

    /// `a·b + c`, fused when the host can.
    pub(crate) fn madd(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.t.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// Horner's rule over `coeffs` (highest degree first) at `x`.
    pub(crate) fn poly(&mut self, x: Value, coeffs: &[f32]) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let mut acc = self.f(ty, coeffs[0]);
        for &c in &coeffs[1..] {
            let k = self.f(ty, c);
            acc = self.madd(acc, x, k);
        }
        acc
    }

    /// `2^n` for integral float `n` in [-126, 127].
    fn pow2(&mut self, n: Value) -> Value {
        let ty = self.b.func.dfg.value_type(n);
        let it = Self::int_of(ty);
        let ni = self.b.ins().fcvt_to_sint_sat(it, n);
        let bias = self.i(ty, 127);
        let e = self.b.ins().iadd(ni, bias);
        let bits = self.b.ins().ishl_imm_s(e, 23);
        self.cast_bits(ty, bits)
    }

    /// `exp(x)`: range reduction by ln 2 and a degree-6 polynomial (cephes),
    /// within 2 ulp; `+inf` above ln(f32::MAX), 0 below -86.6 (results
    /// under 2.4e-38 flush to zero), NaN passes through.
    pub(crate) fn exp(&mut self, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let (hi, lo) = (EXP_HI, EXP_LO);
        let (hi_v, lo_v) = (self.f(ty, hi), self.f(ty, lo));
        let xc = self.clamp(x, lo, hi);
        let log2e = self.f(ty, std::f32::consts::LOG2_E);
        let t = self.mul(xc, log2e);
        let n = self.b.ins().nearest(t);
        // ln 2 in two parts, so that n·ln2_hi is exact.
        let c1 = self.f(ty, -LN2_HI);
        let c2 = self.f(ty, -LN2_LO);
        let r = self.madd(n, c1, xc);
        let r = self.madd(n, c2, r);
        let p = self.poly(r, &EXP_P);
        let r2 = self.mul(r, r);
        let one = self.f(ty, 1.0);
        let y = self.madd(p, r2, r);
        let y = self.add(y, one);
        // 2^n as 2^(n-1)·2, so n = 128 (x near ln f32::MAX) stays finite.
        let n1 = self.sub(n, one);
        let s = self.pow2(n1);
        let y = self.mul(y, s);
        let two = self.f(ty, 2.0);
        let y = self.mul(y, two);
        let inf = self.f(ty, f32::INFINITY);
        let over = self.fcmp(FloatCC::GreaterThan, x, hi_v);
        let y = self.sel(over, inf, y);
        let zero = self.f(ty, 0.0);
        let under = self.fcmp(FloatCC::LessThan, x, lo_v);
        self.sel(under, zero, y)
    }

    /// `ln(x)` (cephes logf): exponent and mantissa in [√½, √2), a degree-8
    /// polynomial; subnormals scaled first; 0 → -inf, negative → NaN,
    /// +inf → +inf, NaN passes through.
    pub(crate) fn log(&mut self, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let it = Self::int_of(ty);
        let min_normal = self.f(ty, f32::MIN_POSITIVE);
        let tiny = self.fcmp(FloatCC::LessThan, x, min_normal);
        let scale = self.f(ty, 8_388_608.0); // 2^23
        let scaled = self.mul(x, scale);
        let xs = self.sel(tiny, scaled, x);
        let zero_i = self.i(ty, 0);
        let m23 = self.i(ty, 23);
        let adj = self.sel(tiny, m23, zero_i);
        let bits = self.cast_bits(it, xs);
        let e = self.b.ins().ushr_imm_s(bits, 23);
        let bias = self.i(ty, 127);
        let e = self.b.ins().isub(e, bias);
        let e = self.b.ins().isub(e, adj);
        let mant_mask = self.i(ty, 0x007f_ffff);
        let one_bits = self.i(ty, 0x3f80_0000);
        let m = self.b.ins().band(bits, mant_mask);
        let m = self.b.ins().bor(m, one_bits);
        let m = self.cast_bits(ty, m);
        let sqrt2 = self.f(ty, std::f32::consts::SQRT_2);
        let big = self.fcmp(FloatCC::GreaterThan, m, sqrt2);
        let half = self.f(ty, 0.5);
        let mh = self.mul(m, half);
        let m = self.sel(big, mh, m);
        let one_i = self.i(ty, 1);
        let inc = self.sel(big, one_i, zero_i);
        let e = self.b.ins().iadd(e, inc);
        let fe = self.b.ins().fcvt_from_sint(ty, e);
        let one = self.f(ty, 1.0);
        let f = self.sub(m, one);
        let z = self.mul(f, f);
        let p = self.poly(
            f,
            &[
                7.037_683_6e-2,
                -1.151_461e-1,
                1.167_699_9e-1,
                -1.242_014_1e-1,
                1.424_932_3e-1,
                -1.666_805_8e-1,
                2.000_071_4e-1,
                -2.499_999_4e-1,
                0.333_333_3,
            ],
        );
        let y = self.mul(p, f);
        let y = self.mul(y, z);
        let c_lo = self.f(ty, LN2_LO);
        let y = self.madd(fe, c_lo, y);
        let mhalf = self.f(ty, -0.5);
        let y = self.madd(z, mhalf, y);
        let r = self.add(f, y);
        let c_hi = self.f(ty, LN2_HI);
        let r = self.madd(fe, c_hi, r);
        // Special values.
        let zero = self.f(ty, 0.0);
        let inf = self.f(ty, f32::INFINITY);
        let ninf = self.f(ty, f32::NEG_INFINITY);
        let nan = self.f(ty, f32::NAN);
        let is_inf = self.fcmp(FloatCC::Equal, x, inf);
        let r = self.sel(is_inf, inf, r);
        let is_zero = self.fcmp(FloatCC::Equal, x, zero);
        let r = self.sel(is_zero, ninf, r);
        // Negative or NaN: NaN.
        let bad = self.fcmp(FloatCC::UnorderedOrLessThan, x, zero);
        self.sel(bad, nan, r)
    }

    /// `tanh(x)`: an odd polynomial below 0.625 (cephes tanhf), else
    /// `1 - 2/(exp(2|x|) + 1)` with the sign of x.
    pub(crate) fn tanh(&mut self, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let z = self.mul(x, x);
        let p = self.poly(z, &TANH_P);
        let pz = self.mul(p, z);
        let small = self.madd(pz, x, x);
        let a = self.b.ins().fabs(x);
        let two = self.f(ty, 2.0);
        let a2 = self.mul(a, two);
        let e = self.exp(a2);
        let one = self.f(ty, 1.0);
        let d = self.add(e, one);
        let q = self.div(two, d);
        let big = self.sub(one, q);
        let big = self.copysign(big, x);
        let lim = self.f(ty, 0.625);
        let is_small = self.fcmp(FloatCC::LessThan, a, lim);
        self.sel(is_small, small, big)
    }

    /// `erf(x)` as `x·P(x²)/Q(x²)`, a rational approximation of degree 5
    /// over 5 in `x²` fitted (relative error, Lawson-weighted least
    /// squares; `scripts/fit_erf.py`) on `[0, 3.92]` (f32's `erf` is 1 from
    /// there on), with `x` clamped to `[-4, 4]`, where the rational is just
    /// past 1, and the result to `[-1, 1]`: so `erf(±∞)` is exactly ±1.
    /// Odd by construction; NaN stays NaN. Measured in f32
    /// against f64 `erf`: at most 3.6e-7 absolute and relative (6 ulp),
    /// in about 20 instructions where the series-or-Abramowitz–Stegun form
    /// with its `exp` took about 60.
    pub(crate) fn erf(&mut self, x: Value) -> Value {
        let xc = self.clamp(x, -ERF_LIMIT, ERF_LIMIT);
        let z = self.mul(xc, xc);
        let p = self.poly(z, &ERF_P);
        let q = self.poly(z, &ERF_Q);
        let xp = self.mul(xc, p);
        let r = self.div(xp, q);
        self.clamp(r, -1.0, 1.0)
    }

    /// `v` clamped to `[lo, hi]` by compare and select: Cranelift's vector
    /// `fmin`/`fmax` expand to about eight instructions each for their NaN
    /// and signed-zero rules. A NaN fails both comparisons and passes
    /// through.
    pub(crate) fn clamp(&mut self, v: Value, lo: f32, hi: f32) -> Value {
        let ty = self.b.func.dfg.value_type(v);
        let (lo, hi) = (self.f(ty, lo), self.f(ty, hi));
        let above = self.fcmp(FloatCC::GreaterThan, v, hi);
        let v = self.sel(above, hi, v);
        let below = self.fcmp(FloatCC::LessThan, v, lo);
        self.sel(below, lo, v)
    }

    /// Non-negative `mag` with the sign of `x` (bitwise: Cranelift has no
    /// vector `fcopysign` on x86-64).
    fn copysign(&mut self, mag: Value, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let it = Self::int_of(ty);
        let xb = self.cast_bits(it, x);
        let sign_bit = self.i(ty, i32::MIN as i64);
        let sign = self.b.ins().band(xb, sign_bit);
        let mb = self.cast_bits(it, mag);
        let r = self.b.ins().bor(mb, sign);
        self.cast_bits(ty, r)
    }

    /// `1 / (1 + exp(-x))`.
    pub(crate) fn sigmoid(&mut self, x: Value) -> Value {
        let ty = self.b.func.dfg.value_type(x);
        let nx = self.b.ins().fneg(x);
        let e = self.exp(nx);
        let one = self.f(ty, 1.0);
        let d = self.add(one, e);
        self.div(one, d)
    }

    /// Loads one element (scalar) or four (`f32x4`) of stored dtype
    /// `stored` at `addr` as f32: f16 and bf16 are widened here.
    pub(crate) fn load_float(&mut self, stored: DType, vector: bool, addr: Value) -> Value {
        match (stored, vector) {
            (DType::F32, false) => self.b.ins().load(types::F32, mem(), addr, 0),
            (DType::F32, true) => self.b.ins().load(types::F32X4, mem(), addr, 0),
            (_, false) => {
                let h = self.b.ins().uload16(types::I32, mem(), addr, 0);
                self.widen16(stored, types::F32, h)
            }
            (_, true) => {
                let w = self.b.ins().load(types::I64, mem(), addr, 0);
                let v = self.b.ins().scalar_to_vector(types::I64X2, w);
                let h = self.b.ins().bitcast(types::I16X8, lanes(), v);
                let h = self.b.ins().uwiden_low(h);
                self.widen16(stored, types::F32X4, h)
            }
        }
    }

    /// Two elements of stored dtype `stored` at `addr` as `f64x2`.
    pub(crate) fn load_pair_f64(&mut self, stored: DType, addr: Value) -> Value {
        let v = match stored {
            DType::F32 => {
                let w = self.b.ins().load(types::I64, mem(), addr, 0);
                let v = self.b.ins().scalar_to_vector(types::I64X2, w);
                self.b.ins().bitcast(types::F32X4, lanes(), v)
            }
            _ => {
                let w = self.b.ins().load(types::I32, mem(), addr, 0);
                let v = self.b.ins().scalar_to_vector(types::I32X4, w);
                let h = self.b.ins().bitcast(types::I16X8, lanes(), v);
                let h = self.b.ins().uwiden_low(h);
                self.widen16(stored, types::F32X4, h)
            }
        };
        self.b.ins().fvpromote_low(v)
    }

    /// Stores the two lanes of `f64x2` `v`, rounded to f32, at `addr`.
    pub(crate) fn store_pair_f32(&mut self, v: Value, addr: Value) {
        let f = self.b.ins().fvdemote(v);
        let i = self.b.ins().bitcast(types::I64X2, lanes(), f);
        let w = self.b.ins().extractlane(i, 0);
        self.b.ins().store(mem(), w, addr, 0);
    }

    /// Zero-extended 16-bit patterns (i32 lanes) as f32 lanes of `ty`.
    fn widen16(&mut self, stored: DType, ty: Type, h: Value) -> Value {
        if stored == DType::BF16 {
            let s = self.b.ins().ishl_imm_s(h, 16);
            return self.cast_bits(ty, s);
        }
        // f16: the 16 bits to the top, then an arithmetic shift by 3: the
        // sign fills bits 31..28, the exponent and mantissa land at 27..13;
        // clearing bits 30..28 leaves sign | (exponent, mantissa) << 13,
        // which rescaled by 2^112 is the value (exact for normals and
        // subnormals; the sign rides along). An all-ones exponent
        // (infinity, NaN) comes out of the rescale as 2^16·(1 + m), finite:
        // its exponent field is set to all ones, which keeps the mantissa
        // (NaN payloads) and the sign. A signalling NaN stays signalling
        // (F16C and the `half` crate set the quiet bit); arithmetic on it
        // gives a quiet NaN either way.
        let top = self.b.ins().ishl_imm_s(h, 16);
        let spread = self.b.ins().sshr_imm_s(top, 3);
        let keep = self.i(ty, 0x8fff_e000_u32 as i32 as i64);
        let u = self.b.ins().band(spread, keep);
        let f = self.cast_bits(ty, u);
        let magic = self.f(ty, f32::from_bits(0x7780_0000));
        let mag = self.mul(f, magic);
        let exp_field = self.i(ty, 0x0f80_0000);
        let e = self.b.ins().band(u, exp_field);
        let is_special = self.icmp_lanes(IntCC::Equal, e, exp_field);
        let it = Self::int_of(ty);
        let mag_bits = self.cast_bits(it, mag);
        let all_ones = self.i(ty, 0x7f80_0000);
        let r = if ty.is_vector() {
            // The comparison is an all-ones lane mask: no select needed.
            let set = self.b.ins().band(is_special, all_ones);
            self.b.ins().bor(mag_bits, set)
        } else {
            let special = self.b.ins().bor(mag_bits, all_ones);
            self.b.ins().select(is_special, special, mag_bits)
        };
        self.cast_bits(ty, r)
    }

    /// `p + i·scale` as an address.
    pub(crate) fn addr(&mut self, p: Value, i: Value, scale: i64) -> Value {
        let off = if scale == 1 {
            i
        } else {
            self.b.ins().imul_imm_s(i, scale)
        };
        self.b.ins().iadd(p, off)
    }
}

/// A counted loop `i = start; while i + step <= end { body(i); i += step }`;
/// returns the first index it did not run (for a tail loop).
pub(crate) fn for_range(
    b: &mut FunctionBuilder<'_>,
    start: Value,
    end: Value,
    step: i64,
    mut body: impl FnMut(&mut FunctionBuilder<'_>, Value),
) -> Value {
    let var = b.declare_var(types::I64);
    b.def_var(var, start);
    let head = b.create_block();
    let block = b.create_block();
    let exit = b.create_block();
    b.ins().jump(head, &[]);
    b.switch_to_block(head);
    let i = b.use_var(var);
    let next = b.ins().iadd_imm_s(i, step);
    let go = b.ins().icmp(IntCC::SignedLessThanOrEqual, next, end);
    b.ins().brif(go, block, &[], exit, &[]);
    b.switch_to_block(block);
    let i = b.use_var(var);
    body(b, i);
    let i = b.use_var(var);
    let next = b.ins().iadd_imm_s(i, step);
    b.def_var(var, next);
    b.ins().jump(head, &[]);
    b.switch_to_block(exit);
    b.use_var(var)
}

/// The size in bytes of one element of `d`.
pub(crate) fn size(d: DType) -> i64 {
    d.size_bytes() as i64
}
