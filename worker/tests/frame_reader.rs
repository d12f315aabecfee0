//! The data-plane frame reader against what a broken or hostile peer can send: random bytes,
//! truncated frames, oversized length prefixes, headers of any kind, op, dtype and shape. It
//! returns an error, never panics, and never allocates more than the frame it expects (checked by
//! a counting allocator: the largest single allocation made while reading).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use candle_core::{DType, Device, Tensor};
use gemma_proto::pb;
use gemma_worker::data_plane::frame::{self, Expected};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;

struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only records sizes in a const-initialised
// thread-local (no allocation of its own).
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// The frame every case expects: an all-reduce partial of [2, 8] f32, operation 0.
const DIMS: [usize; 2] = [2, 8];
const EXPECTED: Expected<'static> = Expected {
    kind: pb::FrameKind::Partial,
    op: 0,
    dims: &DIMS,
    dtype: DType::F32,
};
/// More than any read may allocate: the header limit, prost's decoding of it, and the tensor.
const ALLOCATION_BOUND: usize = 64 << 10;

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Reads one tensor frame from `bytes`; returns the result and the largest allocation made.
fn read(bytes: &[u8]) -> (Result<Tensor, String>, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut buf = Vec::new();
    LARGEST.with(|l| l.set(0));
    let got = rt.block_on(frame::read_tensor(
        &mut &bytes[..],
        &mut buf,
        &EXPECTED,
        &Device::Cpu,
    ));
    let largest = LARGEST.with(Cell::get);
    (got.map_err(|e| e.to_string()), largest)
}

fn frame_bytes(header: &pb::PeerFrame, declared_len: Option<u32>, tail: &[u8]) -> Vec<u8> {
    let encoded = header.encode_to_vec();
    let len = declared_len.unwrap_or(encoded.len() as u32);
    let mut bytes = len.to_le_bytes().to_vec();
    bytes.extend_from_slice(&encoded);
    bytes.extend_from_slice(tail);
    bytes
}

#[test]
fn a_well_formed_frame_round_trips() {
    let t = Tensor::arange(0f32, 16., &Device::Cpu)
        .unwrap()
        .reshape((2, 8))
        .unwrap();
    let mut bytes = Vec::new();
    frame::encode_tensor(&mut bytes, pb::FrameKind::Partial, 0, &t).unwrap();
    let (got, _) = read(&bytes);
    let got = got.unwrap();
    assert_eq!(got.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    // Every strict prefix is an error.
    for cut in 0..bytes.len() {
        assert!(read(&bytes[..cut]).0.is_err(), "prefix of {cut} bytes");
    }
}

#[test]
fn random_bytes_are_refused_without_a_large_allocation() {
    let strategy = prop::collection::vec(any::<u8>(), 0..700);
    runner()
        .run(&strategy, |bytes| {
            let (got, largest) = read(&bytes);
            prop_assert!(largest <= ALLOCATION_BOUND, "allocated {largest} bytes");
            if let Ok(t) = got {
                prop_assert_eq!(t.dims(), &DIMS[..]);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn headers_of_any_shape_and_length_are_refused_unless_expected() {
    let dim = prop_oneof![Just(2u64), Just(8u64), 0..1u64 << 20, any::<u64>()];
    let strategy = (
        0..4i32,
        prop_oneof![Just(0u64), any::<u64>()],
        0..5i32,
        prop::collection::vec(dim, 0..5),
        prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        prop::collection::vec(any::<u8>(), 0..100),
        prop_oneof![Just(None), (0..200usize).prop_map(Some)],
    );
    runner()
        .run(
            &strategy,
            |(kind, op, dtype, shape, declared, tail, cut)| {
                let header = pb::PeerFrame {
                    kind,
                    op,
                    tensor: Some(pb::TensorData {
                        dtype,
                        shape: shape.clone(),
                        data: Default::default(),
                    }),
                };
                let mut bytes = frame_bytes(&header, declared, &tail);
                if let Some(cut) = cut {
                    bytes.truncate(cut);
                }
                let (got, largest) = read(&bytes);
                prop_assert!(largest <= ALLOCATION_BOUND, "allocated {largest} bytes");
                let expected = kind == pb::FrameKind::Partial as i32
                    && op == 0
                    && dtype == pb::DType::DtypeF32 as i32
                    && shape == [2, 8];
                if got.is_ok() {
                    prop_assert!(expected, "accepted {header:?}");
                    prop_assert!(tail.len() >= 64);
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn hellos_are_bounded() {
    let strategy = prop::collection::vec(any::<u8>(), 0..300);
    runner()
        .run(&strategy, |bytes| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            LARGEST.with(|l| l.set(0));
            let _ = rt.block_on(frame::read_hello(&mut &bytes[..]));
            let largest = LARGEST.with(Cell::get);
            prop_assert!(largest <= ALLOCATION_BOUND, "allocated {largest} bytes");
            Ok(())
        })
        .unwrap();
    // A length prefix past the cap is refused before anything is read after it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let huge = u32::MAX.to_le_bytes();
    let e = rt.block_on(frame::read_hello(&mut &huge[..])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "a hello of 4294967295 bytes exceeds the limit of 128"
    );
}
