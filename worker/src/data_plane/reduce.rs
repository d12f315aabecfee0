//! The rank-ordered sum of a stage's all-reduce partials, computed straight from this rank's
//! partial and the buffers its peers' partials were received into. A steady stream of steps
//! allocates one buffer per all-reduce (the sum's own storage) instead of one per peer plus one
//! per addition, and the result is bit for bit what adding the partials as tensors in rank order
//! gives: ((p0 + p1) + p2) + ..., element by element, in the partials' own dtype.

use std::ops::AddAssign;

use candle_core::{Device, Tensor, WithDType};
use half::{bf16, f16};

use crate::error::CollectiveError;
use crate::wire::{with_elements, ElementBuffer};

/// An element type a partial can hold, and how to see it in a received buffer.
trait Summable: WithDType + AddAssign {
    fn received(buf: &ElementBuffer) -> Option<&[Self]>;
}

impl Summable for f32 {
    fn received(buf: &ElementBuffer) -> Option<&[Self]> {
        match buf {
            ElementBuffer::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Summable for bf16 {
    fn received(buf: &ElementBuffer) -> Option<&[Self]> {
        match buf {
            ElementBuffer::Bf16(v) => Some(v),
            _ => None,
        }
    }
}

impl Summable for f16 {
    fn received(buf: &ElementBuffer) -> Option<&[Self]> {
        match buf {
            ElementBuffer::F16(v) => Some(v),
            _ => None,
        }
    }
}

/// The sum over the stage, in rank order, of `mine` (this rank's partial, at `my_rank`) and the
/// peers' partials as `(rank, buffer)`. Every buffer holds exactly `mine`'s shape and dtype (the
/// frame reader checked it).
pub fn rank_ordered_sum(
    mine: &Tensor,
    my_rank: usize,
    peers: &[(usize, &ElementBuffer)],
    device: &Device,
) -> Result<Tensor, CollectiveError> {
    match mine.dtype() {
        candle_core::DType::F32 => sum_as::<f32>(mine, my_rank, peers, device),
        candle_core::DType::BF16 => sum_as::<bf16>(mine, my_rank, peers, device),
        candle_core::DType::F16 => sum_as::<f16>(mine, my_rank, peers, device),
        other => Err(CollectiveError::Mismatch(format!(
            "a partial of dtype {other:?} cannot be summed; f32, bf16 and f16 can"
        ))),
    }
}

fn sum_as<T: Summable>(
    mine: &Tensor,
    my_rank: usize,
    peers: &[(usize, &ElementBuffer)],
    device: &Device,
) -> Result<Tensor, CollectiveError> {
    let mismatch = |what: String| CollectiveError::Mismatch(what);
    let sum = with_elements::<T, _>(mine, |own| -> Result<Vec<T>, CollectiveError> {
        let mut parts: Vec<Option<&[T]>> = vec![None; peers.len() + 1];
        *parts
            .get_mut(my_rank)
            .ok_or_else(|| mismatch(format!("rank {my_rank} outside the stage")))? = Some(own);
        for (rank, buf) in peers {
            let slot = parts
                .get_mut(*rank)
                .ok_or_else(|| mismatch(format!("peer rank {rank} outside the stage")))?;
            let got = T::received(buf)
                .filter(|v| v.len() == own.len())
                .ok_or_else(|| {
                    mismatch(format!("rank {rank}'s partial is not {:?}", mine.shape()))
                })?;
            *slot = Some(got);
        }
        let mut parts = parts
            .into_iter()
            .map(|p| p.ok_or_else(|| mismatch("a rank sent no partial".into())));
        let mut out = parts
            .next()
            .ok_or_else(|| mismatch("no partials".into()))??
            .to_vec();
        for part in parts {
            for (o, x) in out.iter_mut().zip(part?) {
                *o += *x;
            }
        }
        Ok(out)
    })
    .map_err(|e| mismatch(e.to_string()))??;
    Tensor::from_vec(sum, mine.dims(), device).map_err(|e| mismatch(e.to_string()))
}
