//! A worker of a tp=4 plan holds a quarter of the weights: loading reads only its slices and
//! drops the mapped pages it copied from, so its peak memory grows with its shard and with
//! nothing else.
//!
//! What a process holds besides its shard (the binary's pages, the allocator's arenas, a stack
//! per thread of candle's pool, the KV cache, RoPE tables) depends on the machine and the build,
//! not on the size of the weights. So the bound compares two models that differ only in their
//! vocabulary, the embedding a quarter of which each shard holds: every part of the process but
//! the weights is the same in both, and the larger model's peak may exceed the smaller one's by
//! its extra shard bytes plus what the mapped pages not yet released can differ by, never more.
//! A load that kept the mapped file resident, or copied the embedding once more on the way,
//! would exceed it by a whole shard.

use std::path::Path;
use std::process::Command;

use gemma_testkit::TinyGemma;

/// The loader drops mapped pages once it has read 8 MiB since the last release, in reads of at
/// most 8 MiB (`RELEASE_EVERY` in worker/src/weights/mapped.rs): at any moment under 16 MiB of
/// the file is resident.
const MAPPED_WINDOW: u64 = 16 << 20;

/// Shaped like a 7B layer stack, scaled down; only `vocab_size` differs between the two models.
fn model(vocab_size: usize) -> TinyGemma {
    TinyGemma {
        vocab_size,
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 64,
        ..TinyGemma::mha_like_7b()
    }
}

/// What one tp=4 shard of the model in `dir` reported: (its weight bytes, its peak RSS bytes).
fn load_shard(dir: &Path, shard: usize) -> (u64, u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_gemma-local"))
        .args(["--model", &dir.display().to_string()])
        .args(["--tp", "4", "--only-shard", &shard.to_string()])
        .output()
        .expect("run gemma-local");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let weights = report["weight_bytes"].as_u64().expect("weight bytes");
    let hwm = report["vm_hwm_kib"].as_u64().expect("VmHWM") << 10;
    (weights, hwm)
}

fn file_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("model.safetensors"))
        .expect("meta")
        .len()
}

#[test]
fn tp4_worker_peaks_at_a_quarter_of_the_weights() {
    let (big, small) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    model(256_000).write(big.path()).expect("write model");
    model(32_000).write(small.path()).expect("write model");
    let big_file = file_bytes(big.path());
    assert!(big_file >= 400 << 20, "the model must be at least 400 MB");
    for shard in [0, 3] {
        let (big_weights, big_peak) = load_shard(big.path(), shard);
        let (small_weights, small_peak) = load_shard(small.path(), shard);
        assert!(
            big_weights <= big_file / 4 + (1 << 20),
            "shard {shard} read {big_weights} of {big_file} bytes"
        );
        let extra_weights = big_weights - small_weights;
        let limit = extra_weights + MAPPED_WINDOW;
        let extra_peak = big_peak.saturating_sub(small_peak);
        eprintln!(
            "shard {shard}: weights {} MiB -> peak {} MiB (small model: {} MiB -> {} MiB, so \
             {} MiB of the process is not weights); extra peak {} MiB <= extra weights {} MiB \
             + {} MiB",
            big_weights >> 20,
            big_peak >> 20,
            small_weights >> 20,
            small_peak >> 20,
            small_peak.saturating_sub(small_weights) >> 20,
            extra_peak >> 20,
            extra_weights >> 20,
            MAPPED_WINDOW >> 20
        );
        assert!(
            extra_peak <= limit,
            "shard {shard}: {extra_weights} more weight bytes raised the peak by {extra_peak} \
             bytes, more than the weights and the {MAPPED_WINDOW}-byte mapped window"
        );
    }
}
