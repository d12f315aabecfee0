//! candle tensors <-> wire tensors (raw little-endian bytes with dtype and shape).

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use gemma_proto::pb;
use half::{bf16, f16};

use crate::error::WireTensorError;

pub fn dtype_to_wire(d: DType) -> Result<pb::DType, WireTensorError> {
    match d {
        DType::F32 => Ok(pb::DType::DtypeF32),
        DType::BF16 => Ok(pb::DType::DtypeBf16),
        DType::F16 => Ok(pb::DType::DtypeF16),
        other => Err(WireTensorError(format!(
            "dtype {other:?} cannot travel; f32, bf16 and f16 can"
        ))),
    }
}

pub fn dtype_from_wire(d: i32) -> Result<DType, WireTensorError> {
    match pb::DType::try_from(d) {
        Ok(pb::DType::DtypeF32) => Ok(DType::F32),
        Ok(pb::DType::DtypeBf16) => Ok(DType::BF16),
        Ok(pb::DType::DtypeF16) => Ok(DType::F16),
        _ => Err(WireTensorError(format!(
            "unknown dtype {d}; expected f32, bf16 or f16"
        ))),
    }
}

/// Encodes a tensor's elements in row-major order.
pub fn encode_tensor(t: &Tensor) -> Result<pb::TensorData, WireTensorError> {
    let dtype = dtype_to_wire(t.dtype())?;
    let flat = t.flatten_all().map_err(WireTensorError::candle)?;
    let data: Vec<u8> = match t.dtype() {
        DType::BF16 => le_bytes(
            &flat.to_vec1::<bf16>().map_err(WireTensorError::candle)?,
            |v| v.to_le_bytes(),
        ),
        DType::F16 => le_bytes(
            &flat.to_vec1::<f16>().map_err(WireTensorError::candle)?,
            |v| v.to_le_bytes(),
        ),
        _ => le_bytes(
            &flat.to_vec1::<f32>().map_err(WireTensorError::candle)?,
            |v| v.to_le_bytes(),
        ),
    };
    Ok(pb::TensorData {
        dtype: dtype as i32,
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        data: Bytes::from(data),
    })
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&to_le(v));
    }
    out
}

/// Decodes a wire tensor, checking its byte length against dtype and shape.
pub fn decode_tensor(td: &pb::TensorData, device: &Device) -> Result<Tensor, WireTensorError> {
    let dtype = dtype_from_wire(td.dtype)?;
    let dims = td.dims();
    let numel: usize = dims.iter().product();
    if td.data.len() != numel * dtype.size_in_bytes() {
        return Err(WireTensorError(format!(
            "tensor of shape {dims:?} {dtype:?} needs {} bytes, got {}",
            numel * dtype.size_in_bytes(),
            td.data.len()
        )));
    }
    let t = match dtype {
        DType::BF16 => {
            let (e, _) = td.data.as_chunks::<2>();
            Tensor::from_vec(
                e.iter()
                    .map(|&b| bf16::from_le_bytes(b))
                    .collect::<Vec<_>>(),
                dims,
                device,
            )
        }
        DType::F16 => {
            let (e, _) = td.data.as_chunks::<2>();
            Tensor::from_vec(
                e.iter().map(|&b| f16::from_le_bytes(b)).collect::<Vec<_>>(),
                dims,
                device,
            )
        }
        _ => {
            let (e, _) = td.data.as_chunks::<4>();
            Tensor::from_vec(
                e.iter().map(|&b| f32::from_le_bytes(b)).collect::<Vec<_>>(),
                dims,
                device,
            )
        }
    };
    t.map_err(WireTensorError::candle)
}
