//! Quantized copies of the vectors for the graph walk.
//!
//! A graph walk is bound by memory: each point it meets costs a read of its whole vector,
//! from RAM (or the page cache) at a random address. With quantization the walk reads a
//! small code instead — half precision (2 bytes a dimension) or int8 (1 byte a dimension
//! and one scale per vector) — and the candidates it ends with are rescored exactly from
//! the f32 vectors, which stay the one full copy, on disk and mapped. So scores and order
//! of the results are exact; quantization can only change which candidates the walk finds
//! (recall), which `ef` pays for.
//!
//! Int8 codes use one scale per vector (its largest magnitude over 127, rounded to
//! nearest): no training pass, and an upsert never changes the codes of other vectors.
//!
//! A code is stored as whole `u32` words (aligned for the scale and for half values):
//! - int8: the scale (`f32` bits), then the `dim` signed bytes, zero-padded to a word;
//! - f16: the `dim` half values, zero-padded to a word.

use serde::{Deserialize, Serialize};

/// How the graph walk reads vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Quantization {
    /// The f32 vectors themselves (4 bytes a dimension).
    #[default]
    None,
    /// Half precision (2 bytes a dimension), rescored exactly.
    F16,
    /// Signed bytes with a scale per vector (1 byte a dimension), rescored exactly.
    Int8,
}

impl Quantization {
    /// The code's size in `u32` words (0 without quantization).
    pub fn words(self, dim: usize) -> usize {
        match self {
            Quantization::None => 0,
            Quantization::F16 => (2 * dim).div_ceil(4),
            Quantization::Int8 => 1 + dim.div_ceil(4),
        }
    }

    /// The tag saved in a graph file.
    pub(crate) fn tag(self) -> u64 {
        match self {
            Quantization::None => 0,
            Quantization::F16 => 1,
            Quantization::Int8 => 2,
        }
    }

    pub(crate) fn from_tag(tag: u64) -> Option<Self> {
        match tag {
            0 => Some(Quantization::None),
            1 => Some(Quantization::F16),
            2 => Some(Quantization::Int8),
            _ => None,
        }
    }

    /// Writes the code of `v` into `out` (`self.words(v.len())` words).
    pub fn encode(self, v: &[f32], out: &mut [u32]) {
        debug_assert_eq!(out.len(), self.words(v.len()));
        out.iter_mut().for_each(|w| *w = 0);
        match self {
            Quantization::None => {}
            Quantization::F16 => {
                for (i, &x) in v.iter().enumerate() {
                    let h = half::f16::from_f32(x).to_bits() as u32;
                    out[i / 2] |= h << (16 * (i % 2));
                }
            }
            Quantization::Int8 => {
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max > 0.0 && max.is_finite() { max / 127.0 } else { 0.0 };
                out[0] = scale.to_bits();
                for (i, &x) in v.iter().enumerate() {
                    let c = if scale > 0.0 { (x / scale).round().clamp(-127.0, 127.0) as i8 } else { 0 };
                    out[1 + i / 4] |= (c as u8 as u32) << (8 * (i % 4));
                }
            }
        }
    }

    /// The vector a code stands for (tests and checks; the walk never decodes).
    pub fn decode(self, code: &[u32], dim: usize) -> Vec<f32> {
        match self {
            Quantization::None => Vec::new(),
            Quantization::F16 => (0..dim)
                .map(|i| half::f16::from_bits((code[i / 2] >> (16 * (i % 2))) as u16).to_f32())
                .collect(),
            Quantization::Int8 => {
                let scale = f32::from_bits(code[0]);
                (0..dim).map(|i| ((code[1 + i / 4] >> (8 * (i % 4))) as u8 as i8) as f32 * scale).collect()
            }
        }
    }
}

/// The int8 scale and signed bytes of a code (little-endian words).
#[inline]
pub(crate) fn int8_parts(code: &[u32], dim: usize) -> (f32, &[i8]) {
    let bytes = &code[1..];
    // A query of another length never reads past the code.
    let dim = dim.min(4 * bytes.len());
    // SAFETY: `bytes` holds `4 · bytes.len() ≥ dim` initialized bytes; i8 has no alignment
    // or validity requirements.
    let c = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const i8, dim) };
    (f32::from_bits(code[0]), c)
}

/// The half values of a code (little-endian words).
#[inline]
pub(crate) fn f16_parts(code: &[u32], dim: usize) -> &[u16] {
    let dim = dim.min(2 * code.len());
    // SAFETY: the words hold `2 · code.len() ≥ dim` u16s, and u32 alignment suffices for
    // u16.
    unsafe { std::slice::from_raw_parts(code.as_ptr() as *const u16, dim) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decode_close_to_their_vectors() {
        let dim = 37;
        let v: Vec<f32> = (0..dim).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        for q in [Quantization::F16, Quantization::Int8] {
            let mut code = vec![0u32; q.words(dim)];
            q.encode(&v, &mut code);
            let back = q.decode(&code, dim);
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let tol = match q {
                Quantization::F16 => 1e-3,
                _ => max / 127.0 / 2.0 + 1e-6,
            };
            for (a, b) in v.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{q:?}: {a} vs {b}");
            }
        }
        // A zero vector (and a non-finite one) encodes to zeros, not NaNs.
        let mut code = vec![0u32; Quantization::Int8.words(4)];
        Quantization::Int8.encode(&[0.0; 4], &mut code);
        assert!(Quantization::Int8.decode(&code, 4).iter().all(|x| *x == 0.0));
        Quantization::Int8.encode(&[f32::INFINITY, 1.0, 0.0, 0.0], &mut code);
        assert!(Quantization::Int8.decode(&code, 4).iter().all(|x| x.is_finite()));
    }

    #[test]
    fn settings_read_and_write_lowercase_names() {
        for (q, s) in [(Quantization::None, "\"none\""), (Quantization::F16, "\"f16\""), (Quantization::Int8, "\"int8\"")] {
            assert_eq!(serde_json::to_string(&q).unwrap(), s);
            assert_eq!(serde_json::from_str::<Quantization>(s).unwrap(), q);
            assert_eq!(Quantization::from_tag(q.tag()), Some(q));
        }
        assert!(serde_json::from_str::<Quantization>("\"int4\"").is_err());
    }
}
