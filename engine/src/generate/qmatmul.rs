//! Quantized matrix products for the decoder: `out[rows, n] = x[rows, k] · Wᵀ` with `W` in
//! GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_K, Q3_K or Q2_K (see [`QKind`]) and `x` quantized
//! on the fly to 8 bits per 32-value block (as llama.cpp does), so the inner loop is an
//! integer dot product.
//!
//! At load each weight is repacked into *tiles* of 16 output rows: for every block of 32
//! inputs a tile stores the 16 rows' values interleaved four at a time (one 64-byte vector
//! holds four consecutive inputs of all 16 rows), followed by the 16 rows' scales as f16.
//! One AVX-512 VNNI `vpdpbusd` then multiplies four inputs of 16 rows by the same four
//! activations (a broadcast), so a tile's 16 outputs accumulate in one register without any
//! horizontal sums, and the per-block scales are plain vector loads. A tile is read once per
//! step and reused, from L1, for every row of `x` — a batch of B sequences reads the weights
//! once, not B times.
//!
//! CPUs with AVX2 but without AVX-512 VNNI run the same loop with `vpmaddubsw`/`vpmaddwd`
//! pairs over the same layout; others a portable version. Other GGUF types are rewritten
//! into these at load (`repack`) or, for f16/bf16/f32, run through gemm in f32.

use crate::kernels::{gemm_f32, Parallel};
use crate::team::{team, Parts};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Output rows per tile.
pub const TILE: usize = 16;
/// Inputs per quantization block.
pub const QK: usize = 32;

/// The GGUF block types with a packed integer kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    Q4_0,
    Q4_1,
    Q8_0,
    /// 5-bit values: the low nibbles as Q4_0's, the fifth bits as one 64-bit mask per
    /// 64-byte group (5.5 bits per weight read, where a Q8_0 copy reads 8.5).
    Q5_0,
    /// 5-bit values with a minimum, as GGUF's Q5_1: Q5_0's values and Q4_1's per-row f16
    /// scale and minimum (6 bits per weight read; Q5_K is rewritten into it).
    Q5_1,
    /// Q6_K's 6-bit values read as they are (7 bits per weight read, where the Q8_0 copy
    /// read 8.5): the low nibbles as Q4_0's, the top two bits as 16 bytes per 64-byte group,
    /// and per row and 32-block the super-block's f16 `d` and the two 16-value sub-blocks'
    /// 8-bit scales (the value is `d·sc·(q − 32)`, as in Q6_K). Its GGUF-side block (what
    /// [`PackedMatrix::from_ggml`] takes, written by `repack`) is 36 bytes: `d`, the two
    /// scales, 32 bytes of `q`.
    Q6,
    /// Q3_K's 3-bit values read as they are (4 bits per weight read, where the Q6 blocks
    /// it was rewritten into before read 7): the low bit pairs four groups to a 64-byte
    /// vector, the third bits of all eight groups in one more (group `u` at bit `u` of each
    /// byte: two instructions unpack a group's), and Q6's per-row
    /// f16 `d` and two 8-bit sub-block scales (the value is `d·sc·(q − 4)`, as in Q3_K).
    /// Its GGUF-side block is Q6's 36 bytes with `q` in 0..8.
    Q3,
    /// Q2_K's 2-bit values read as they are (4 bits per weight read, where the Q8_0
    /// requantization it replaces read 8.5 and rounded): Q3's bit pairs, per row the
    /// super-block's f16 `d` and `dmin`, and per 16-value sub-block its 4-bit scale and
    /// minimum (the value is `d·sc·q − dmin·m`, as in Q2_K). Its GGUF-side block is 40
    /// bytes: `d`, the two scales, `dmin`, the two minimums, 32 bytes of `q`.
    Q2,
}

impl QKind {
    /// The GGUF block type of the same layout (none for [`QKind::Q6`], whose 32-value
    /// blocks are ragway's own).
    pub fn ggml_dtype(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q5_0 => Some(GgmlDType::Q5_0),
            Self::Q5_1 => Some(GgmlDType::Q5_1),
            Self::Q6 | Self::Q3 | Self::Q2 => None,
        }
    }

    /// Bytes of one block of 32 values as [`PackedMatrix::from_ggml`] takes it.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q6 | Self::Q3 => 36,
            Self::Q2 => 40,
        }
    }

    /// Bytes of the packed values of one tile block (16 rows × 32 inputs).
    fn tile_value_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 256,
            Self::Q8_0 => 512,
            Self::Q5_0 | Self::Q5_1 => 256 + 64,
            Self::Q6 => 256 + 128,
            Self::Q3 => 128 + 64,
            Self::Q2 => 128,
        }
    }

    /// Bytes of one tile block: values, then 16 f16 scales (and 16 f16 minimums for Q4_1 and
    /// Q5_1, or two rows of 16 8-bit sub-block scales for Q6 and Q3; Q2 adds 16 f16 `dmin`
    /// and two rows of 16 8-bit minimums to those).
    fn tile_block_bytes(self) -> usize {
        self.tile_value_bytes()
            + match self {
                Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => 32,
                Self::Q4_1 | Self::Q5_1 | Self::Q6 | Self::Q3 => 64,
                Self::Q2 => 128,
            }
    }

    /// Whether the kind carries a per-block minimum (`value = d·q + m`).
    fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }
}

const K_Q4_0: u8 = 0;
const K_Q4_1: u8 = 1;
const K_Q8_0: u8 = 2;
const K_Q5_0: u8 = 3;
const K_Q6: u8 = 4;
const K_Q5_1: u8 = 5;
const K_Q3: u8 = 6;
const K_Q2: u8 = 7;

/// Bytes of a kind's packed values and of its whole tile block, for the SIMD kernels'
/// const kind numbers (see [`QKind::tile_value_bytes`], [`QKind::tile_block_bytes`]).
const fn tile_layout(kind: u8) -> (usize, usize) {
    match kind {
        K_Q8_0 => (512, 544),
        K_Q4_1 => (256, 320),
        K_Q5_0 => (320, 352),
        K_Q6 => (384, 448),
        K_Q5_1 => (320, 384),
        K_Q3 => (192, 256),
        K_Q2 => (128, 256),
        _ => (256, 288),
    }
}

/// Activations quantized to 8 bits per block of 32: values, per-block scale and per-block
/// sum of the quantized values (the sum carries the weights' offsets: `-8` for Q4_0, the
/// minimum for Q4_1, `-128` for the unsigned view of Q8_0), and the sum of each block's
/// first 16 (Q6's two sub-blocks have scales of their own).
#[derive(Debug, Default, Clone)]
pub struct QActs {
    rows: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<i32>,
    s_lo: Vec<i32>,
}

impl QActs {
    /// Quantizes `x[rows, k]` (row-major) in place of the previous contents.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) {
        assert_eq!(x.len(), rows * k);
        assert_eq!(k % QK, 0, "inputs must be a multiple of {QK}");
        let nb = k / QK;
        self.rows = rows;
        self.k = k;
        self.qs.resize(rows * k, 0);
        self.d.resize(rows * nb, 0.0);
        self.s.resize(rows * nb, 0);
        self.s_lo.resize(rows * nb, 0);
        type Block<'a> = (&'a [f32], (&'a mut [i8], (&'a mut f32, (&'a mut i32, &'a mut i32))));
        let quantize_block = |(xb, (qb, (d, (s, s_lo)))): Block| {
            // Lane-wise maxima, then one reduction: a scalar fold does not vectorize.
            let mut lanes = [0f32; 8];
            for c in xb.chunks_exact(8) {
                for l in 0..8 {
                    lanes[l] = lanes[l].max(c[l].abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sums = [0i32; 2];
            for (half, (qh, xh)) in qb.chunks_exact_mut(16).zip(xb.chunks_exact(16)).enumerate() {
                for (q, v) in qh.iter_mut().zip(xh) {
                    // Half away from zero as llama.cpp's roundf, written so that it vectorizes.
                    let x = v * inv;
                    let r = (x + 0.5f32.copysign(x)).trunc() as i32;
                    *q = r as i8;
                    sums[half] += r;
                }
            }
            *d = scale;
            *s = sums[0] + sums[1];
            *s_lo = sums[0];
        };
        if rows >= 16 {
            let (qs, d, s, s_lo) = (
                Parts::new(&mut self.qs),
                Parts::new(&mut self.d),
                Parts::new(&mut self.s),
                Parts::new(&mut self.s_lo),
            );
            team().for_ranges(rows * nb, 256, |r| {
                // SAFETY: the ranges of blocks are disjoint, so are their values and sums.
                let (qs, d, s, s_lo) = unsafe {
                    (qs.slice(r.start * QK..r.end * QK), d.slice(r.clone()), s.slice(r.clone()), s_lo.slice(r.clone()))
                };
                x[r.start * QK..r.end * QK]
                    .chunks_exact(QK)
                    .zip(qs.chunks_exact_mut(QK).zip(d.iter_mut().zip(s.iter_mut().zip(s_lo.iter_mut()))))
                    .for_each(quantize_block);
            });
        } else {
            x.chunks_exact(QK)
                .zip(
                    self.qs
                        .chunks_exact_mut(QK)
                        .zip(self.d.iter_mut().zip(self.s.iter_mut().zip(self.s_lo.iter_mut()))),
                )
                .for_each(quantize_block);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A GGUF weight `[n, k]` repacked into 16-row tiles (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    kind: QKind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Repacks GGUF blocks (row-major, `k / 32` blocks per row). `n` must be a multiple of 16
    /// and `k` of 32; callers fall back to f32 otherwise.
    pub fn from_ggml(kind: QKind, n: usize, k: usize, raw: &[u8]) -> Result<Self, String> {
        if n % TILE != 0 || k % QK != 0 {
            return Err(format!("shape [{n}, {k}] does not tile by [{TILE}, {QK}]"));
        }
        let nb = k / QK;
        let bb = kind.ggml_block_bytes();
        if raw.len() != n * nb * bb {
            return Err(format!("{} bytes for a [{n}, {k}] {kind:?} tensor, expected {}", raw.len(), n * nb * bb));
        }
        let tbb = kind.tile_block_bytes();
        let vb = kind.tile_value_bytes();
        let mut data = vec![0u8; n / TILE * nb * tbb];
        data.par_chunks_exact_mut(nb * tbb).enumerate().for_each(|(t, tile)| {
            for lane in 0..TILE {
                let r = t * TILE + lane;
                for b in 0..nb {
                    let src = &raw[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                    let dst = &mut tile[b * tbb..(b + 1) * tbb];
                    let mut vals = [0u8; QK];
                    let (d, m) = match kind {
                        QKind::Q4_0 | QKind::Q4_1 => {
                            let off = if kind == QKind::Q4_1 { 4 } else { 2 };
                            for j in 0..16 {
                                vals[j] = src[off + j] & 0x0F;
                                vals[j + 16] = src[off + j] >> 4;
                            }
                            let m = if kind == QKind::Q4_1 { [src[2], src[3]] } else { [0, 0] };
                            ([src[0], src[1]], m)
                        }
                        QKind::Q8_0 => {
                            for j in 0..QK {
                                vals[j] = src[2 + j] ^ 0x80;
                            }
                            ([src[0], src[1]], [0, 0])
                        }
                        QKind::Q5_0 | QKind::Q5_1 => {
                            // Q5_1: `d`, `m`, then Q5_0's high bits and nibbles.
                            let at = if kind == QKind::Q5_1 { 4 } else { 2 };
                            let qh = u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]]);
                            for j in 0..16 {
                                vals[j] = (src[at + 4 + j] & 0x0F) | (((qh >> j) & 1) as u8) << 4;
                                vals[j + 16] = (src[at + 4 + j] >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
                            }
                            let m = if kind == QKind::Q5_1 { [src[2], src[3]] } else { [0, 0] };
                            ([src[0], src[1]], m)
                        }
                        QKind::Q6 | QKind::Q3 => {
                            let mask = if kind == QKind::Q6 { 0x3F } else { 0x07 };
                            for j in 0..QK {
                                vals[j] = src[4 + j] & mask;
                            }
                            ([src[0], src[1]], [src[2], src[3]])
                        }
                        QKind::Q2 => {
                            for j in 0..QK {
                                vals[j] = src[8 + j] & 3;
                            }
                            // `dmin` and the two minimums.
                            dst[vb + 64 + lane * 2..vb + 64 + lane * 2 + 2].copy_from_slice(&src[4..6]);
                            dst[vb + 96 + lane] = src[6];
                            dst[vb + 112 + lane] = src[7];
                            ([src[0], src[1]], [src[2], src[3]])
                        }
                    };
                    for (kk, &v) in vals.iter().enumerate() {
                        let u = kk / 4;
                        let j = lane * 4 + kk % 4;
                        match kind {
                            QKind::Q8_0 => dst[u * 64 + j] = v,
                            QKind::Q5_0 | QKind::Q5_1 => {
                                dst[(u / 2) * 64 + j] |= (v & 0x0F) << ((u % 2) * 4);
                                dst[256 + u * 8 + j / 8] |= (v >> 4) << (j % 8);
                            }
                            QKind::Q6 => {
                                dst[(u / 2) * 64 + j] |= (v & 0x0F) << ((u % 2) * 4);
                                dst[256 + u * 16 + j % 16] |= (v >> 4) << (2 * (j / 16));
                            }
                            QKind::Q3 => {
                                dst[(u / 4) * 64 + j] |= (v & 3) << ((u % 4) * 2);
                                dst[128 + j] |= (v >> 2) << u;
                            }
                            QKind::Q2 => dst[(u / 4) * 64 + j] |= v << ((u % 4) * 2),
                            _ => dst[(u / 2) * 64 + j] |= v << ((u % 2) * 4),
                        }
                    }
                    dst[vb + lane * 2..vb + lane * 2 + 2].copy_from_slice(&d);
                    if kind.has_min() {
                        dst[vb + 32 + lane * 2..vb + 32 + lane * 2 + 2].copy_from_slice(&m);
                    }
                    if matches!(kind, QKind::Q6 | QKind::Q3 | QKind::Q2) {
                        // The two sub-block scales: row `lane`'s low one, then its high one.
                        dst[vb + 32 + lane] = m[0];
                        dst[vb + 48 + lane] = m[1];
                    }
                }
            }
        });
        Ok(Self { kind, n, k, data })
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `r` of the weight in f32 (an embedding lookup when the matrix is a token table).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() == self.k);
        let nb = self.k / QK;
        let tbb = self.kind.tile_block_bytes();
        let vb = self.kind.tile_value_bytes();
        let (t, lane) = (r / TILE, r % TILE);
        for b in 0..nb {
            let blk = &self.data[(t * nb + b) * tbb..(t * nb + b + 1) * tbb];
            let d = f16_at(blk, vb + lane * 2);
            let m = if self.kind.has_min() { f16_at(blk, vb + 32 + lane * 2) } else { 0.0 };
            // Q6: d·sc of each sub-block, in f32 as ggml computes it (exact: an f16 times an i8).
            let q6_scale = |kk: usize| d * blk[vb + 32 + (kk / 16) * 16 + lane] as i8 as f32;
            for kk in 0..QK {
                let u = kk / 4;
                let j = lane * 4 + kk % 4;
                let v = match self.kind {
                    QKind::Q8_0 => (blk[u * 64 + j] ^ 0x80) as i8 as f32 * d,
                    QKind::Q4_0 => (((blk[(u / 2) * 64 + j] >> ((u % 2) * 4)) & 0x0F) as f32 - 8.0) * d,
                    QKind::Q4_1 => ((blk[(u / 2) * 64 + j] >> ((u % 2) * 4)) & 0x0F) as f32 * d + m,
                    QKind::Q5_0 => (q5_value(blk, u, j) as f32 - 16.0) * d,
                    QKind::Q5_1 => q5_value(blk, u, j) as f32 * d + m,
                    QKind::Q6 => q6_scale(kk) * (q6_value(blk, u, j) as f32 - 32.0),
                    QKind::Q3 => q6_scale(kk) * (q3_value(blk, u, j) as f32 - 4.0),
                    QKind::Q2 => {
                        let min = f16_at(blk, vb + 64 + lane * 2) * blk[vb + 96 + (kk / 16) * 16 + lane] as f32;
                        q6_scale(kk) * pair_value(blk, u, j) as f32 - min
                    }
                };
                out[b * QK + kk] = v;
            }
        }
    }

    /// Where tile `t` (output rows 16t to 16t + 15) starts.
    fn tile(&self, t: usize) -> *const u8 {
        let nb = self.k / QK;
        self.data[t * nb * self.kind.tile_block_bytes()..].as_ptr()
    }

    /// `out[rows, n] = x · Wᵀ` for activations quantized by [`QActs::quantize`].
    pub fn matmul(&self, x: &QActs, out: &mut [f32]) {
        assert_eq!(x.k, self.k, "input width");
        let rows = x.rows;
        assert_eq!(out.len(), rows * self.n, "output size");
        let tiles = self.n / TILE;
        let nb = self.k / QK;
        let optr = SendPtr(out.as_mut_ptr());
        let run = |t: usize| {
            // SAFETY: tile `t` lies in `data` (n / 16 tiles of nb blocks), the kernels read
            // rows < x.rows of x and write columns [16t, 16t + 16) of rows < x.rows of out,
            // which no other tile writes.
            unsafe { run_tile(self.kind, self.tile(t), nb, x, optr.get().add(t * TILE), self.n) }
        };
        let work = tiles as u64 * rows as u64 * self.k as u64 * TILE as u64;
        if work >= 1 << 18 {
            team().for_ranges(tiles, 1, |r| r.for_each(run));
        } else {
            (0..tiles).for_each(run);
        }
    }
}

/// The 6-bit value at byte `j` of group `u` of a Q6 tile block.
fn q6_value(blk: &[u8], u: usize, j: usize) -> u8 {
    let nib = (blk[(u / 2) * 64 + j] >> ((u % 2) * 4)) & 0x0F;
    nib | ((blk[256 + u * 16 + j % 16] >> (2 * (j / 16))) & 3) << 4
}

/// The low bit pair at byte `j` of group `u` of a Q3 or Q2 tile block (the whole value for
/// Q2).
fn pair_value(blk: &[u8], u: usize, j: usize) -> u8 {
    (blk[(u / 4) * 64 + j] >> ((u % 4) * 2)) & 3
}

/// The 3-bit value at byte `j` of group `u` of a Q3 tile block.
fn q3_value(blk: &[u8], u: usize, j: usize) -> u8 {
    pair_value(blk, u, j) | ((blk[128 + j] >> u) & 1) << 2
}

/// The 5-bit value at byte `j` of group `u` of a Q5_0 tile block.
fn q5_value(blk: &[u8], u: usize, j: usize) -> u8 {
    let nib = (blk[(u / 2) * 64 + j] >> ((u % 2) * 4)) & 0x0F;
    nib | ((blk[256 + u * 8 + j / 8] >> (j % 8)) & 1) << 4
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: parallel tasks write disjoint columns of one output buffer that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The widest kernel this CPU runs (`RAGWAY_NO_AVX512`, `RAGWAY_NO_AVX2` step down, for
/// comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Simd {
    Avx512Vnni,
    Avx2,
    Portable,
}

fn simd() -> Simd {
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let off = |var: &str| std::env::var_os(var).is_some();
            if Simd::Avx512Vnni.available() && !off("RAGWAY_NO_AVX512") {
                return Simd::Avx512Vnni;
            }
            if Simd::Avx2.available() && !off("RAGWAY_NO_AVX2") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    })
}

impl Simd {
    /// Whether this CPU has what the kernel needs.
    #[cfg(target_arch = "x86_64")]
    fn available(self) -> bool {
        match self {
            Simd::Avx512Vnni => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vnni")
            }
            Simd::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            Simd::Portable => true,
        }
    }
}

/// Rows of `x` per kernel call: a tile's unpacked block (8 registers) is reused for this many
/// activation rows, each with its own accumulator.
// (8 was measured slower: 8 accumulators plus the 8 unpacked weight vectors spill.)
const ROWS: usize = 4;

/// # Safety
/// `tile` points at a whole tile of `nb` blocks; `out` at column 16t of row 0 of an output
/// with row stride `out_rs` and at least `x.rows` rows.
unsafe fn run_tile(kind: QKind, tile: *const u8, nb: usize, x: &QActs, out: *mut f32, out_rs: usize) {
    run_tile_on(simd(), kind, tile, nb, x, out, out_rs)
}

/// [`run_tile`] on the kernel `with` (which the CPU must have).
///
/// # Safety
/// As [`run_tile`].
unsafe fn run_tile_on(with: Simd, kind: QKind, tile: *const u8, nb: usize, x: &QActs, out: *mut f32, out_rs: usize) {
    let rows = x.rows;
    // Both SIMD kernels take ROWS activation rows per call, then the rest in one call.
    #[cfg(target_arch = "x86_64")]
    macro_rules! rows_through {
        ($m:ident) => {{
            macro_rules! go {
                ($kind:expr) => {{
                    let mut r = 0;
                    while r + ROWS <= rows {
                        $m::tile::<ROWS, { $kind }>(tile, nb, x, r, out, out_rs);
                        r += ROWS;
                    }
                    match rows - r {
                        0 => {}
                        1 => $m::tile::<1, { $kind }>(tile, nb, x, r, out, out_rs),
                        2 => $m::tile::<2, { $kind }>(tile, nb, x, r, out, out_rs),
                        _ => $m::tile::<3, { $kind }>(tile, nb, x, r, out, out_rs),
                    }
                }};
            }
            match kind {
                QKind::Q4_0 => go!(K_Q4_0),
                QKind::Q4_1 => go!(K_Q4_1),
                QKind::Q8_0 => go!(K_Q8_0),
                QKind::Q5_0 => go!(K_Q5_0),
                QKind::Q6 => go!(K_Q6),
                QKind::Q5_1 => go!(K_Q5_1),
                QKind::Q3 => go!(K_Q3),
                QKind::Q2 => go!(K_Q2),
            }
            return;
        }};
    }
    #[cfg(target_arch = "x86_64")]
    match with {
        Simd::Avx512Vnni => rows_through!(avx512),
        Simd::Avx2 => rows_through!(avx2),
        Simd::Portable => {}
    }
    for r in 0..rows {
        portable_tile(kind, tile, nb, x, r, out.add(r * out_rs));
    }
}

/// The same computation as the AVX-512 kernel, one activation row at a time.
unsafe fn portable_tile(kind: QKind, tile: *const u8, nb: usize, x: &QActs, row: usize, out: *mut f32) {
    let tbb = kind.tile_block_bytes();
    let vb = kind.tile_value_bytes();
    let mut acc = [0f32; TILE];
    for b in 0..nb {
        let blk = std::slice::from_raw_parts(tile.add(b * tbb), tbb);
        let a = &x.qs[row * x.k + b * QK..row * x.k + (b + 1) * QK];
        let da = x.d[row * (x.k / QK) + b];
        let sa = x.s[row * (x.k / QK) + b];
        let sa_lo = x.s_lo[row * (x.k / QK) + b];
        for (lane, acc) in acc.iter_mut().enumerate() {
            // The sums over the block's first and second 16 inputs.
            let mut s2 = [0i32; 2];
            for kk in 0..QK {
                let (u, j) = (kk / 4, lane * 4 + kk % 4);
                let w = match kind {
                    QKind::Q8_0 => blk[u * 64 + j],
                    QKind::Q5_0 | QKind::Q5_1 => q5_value(blk, u, j),
                    QKind::Q6 => q6_value(blk, u, j),
                    QKind::Q3 => q3_value(blk, u, j),
                    QKind::Q2 => pair_value(blk, u, j),
                    _ => (blk[(u / 2) * 64 + j] >> ((u % 2) * 4)) & 0x0F,
                };
                s2[kk / 16] += w as i32 * a[kk] as i32;
            }
            let s = s2[0] + s2[1];
            let dw = f16_at(blk, vb + lane * 2);
            match kind {
                QKind::Q6 | QKind::Q3 | QKind::Q2 => {
                    let sc = |h: usize| blk[vb + 32 + h * 16 + lane] as i8 as f32;
                    let off = match kind {
                        QKind::Q6 => 32,
                        QKind::Q3 => 4,
                        _ => 0,
                    };
                    let (lo, hi) = (s2[0] - off * sa_lo, s2[1] - off * (sa - sa_lo));
                    *acc += lo as f32 * (dw * sc(0) * da) + hi as f32 * (dw * sc(1) * da);
                    if kind == QKind::Q2 {
                        let m = |h: usize| blk[vb + 96 + h * 16 + lane] as f32;
                        let dmin = f16_at(blk, vb + 64 + lane * 2);
                        *acc -= dmin * da * (m(0) * sa_lo as f32 + m(1) * (sa - sa_lo) as f32);
                    }
                }
                QKind::Q4_0 => *acc += dw * da * (s - 8 * sa) as f32,
                QKind::Q8_0 => *acc += dw * da * (s - 128 * sa) as f32,
                QKind::Q5_0 => *acc += dw * da * (s - 16 * sa) as f32,
                QKind::Q4_1 | QKind::Q5_1 => {
                    *acc += dw * da * s as f32 + f16_at(blk, vb + 32 + lane * 2) * da * sa as f32
                }
            }
        }
    }
    std::ptr::copy_nonoverlapping(acc.as_ptr(), out, TILE);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{tile_layout, QActs, K_Q2, K_Q3, K_Q4_1, K_Q5_0, K_Q5_1, K_Q6, K_Q8_0, QK};
    use std::arch::x86_64::*;

    /// One tile × `R` activation rows starting at `row0`.
    ///
    /// Kinds with a scale per 16-value sub-block (Q6, Q3, Q2) keep two sums per row, one
    /// per sub-block (groups 0-3 and 4-7), each scaled by its row's sub-block scale.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; pointers as in [`super::run_tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile<const R: usize, const KIND: u8>(
        tile: *const u8,
        nb: usize,
        x: &QActs,
        row0: usize,
        out: *mut f32,
        out_rs: usize,
    ) {
        let (vb, tbb) = tile_layout(KIND);
        let low = _mm512_set1_epi8(0x0F);
        let three = _mm512_set1_epi8(3);
        let four = _mm512_set1_epi8(4);
        let q6_shifts = _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6);
        let mut acc = [_mm512_setzero_ps(); R];
        let k = x.k;
        let xnb = k / QK;
        for b in 0..nb {
            let w = tile.add(b * tbb);
            let mut u = [_mm512_setzero_si512(); 8];
            if KIND == K_Q8_0 {
                for (i, u) in u.iter_mut().enumerate() {
                    *u = _mm512_loadu_si512(w.add(i * 64) as *const __m512i);
                }
            } else if KIND == K_Q2 || KIND == K_Q3 {
                // Bit pairs: group i at bits 2·(i % 4) of the bytes of vector i / 4; Q3's
                // third bits: group i at bit i of the third vector's bytes, moved to bit 2
                // (16-bit shifts by at most 5 keep a byte's bit 2 its own).
                let v = [_mm512_loadu_si512(w as *const __m512i), _mm512_loadu_si512(w.add(64) as *const __m512i)];
                let hv = if KIND == K_Q3 { _mm512_loadu_si512(w.add(128) as *const __m512i) } else { v[0] };
                for (i, u) in u.iter_mut().enumerate() {
                    let pair =
                        _mm512_and_si512(_mm512_srl_epi16(v[i / 4], _mm_cvtsi32_si128(2 * (i % 4) as i32)), three);
                    *u = if KIND == K_Q3 {
                        let third = if i >= 2 {
                            _mm512_srl_epi16(hv, _mm_cvtsi32_si128(i as i32 - 2))
                        } else {
                            _mm512_sll_epi16(hv, _mm_cvtsi32_si128(2 - i as i32))
                        };
                        _mm512_or_si512(pair, _mm512_and_si512(third, four))
                    } else {
                        pair
                    };
                }
            } else {
                for p in 0..4 {
                    let v = _mm512_loadu_si512(w.add(p * 64) as *const __m512i);
                    u[2 * p] = _mm512_and_si512(v, low);
                    u[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
                if KIND == K_Q5_0 || KIND == K_Q5_1 {
                    // Each group's fifth bits: one 64-bit mask, one bit per byte.
                    let sixteen = _mm512_set1_epi8(16);
                    for (i, u) in u.iter_mut().enumerate() {
                        let m = (w.add(256 + i * 8) as *const u64).read_unaligned();
                        *u = _mm512_or_si512(*u, _mm512_maskz_mov_epi8(m, sixteen));
                    }
                }
                if KIND == K_Q6 {
                    // Each group's top two bits: 16 bytes, byte j % 16 holding byte j's at bit
                    // 2·(j / 16). Copied to the four 128-bit lanes, lane l shifted by 2·l.
                    for (i, u) in u.iter_mut().enumerate() {
                        let hb = _mm512_broadcast_i32x4(_mm_loadu_si128(w.add(256 + i * 16) as *const __m128i));
                        let top = _mm512_and_si512(_mm512_srlv_epi64(hb, q6_shifts), three);
                        *u = _mm512_or_si512(*u, _mm512_slli_epi16::<4>(top));
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(vb) as *const __m256i));
            let mw = if KIND == K_Q4_1 || KIND == K_Q5_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(w.add(vb + 32) as *const __m256i))
            } else {
                _mm512_setzero_ps()
            };
            if KIND == K_Q6 || KIND == K_Q3 || KIND == K_Q2 {
                // d·sc of each row's two sub-blocks; the values' offset (Q6 32, Q3 4).
                let sc =
                    |at: usize| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(w.add(at) as *const __m128i)));
                let (lo, hi) = (_mm512_mul_ps(dw, sc(vb + 32)), _mm512_mul_ps(dw, sc(vb + 48)));
                let off = match KIND {
                    K_Q6 => 32,
                    K_Q3 => 4,
                    _ => 0,
                };
                // Q2's minimums (unsigned 4-bit, per row and sub-block) and each row's dmin.
                let (m_lo, m_hi, dmin) = if KIND == K_Q2 {
                    let m = |at: usize| {
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(w.add(at) as *const __m128i)))
                    };
                    (m(vb + 96), m(vb + 112), _mm512_cvtph_ps(_mm256_loadu_si256(w.add(vb + 64) as *const __m256i)))
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps())
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = row0 + r;
                    let a = x.qs.as_ptr().add(row * k + b * QK) as *const i32;
                    let mut s0 = _mm512_setzero_si512();
                    let mut s1 = _mm512_setzero_si512();
                    for i in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, u[i], _mm512_set1_epi32(a.add(i).read_unaligned()));
                        s1 = _mm512_dpbusd_epi32(s1, u[i + 4], _mm512_set1_epi32(a.add(i + 4).read_unaligned()));
                    }
                    let da = _mm512_set1_ps(*x.d.get_unchecked(row * xnb + b));
                    let sa = *x.s.get_unchecked(row * xnb + b);
                    let sa_lo = *x.s_lo.get_unchecked(row * xnb + b);
                    if off != 0 {
                        s0 = _mm512_sub_epi32(s0, _mm512_set1_epi32(off * sa_lo));
                        s1 = _mm512_sub_epi32(s1, _mm512_set1_epi32(off * (sa - sa_lo)));
                    }
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_mul_ps(lo, da), *acc);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_mul_ps(hi, da), *acc);
                    if KIND == K_Q2 {
                        // − dmin·(m_lo·Σa_lo + m_hi·Σa_hi), times the activations' scale.
                        let m = _mm512_fmadd_ps(
                            m_lo,
                            _mm512_set1_ps(sa_lo as f32),
                            _mm512_mul_ps(m_hi, _mm512_set1_ps((sa - sa_lo) as f32)),
                        );
                        *acc = _mm512_fnmadd_ps(m, _mm512_mul_ps(dmin, da), *acc);
                    }
                }
                continue;
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = row0 + r;
                let a = x.qs.as_ptr().add(row * k + b * QK) as *const i32;
                let mut s0 = _mm512_setzero_si512();
                let mut s1 = _mm512_setzero_si512();
                for i in (0..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, u[i], _mm512_set1_epi32(a.add(i).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, u[i + 1], _mm512_set1_epi32(a.add(i + 1).read_unaligned()));
                }
                let mut s = _mm512_add_epi32(s0, s1);
                let da = *x.d.get_unchecked(row * xnb + b);
                let sa = *x.s.get_unchecked(row * xnb + b);
                if KIND == K_Q8_0 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * sa));
                } else if KIND == K_Q5_0 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(16 * sa));
                } else if KIND != K_Q4_1 && KIND != K_Q5_1 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * sa));
                }
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(da)), *acc);
                if KIND == K_Q4_1 || KIND == K_Q5_1 {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(da * sa as f32), *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add((row0 + r) * out_rs), *acc);
        }
    }
}

/// The same tiles on AVX2 (no AVX-512), four activation rows per call as with AVX-512
/// (measured against two, alternating runs: prefill +11–24%, 8 streams +10–45%): each 64-byte group of four inputs × 16 rows is two
/// 256-bit halves (rows 0-7, rows 8-15). `vpmaddubsw` multiplies unsigned weight bytes by
/// the broadcast signed activations and adds pairs to i16, `vpmaddwd` by ones adds those to
/// i32: four inputs per row per lane, as `vpdpbusd` does in one step. Q4 nibbles (≤ 15)
/// cannot saturate the i16 sums; Q8_0 weights go through llama.cpp's sign trick
/// (`|w|` times `a·sign(w)`, at most 2·128·127) and need no offset correction. For the
/// kinds with 16-value sub-block scales (Q6, Q3, Q2) `vpmaddwd` multiplies by each row's
/// sub-block scale instead of by ones, so a block's two sub-blocks meet in one integer sum
/// and a row converts one sum to float per block, not two (Q6's pairs reach 2·63·127, its
/// scaled sums 8·2·16002·128: neither saturates nor overflows).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{tile_layout, QActs, K_Q2, K_Q3, K_Q4_1, K_Q5_0, K_Q5_1, K_Q6, K_Q8_0, QK};
    use std::arch::x86_64::*;

    /// One tile × `R` activation rows starting at `row0`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; pointers as in [`super::run_tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const KIND: u8>(
        tile: *const u8,
        nb: usize,
        x: &QActs,
        row0: usize,
        out: *mut f32,
        out_rs: usize,
    ) {
        let (vb, tbb) = tile_layout(KIND);
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        // Q5_0: byte k of a half takes bit k % 8 of byte k / 8 of its 32-bit mask (shuffles
        // stay within 128-bit lanes: the low lane reads mask bytes 0-1, the high one 2-3).
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sixteen = _mm256_set1_epi8(16);
        let three = _mm256_set1_epi8(3);
        let four = _mm256_set1_epi8(4);
        // Q6: half h of a group takes 128-bit lanes 2h and 2h + 1 of its top bits, shifted
        // by 2·lane (see the AVX-512 kernel).
        let q6_shifts = [_mm256_setr_epi64x(0, 0, 2, 2), _mm256_setr_epi64x(4, 4, 6, 6)];
        // Kinds with a scale per 16-value sub-block multiply it in with `vpmaddwd` (in place
        // of ones), so one integer sum per row and block carries both sub-blocks.
        let sub_scaled = KIND == K_Q6 || KIND == K_Q3 || KIND == K_Q2;
        // A half's scales, permuted so that each 128-bit lane holds its 8 rows' low
        // sub-block scales (bytes 0-7) then high ones (8-15); 32-bit lane j of 128-bit lane
        // L is row 4L + j of the half. These masks put a row's scale (or its two) in the
        // high bytes of the lane's two i16s; an arithmetic shift right by 8 sign-extends.
        let z = -128i8;
        let lo_pairs = _mm256_setr_epi8(
            z, 0, z, 0, z, 1, z, 1, z, 2, z, 2, z, 3, z, 3, z, 4, z, 4, z, 5, z, 5, z, 6, z, 6, z, 7, z, 7,
        );
        let hi_pairs = _mm256_setr_epi8(
            z, 8, z, 8, z, 9, z, 9, z, 10, z, 10, z, 11, z, 11, z, 12, z, 12, z, 13, z, 13, z, 14, z, 14, z, 15, z, 15,
        );
        let lo_hi = _mm256_setr_epi8(
            z, 0, z, 8, z, 1, z, 9, z, 2, z, 10, z, 3, z, 11, z, 4, z, 12, z, 5, z, 13, z, 6, z, 14, z, 7, z, 15,
        );
        let halves = |v: __m256i| [_mm256_permute4x64_epi64::<0x88>(v), _mm256_permute4x64_epi64::<0xDD>(v)];
        let widen = |v: __m256i, mask: __m256i| _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(v, mask));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let k = x.k;
        let xnb = k / QK;
        for b in 0..nb {
            let w = tile.add(b * tbb);
            // `vpmaddwd` multipliers [sub-block][half], and per half each row's two scales
            // side by side (for the offset and minimum terms).
            let mut mult = [[ones; 2]; 2];
            let mut pairs = [_mm256_setzero_si256(); 2];
            if sub_scaled {
                let sc = halves(_mm256_loadu_si256(w.add(vb + 32) as *const __m256i));
                for h in 0..2 {
                    mult[0][h] = widen(sc[h], lo_pairs);
                    mult[1][h] = widen(sc[h], hi_pairs);
                    pairs[h] = widen(sc[h], lo_hi);
                }
            }
            // Sums per row and half.
            let mut s = [[_mm256_setzero_si256(); 2]; R];
            for i in 0..8 {
                let part = if sub_scaled { i / 4 } else { 0 };
                // Group i: inputs 4i..4i+3 of the 16 rows, as two halves of 8 rows.
                let half = |h: usize| -> __m256i {
                    if KIND == K_Q8_0 {
                        _mm256_loadu_si256(w.add(i * 64 + h * 32) as *const __m256i)
                    } else if KIND == K_Q2 || KIND == K_Q3 {
                        // Bit pairs: group i at bits 2·(i % 4) of the bytes of vector i / 4.
                        let v = _mm256_loadu_si256(w.add((i / 4) * 64 + h * 32) as *const __m256i);
                        let pair = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * (i % 4) as i32)), three);
                        if KIND == K_Q2 {
                            return pair;
                        }
                        // Q3's third bits: group i at bit i of the last vector's bytes, shifted
                        // to bit 2 (16-bit shifts by at most 5 keep a byte's bit 2 its own).
                        let hv = _mm256_loadu_si256(w.add(128 + h * 32) as *const __m256i);
                        let third = if i >= 2 {
                            _mm256_srl_epi16(hv, _mm_cvtsi32_si128(i as i32 - 2))
                        } else {
                            _mm256_sll_epi16(hv, _mm_cvtsi32_si128(2 - i as i32))
                        };
                        _mm256_or_si256(pair, _mm256_and_si256(third, four))
                    } else {
                        let v = _mm256_loadu_si256(w.add((i / 2) * 64 + h * 32) as *const __m256i);
                        let nib = if i % 2 == 0 {
                            _mm256_and_si256(v, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), low)
                        };
                        if KIND == K_Q5_0 || KIND == K_Q5_1 {
                            let m = (w.add(256 + i * 8 + h * 4) as *const i32).read_unaligned();
                            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(m), spread);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                            _mm256_or_si256(nib, _mm256_and_si256(set, sixteen))
                        } else if KIND == K_Q6 {
                            let hb =
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(w.add(256 + i * 16) as *const __m128i));
                            let top = _mm256_and_si256(_mm256_srlv_epi64(hb, q6_shifts[h]), three);
                            _mm256_or_si256(nib, _mm256_slli_epi16::<4>(top))
                        } else {
                            nib
                        }
                    }
                };
                let wv = [half(0), half(1)];
                // Q8_0: the signed weights and their magnitudes.
                let signed = [_mm256_xor_si256(wv[0], flip), _mm256_xor_si256(wv[1], flip)];
                for (r, s) in s.iter_mut().enumerate() {
                    let a4 = (x.qs.as_ptr().add((row0 + r) * k + b * QK) as *const i32).add(i).read_unaligned();
                    let a = _mm256_set1_epi32(a4);
                    for h in 0..2 {
                        let p16 = if KIND == K_Q8_0 {
                            _mm256_maddubs_epi16(_mm256_sign_epi8(signed[h], signed[h]), _mm256_sign_epi8(a, signed[h]))
                        } else {
                            _mm256_maddubs_epi16(wv[h], a)
                        };
                        s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(p16, mult[part][h]));
                    }
                }
            }
            let dw = [
                _mm256_cvtph_ps(_mm_loadu_si128(w.add(vb) as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(w.add(vb + 16) as *const __m128i)),
            ];
            let mw = if KIND == K_Q4_1 || KIND == K_Q5_1 {
                [
                    _mm256_cvtph_ps(_mm_loadu_si128(w.add(vb + 32) as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(w.add(vb + 48) as *const __m128i)),
                ]
            } else {
                [_mm256_setzero_ps(); 2]
            };
            if sub_scaled {
                // Q2's minimums, as its scales' pairs.
                let (mins, dmin) = if KIND == K_Q2 {
                    let m = halves(_mm256_loadu_si256(w.add(vb + 96) as *const __m256i));
                    let dmin = |h: usize| _mm256_cvtph_ps(_mm_loadu_si128(w.add(vb + 64 + h * 16) as *const __m128i));
                    ([widen(m[0], lo_hi), widen(m[1], lo_hi)], [dmin(0), dmin(1)])
                } else {
                    ([_mm256_setzero_si256(); 2], [_mm256_setzero_ps(); 2])
                };
                for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                    let row = row0 + r;
                    let da = _mm256_set1_ps(*x.d.get_unchecked(row * xnb + b));
                    let sa = *x.s.get_unchecked(row * xnb + b);
                    let sa_lo = *x.s_lo.get_unchecked(row * xnb + b);
                    // The two sub-blocks' activation sums as i16s (each at most 16·127).
                    let sa_pair = _mm256_set1_epi32(((sa - sa_lo) << 16) | (sa_lo & 0xFFFF));
                    for h in 0..2 {
                        // Σ sc·(q − off)·a = Σ sc·q·a − off·(sc_lo·Σa_lo + sc_hi·Σa_hi).
                        let offsets = _mm256_madd_epi16(pairs[h], sa_pair);
                        let si = match KIND {
                            K_Q6 => _mm256_sub_epi32(s[h], _mm256_slli_epi32::<5>(offsets)),
                            K_Q3 => _mm256_sub_epi32(s[h], _mm256_slli_epi32::<2>(offsets)),
                            _ => s[h],
                        };
                        acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw[h], da), acc[h]);
                        if KIND == K_Q2 {
                            // − dmin·(m_lo·Σa_lo + m_hi·Σa_hi), times the activations' scale.
                            let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins[h], sa_pair));
                            acc[h] = _mm256_fnmadd_ps(m, _mm256_mul_ps(dmin[h], da), acc[h]);
                        }
                    }
                }
                continue;
            }
            for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                let row = row0 + r;
                let da = *x.d.get_unchecked(row * xnb + b);
                let sa = *x.s.get_unchecked(row * xnb + b);
                for h in 0..2 {
                    let mut si = s[h];
                    if KIND == K_Q5_0 {
                        si = _mm256_sub_epi32(si, _mm256_set1_epi32(16 * sa));
                    } else if KIND != K_Q8_0 && KIND != K_Q4_1 && KIND != K_Q5_1 {
                        si = _mm256_sub_epi32(si, _mm256_set1_epi32(8 * sa));
                    }
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw[h], _mm256_set1_ps(da)), acc[h]);
                    if KIND == K_Q4_1 || KIND == K_Q5_1 {
                        acc[h] = _mm256_fmadd_ps(mw[h], _mm256_set1_ps(da * sa as f32), acc[h]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add((row0 + r) * out_rs), acc[0]);
            _mm256_storeu_ps(out.add((row0 + r) * out_rs + 8), acc[1]);
        }
    }
}

/// An f32 weight `[n, k]` (safetensors models, and GGUF types without a packed kernel).
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    n: usize,
    k: usize,
    w: Vec<f32>,
}

impl DenseMatrix {
    pub fn new(n: usize, k: usize, w: Vec<f32>) -> Self {
        assert_eq!(w.len(), n * k);
        Self { n, k, w }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.w[r * self.k..(r + 1) * self.k]
    }

    /// `out[rows, n] = x[rows, k] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.k);
        assert_eq!(out.len(), rows * self.n);
        let (n, k) = (self.n, self.k);
        let optr = SendPtr(out.as_mut_ptr());
        // Column ranges of the output, one product each (the team's threads, not gemm's).
        let cols = if rows * n * k >= 1 << 18 { TILE } else { n };
        team().for_ranges(n, cols, |c| {
            // SAFETY: x is [rows, k] row-major, rows c of W ([n, k] row-major) read as the
            // columns of Wᵀ through strides (row stride 1, column stride k); the output block
            // is columns c of out ([rows, n]), which no other range writes.
            unsafe {
                gemm_f32(
                    rows,
                    c.len(),
                    k,
                    optr.get().add(c.start),
                    n,
                    (x.as_ptr(), k as isize, 1),
                    (self.w.as_ptr().add(c.start * k), 1, k as isize),
                    Parallel::Single,
                );
            }
        });
    }
}

/// Half-precision weights `[n, k]` (f16 or bf16 safetensors and GGUF tensors), kept in half
/// precision: half the memory of f32 and half the bytes read per decode step. Products run
/// in f32 over 16 output rows at a time, each block converted once per call (by a `dot` per
/// row for a few activation rows, by gemm for a prefill).
#[derive(Debug, Clone)]
pub enum HalfWeights {
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

#[derive(Debug, Clone)]
pub struct HalfMatrix {
    n: usize,
    k: usize,
    w: HalfWeights,
}

impl HalfMatrix {
    pub fn new(n: usize, k: usize, w: HalfWeights) -> Self {
        let len = match &w {
            HalfWeights::F16(v) => v.len(),
            HalfWeights::Bf16(v) => v.len(),
        };
        assert_eq!(len, n * k);
        Self { n, k, w }
    }

    /// Rows `r0..r0 + out.len() / k` in f32.
    pub fn rows_f32(&self, r0: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let range = r0 * self.k..r0 * self.k + out.len();
        match &self.w {
            HalfWeights::F16(v) => v[range].convert_to_f32_slice(out),
            HalfWeights::Bf16(v) => v[range].convert_to_f32_slice(out),
        }
    }

    /// `out[rows, n] = x[rows, k] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.k);
        assert_eq!(out.len(), rows * self.n);
        let (n, k) = (self.n, self.k);
        let optr = SendPtr(out.as_mut_ptr());
        thread_local! {
            /// One converted block per thread, reused across calls (no allocation per block).
            static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let run = |b: usize| {
            BLOCK.with_borrow_mut(|w| {
                let r0 = b * TILE;
                let nr = TILE.min(n - r0);
                w.resize(nr * k, 0.0);
                self.rows_f32(r0, w);
                let out = optr.get();
                if rows <= 4 {
                    for r in 0..rows {
                        for c in 0..nr {
                            let v = crate::kernels::dot(&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                            // SAFETY: column r0 + c < n of row r < rows: this block's own.
                            unsafe { *out.add(r * n + r0 + c) = v };
                        }
                    }
                } else {
                    // SAFETY: x is [rows, k]; w is this block's [nr, k] read as its transpose;
                    // the destination is columns [r0, r0 + nr) of out, row stride n.
                    unsafe {
                        gemm_f32(
                            rows,
                            nr,
                            k,
                            out.add(r0),
                            n,
                            (x.as_ptr(), k as isize, 1),
                            (w.as_ptr(), 1, k as isize),
                            Parallel::Single,
                        );
                    }
                }
            })
        };
        let blocks = n.div_ceil(TILE);
        if rows * n * k >= 1 << 18 {
            team().for_each(blocks, run);
        } else {
            (0..blocks).for_each(run);
        }
    }
}

/// A linear layer without bias, in whichever form its weights allow.
#[derive(Debug, Clone)]
pub enum Linear {
    Packed(PackedMatrix),
    Half(HalfMatrix),
    Dense(DenseMatrix),
}

impl Linear {
    pub fn n(&self) -> usize {
        match self {
            Linear::Packed(p) => p.n,
            Linear::Half(h) => h.n,
            Linear::Dense(d) => d.n,
        }
    }

    pub fn k(&self) -> usize {
        match self {
            Linear::Packed(p) => p.k,
            Linear::Half(h) => h.k,
            Linear::Dense(d) => d.k,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Linear::Packed(p) => p.data.len(),
            Linear::Half(h) => h.n * h.k * 2,
            Linear::Dense(d) => d.w.len() * 4,
        }
    }

    /// `out[rows, n] = x[rows, k] · Wᵀ`; `scratch` holds the quantized activations.
    pub fn forward(&self, x: &[f32], rows: usize, scratch: &mut QActs, out: &mut Vec<f32>) {
        out.resize(rows * self.n(), 0.0);
        match self {
            Linear::Packed(p) => {
                scratch.quantize(x, rows, p.k);
                p.matmul(scratch, out);
            }
            Linear::Half(h) => h.matmul(x, rows, out),
            Linear::Dense(d) => d.matmul(x, rows, out),
        }
    }

    /// Row `r` of the weight in f32.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            Linear::Packed(p) => p.dequantize_row(r, out),
            Linear::Half(h) => h.rows_f32(r, out),
            Linear::Dense(d) => out.copy_from_slice(d.row(r)),
        }
    }

    /// Short name of the storage, for logs.
    pub fn describe(&self) -> String {
        match self {
            Linear::Packed(p) => format!("{:?} packed", p.kind),
            Linear::Half(HalfMatrix { w: HalfWeights::F16(_), .. }) => "f16".to_string(),
            Linear::Half(HalfMatrix { w: HalfWeights::Bf16(_), .. }) => "bf16".to_string(),
            Linear::Dense(_) => "f32".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    /// `q` (of type `dtype`, `[n, k]`) rewritten as the loader does and packed.
    fn pack(q: &QTensor, dtype: GgmlDType, n: usize, k: usize) -> PackedMatrix {
        let kind = crate::generate::repack::target(dtype).unwrap();
        let raw = crate::generate::repack::rewrite(dtype, &q.data().unwrap()).unwrap();
        PackedMatrix::from_ggml(kind, n, k, &raw).unwrap()
    }

    /// Packed kernels against candle's own dequantization followed by an f64 product; the
    /// only difference allowed is the 8-bit quantization of the activations.
    fn check(dtype: GgmlDType, n: usize, k: usize, rows: usize) {
        let mut seed = 42u64 + n as u64;
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed) * 3.0).collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        let deq: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let packed = pack(&q, dtype, n, k);
        // dequantize_row reproduces candle's dequantization exactly
        let mut row = vec![0f32; k];
        for r in [0, 5, n - 1] {
            packed.dequantize_row(r, &mut row);
            assert_eq!(&row[..], &deq[r * k..(r + 1) * k], "row {r}");
        }
        let mut acts = QActs::default();
        acts.quantize(&x, rows, k);
        let mut out = vec![0f32; rows * n];
        packed.matmul(&acts, &mut out);
        let mut portable = vec![0f32; rows * n];
        for t in 0..n / TILE {
            for r in 0..rows {
                unsafe {
                    let tile = packed.tile(t);
                    portable_tile(packed.kind, tile, k / QK, &acts, r, portable.as_mut_ptr().add(r * n + t * TILE));
                }
            }
        }
        for r in 0..rows {
            for c in 0..n {
                let exact: f64 = (0..k).map(|i| deq[c * k + i] as f64 * x[r * k + i] as f64).sum::<f64>();
                let got = out[r * n + c] as f64;
                let scale: f64 = (0..k).map(|i| (deq[c * k + i] as f64 * x[r * k + i] as f64).abs()).sum::<f64>();
                assert!((got - exact).abs() <= 0.01 * scale + 1e-3, "{dtype:?} [{r},{c}]: {got} vs {exact}");
                let p = portable[r * n + c];
                assert!((p - out[r * n + c]).abs() <= 1e-4 * (1.0 + p.abs()), "portable {p} vs {}", out[r * n + c]);
            }
        }
    }

    #[test]
    fn q4_0_matches_dequantized_product() {
        check(GgmlDType::Q4_0, 48, 96, 7);
    }

    #[test]
    fn q4_1_matches_dequantized_product() {
        check(GgmlDType::Q4_1, 32, 128, 5);
        check(GgmlDType::Q4_1, 64, 576, 1);
    }

    #[test]
    fn q8_0_matches_dequantized_product() {
        check(GgmlDType::Q8_0, 16, 64, 9);
    }

    /// A row's product does not depend on the other rows of the call (batched decoding must
    /// equal sequential decoding bit for bit).
    #[test]
    fn rows_are_independent_of_the_batch() {
        for dtype in
            [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q6K]
        {
            let (n, k, rows) = (32, 768, 6);
            let mut seed = 7u64;
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
            let packed = pack(&q, dtype, n, k);
            let mut acts = QActs::default();
            acts.quantize(&x, rows, k);
            let mut all = vec![0f32; rows * n];
            packed.matmul(&acts, &mut all);
            for r in 0..rows {
                acts.quantize(&x[r * k..(r + 1) * k], 1, k);
                let mut one = vec![0f32; n];
                packed.matmul(&acts, &mut one);
                assert_eq!(&all[r * n..(r + 1) * n], &one[..], "{dtype:?} row {r}");
            }
        }
    }

    /// Q6_K read as it is (its 256-value super-blocks need `k` a multiple of 256).
    #[test]
    fn q6_matches_dequantized_product() {
        check(GgmlDType::Q6K, 48, 256, 7);
        check(GgmlDType::Q6K, 32, 768, 1);
        check(GgmlDType::Q6K, 16, 512, 4);
    }

    /// Q3_K and Q2_K in tiles of their own (256-value super-blocks), read at 4 bits a weight.
    #[test]
    fn q3k_and_q2k_match_dequantized_product() {
        for (dtype, kind) in [(GgmlDType::Q3K, QKind::Q3), (GgmlDType::Q2K, QKind::Q2)] {
            let x = Tensor::zeros((32, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
            let p = pack(&QTensor::quantize(&x, dtype).unwrap(), dtype, 32, 256);
            assert_eq!((p.kind(), p.size_in_bytes()), (kind, 32 * 256 / 2));
            check(dtype, 48, 256, 7);
            check(dtype, 32, 768, 1);
            check(dtype, 16, 512, 4);
        }
    }

    /// Each x86 kernel this CPU has (whatever `simd()` picked), on every packed kind and on
    /// one to five rows at once, against the portable loop; random activations, and
    /// activations that all quantize to ±127 (no integer sum may overflow or saturate).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_kernel_the_cpu_has_matches_the_portable_one() {
        let kernels: Vec<Simd> = [Simd::Avx512Vnni, Simd::Avx2].into_iter().filter(|k| k.available()).collect();
        let mut ran = 0;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q6K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
        ] {
            let (n, k) = (32, 512);
            let mut seed = 99u64;
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let random: Vec<f32> = (0..5 * k).map(|_| lcg(&mut seed) * 2.0).collect();
            // Every activation at ±127 after quantization: the integer sums at their largest.
            let extreme: Vec<f32> = (0..5 * k).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
            let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
            let packed = pack(&q, dtype, n, k);
            let kind = packed.kind;
            for (x, rows) in [&random, &extreme].into_iter().flat_map(|x| (1..=5).map(move |r| (x, r))) {
                let mut acts = QActs::default();
                acts.quantize(&x[..rows * k], rows, k);
                let run = |with: Simd| {
                    let mut out = vec![0f32; rows * n];
                    for t in 0..n / TILE {
                        unsafe {
                            let tile = packed.tile(t);
                            run_tile_on(with, kind, tile, k / QK, &acts, out.as_mut_ptr().add(t * TILE), n);
                        }
                    }
                    out
                };
                let want = run(Simd::Portable);
                for with in &kernels {
                    let got = run(*with);
                    for (g, p) in got.iter().zip(&want) {
                        assert!((g - p).abs() <= 1e-4 * (1.0 + p.abs()), "{with:?} {kind:?} rows {rows}: {g} vs {p}");
                    }
                    ran += 1;
                }
            }
        }
        eprintln!("{ran} kernel runs checked");
    }

    #[test]
    fn q5_1_matches_dequantized_product() {
        check(GgmlDType::Q5_1, 48, 96, 7);
        check(GgmlDType::Q5_1, 32, 640, 1);
    }

    #[test]
    fn q5_0_matches_dequantized_product() {
        check(GgmlDType::Q5_0, 48, 96, 7);
        check(GgmlDType::Q5_0, 32, 640, 1);
    }

    #[test]
    fn half_matches_f32_on_the_same_values() {
        use half::{bf16, f16};
        for (rows, n, k) in [(1, 40, 64), (3, 33, 96), (9, 48, 128)] {
            let mut seed = 7u64 + rows as u64;
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            for half in [
                HalfWeights::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
                HalfWeights::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            ] {
                let h = HalfMatrix::new(n, k, half);
                let mut wf = vec![0f32; n * k];
                h.rows_f32(0, &mut wf);
                let mut want = vec![0f32; rows * n];
                DenseMatrix::new(n, k, wf).matmul(&x, rows, &mut want);
                let mut got = vec![0f32; rows * n];
                h.matmul(&x, rows, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b} ({rows}x{n}x{k})");
                }
            }
        }
    }

    #[test]
    fn dense_matches_naive() {
        let (n, k, rows) = (5, 7, 3);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.1).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| 1.0 - i as f32 * 0.05).collect();
        let d = DenseMatrix::new(n, k, w.clone());
        let mut out = vec![0f32; rows * n];
        d.matmul(&x, rows, &mut out);
        for r in 0..rows {
            for c in 0..n {
                let e: f32 = (0..k).map(|i| w[c * k + i] * x[r * k + i]).sum();
                assert!((out[r * n + c] - e).abs() < 1e-4);
            }
        }
    }
}
