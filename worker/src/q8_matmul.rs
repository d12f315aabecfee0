//! Q8_0 weights times f32 activations, the activations quantized as llama.cpp quantizes them for
//! Q8_0: one scale per 32 inputs. On AVX512-VNNI CPUs.
//!
//! Why not candle's kernels: its fast x86 path for Q8_0 (repacked, VNNI) quantizes the
//! activations per 256 inputs (Q8_K), so one large activation coarsens 255 others; on
//! gemma-3-270m (whose Q4_K_M file is mostly Q5_0 and Q8_0: 640 columns are not a multiple of
//! 256) that doubled the mean KL divergence from the dequantized model. Its generic Q8_0 path
//! quantizes per 32 but is 2-3x slower with many rows.
//!
//! Layout: output rows in groups of 16 (one 512-bit register holds 16 lanes of 4 bytes); per
//! group and per block of 32 inputs, 8 registers whose lane r holds 4 consecutive weights of row
//! r, stored as `w + 128` (VNNI multiplies unsigned by signed bytes), and 16 f16 scales. One
//! `vpdpbusd` then adds 4 products to each of 16 rows; the `+128` is taken back per block with
//! the activations' block sum. Integer sums are exact, so the result equals the scalar
//! definition (`reference_matmul`) bit for bit.

use std::ops::Range;

use half::f16;

/// Inputs per Q8_0 block.
pub const BLOCK: usize = 32;
/// Output rows per register group.
const GROUP: usize = 16;
/// Bytes of one GGUF Q8_0 block: an f16 scale, then 32 int8.
const BLOCK_BYTES: usize = 2 + BLOCK;
/// Activation rows multiplied per pass over a group's weights (accumulators held in registers).
const ROWS_PER_TILE: usize = 4;

/// 64 bytes, aligned for 512-bit loads.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lanes([u8; 64]);

/// A `[n, k]` Q8_0 matrix repacked for [`Q8Matrix::matmul`].
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `[groups][k / 32][8]`: register t of a block holds inputs 4t..4t+4 of 16 rows.
    weights: Vec<Lanes>,
    /// `[groups][k / 32][16]`: each row's block scale, f16 as in the file (decode is bound by
    /// memory bandwidth: f32 scales would add 6 % to every weight read).
    scales: Vec<f16>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix[{}, {}]", self.n, self.k)
    }
}

/// How [`Q8Matrix::matmul`] lays out its `[m, n]` product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `out[i * n + j]`: a token's outputs together (a projection's).
    RowMajor,
    /// `out[j * m + i]`: an output's tokens together (the lm_head's vocabulary-major logits).
    ColumnMajor,
}

/// Activations quantized per block of 32: `q` `[m, k]`, `d` and `sum128` `[m, k / 32]`.
pub struct QuantizedRows {
    m: usize,
    k: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// 128 x the block's sum of `q`: what the weights' `+128` adds to each block's dot product.
    sum128: Vec<i32>,
}

impl QuantizedRows {
    /// `x` `[m, k]` row-major; `k` a multiple of 32. As llama.cpp's `quantize_row_q8_0`, with
    /// the scale kept in f32: d = max|x| / 127, q = round(x / d).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len() == m * k);
        let kb = k / BLOCK;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * kb];
        let mut sum128 = vec![0i32; m * kb];
        for (b, (xs, qs)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (v, o) in xs.iter().zip(qs.iter_mut()) {
                *o = (v * inv).round() as i8;
                sum += *o as i32;
            }
            d[b] = scale;
            sum128[b] = 128 * sum;
        }
        Self { m, k, q, d, sum128 }
    }

    pub fn rows(&self) -> usize {
        self.m
    }
}

impl Q8Matrix {
    /// Whether this CPU runs the kernel (AVX512F, BW and VNNI).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Repacks GGUF Q8_0 blocks of an `[n, k]` matrix (`n` rows of `k / 32` blocks). None
    /// where the CPU cannot run the kernel, or the bytes do not hold exactly that.
    pub fn from_gguf_blocks(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !Self::available() {
            return None;
        }
        Self::pack(bytes, n, k)
    }

    fn pack(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * (k / BLOCK) * BLOCK_BYTES {
            return None;
        }
        let kb = k / BLOCK;
        let groups = n.div_ceil(GROUP);
        // Rows past n (the last group's) stay zero weights with zero scales.
        let mut weights = vec![Lanes([128; 64]); groups * kb * 8];
        let mut scales = vec![f16::ZERO; groups * kb * GROUP];
        for (row, row_bytes) in bytes.chunks_exact(kb * BLOCK_BYTES).enumerate() {
            let (g, lane) = (row / GROUP, row % GROUP);
            for (b, block) in row_bytes.chunks_exact(BLOCK_BYTES).enumerate() {
                let gb = g * kb + b;
                scales[gb * GROUP + lane] = f16::from_le_bytes([block[0], block[1]]);
                for (i, &w) in block[2..].iter().enumerate() {
                    let (t, j) = (i / 4, i % 4);
                    weights[gb * 8 + t].0[lane * 4 + j] = (w as i8 as i16 + 128) as u8;
                }
            }
        }
        Some(Self {
            n,
            k,
            weights,
            scales,
        })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `r`'s values (scale x int8), into `out` (`k` long): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.k / BLOCK;
        let (g, lane) = (r / GROUP, r % GROUP);
        for (b, block) in out.chunks_exact_mut(BLOCK).enumerate() {
            let gb = g * kb + b;
            let scale = self.scales[gb * GROUP + lane].to_f32();
            for (i, o) in block.iter_mut().enumerate() {
                let w = self.weights[gb * 8 + i / 4].0[lane * 4 + i % 4] as i16 - 128;
                *o = w as f32 * scale;
            }
        }
    }

    /// `x` `[m, k]` times this matrix transposed: `[m, n]` in `layout`.
    pub fn matmul(&self, x: &QuantizedRows, layout: Layout) -> Vec<f32> {
        assert_eq!(x.k, self.k, "activation width");
        let (m, n) = (x.m, self.n);
        let mut out = vec![0f32; m * n];
        let groups = n.div_ceil(GROUP);
        let out_addr = out.as_mut_ptr() as usize;
        // candle's own pool: its workers spin between candle's ops, so work given to another
        // pool would wait for cores they hold; the calling thread takes a share too.
        candle_core::utils::barrier_pool().execute_chunked(groups, |range| {
            for g in range {
                let rows = g * GROUP..((g + 1) * GROUP).min(n);
                // SAFETY: group g writes only outputs of its rows (its columns of every token),
                // which no other group writes; `out` outlives the pool's call.
                let sink = |i: usize, values: &[f32; GROUP]| unsafe {
                    let out = out_addr as *mut f32;
                    for (r, j) in rows.clone().enumerate() {
                        let at = match layout {
                            Layout::RowMajor => i * n + j,
                            Layout::ColumnMajor => j * m + i,
                        };
                        *out.add(at) = values[r];
                    }
                };
                self.group(g, x, sink);
            }
        });
        out
    }

    /// Every activation row through output group `g`.
    fn group(&self, g: usize, x: &QuantizedRows, mut sink: impl FnMut(usize, &[f32; GROUP])) {
        let kb = self.k / BLOCK;
        let weights = &self.weights[g * kb * 8..(g + 1) * kb * 8];
        let scales = &self.scales[g * kb * GROUP..(g + 1) * kb * GROUP];
        let mut i = 0;
        while i < x.m {
            let tile = (x.m - i).min(ROWS_PER_TILE);
            let mut acc = [[0f32; GROUP]; ROWS_PER_TILE];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `from_gguf_blocks` made the matrix only where `available()`; the slices
            // hold kb blocks of the group and `tile` rows of activations from row i.
            unsafe {
                match tile {
                    4 => vnni::tile::<4>(weights, scales, x, i, &mut acc),
                    3 => vnni::tile::<3>(weights, scales, x, i, &mut acc),
                    2 => vnni::tile::<2>(weights, scales, x, i, &mut acc),
                    _ => vnni::tile::<1>(weights, scales, x, i, &mut acc),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            scalar_tile(weights, scales, x, i..i + tile, &mut acc);
            for (t, values) in acc.iter().take(tile).enumerate() {
                sink(i + t, values);
            }
            i += tile;
        }
    }
}

/// The kernel's definition in plain Rust, in the same order of operations: per output, per
/// block, the exact integer dot product, then `acc = int * (w_scale * x_scale) + acc` fused.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn scalar_tile(
    weights: &[Lanes],
    scales: &[f16],
    x: &QuantizedRows,
    rows: Range<usize>,
    acc: &mut [[f32; GROUP]; ROWS_PER_TILE],
) {
    let kb = x.k / BLOCK;
    for (t, i) in rows.enumerate() {
        for (lane, out) in acc[t].iter_mut().enumerate() {
            for b in 0..kb {
                let mut dot = 0i32;
                for e in 0..BLOCK {
                    let w = weights[b * 8 + e / 4].0[lane * 4 + e % 4] as i32;
                    dot += w * x.q[i * x.k + b * BLOCK + e] as i32;
                }
                let dot = dot - x.sum128[i * kb + b];
                let scale = scales[b * GROUP + lane].to_f32() * x.d[i * kb + b];
                *out = (dot as f32).mul_add(scale, *out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Lanes, QuantizedRows, BLOCK, GROUP, ROWS_PER_TILE};

    /// Rows `first..first + R` of `x` through one group (`weights`: kb x 8 registers,
    /// `scales`: kb x 16) into `acc[0..R]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize>(
        weights: &[Lanes],
        scales: &[f16],
        x: &QuantizedRows,
        first: usize,
        acc: &mut [[f32; GROUP]; ROWS_PER_TILE],
    ) {
        let kb = x.k / BLOCK;
        let mut sums = [_mm512_setzero_ps(); R];
        let q = x.q.as_ptr();
        for b in 0..kb {
            let w = weights.as_ptr().add(b * 8) as *const __m512i;
            let regs = [
                _mm512_load_si512(w),
                _mm512_load_si512(w.add(1)),
                _mm512_load_si512(w.add(2)),
                _mm512_load_si512(w.add(3)),
                _mm512_load_si512(w.add(4)),
                _mm512_load_si512(w.add(5)),
                _mm512_load_si512(w.add(6)),
                _mm512_load_si512(w.add(7)),
            ];
            let w_scale = _mm512_cvtph_ps(_mm256_loadu_si256(
                scales.as_ptr().add(b * GROUP) as *const __m256i
            ));
            for (r, sum) in sums.iter_mut().enumerate() {
                let i = first + r;
                let xb = q.add(i * x.k + b * BLOCK) as *const i32;
                let mut dot = _mm512_setzero_si512();
                for (t, reg) in regs.iter().enumerate() {
                    let four = _mm512_set1_epi32(xb.add(t).read_unaligned());
                    dot = _mm512_dpbusd_epi32(dot, *reg, four);
                }
                let dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(x.sum128[i * kb + b]));
                let scale = _mm512_mul_ps(w_scale, _mm512_set1_ps(x.d[i * kb + b]));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *sum);
            }
        }
        for (r, sum) in sums.iter().enumerate() {
            _mm512_storeu_ps(acc[r].as_mut_ptr(), *sum);
        }
    }
}

/// [`Q8Matrix::matmul`] by the scalar definition (tests hold the kernel to it bit for bit).
pub fn reference_matmul(w: &Q8Matrix, x: &QuantizedRows, layout: Layout) -> Vec<f32> {
    let (m, n, kb) = (x.m, w.n, w.k / BLOCK);
    let mut out = vec![0f32; m * n];
    for g in 0..n.div_ceil(GROUP) {
        let weights = &w.weights[g * kb * 8..(g + 1) * kb * 8];
        let scales = &w.scales[g * kb * GROUP..(g + 1) * kb * GROUP];
        for i in 0..m {
            let mut acc = [[0f32; GROUP]; ROWS_PER_TILE];
            scalar_tile(weights, scales, x, i..i + 1, &mut acc);
            for (r, j) in (g * GROUP..((g + 1) * GROUP).min(n)).enumerate() {
                let at = match layout {
                    Layout::RowMajor => i * n + j,
                    Layout::ColumnMajor => j * m + i,
                };
                out[at] = acc[0][r];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma_proto::SplitMix64;

    /// GGUF Q8_0 blocks of an `[n, k]` matrix: random scales (some zero) and int8 in -127..=127.
    fn blocks(n: usize, k: usize, rng: &mut SplitMix64) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n * k / BLOCK {
            let scale = match rng.next_u64() % 8 {
                0 => 0.0,
                s => s as f32 * 1e-3,
            };
            out.extend(f16::from_f32(scale).to_le_bytes());
            out.extend((0..BLOCK).map(|_| ((rng.next_u64() % 255) as i32 - 127) as i8 as u8));
        }
        out
    }

    /// Activations with a few large outliers, as a transformer's have.
    fn activations(m: usize, k: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..m * k)
            .map(|i| {
                let v = (rng.next_u64() % 20001) as f32 / 10000.0 - 1.0;
                if i % 97 == 0 {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn the_kernel_equals_the_scalar_definition_bit_for_bit() {
        if !Q8Matrix::available() {
            eprintln!("skipped: this CPU has no AVX512-VNNI");
            return;
        }
        let mut rng = SplitMix64::new(7);
        // 40 rows: two full groups and a partial one; 1 to 9 tokens: every tile size.
        for (n, k) in [(40, 640), (16, 32), (5, 96)] {
            let w = Q8Matrix::from_gguf_blocks(&blocks(n, k, &mut rng), n, k).unwrap();
            for m in [1, 2, 3, 4, 5, 9] {
                let x = QuantizedRows::quantize(&activations(m, k, &mut rng), m, k);
                for layout in [Layout::RowMajor, Layout::ColumnMajor] {
                    let fast = w.matmul(&x, layout);
                    let slow = reference_matmul(&w, &x, layout);
                    assert!(
                        fast.iter()
                            .zip(&slow)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "n {n} k {k} m {m} {layout:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_dequantize_as_ggml_does() {
        let mut rng = SplitMix64::new(3);
        let (n, k) = (21, 64);
        let bytes = blocks(n, k, &mut rng);
        let w = Q8Matrix::pack(&bytes, n, k).unwrap();
        for r in 0..n {
            let mut row = vec![0f32; k];
            w.dequantize_row(r, &mut row);
            for (b, block) in bytes[r * 2 * BLOCK_BYTES..(r + 1) * 2 * BLOCK_BYTES]
                .chunks_exact(BLOCK_BYTES)
                .enumerate()
            {
                let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                for e in 0..BLOCK {
                    assert_eq!(row[b * BLOCK + e], block[2 + e] as i8 as f32 * scale);
                }
            }
        }
    }

    /// Against f32 arithmetic on the dequantized weights: the only difference is the
    /// activations' rounding, at most half a step of each 32-input block's scale per input.
    #[test]
    fn the_product_is_the_dequantized_product_up_to_activation_rounding() {
        let mut rng = SplitMix64::new(11);
        let (n, k, m) = (24, 128, 3);
        let w = Q8Matrix::pack(&blocks(n, k, &mut rng), n, k).unwrap();
        let xf = activations(m, k, &mut rng);
        let x = QuantizedRows::quantize(&xf, m, k);
        let got = reference_matmul(&w, &x, Layout::RowMajor);
        for i in 0..m {
            for j in 0..n {
                let mut row = vec![0f32; k];
                w.dequantize_row(j, &mut row);
                let exact: f32 = row
                    .iter()
                    .zip(&xf[i * k..(i + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                let bound: f32 = (0..k)
                    .map(|e| row[e].abs() * x.d[i * (k / BLOCK) + e / BLOCK] * 0.5)
                    .sum::<f32>()
                    + 1e-4;
                let diff = (got[i * n + j] - exact).abs();
                assert!(diff <= bound, "[{i}, {j}]: {diff} > {bound}");
            }
        }
    }
}
