//! Distance kernels of the dense half, vectorized by hand.
//!
//! A graph walk spends most of its time in these two functions, and leaving them to the
//! auto-vectorizer proved fragile: measured on the same machine, two builds of identical
//! source differed 2.3x in search speed because, in one, the inliner gave up on the slice
//! iterators inside the generic dot product and it ran scalar. These kernels use explicit
//! AVX2 + FMA intrinsics (AVX-512 for f32 against f32 where the CPU has it), chosen once at
//! run time, with a portable fallback.

use std::sync::OnceLock;

type Kernel = fn(&[f32], &[f32]) -> f32;
type I8Kernel = fn(&[f32], &[i8], f32) -> f32;
type F16Kernel = fn(&[f32], &[u16]) -> f32;
/// `Σ qᵢ·cᵢ` in integers of a quantized query and an int8 code ([`dot_i8_i8`]).
type IntKernel = fn(&QueryI8, &[i8]) -> i32;

struct Kernels {
    dot: Kernel,
    l2: Kernel,
    dot_i8: I8Kernel,
    l2_i8: I8Kernel,
    dot_f16: F16Kernel,
    l2_f16: F16Kernel,
    int_dot: IntKernel,
    /// `int_dot` runs on SIMD integer instructions (see [`int8_dot_fast`]).
    int_dot_fast: bool,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let f16c = std::is_x86_feature_detected!("f16c");
            // 16 lanes a step where the CPU has them (hnswlib and faiss pick theirs the same
            // way); the code kernels keep 8 (their loads widen i8 and f16 to 8 floats).
            let avx512 = std::is_x86_feature_detected!("avx512f");
            // Integer products of a quantized query: AVX-512 VNNI's `vpdpbusd`, 64 values a
            // step, else AVX2's `vpmaddubsw` on the code's magnitudes and the query's values
            // with the code's signs, then `vpmaddwd`, 32 values a step (no pair of products
            // can saturate 16 bits: both sides stay within ±127, the code's magnitude within
            // 128).
            let vnni =
                avx512 && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni");
            return Kernels {
                dot: if avx512 { x86::dot512 } else { x86::dot },
                l2: if avx512 { x86::l2_512 } else { x86::l2 },
                dot_i8: x86::dot_i8,
                l2_i8: x86::l2_i8,
                dot_f16: if f16c { x86::dot_f16 } else { portable::dot_f16 },
                l2_f16: if f16c { x86::l2_f16 } else { portable::l2_f16 },
                int_dot: if vnni { x86::int_dot_vnni } else { x86::int_dot_avx2 },
                int_dot_fast: true,
            };
        }
        Kernels {
            dot: portable::dot,
            l2: portable::l2,
            dot_i8: portable::dot_i8,
            l2_i8: portable::l2_i8,
            dot_f16: portable::dot_f16,
            l2_f16: portable::l2_f16,
            int_dot: portable::int_dot,
            int_dot_fast: false,
        }
    })
}

/// The dot product of two vectors of equal length.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    (kernels().dot)(a, b)
}

/// The squared Euclidean distance of two vectors of equal length.
#[inline]
pub fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    (kernels().l2)(a, b)
}

/// `scale · Σ q[i]·c[i]`: the dot product of a vector with an int8 code of scale `scale`.
#[inline]
pub fn dot_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
    debug_assert_eq!(q.len(), c.len());
    (kernels().dot_i8)(q, c, scale)
}

/// `Σ (q[i] − scale·c[i])²`: the squared distance of a vector to an int8 code.
#[inline]
pub fn squared_l2_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
    debug_assert_eq!(q.len(), c.len());
    (kernels().l2_i8)(q, c, scale)
}

/// The dot product of a vector with IEEE half-precision values (given as their bits).
#[inline]
pub fn dot_f16(q: &[f32], c: &[u16]) -> f32 {
    debug_assert_eq!(q.len(), c.len());
    (kernels().dot_f16)(q, c)
}

/// The squared distance of a vector to half-precision values (given as their bits).
#[inline]
pub fn squared_l2_f16(q: &[f32], c: &[u16]) -> f32 {
    debug_assert_eq!(q.len(), c.len());
    (kernels().l2_f16)(q, c)
}

/// A query quantized for integer dot products with int8 codes ([`dot_i8_i8`]): each value
/// rounded to one of ±127 steps of `max |q| / 127`, stored plus 128 as an unsigned byte
/// (the operand AVX-512 VNNI's `vpdpbusd` takes unsigned), padded with 128 (zero) to a
/// multiple of 64 bytes.
#[derive(Debug, Clone)]
pub struct QueryI8 {
    bytes: Vec<u8>,
    len: usize,
    scale: f32,
}

impl QueryI8 {
    pub fn new(q: &[f32]) -> Self {
        let max = q.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        let mut bytes = vec![128u8; q.len().next_multiple_of(64)];
        for (b, &x) in bytes.iter_mut().zip(q) {
            *b = ((x / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
        }
        Self { bytes, len: q.len(), scale }
    }
}

/// True when [`dot_i8_i8`] runs on integer SIMD instructions (AVX-512 VNNI, or AVX2); a
/// graph walk on int8 codes then quantizes its query once and uses it.
pub fn int8_dot_fast() -> bool {
    kernels().int_dot_fast
}

/// `q · (scale · c)` for a quantized query and an int8 code, in integers: the query's own
/// rounding (at most half a step of `max |q| / 127` a value) is the only difference from
/// [`dot_i8`]. Portable where [`int8_dot_fast`] is false.
#[inline]
pub fn dot_i8_i8(q: &QueryI8, c: &[i8], scale: f32) -> f32 {
    (kernels().int_dot)(q, c) as f32 * q.scale * scale
}

/// Cosine similarity: one definition for the workspace (RAG reranking and MMR, few-shot
/// selection, drift profiles, eval metrics). 0 when either vector is zero or their lengths
/// differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let d = (dot(a, a) as f64 * dot(b, b) as f64).sqrt();
    if d == 0.0 {
        0.0
    } else {
        (dot(a, b) as f64 / d) as f32
    }
}

mod portable {
    /// `Σ term(a[i], b[i])` over eight independent accumulators of indexed chunks (no
    /// bounds checks in the loop), so that it vectorizes where the target allows.
    #[inline(always)]
    fn sum8(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0f32; 8];
        let full = n / 8 * 8;
        let mut i = 0;
        while i < full {
            for l in 0..8 {
                acc[l] += term(a[i + l], b[i + l]);
            }
            i += 8;
        }
        let mut s: f32 = acc.iter().sum();
        for j in full..n {
            s += term(a[j], b[j]);
        }
        s
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        sum8(a, b, |x, y| x * y)
    }

    pub fn l2(a: &[f32], b: &[f32]) -> f32 {
        sum8(a, b, |x, y| (x - y) * (x - y))
    }

    fn widen_i8(c: &[i8]) -> impl Iterator<Item = f32> + '_ {
        c.iter().map(|&x| x as f32)
    }

    fn widen_f16(c: &[u16]) -> impl Iterator<Item = f32> + '_ {
        c.iter().map(|&x| half::f16::from_bits(x).to_f32())
    }

    /// `Σ term(q[i], c[i])` over eight accumulators, as [`sum8`] does.
    fn sum8_iter(q: &[f32], c: impl Iterator<Item = f32>, term: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (&x, y)) in q.iter().zip(c).enumerate() {
            acc[i % 8] += term(x, y);
        }
        acc.iter().sum()
    }

    pub fn dot_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
        scale * sum8_iter(q, widen_i8(c), |x, y| x * y)
    }

    pub fn int_dot(q: &super::QueryI8, c: &[i8]) -> i32 {
        q.bytes[..q.len].iter().zip(c).map(|(&b, &y)| (b as i32 - 128) * y as i32).sum()
    }

    pub fn l2_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
        sum8_iter(q, widen_i8(c), |x, y| (x - scale * y) * (x - scale * y))
    }

    pub fn dot_f16(q: &[f32], c: &[u16]) -> f32 {
        sum8_iter(q, widen_f16(c), |x, y| x * y)
    }

    pub fn l2_f16(q: &[f32], c: &[u16]) -> f32 {
        sum8_iter(q, widen_f16(c), |x, y| (x - y) * (x - y))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: selected only after `avx2` and `fma` were detected on this CPU.
        unsafe { dot_avx2(a, b) }
    }

    pub fn l2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { l2_avx2(a, b) }
    }

    pub fn dot512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: selected only after `avx512f` was detected on this CPU.
        unsafe { f32_avx512::<false>(a, b) }
    }

    pub fn l2_512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { f32_avx512::<true>(a, b) }
    }

    /// The dot product (or with `L2` the squared distance) 16 lanes at a time, four
    /// accumulators deep.
    #[target_feature(enable = "avx512f")]
    fn f32_avx512<const L2: bool>(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let step = |i: usize, acc: __m512| -> __m512 {
            // SAFETY: callers keep `i + 16 <= n`, so the loads stay inside both slices.
            let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
            if L2 {
                let d = _mm512_sub_ps(x, y);
                _mm512_fmadd_ps(d, d, acc)
            } else {
                _mm512_fmadd_ps(x, y, acc)
            }
        };
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = step(i + 16 * j, *a);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = step(i, acc[0]);
            i += 16;
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        while i < n {
            let (x, y) = (a[i], b[i]);
            s += if L2 { (x - y) * (x - y) } else { x * y };
            i += 1;
        }
        s
    }

    pub fn int_dot_vnni(q: &super::QueryI8, c: &[i8]) -> i32 {
        // SAFETY: selected only after AVX-512 F, BW and VNNI were detected on this CPU;
        // `q.bytes` holds `q.len` bytes rounded up to 64, and `n` fits both slices.
        unsafe { i8_i8_vnni(&q.bytes, c, q.len.min(c.len())) }
    }

    pub fn int_dot_avx2(q: &super::QueryI8, c: &[i8]) -> i32 {
        // SAFETY: selected only after `avx2` was detected; `n` fits both slices.
        unsafe { i8_i8_avx2(&q.bytes, c, q.len.min(c.len())) }
    }

    pub fn dot_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
        // SAFETY: selected only after `avx2` and `fma` were detected on this CPU.
        unsafe { i8_avx2::<false>(q, c, scale) }
    }

    pub fn l2_i8(q: &[f32], c: &[i8], scale: f32) -> f32 {
        // SAFETY: as above.
        unsafe { i8_avx2::<true>(q, c, scale) }
    }

    pub fn dot_f16(q: &[f32], c: &[u16]) -> f32 {
        // SAFETY: selected only after `avx2`, `fma` and `f16c` were detected on this CPU.
        unsafe { f16_avx2::<false>(q, c) }
    }

    pub fn l2_f16(q: &[f32], c: &[u16]) -> f32 {
        // SAFETY: as above.
        unsafe { f16_avx2::<true>(q, c) }
    }

    /// `Σ (q[i] − 128) · c[i]` over `n` values with `vpdpbusd`: 64 values a step, the
    /// last step's missing values masked off (masked loads never touch them). The query's
    /// bias of 128 comes off by a second `vpdpbusd` of the code against ones.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `q` holds `n` bytes (rounded up to a multiple of
    /// 64, padded) and `c` at least `n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn i8_i8_vnni(q: &[u8], c: &[i8], n: usize) -> i32 {
        let (pq, pc) = (q.as_ptr(), c.as_ptr());
        let ones = _mm512_set1_epi8(1);
        let (mut acc, mut sum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut i = 0;
        while i < n {
            let left = n - i;
            // SAFETY: full steps read 64 bytes inside both slices; the last one reads
            // `left` bytes of the code (masked) and 64 of the padded query.
            let (qv, cv) = unsafe {
                let qv = _mm512_loadu_si512(pq.add(i) as *const _);
                let cv = if left >= 64 {
                    _mm512_loadu_si512(pc.add(i) as *const _)
                } else {
                    _mm512_maskz_loadu_epi8((1u64 << left) - 1, pc.add(i))
                };
                (qv, cv)
            };
            acc = _mm512_dpbusd_epi32(acc, qv, cv);
            sum = _mm512_dpbusd_epi32(sum, ones, cv);
            i += 64;
        }
        _mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(sum)
    }

    /// `Σ (q[i] − 128) · c[i]` over `n` values with AVX2, 32 values a step: the query's
    /// bias comes off by flipping its top bit, then `vpmaddubsw` multiplies the code's
    /// magnitudes (unsigned) by the query's values carrying the code's signs, and
    /// `vpmaddwd` widens the pair sums to 32 bits.
    ///
    /// # Safety
    /// The CPU has AVX2; `q` and `c` hold at least `n` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn i8_i8_avx2(q: &[u8], c: &[i8], n: usize) -> i32 {
        let (pq, pc) = (q.as_ptr(), c.as_ptr());
        let bias = _mm256_set1_epi8(i8::MIN);
        let ones = _mm256_set1_epi16(1);
        let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: `i + 32 <= n` keeps both 32-byte loads inside the slices.
            let (qv, cv) = unsafe {
                (
                    _mm256_xor_si256(_mm256_loadu_si256(pq.add(i) as *const __m256i), bias),
                    _mm256_loadu_si256(pc.add(i) as *const __m256i),
                )
            };
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(cv), _mm256_sign_epi8(qv, cv));
            let sums = _mm256_madd_epi16(pairs, ones);
            if (i / 32) % 2 == 0 {
                a0 = _mm256_add_epi32(a0, sums);
            } else {
                a1 = _mm256_add_epi32(a1, sums);
            }
            i += 32;
        }
        let v = _mm256_add_epi32(a0, a1);
        let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
        let v = _mm_add_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
        let mut s = _mm_cvtsi128_si32(v);
        while i < n {
            s += (q[i] as i32 - 128) * c[i] as i32;
            i += 1;
        }
        s
    }

    /// One step of a code kernel: the dot product's or the squared distance's term.
    #[target_feature(enable = "avx2,fma")]
    fn step<const L2: bool>(q: __m256, c: __m256, acc: __m256) -> __m256 {
        if L2 {
            let d = _mm256_sub_ps(q, c);
            _mm256_fmadd_ps(d, d, acc)
        } else {
            _mm256_fmadd_ps(q, c, acc)
        }
    }

    /// The code's values times the scale where the squared distance needs them (the dot
    /// product is scaled once, after the sum).
    #[target_feature(enable = "avx2,fma")]
    fn scaled<const L2: bool>(c: __m256, scale: __m256) -> __m256 {
        if L2 {
            _mm256_mul_ps(c, scale)
        } else {
            c
        }
    }

    /// Dot product (`L2` false, scaled after the sum) or squared distance (`L2` true, the
    /// code scaled per lane) of `q` and an int8 code.
    #[target_feature(enable = "avx2,fma")]
    fn i8_avx2<const L2: bool>(q: &[f32], c: &[i8], scale: f32) -> f32 {
        let n = q.len().min(c.len());
        let (pq, pc) = (q.as_ptr(), c.as_ptr());
        let sv = _mm256_set1_ps(scale);
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (all loads): `i + 16 <= n` (then `i + 8 <= n`) keeps the 16- and 8-byte
        // code loads and the 8-lane query loads inside both slices.
        while i + 16 <= n {
            unsafe {
                let bytes = _mm_loadu_si128(pc.add(i) as *const __m128i);
                let lo = scaled::<L2>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), sv);
                let hi = scaled::<L2>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(bytes))), sv);
                s0 = step::<L2>(_mm256_loadu_ps(pq.add(i)), lo, s0);
                s1 = step::<L2>(_mm256_loadu_ps(pq.add(i + 8)), hi, s1);
            }
            i += 16;
        }
        while i + 8 <= n {
            unsafe {
                let bytes = _mm_loadl_epi64(pc.add(i) as *const __m128i);
                let v = scaled::<L2>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), sv);
                s0 = step::<L2>(_mm256_loadu_ps(pq.add(i)), v, s0);
            }
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while i < n {
            let y = c[i] as f32 * if L2 { scale } else { 1.0 };
            s += if L2 { (q[i] - y) * (q[i] - y) } else { q[i] * y };
            i += 1;
        }
        if L2 {
            s
        } else {
            s * scale
        }
    }

    /// Dot product or squared distance of `q` and half-precision values.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_avx2<const L2: bool>(q: &[f32], c: &[u16]) -> f32 {
        let n = q.len().min(c.len());
        let (pq, pc) = (q.as_ptr(), c.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (all loads): `i + 16 <= n` (then `i + 8 <= n`) keeps the 8-value half loads
        // and the 8-lane query loads inside both slices.
        while i + 16 <= n {
            unsafe {
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(pc.add(i) as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(pc.add(i + 8) as *const __m128i));
                s0 = step::<L2>(_mm256_loadu_ps(pq.add(i)), lo, s0);
                s1 = step::<L2>(_mm256_loadu_ps(pq.add(i + 8)), hi, s1);
            }
            i += 16;
        }
        while i + 8 <= n {
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(pc.add(i) as *const __m128i));
                s0 = step::<L2>(_mm256_loadu_ps(pq.add(i)), v, s0);
            }
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while i < n {
            let y = half::f16::from_bits(c[i]).to_f32();
            s += if L2 { (q[i] - y) * (q[i] - y) } else { q[i] * y };
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1, mut s2, mut s3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (all loads): `i + 32 <= n` (then `i + 8 <= n`) keeps every 8-lane
        // unaligned load inside both slices.
        while i + 32 <= n {
            unsafe {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), s3);
            }
            i += 32;
        }
        while i + 8 <= n {
            unsafe {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            }
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY (all loads): as in `dot_avx2`.
        while i + 16 <= n {
            unsafe {
                let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                let d1 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)));
                s0 = _mm256_fmadd_ps(d0, d0, s0);
                s1 = _mm256_fmadd_ps(d1, d1, s1);
            }
            i += 16;
        }
        while i + 8 <= n {
            unsafe {
                let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                s0 = _mm256_fmadd_ps(d, d, s0);
            }
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(s0, s1));
        while i < n {
            let d = a[i] - b[i];
            s += d * d;
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn exact_l2(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum()
    }

    /// The integer dot product of a quantized query and an int8 code is exact in integers
    /// (whichever kernel runs), and off the f32 query's dot product only by the query's
    /// rounding: at most half a step a value.
    /// Each integer kernel the CPU has, against integer sums (codes over the whole i8
    /// range, -128 included, as a damaged file could hold).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_integer_kernel_the_cpu_has_sums_exactly() {
        for n in (0..140).chain([383, 384, 385, 768]) {
            let q: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let c: Vec<i8> = (0..n).map(|i| (i * 53 % 256) as u8 as i8).collect();
            let qi = QueryI8::new(&q);
            let want: i32 = qi.bytes[..n].iter().zip(&c).map(|(&b, &y)| (b as i32 - 128) * y as i32).sum();
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 detected; both slices hold `n` bytes.
                assert_eq!(unsafe { x86::i8_i8_avx2(&qi.bytes, &c, n) }, want, "avx2, n {n}");
            }
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                // SAFETY: detected; the query is padded to a multiple of 64.
                assert_eq!(unsafe { x86::i8_i8_vnni(&qi.bytes, &c, n) }, want, "vnni, n {n}");
            }
        }
    }

    #[test]
    fn quantized_queries_dot_int8_codes_exactly_in_integers() {
        for n in (0..140).chain([383, 384, 385, 768, 1536]) {
            let q: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let c: Vec<i8> = (0..n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
            let qi = QueryI8::new(&q);
            let ints: i64 = qi.bytes[..n].iter().zip(&c).map(|(&b, &y)| (b as i64 - 128) * y as i64).sum();
            let got = dot_i8_i8(&qi, &c, 0.5);
            let want = ints as f64 * qi.scale as f64 * 0.5;
            assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "n {n}: {got} vs {want}");
            let step = q.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            let exact: f64 = q.iter().zip(&c).map(|(&x, &y)| x as f64 * y as f64 * 0.5).sum();
            let bound = 0.5 * step as f64 * c.iter().map(|&y| (y as f64).abs() * 0.5).sum::<f64>() + 1e-4;
            assert!((got as f64 - exact).abs() <= bound, "n {n}: {got} vs {exact} (bound {bound})");
        }
    }

    /// Each x86 f32 kernel this CPU can run, whichever one `dot` and `squared_l2` picked.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_kernel_the_cpu_has_agrees_with_f64_sums() {
        let mut kernels: Vec<(&str, fn(&[f32], &[f32]) -> f32, bool)> = Vec::new();
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            kernels.extend([("avx2 dot", x86::dot as fn(&[f32], &[f32]) -> f32, false), ("avx2 l2", x86::l2, true)]);
        }
        if std::is_x86_feature_detected!("avx512f") {
            kernels.extend([
                ("avx512 dot", x86::dot512 as fn(&[f32], &[f32]) -> f32, false),
                ("avx512 l2", x86::l2_512, true),
            ]);
        }
        for n in (0..140).chain([383, 384, 385, 768, 1536]) {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            for (name, kernel, l2) in &kernels {
                let want = if *l2 { exact_l2(&a, &b) } else { exact_dot(&a, &b) };
                let got = kernel(&a, &b) as f64;
                assert!((got - want).abs() <= 1e-5 * (n as f64 + 1.0), "{name}, n {n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn kernels_agree_with_f64_sums_at_every_length() {
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for n in (0..80).chain([127, 128, 129, 384, 385, 768, 1536]) {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let tol = 1e-5 * (n as f64 + 1.0);
            for (got, want) in [
                (dot(&a, &b) as f64, exact_dot(&a, &b)),
                (portable::dot(&a, &b) as f64, exact_dot(&a, &b)),
                (squared_l2(&a, &b) as f64, exact_l2(&a, &b)),
                (portable::l2(&a, &b) as f64, exact_l2(&a, &b)),
            ] {
                assert!((got - want).abs() <= tol, "n {n}: {got} vs {want}");
            }
            // The code kernels against the same sums over the codes' values.
            let c: Vec<i8> = (0..n).map(|_| (next() * 254.0) as i8).collect();
            let h: Vec<u16> = (0..n).map(|_| half::f16::from_f32(next()).to_bits()).collect();
            let (ci, hf): (Vec<f32>, Vec<f32>) = (
                c.iter().map(|&x| x as f32 * 0.01).collect(),
                h.iter().map(|&x| half::f16::from_bits(x).to_f32()).collect(),
            );
            let tol = 1e-3 * (n as f64 + 1.0);
            for (got, want) in [
                (dot_i8(&a, &c, 0.01) as f64, exact_dot(&a, &ci)),
                (portable::dot_i8(&a, &c, 0.01) as f64, exact_dot(&a, &ci)),
                (squared_l2_i8(&a, &c, 0.01) as f64, exact_l2(&a, &ci)),
                (portable::l2_i8(&a, &c, 0.01) as f64, exact_l2(&a, &ci)),
                (dot_f16(&a, &h) as f64, exact_dot(&a, &hf)),
                (portable::dot_f16(&a, &h) as f64, exact_dot(&a, &hf)),
                (squared_l2_f16(&a, &h) as f64, exact_l2(&a, &hf)),
                (portable::l2_f16(&a, &h) as f64, exact_l2(&a, &hf)),
            ] {
                assert!((got - want).abs() <= tol, "codes, n {n}: {got} vs {want}");
            }
        }
    }
}
