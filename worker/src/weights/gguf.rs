//! Weights of a GGUF file (llama.cpp's format), memory-mapped. Tensors are found by their
//! HuggingFace names (mapped to llama.cpp's), a shard reads only its rows or its columns, and
//! quantized blocks are split on block boundaries so a shard can keep them quantized.
//!
//! GGUF stores a weight `[out, in]` row by row, each row a run of blocks along `in`: rows slice
//! freely; columns slice only at multiples of the block size (32 or 256 elements).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{DType, Device, Tensor};
use gemma_proto::{Architecture, GgmlType, GgufHeader, GgufTensor};
use memmap2::Mmap;

use super::mapped::{map_file, ReleaseBehind};
use super::{
    candle_error, check_stored, NormWeights, QuantizedMatrix, Slice, TensorSource, EMBED_TOKENS,
};
use crate::error::LoadError;
use crate::q8_matmul::Q8Matrix;

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    header: GgufHeader,
    by_name: HashMap<String, usize>,
    arch: Architecture,
    bytes_read: Arc<AtomicU64>,
}

impl GgufFile {
    pub fn open(path: &Path, arch: Architecture) -> Result<Self, LoadError> {
        // Reading the header checks every tensor's range against the file's size.
        let header = GgufHeader::read_file(path).map_err(gemma_proto::ConfigError::from)?;
        let mmap = map_file(path)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header,
            by_name,
            arch,
            bytes_read: Arc::default(),
        })
    }

    /// The tensor behind HF name `name`, checked against the expected shape and slice.
    fn find(
        &self,
        name: &str,
        shape: &[usize],
        slice: &Slice,
    ) -> Result<(&GgufTensor, GgmlType), LoadError> {
        let gguf = gguf_name(name, self.arch).unwrap_or_else(|| name.to_string());
        let t = self
            .by_name
            .get(&gguf)
            .and_then(|&i| self.header.tensors.get(i))
            .ok_or_else(|| LoadError::MissingTensor {
                tensor: format!("{gguf} ({name})"),
                files: self.path.display().to_string(),
            })?;
        // Whole blocks per row, or the rows could not be sliced.
        let stored_type = t
            .ggml_type
            .filter(|ty| {
                t.shape
                    .last()
                    .is_some_and(|c| c.is_multiple_of(ty.block_size()))
            })
            .ok_or_else(|| format!("ggml type {}", t.type_id));
        let ty = check_stored(&self.path, &gguf, &t.shape, stored_type, shape, slice)?;
        Ok((t, ty))
    }

    /// Byte ranges of `slice` in the map, in file order; None when columns split blocks.
    fn pieces(&self, t: &GgufTensor, ty: GgmlType, slice: &Slice) -> Option<Vec<Range<usize>>> {
        let base = (self.header.data_start + t.offset) as usize;
        let cols = *t.shape.last()?;
        let rows = t.elements() / cols.max(1);
        let row_bytes = ty.row_bytes(cols);
        Some(match slice {
            Slice::Whole => std::iter::once(base..base + rows * row_bytes).collect(),
            Slice::Rows(r) => {
                std::iter::once(base + r.start * row_bytes..base + r.end * row_bytes).collect()
            }
            Slice::Cols(c) => {
                let bs = ty.block_size();
                if !c.start.is_multiple_of(bs) || !c.end.is_multiple_of(bs) {
                    return None;
                }
                let (from, len) = (ty.row_bytes(c.start), ty.row_bytes(c.len()));
                (0..rows)
                    .map(|row| {
                        let at = base + row * row_bytes + from;
                        at..at + len
                    })
                    .collect()
            }
        })
    }

    /// Copies `pieces` into one 8-byte-aligned buffer (what candle's block types need), dropping
    /// the mapped pages as it goes so a load's resident memory stays at its own slice.
    fn gather(&self, pieces: &[Range<usize>]) -> Vec<u64> {
        let total: usize = pieces.iter().map(|r| r.len()).sum();
        let mut out = vec![0u64; total.div_ceil(8)];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        let mut at = 0;
        let mut release = ReleaseBehind::new(&self.mmap);
        for r in pieces {
            bytes[at..at + r.len()].copy_from_slice(&self.mmap[r.clone()]);
            at += r.len();
            release.read(r.clone());
        }
        self.bytes_read.fetch_add(total as u64, Ordering::Relaxed);
        out
    }
}

impl TensorSource for GgufFile {
    /// Dequantizes (or decodes) `slice` of tensor `name` to `dtype`.
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let (t, ty) = self.find(name, shape, &slice)?;
        let Some(pieces) = self.pieces(t, ty, &slice) else {
            // Columns that split blocks: dequantize whole rows, then keep the columns.
            let whole = self.load(name, shape, Slice::Whole, DType::F32, device)?;
            let Slice::Cols(c) = slice else {
                unreachable!("only column slices can split blocks")
            };
            return whole
                .narrow(1, c.start, c.len())
                .and_then(|t| t.contiguous())
                .and_then(|t| t.to_dtype(dtype))
                .map_err(candle_error(name));
        };
        let bytes = self.gather(&pieces);
        let out_shape = slice.shape_of(shape);
        qtensor_from_ggml(
            candle_type(ty),
            bytemuck::cast_slice(&bytes),
            out_shape,
            device,
        )
        .and_then(|q| q.dequantize(device))
        .and_then(|t| t.to_dtype(dtype))
        .map_err(candle_error(name))
    }

    /// `slice` of tensor `name` in its quantized blocks, or None where it is better decoded:
    /// a float tensor, or columns that do not fall on block boundaries.
    ///
    /// Q5_0 blocks are rewritten as Q8_0 blocks holding exactly the same values (the same scale,
    /// the 5-bit codes minus 16 as int8): candle multiplies Q8_0 with SIMD and Q5_0 without.
    /// Where the CPU has AVX512-VNNI, Q8_0 goes to `Q8Matrix` (activations quantized per 32
    /// inputs, as llama.cpp's; candle's fast path there quantizes them per 256).
    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        slice: &Slice,
        device: &Device,
    ) -> Result<Option<QuantizedMatrix>, LoadError> {
        let (t, ty) = self.find(name, shape, slice)?;
        if ty.is_float() {
            return Ok(None);
        }
        let Some(pieces) = self.pieces(t, ty, slice) else {
            tracing::warn!(
                tensor = %t.name,
                ?slice,
                "columns split quantized blocks; this slice is dequantized at load"
            );
            return Ok(None);
        };
        let mut bytes = self.gather(&pieces);
        let mut ty = ty;
        if ty == GgmlType::Q5_0 {
            bytes = q5_0_to_q8_0(bytemuck::cast_slice(&bytes));
            ty = GgmlType::Q8_0;
        }
        let dims = slice.shape_of(shape);
        if ty == GgmlType::Q8_0 && device.is_cpu() {
            let bytes: &[u8] = bytemuck::cast_slice(&bytes);
            if let Some(q8) = Q8Matrix::from_gguf_blocks(
                &bytes[..ty.row_bytes(dims[1]) * dims[0]],
                dims[0],
                dims[1],
            ) {
                return Ok(Some(QuantizedMatrix::Q8(Arc::new(q8))));
            }
        }
        let blocks = qtensor_from_ggml(candle_type(ty), bytemuck::cast_slice(&bytes), dims, device)
            .map_err(candle_error(name))?;
        Ok(Some(QuantizedMatrix::Blocks(Arc::new(blocks))))
    }

    /// llama.cpp's converter adds Gemma's 1 to the norms it writes.
    fn norm_weights(&self) -> NormWeights {
        NormWeights::Multiplier
    }

    fn bytes_read(&self) -> &Arc<AtomicU64> {
        &self.bytes_read
    }

    /// The file's average stored bytes per parameter.
    fn bytes_per_parameter(&self) -> f64 {
        let (bytes, elems) = self.header.tensors.iter().fold((0, 0), |(b, e), t| {
            (b + t.byte_len().unwrap_or(0), e + t.elements())
        });
        bytes as f64 / elems.max(1) as f64
    }
}

/// llama.cpp's name for a HuggingFace Gemma tensor name. Gemma 1's `post_attention_layernorm` is
/// the norm before the MLP (llama.cpp's `ffn_norm`); in Gemma 2 and 3 it follows attention and
/// `pre_feedforward_layernorm` is `ffn_norm`.
pub fn gguf_name(hf: &str, arch: Architecture) -> Option<String> {
    match hf {
        EMBED_TOKENS => return Some("token_embd.weight".to_string()),
        "model.norm.weight" => return Some("output_norm.weight".to_string()),
        _ => {}
    }
    let (layer, tail) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let short = match tail {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "self_attn.q_norm.weight" => "attn_q_norm",
        "self_attn.k_norm.weight" => "attn_k_norm",
        "post_attention_layernorm.weight" if arch == Architecture::Gemma => "ffn_norm",
        "post_attention_layernorm.weight" => "post_attention_norm",
        "pre_feedforward_layernorm.weight" => "ffn_norm",
        "post_feedforward_layernorm.weight" => "post_ffw_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

fn candle_type(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::Bf16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

const Q5_0_BLOCK: usize = 22;
const Q8_0_BLOCK: usize = 34;

/// Q5_0 blocks (f16 scale d, 32 high bits, 16 bytes of low nibbles; x = d * (q - 16)) as Q8_0
/// blocks (f16 scale d, 32 int8; x = d * q) with the same d and q - 16: the same values exactly.
pub fn q5_0_to_q8_0(src: &[u8]) -> Vec<u64> {
    let blocks = src.len() / Q5_0_BLOCK;
    let mut out = vec![0u64; (blocks * Q8_0_BLOCK).div_ceil(8)];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
    for (b, d) in src
        .chunks_exact(Q5_0_BLOCK)
        .zip(dst.chunks_exact_mut(Q8_0_BLOCK))
    {
        d[..2].copy_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        for j in 0..16 {
            let lo = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            d[2 + j] = (lo as i8 - 16) as u8;
            d[2 + j + 16] = (hi as i8 - 16) as u8;
        }
    }
    out
}
