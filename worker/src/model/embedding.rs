//! Vocabulary-parallel embedding, tied to the lm_head: rank t holds rows [v0, v1) of the one
//! matrix that both embeds tokens and produces logits. Never scaled in place: the sqrt(hidden)
//! normalizer applies to the embedded activations only.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::{DType, Result, Tensor};

use super::linear::{quantize_rows, Linear};
use super::ShardOptions;
use crate::error::LoadError;
use crate::q8_matmul::{Layout, Q8Matrix};
use crate::weights::{Matrix, QuantizedMatrix, Slice, WeightFiles, EMBED_TOKENS};

#[derive(Debug, Clone)]
enum Table {
    /// [v1 - v0, hidden] in the compute dtype.
    Dense(Tensor),
    /// The rows in their GGUF blocks: looked up by copying a token's row of blocks; `logits`
    /// multiplies by the same blocks.
    Quantized { rows: Arc<QTensor>, logits: Linear },
    /// Q8_0 repacked for `q8_matmul`: rows looked up from the same repacked matrix.
    Q8(Arc<Q8Matrix>),
}

#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding {
    table: Table,
    rows: Range<usize>,
    hidden: usize,
    dtype: DType,
}

impl VocabParallelEmbedding {
    pub fn load(
        files: &WeightFiles,
        vocab: usize,
        hidden: usize,
        rows: Range<usize>,
        opts: &ShardOptions,
    ) -> std::result::Result<Self, LoadError> {
        let table = match files.load_matrix(
            EMBED_TOKENS,
            &[vocab, hidden],
            Slice::Rows(rows.clone()),
            opts.dtype,
            &opts.device,
            opts.quantized,
        )? {
            Matrix::Dense(w) => Table::Dense(w),
            Matrix::Quantized(QuantizedMatrix::Blocks(blocks)) => Table::Quantized {
                rows: blocks.clone(),
                logits: Linear::from_matrix(
                    EMBED_TOKENS,
                    Matrix::Quantized(QuantizedMatrix::Blocks(blocks)),
                )?,
            },
            Matrix::Quantized(QuantizedMatrix::Q8(q8)) => Table::Q8(q8),
        };
        Ok(Self {
            table,
            rows,
            hidden,
            dtype: opts.dtype,
        })
    }

    /// This rank's partial embedding of `tokens`: its rows for tokens in [v0, v1), exact zeros
    /// elsewhere, so the stage's all-reduce reassembles the full embedding bit-exactly.
    pub fn embed_partial(&self, tokens: &[u32]) -> Result<Tensor> {
        let (v0, v1) = (self.rows.start as u32, self.rows.end as u32);
        let local = |t: u32| (v0..v1).contains(&t).then(|| (t - v0) as usize);
        match &self.table {
            Table::Dense(weight) => {
                let device = weight.device();
                let n = tokens.len();
                let ids: Vec<u32> = tokens
                    .iter()
                    .map(|&t| local(t).unwrap_or(0) as u32)
                    .collect();
                let keep: Vec<f32> = tokens
                    .iter()
                    .map(|&t| f32::from(u8::from(local(t).is_some())))
                    .collect();
                let rows = weight.index_select(&Tensor::from_vec(ids, n, device)?, 0)?;
                let keep = Tensor::from_vec(keep, (n, 1), device)?.to_dtype(weight.dtype())?;
                rows.broadcast_mul(&keep)
            }
            Table::Q8(table) => {
                let mut x = vec![0f32; tokens.len() * self.hidden];
                for (t, row) in tokens.iter().zip(x.chunks_exact_mut(self.hidden)) {
                    if let Some(r) = local(*t) {
                        table.dequantize_row(r, row);
                    }
                }
                Tensor::from_vec(x, (tokens.len(), self.hidden), &candle_core::Device::Cpu)?
                    .to_dtype(self.dtype)
            }
            Table::Quantized { rows, .. } => {
                // Copy each token's row of blocks (all-zero blocks decode to zeros in every
                // format), then dequantize the [tokens, hidden] result in one call.
                let data = rows.data()?;
                let row_bytes = data.len() / self.rows.len().max(1);
                let mut buf = vec![0u64; (tokens.len() * row_bytes).div_ceil(8)];
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
                for (i, &t) in tokens.iter().enumerate() {
                    if let Some(r) = local(t) {
                        bytes[i * row_bytes..(i + 1) * row_bytes]
                            .copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                    }
                }
                let device = rows.device();
                let picked = qtensor_from_ggml(
                    rows.dtype(),
                    &bytes[..tokens.len() * row_bytes],
                    vec![tokens.len(), self.hidden],
                    &device,
                )?;
                picked.dequantize(&device)?.to_dtype(self.dtype)
            }
        }
    }

    /// Logits of this rank's vocabulary slice, vocabulary-major, in f32:
    /// hidden [seqs, hidden] -> [v1 - v0, seqs].
    ///
    /// Dense: computed as weight @ hidden^T so the vocabulary is gemm's long side and each weight
    /// element is packed once (hidden @ weight^T re-packed the hidden rows for every slice of the
    /// vocabulary: a quarter of a 64-sequence step went to packing), and left vocabulary-major
    /// because the candidate selection reads it in that order anyway.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.table {
            Table::Dense(weight) => weight.matmul(&hidden.t()?)?.to_dtype(DType::F32),
            Table::Quantized { logits, .. } => logits
                .forward(&hidden.to_dtype(DType::F32)?)?
                .t()?
                .contiguous(),
            // Vocabulary-major straight from the kernel.
            Table::Q8(table) => {
                let seqs = hidden.dim(0)?;
                let xq = quantize_rows(hidden, self.hidden)?;
                let logits = table.matmul(&xq, Layout::ColumnMajor);
                Tensor::from_vec(logits, (table.rows(), seqs), hidden.device())
            }
        }
    }
}
