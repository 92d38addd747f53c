//! Dequantization of GGML tensor types to f32, following ggml's reference C code
//! (`ggml-quants.c`: `dequantize_row_*`). Blocks are little-endian and packed.

use anyhow::{bail, Result};
use half::{bf16, f16};

/// A GGML tensor type: its id in the file, name, and block geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    name: &'static str,
    /// Values per block.
    block_values: u64,
    /// Bytes per block.
    block_bytes: u64,
}

/// Every type a GGUF file may name (so that an unsupported one is named in errors), with its
/// block size in values and bytes (ggml's `type_traits`).
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K";

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        match TYPES.iter().find(|t| t.0 == id) {
            Some(&(id, name, block_values, block_bytes)) => Ok(Self {
                id,
                name,
                block_values,
                block_bytes,
            }),
            None => bail!("unknown GGML type id {id}"),
        }
    }
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// (values per block, bytes per block)
    pub fn block(&self) -> (u64, u64) {
        (self.block_values, self.block_bytes)
    }
}

/// Dequantizes a whole tensor's bytes (a multiple of the type's block) to f32.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let (values_per_block, bytes_per_block) = ggml_type.block();
    let (values_per_block, bytes_per_block) = (values_per_block as usize, bytes_per_block as usize);
    if !bytes.len().is_multiple_of(bytes_per_block) {
        bail!(
            "{} bytes is not a whole number of {} blocks ({bytes_per_block} bytes each)",
            bytes.len(),
            ggml_type.name()
        );
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ggml_type.name() {
        "F32" => |b, out| out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        "F16" => |b, out| out[0] = f16_at(b, 0),
        "BF16" => |b, out| out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        "Q8_0" => q8_0,
        "Q4_0" => q4_0,
        "Q4_1" => q4_1,
        "Q4_K" => q4_k,
        "Q6_K" => q6_k,
        other => bail!(
            "quant type {other} cannot be dequantized by this importer (supported: {SUPPORTED})"
        ),
    };
    let mut values = vec![0f32; bytes.len() / bytes_per_block * values_per_block];
    for (block, out) in bytes
        .chunks_exact(bytes_per_block)
        .zip(values.chunks_exact_mut(values_per_block))
    {
        block_fn(block, out);
    }
    Ok(values)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// d: f16, then 32 signed bytes: x = d * q.
fn q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (x, &q) in out.iter_mut().zip(&block[2..34]) {
        *x = d * (q as i8) as f32;
    }
}

/// d: f16, 16 bytes of nibbles; the low nibbles are values 0..16, the high ones 16..32.
fn q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (j, &q) in block[2..18].iter().enumerate() {
        out[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        out[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// d, m: f16, then nibbles as in Q4_0: x = d * q + m.
fn q4_1(block: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for (j, &q) in block[4..20].iter().enumerate() {
        out[j] = d * (q & 0x0F) as f32 + m;
        out[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, scales: &[u8]) -> (f32, f32) {
    let (scale, min) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (scale as f32, min as f32)
}

/// Super-block of 256: d, dmin (f16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
/// Each 64 values use 32 bytes: low nibbles then high nibbles, each with its own scale and min.
fn q4_k(block: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let scales = &block[4..16];
    let quants = &block[16..144];
    for chunk in 0..4 {
        let (scale_lo, min_lo) = scale_min_k4(2 * chunk, scales);
        let (scale_hi, min_hi) = scale_min_k4(2 * chunk + 1, scales);
        let q = &quants[32 * chunk..32 * chunk + 32];
        let y = &mut out[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            y[l] = d * scale_lo * (q[l] & 0x0F) as f32 - dmin * min_lo;
            y[l + 32] = d * scale_hi * (q[l] >> 4) as f32 - dmin * min_hi;
        }
    }
}

/// Super-block of 256: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed scales,
/// d (f16). Values are 6-bit, offset by 32, each group of 16 with its own scale.
fn q6_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 208);
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[128 + 32 * half..128 + 32 * half + 32];
        let sc = &block[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_by_hand() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 4; // +4
        block[3] = 0xFE; // -2
        let values = dequantize(GgmlType::from_id(8).unwrap(), &block).unwrap();
        assert_eq!(&values[..3], &[2.0, -1.0, 0.0]);
    }

    #[test]
    fn unsupported_and_partial_blocks_are_named() {
        let q5k = GgmlType::from_id(13).unwrap();
        let err = dequantize(q5k, &[0u8; 176]).unwrap_err().to_string();
        assert!(err.contains("Q5_K") && err.contains("Q6_K"), "{err}");
        let err = dequantize(GgmlType::from_id(2).unwrap(), &[0u8; 17])
            .unwrap_err()
            .to_string();
        assert!(err.contains("Q4_0") && err.contains("17 bytes"), "{err}");
        assert!(GgmlType::from_id(99).is_err());
    }
}
