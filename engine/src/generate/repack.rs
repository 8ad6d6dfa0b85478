//! GGUF block types the packed kernels do not read directly, rewritten at load into the
//! 32-value blocks they do read, without an f32 copy of the weights (Q4_0, Q4_1, Q5_0, Q5_1
//! and Q8_0 are read as they are):
//!
//! - Q4_K → Q4_1 and Q5_K → Q5_1: each 32-value sub-block's `d·scale` and `dmin·min` become
//!   its f16 scale and minimum (rounded to f16: ~5e-4 relative, far below the 4- or 5-bit
//!   step); the values are the same.
//! - Q6_K → [`QKind::Q6`], exactly: each 32-value sub-block keeps its 6-bit values, its
//!   super-block's `d` and its two 8-bit scales (ragway's own 36-byte block).
//! - Q3_K → [`QKind::Q3`], exactly: Q6's blocks with 3-bit values (`q − 4` for `q − 32`)
//!   and Q3_K's 6-bit scales (`sc − 32`, which an 8-bit scale holds); 4 bits a weight read
//!   where the file has 3.4. Stacked beside Q6_K (Q3_K_M files), Q3_K widens into
//!   [`QKind::Q6`] exactly instead (values `q + 28`).
//! - Q2_K → [`QKind::Q2`], exactly: each 32-value block keeps its 2-bit values, the
//!   super-block's `d` and `dmin` and its two 16-value sub-blocks' 4-bit scales and minimums
//!   (ragway's own 40-byte block); 4 bits a weight read where the file has 2.6.
//! - Matrices of different types stacked into one (Q, K and V; gate and up — K-quant files
//!   mix them) are read as Q8_0: Q5_0 widened exactly (the same f16 scale, the 5-bit values
//!   as 8-bit ones), the others requantized per 32 values as llama.cpp quantizes Q8_0
//!   (`d = max|x| / 127`: an error under an eighth of a 5-bit step).
//!
//! The result is the GGUF byte layout of the target type (Q6's own for Q6_K), for
//! [`PackedMatrix::from_ggml`].
//!
//! [`PackedMatrix::from_ggml`]: super::qmatmul::PackedMatrix::from_ggml

use super::qmatmul::QKind;
use candle_core::quantized::GgmlDType;
use half::f16;

/// The kind that matrices of these types, stacked into one (Q, K and V; gate and up), are read
/// as together: their common [`target`], or Q8_0 when they differ (K-quant files mix them:
/// Q4_K or Q5_0 beside Q6_K or Q8_0): Q5_0 widens into Q8_0 exactly, the others are
/// requantized per 32 values.
pub fn common_target(dtypes: &[GgmlDType]) -> Option<QKind> {
    let kinds: Vec<QKind> = dtypes.iter().map(|&d| target(d)).collect::<Option<_>>()?;
    let first = *kinds.first()?;
    if kinds.iter().all(|&k| k == first) {
        Some(first)
    } else if kinds.iter().all(|&k| matches!(k, QKind::Q3 | QKind::Q6)) {
        Some(QKind::Q6)
    } else {
        Some(QKind::Q8_0)
    }
}

/// [`rewrite`] into `kind`, which is `dtype`'s own target or Q8_0 (see [`common_target`]).
pub fn rewrite_as(
    dtype: GgmlDType,
    kind: QKind,
    raw: &[u8],
    dequantized: impl FnOnce() -> Option<Vec<f32>>,
) -> Option<Vec<u8>> {
    if target(dtype) == Some(kind) {
        rewrite(dtype, raw)
    } else if dtype == GgmlDType::Q5_0 && kind == QKind::Q8_0 {
        q5_0_to_q8_0(raw)
    } else if dtype == GgmlDType::Q3K && kind == QKind::Q6 {
        q3k_blocks(raw, 28)
    } else if kind == QKind::Q8_0 && target(dtype).is_some() {
        Some(quantize_q8_0(&dequantized()?))
    } else {
        None
    }
}

/// The packed kind that `dtype` is read as (itself, or what it is rewritten into).
pub fn target(dtype: GgmlDType) -> Option<QKind> {
    match dtype {
        GgmlDType::Q4_0 => Some(QKind::Q4_0),
        GgmlDType::Q4_1 | GgmlDType::Q4K => Some(QKind::Q4_1),
        GgmlDType::Q5_0 => Some(QKind::Q5_0),
        GgmlDType::Q5_1 | GgmlDType::Q5K => Some(QKind::Q5_1),
        GgmlDType::Q6K => Some(QKind::Q6),
        GgmlDType::Q3K => Some(QKind::Q3),
        GgmlDType::Q8_0 => Some(QKind::Q8_0),
        GgmlDType::Q2K => Some(QKind::Q2),
        _ => None,
    }
}

/// `raw` (whole blocks of `dtype`) in the layout of `target(dtype)` that
/// [`PackedMatrix::from_ggml`] takes. `None` when the bytes are not whole blocks.
///
/// [`PackedMatrix::from_ggml`]: super::qmatmul::PackedMatrix::from_ggml
pub fn rewrite(dtype: GgmlDType, raw: &[u8]) -> Option<Vec<u8>> {
    match dtype {
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => Some(raw.to_vec()),
        GgmlDType::Q4K => q4k_to_q4_1(raw),
        GgmlDType::Q5K => q5k_to_q5_1(raw),
        GgmlDType::Q6K => q6k_to_q6(raw),
        GgmlDType::Q3K => q3k_blocks(raw, 0),
        GgmlDType::Q2K => q2k_blocks(raw),
        _ => None,
    }
}

const Q5_0_BYTES: usize = 22;
const Q8_0_BYTES: usize = 34;
const Q4K_BYTES: usize = 144;
const Q4_1_BYTES: usize = 20;
const Q6K_BYTES: usize = 210;
const Q5K_BYTES: usize = 176;
const Q5_1_BYTES: usize = 24;
const Q6_BYTES: usize = 36;
const Q3K_BYTES: usize = 110;
const Q2K_BYTES: usize = 84;
const Q2_BYTES: usize = 40;

/// `raw` as whole blocks of `block` bytes, each rewritten by `f` (about `out_block` bytes
/// out); `None` when `raw` is not whole blocks.
fn blockwise(raw: &[u8], block: usize, out_block: usize, mut f: impl FnMut(&[u8], &mut Vec<u8>)) -> Option<Vec<u8>> {
    if !raw.len().is_multiple_of(block) {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() / block * out_block);
    for b in raw.chunks_exact(block) {
        f(b, &mut out);
    }
    Some(out)
}

/// Q5_0 (`d`, 32 high bits, 16 bytes of low nibbles) → Q8_0 (`d`, 32 signed bytes).
fn q5_0_to_q8_0(raw: &[u8]) -> Option<Vec<u8>> {
    blockwise(raw, Q5_0_BYTES, Q8_0_BYTES, |b, out| {
        out.extend_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut vals = [0i8; 32];
        for j in 0..16 {
            let hi0 = ((qh >> j) << 4) & 0x10;
            let hi1 = (qh >> (j + 12)) & 0x10;
            vals[j] = ((qs[j] as u32 & 0x0F) | hi0) as i8 - 16;
            vals[j + 16] = ((qs[j] as u32 >> 4) | hi1) as i8 - 16;
        }
        out.extend(vals.iter().map(|&v| v as u8));
    })
}

/// The 6-bit scale and minimum of sub-block `j` of a K-quant's 12 packed scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A K-quant with a scale and a minimum per 32-value sub-block (Q4_K, Q5_K: `d`, `dmin` and
/// 12 scale bytes first; value `d·sc·q − dmin·m`) → eight blocks of `out_block` bytes per
/// super-block of `block`, each `d·sc` and `−dmin·m` as f16, then what `values(super_block,
/// sub, out)` appends.
fn with_scale_and_min(
    raw: &[u8],
    block: usize,
    out_block: usize,
    values: impl Fn(&[u8], usize, &mut Vec<u8>),
) -> Option<Vec<u8>> {
    blockwise(raw, block, 8 * out_block, |b, out| {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
        for sub in 0..8 {
            let (sc, m) = scale_min_k4(sub, &b[4..16]);
            out.extend_from_slice(&f16::from_f32(d * sc as f32).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-dmin * m as f32).to_le_bytes());
            values(b, sub, out);
        }
    })
}

/// Q4_K (256 values: `d`, `dmin`, 12 scale bytes, 128 bytes of nibbles) → eight Q4_1 blocks
/// (`d`, `m`, 16 bytes; value `d·q + m`).
fn q4k_to_q4_1(raw: &[u8]) -> Option<Vec<u8>> {
    with_scale_and_min(raw, Q4K_BYTES, Q4_1_BYTES, |b, sub, out| {
        // 32 bytes: the low nibbles are sub-block 2·pair, the high ones 2·pair + 1.
        let q = &b[16 + (sub / 2) * 32..16 + (sub / 2 + 1) * 32];
        let nib = |l: usize| if sub % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
        for j in 0..16 {
            out.push(nib(j) | (nib(j + 16) << 4));
        }
    })
}

/// Q5_K (256 values: `d`, `dmin`, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of
/// nibbles) → eight Q5_1 blocks (`d`, `m`, 32 fifth bits, 16 bytes; value `d·q + m`).
fn q5k_to_q5_1(raw: &[u8]) -> Option<Vec<u8>> {
    with_scale_and_min(raw, Q5K_BYTES, Q5_1_BYTES, |b, sub, out| {
        // ggml's order: 32 nibble bytes serve two sub-blocks (low nibbles, then high ones);
        // sub-block `sub` takes bit `sub` of each of the 32 fifth-bit bytes.
        let (qh, q) = (&b[16..48], &b[48 + (sub / 2) * 32..48 + (sub / 2 + 1) * 32]);
        let value = |l: usize| -> u8 {
            let nib = if sub % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 };
            nib | ((qh[l] >> sub) & 1) << 4
        };
        let high = (0..32).fold(0u32, |h, l| h | ((value(l) >> 4) as u32) << l);
        out.extend_from_slice(&high.to_le_bytes());
        for l in 0..16 {
            out.push((value(l) & 0x0F) | (value(l + 16) & 0x0F) << 4);
        }
    })
}

/// Q6_K (256 values: 128 bytes of low nibbles, 64 of top bit pairs, 16 8-bit scales, `d`;
/// value `d·sc[i / 16]·(q − 32)`) → eight [`QKind::Q6`] blocks (`d`, the two scales, 32
/// bytes of `q`), the same values exactly.
fn q6k_to_q6(raw: &[u8]) -> Option<Vec<u8>> {
    blockwise(raw, Q6K_BYTES, 8 * Q6_BYTES, |b, out| {
        let (ql, qh, scales, d) = (&b[..128], &b[128..192], &b[192..208], &b[208..210]);
        // ggml's order: each half of 128 values takes 64 nibble bytes and 32 bit-pair bytes.
        let mut q = [0u8; 256];
        for half in 0..2 {
            let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
            for l in 0..32 {
                let y = half * 128 + l;
                q[y] = (ql[l] & 0x0F) | (qh[l] & 3) << 4;
                q[y + 32] = (ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4;
                q[y + 64] = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
                q[y + 96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
            }
        }
        for sub in 0..8 {
            out.extend_from_slice(d);
            out.extend_from_slice(&scales[2 * sub..2 * sub + 2]);
            out.extend_from_slice(&q[sub * 32..(sub + 1) * 32]);
        }
    })
}

/// Q3_K's sixteen 6-bit scales, unpacked from its 12 bytes as ggml does (the low nibbles of
/// the first 8 bytes, then their high nibbles, each with 2 top bits from the last 4 bytes),
/// less 32.
fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a0, a1, top) = (word(0), word(1), word(2));
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let aux = [
        (a0 & LOW4) | ((top & LOW2) << 4),
        (a1 & LOW4) | (((top >> 2) & LOW2) << 4),
        ((a0 >> 4) & LOW4) | (((top >> 4) & LOW2) << 4),
        ((a1 >> 4) & LOW4) | (((top >> 6) & LOW2) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, w) in aux.iter().enumerate() {
        for (j, b) in w.to_le_bytes().iter().enumerate() {
            out[4 * i + j] = *b as i8 - 32;
        }
    }
    out
}

/// The low bit pair of value `y` of a Q3_K or Q2_K super-block from its 64 bytes of pairs,
/// in ggml's order: each half of 128 values takes 32 bytes, four shifts of 32 values.
fn k_bit_pair(qs: &[u8], y: usize) -> u8 {
    let (half, shift, l) = (y / 128, (y % 128) / 32 * 2, y % 32);
    (qs[half * 32 + l] >> shift) & 3
}

/// Q3_K (256 values: 32 bytes of high bits, 64 bytes of bit pairs, 12 bytes of scales, `d`;
/// value `d·(sc[i / 16] − 32)·(q − 4)`, `q` in 0..8) → eight 36-byte blocks (`d`, the two
/// scales, 32 bytes of `q + offset`): [`QKind::Q3`]'s with `offset` 0, [`QKind::Q6`]'s with
/// 28 (so that `q6 − 32 = q − 4`). The same values exactly.
fn q3k_blocks(raw: &[u8], offset: u8) -> Option<Vec<u8>> {
    blockwise(raw, Q3K_BYTES, 8 * Q6_BYTES, |b, out| {
        let (hmask, qs, d) = (&b[..32], &b[32..96], &b[108..110]);
        let scales = q3k_scales(&b[96..108]);
        // The third bit of value `y`: bit `y / 32` of high-bit byte `y % 32`.
        let mut q = [0u8; 256];
        for (y, v) in q.iter_mut().enumerate() {
            let high = (hmask[y % 32] >> (y / 32)) & 1;
            *v = k_bit_pair(qs, y) + 4 * high + offset;
        }
        for sub in 0..8 {
            out.extend_from_slice(d);
            out.extend_from_slice(&[scales[2 * sub] as u8, scales[2 * sub + 1] as u8]);
            out.extend_from_slice(&q[sub * 32..(sub + 1) * 32]);
        }
    })
}

/// Q2_K (256 values: 16 bytes of 4-bit scale and minimum pairs, 64 bytes of bit pairs, `d`,
/// `dmin`; value `d·sc[i / 16]·q − dmin·m[i / 16]`, `q` in 0..4) → eight [`QKind::Q2`]
/// blocks (`d`, the two scales, `dmin`, the two minimums, 32 bytes of `q`), the same values
/// exactly.
fn q2k_blocks(raw: &[u8]) -> Option<Vec<u8>> {
    blockwise(raw, Q2K_BYTES, 8 * Q2_BYTES, |b, out| {
        let (scales, qs, d, dmin) = (&b[..16], &b[16..80], &b[80..82], &b[82..84]);
        let mut q = [0u8; 256];
        for (y, v) in q.iter_mut().enumerate() {
            *v = k_bit_pair(qs, y);
        }
        for sub in 0..8 {
            let (a, c) = (scales[2 * sub], scales[2 * sub + 1]);
            out.extend_from_slice(d);
            out.extend_from_slice(&[a & 0x0F, c & 0x0F]);
            out.extend_from_slice(dmin);
            out.extend_from_slice(&[a >> 4, c >> 4]);
            out.extend_from_slice(&q[sub * 32..(sub + 1) * 32]);
        }
    })
}

/// f32 values (a multiple of 32) → Q8_0 blocks, as ggml's reference quantizer.
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * Q8_0_BYTES);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Values of GGUF blocks of `dtype` read back through candle's own dequantization.
    fn decode(dtype: GgmlDType, raw: &[u8], n: usize) -> Vec<f32> {
        let storage =
            candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(raw), &Device::Cpu, dtype).unwrap();
        let t = QTensor::new(storage, (n,)).unwrap();
        t.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap()
    }

    /// Values of [`QKind::Q2`] blocks, as ggml computes Q2_K's (`d·sc·q − dmin·m` in f32).
    fn decode_q2(raw: &[u8]) -> Vec<f32> {
        raw.chunks_exact(Q2_BYTES)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let dmin = f16::from_le_bytes([b[4], b[5]]).to_f32();
                (0..32).map(move |j| d * b[2 + j / 16] as f32 * b[8 + j] as f32 - dmin * b[6 + j / 16] as f32)
            })
            .collect()
    }

    /// Values of [`QKind::Q6`] (`offset` 32) or [`QKind::Q3`] (4) blocks, as ggml computes
    /// Q6_K's and Q3_K's (`d·sc` in f32, times `q − offset`).
    fn decode_blocks(raw: &[u8], offset: f32) -> Vec<f32> {
        raw.chunks_exact(Q6_BYTES)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                (0..32).map(move |j| d * b[2 + j / 16] as i8 as f32 * (b[4 + j] as f32 - offset))
            })
            .collect()
    }

    fn values(n: usize) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64::new(7);
        (0..n).map(|i| (rng.next_f32() * 2.0 - 1.0) * if i % 97 == 0 { 4.0 } else { 1.0 }).collect()
    }

    #[test]
    fn rewritten_blocks_hold_the_same_values() {
        let n = 4096;
        let x = Tensor::from_vec(values(n), (n,), &Device::Cpu).unwrap();
        for (dtype, tol) in [
            (GgmlDType::Q5_0, 0.0),
            (GgmlDType::Q4K, 2e-3),
            (GgmlDType::Q6K, 0.0),
            (GgmlDType::Q3K, 0.0),
            (GgmlDType::Q2K, 0.0),
            (GgmlDType::Q5K, 2e-3),
            (GgmlDType::Q5_1, 0.0),
        ] {
            let q = QTensor::quantize(&x, dtype).unwrap();
            let raw = q.data().unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
            let kind = target(dtype).unwrap();
            let out = rewrite(dtype, &raw).unwrap();
            let got = match (kind.ggml_dtype(), kind) {
                (Some(dt), _) => decode(dt, &out, n),
                (None, QKind::Q3) => decode_blocks(&out, 4.0),
                (None, QKind::Q2) => decode_q2(&out),
                (None, _) => decode_blocks(&out, 32.0),
            };
            // Errors relative to each 32-value block's largest magnitude.
            let worst = want
                .chunks(32)
                .zip(got.chunks(32))
                .map(|(w, g)| {
                    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    w.iter().zip(g).map(|(a, b)| (a - b).abs() / amax).fold(0f32, f32::max)
                })
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{dtype:?} → {kind:?}: worst error {worst} of the block maximum");
        }
        assert!(rewrite(GgmlDType::Q4K, &[0u8; 143]).is_none());
        assert!(rewrite(GgmlDType::Q6K, &[0u8; 209]).is_none());
        assert!(rewrite(GgmlDType::Q5K, &[0u8; 175]).is_none());
        assert!(rewrite(GgmlDType::Q3K, &[0u8; 109]).is_none());
        assert!(rewrite(GgmlDType::Q2K, &[0u8; 83]).is_none());
    }

    /// Matrices of one type stacked together keep it; of different types (as K-quant files
    /// stack Q, K and V) they are read as Q8_0 — Q5_0 widened exactly, a Q4_K requantized
    /// within an eighth of its step; types without a packed kernel have no common target.
    #[test]
    fn stacked_types_share_a_kind() {
        assert_eq!(common_target(&[GgmlDType::Q5_0, GgmlDType::Q5_0]), Some(QKind::Q5_0));
        assert_eq!(common_target(&[GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q6K]), Some(QKind::Q8_0));
        assert_eq!(common_target(&[GgmlDType::Q6K, GgmlDType::Q6K]), Some(QKind::Q6));
        assert_eq!(common_target(&[GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K]), Some(QKind::Q8_0));
        assert_eq!(common_target(&[GgmlDType::Q5K, GgmlDType::Q5K]), Some(QKind::Q5_1));
        assert_eq!(common_target(&[GgmlDType::Q4_0, GgmlDType::F16]), None);
        let n = 1024;
        let x = Tensor::from_vec(values(n), (n,), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let out = rewrite_as(GgmlDType::Q5_0, QKind::Q8_0, &q.data().unwrap(), || None).unwrap();
        assert_eq!(decode(GgmlDType::Q8_0, &out, n), want);
        assert!(rewrite_as(GgmlDType::Q4_0, QKind::Q8_0, &[0u8; 18], || None).is_none());
        // Q3_K beside Q6_K (as Q3_K_M files have them) share Q6 exactly.
        assert_eq!(common_target(&[GgmlDType::Q3K, GgmlDType::Q3K]), Some(QKind::Q3));
        assert_eq!(common_target(&[GgmlDType::Q3K, GgmlDType::Q6K]), Some(QKind::Q6));
        let q = QTensor::quantize(&x, GgmlDType::Q3K).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let out = rewrite_as(GgmlDType::Q3K, QKind::Q6, &q.data().unwrap(), || None).unwrap();
        assert_eq!(decode_blocks(&out, 32.0), want);
        assert_eq!(common_target(&[GgmlDType::Q2K, GgmlDType::Q2K]), Some(QKind::Q2));
        assert_eq!(common_target(&[GgmlDType::Q2K, GgmlDType::Q3K]), Some(QKind::Q8_0));
        // Requantized into Q8_0: a Q4_K or a Q2_K stacked beside other types.
        for dtype in [GgmlDType::Q4K, GgmlDType::Q2K] {
            let q = QTensor::quantize(&x, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
            let out = rewrite_as(dtype, QKind::Q8_0, &q.data().unwrap(), || Some(want.clone())).unwrap();
            let got = decode(GgmlDType::Q8_0, &out, n);
            for (w, g) in want.chunks(32).zip(got.chunks(32)) {
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half a Q8_0 step, and its f16 scale's rounding.
                assert!(w.iter().zip(g).all(|(a, b)| (a - b).abs() <= amax * (0.5 / 127.0 + 1e-3)), "{dtype:?}");
            }
        }
    }
}
