//! Frames on a data-plane connection, and the bounds that keep a peer (or a stranger) from making
//! this worker allocate what it did not ask for.
//!
//! A hello is a u32 little-endian length and a prost `PeerHello`. A tensor frame is a u32
//! little-endian header length, a prost `PeerFrame` header (kind, operation number, dtype, shape;
//! its data field empty), then the raw little-endian elements. Every length read from the wire is
//! checked before anything is allocated for it: a hello and a header against a few hundred bytes,
//! a tensor's shape against the one the operation expects (the reader knows it: an all-reduce
//! partial has this rank's own partial's shape, a hand-off `[tokens of the step, hidden]`).

use candle_core::{DType, Device, Tensor};
use gemma_proto::pb;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{FrameError, WireTensorError};
use crate::wire::{append_elements, dtype_from_wire, tensor_header, ElementBuffer};

/// Largest hello accepted: a shard index and a session are a few dozen bytes.
pub const MAX_HELLO_BYTES: usize = 128;
/// Largest tensor-frame header accepted: kind, op number, dtype and a shape of a few dimensions.
pub const MAX_HEADER_BYTES: usize = 512;

/// What the reader of a tensor frame expects: anything else is refused before its elements are
/// read (and so before any buffer is sized from the peer's numbers).
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub kind: pb::FrameKind,
    pub op: u64,
    pub dims: &'a [usize],
    pub dtype: DType,
}

/// Encodes a tensor frame into `buf` (cleared first): header length, header, elements. Encoded
/// once per operation and written to every peer.
pub fn encode_tensor(
    buf: &mut Vec<u8>,
    kind: pb::FrameKind,
    op: u64,
    t: &Tensor,
) -> Result<(), WireTensorError> {
    let header = pb::PeerFrame {
        kind: kind as i32,
        op,
        tensor: Some(tensor_header(t)?),
    };
    buf.clear();
    put_length_prefixed(buf, &header);
    append_elements(t, buf)
}

/// A hello, length-prefixed.
pub fn encode_hello(hello: &pb::PeerHello) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4 + hello.encoded_len());
    put_length_prefixed(&mut buf, hello);
    buf
}

fn put_length_prefixed(buf: &mut Vec<u8>, msg: &impl Message) {
    buf.extend_from_slice(&(msg.encoded_len() as u32).to_le_bytes());
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = msg.encode(buf);
}

/// Reads one hello (at most [`MAX_HELLO_BYTES`]).
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<pb::PeerHello, FrameError> {
    let mut buf = Vec::new();
    read_prefixed(r, &mut buf, "hello", MAX_HELLO_BYTES).await?;
    pb::PeerHello::decode(&buf[..]).map_err(|e| FrameError::Malformed(format!("hello: {e}")))
}

/// Reads one tensor frame (header into `buf`, reused across frames) into a new tensor of the
/// expected shape.
pub async fn read_tensor<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    expected: &Expected<'_>,
    device: &Device,
) -> Result<Tensor, FrameError> {
    let mut elements = ElementBuffer::F32(Vec::new());
    read_elements_into(r, buf, expected, &mut elements).await?;
    elements
        .into_tensor(expected.dims.to_vec(), device)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one tensor frame's elements into `elements` (reused across frames: after the first
/// frame of a shape nothing is allocated), once its header is the expected one. The elements'
/// shape is `expected.dims`.
pub async fn read_elements_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    expected: &Expected<'_>,
    elements: &mut ElementBuffer,
) -> Result<(), FrameError> {
    read_prefixed(r, buf, "frame header", MAX_HEADER_BYTES).await?;
    let frame = pb::PeerFrame::decode(&buf[..])
        .map_err(|e| FrameError::Malformed(format!("frame header: {e}")))?;
    check_header(&frame, expected)?;
    elements.fit(expected.dtype, expected.dims.iter().product());
    r.read_exact(elements.bytes_mut()).await?;
    Ok(())
}

/// The frame's tensor header, once kind, operation, dtype and shape are the expected ones.
fn check_header<'f>(
    frame: &'f pb::PeerFrame,
    expected: &Expected<'_>,
) -> Result<&'f pb::TensorData, FrameError> {
    let unexpected = |found: String| FrameError::Unexpected {
        expected: format!(
            "{:?} op {} {:?} {:?}",
            expected.kind, expected.op, expected.dims, expected.dtype
        ),
        found,
    };
    if frame.kind != expected.kind as i32 || frame.op != expected.op {
        return Err(unexpected(format!("kind {} op {}", frame.kind, frame.op)));
    }
    let header = frame
        .tensor
        .as_ref()
        .ok_or_else(|| FrameError::Malformed("frame without tensor header".into()))?;
    let dtype = dtype_from_wire(header.dtype).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let same_shape = header.shape.len() == expected.dims.len()
        && header
            .shape
            .iter()
            .zip(expected.dims)
            .all(|(&got, &want)| got == want as u64);
    if dtype != expected.dtype || !same_shape {
        return Err(unexpected(format!("{:?} {dtype:?}", header.shape)));
    }
    Ok(header)
}

/// Reads a u32 length and that many bytes into `buf`, refusing a length over `limit` before
/// allocating.
async fn read_prefixed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    what: &'static str,
    limit: usize,
) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLong { what, len, limit });
    }
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(())
}
