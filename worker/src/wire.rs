//! candle tensors on the wire: dtype and shape in a header, raw little-endian elements after it.

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

/// A frame header for a tensor whose elements travel separately (the data plane): dtype and shape
/// only, `data` empty.
pub fn tensor_header(t: &Tensor) -> Result<pb::TensorData, WireTensorError> {
    Ok(pb::TensorData {
        dtype: dtype_to_wire(t.dtype())? as i32,
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        data: Bytes::new(),
    })
}

/// Runs `f` on a contiguous CPU tensor's elements in place (no copy out of candle).
pub fn with_elements<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R, WireTensorError> {
    let t = t.contiguous().map_err(WireTensorError::candle)?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(WireTensorError("expected a CPU tensor".into()));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(WireTensorError("tensor is not contiguous".into()));
    };
    let values = cpu.as_slice::<T>().map_err(WireTensorError::candle)?;
    Ok(f(&values[start..end]))
}

/// Appends the tensor's elements, little-endian, to `out` with a single copy out of candle's
/// storage (the hosts are little-endian: see the compile-time check below).
pub fn append_elements(t: &Tensor, out: &mut Vec<u8>) -> Result<(), WireTensorError> {
    match t.dtype() {
        DType::F32 => {
            with_elements::<f32, _>(t, |v| out.extend_from_slice(bytemuck::cast_slice(v)))
        }
        DType::BF16 => {
            with_elements::<bf16, _>(t, |v| out.extend_from_slice(bytemuck::cast_slice(v)))
        }
        DType::F16 => {
            with_elements::<f16, _>(t, |v| out.extend_from_slice(bytemuck::cast_slice(v)))
        }
        other => Err(WireTensorError(format!("dtype {other:?} cannot travel"))),
    }
}

/// A zeroed element buffer for a tensor described by `header`, to be filled straight from the
/// socket, and turned into a tensor by [`ElementBuffer::into_tensor`].
pub enum ElementBuffer {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl ElementBuffer {
    /// Holds `numel` elements of `dtype` from now on, reusing this buffer's allocation when the
    /// dtype is the one it already holds (the data plane receives every all-reduce partial of a
    /// link into one of these, so a steady stream of steps allocates nothing here).
    pub fn fit(&mut self, dtype: DType, numel: usize) {
        match (dtype, &mut *self) {
            (DType::BF16, Self::Bf16(v)) => v.resize(numel, bf16::ZERO),
            (DType::F16, Self::F16(v)) => v.resize(numel, f16::ZERO),
            (DType::F32, Self::F32(v)) => v.resize(numel, 0.0),
            (DType::BF16, _) => *self = Self::Bf16(vec![bf16::ZERO; numel]),
            (DType::F16, _) => *self = Self::F16(vec![f16::ZERO; numel]),
            (_, _) => *self = Self::F32(vec![0.0; numel]),
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice_mut(v),
            Self::Bf16(v) => bytemuck::cast_slice_mut(v),
            Self::F16(v) => bytemuck::cast_slice_mut(v),
        }
    }

    pub fn into_tensor(self, dims: Vec<usize>, device: &Device) -> Result<Tensor, WireTensorError> {
        match self {
            Self::F32(v) => Tensor::from_vec(v, dims, device),
            Self::Bf16(v) => Tensor::from_vec(v, dims, device),
            Self::F16(v) => Tensor::from_vec(v, dims, device),
        }
        .map_err(WireTensorError::candle)
    }
}

// The data plane sends elements in memory order as little-endian bytes.
#[cfg(not(target_endian = "little"))]
compile_error!("gemma-worker's data plane assumes a little-endian host");
