//! A worker of a tp=4 plan holds a quarter of the weights: loading reads only its slices and
//! drops the mapped pages it copied from, so its peak RSS is its shard plus a fixed overhead.

use std::process::Command;

use gemma_testkit::TinyGemma;

/// Process, allocator, RoPE tables and one 8 MiB window of mapped pages (measured: 11-14 MiB).
const FIXED_OVERHEAD_MIB: u64 = 32;

#[test]
fn tp4_worker_peaks_at_a_quarter_of_the_weights() {
    let model = TinyGemma {
        vocab_size: 256_000,
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 64,
        ..TinyGemma::mha_like_7b()
    };
    let dir = tempfile::tempdir().expect("tmp");
    model.write(dir.path()).expect("write model");
    let file_bytes = std::fs::metadata(dir.path().join("model.safetensors"))
        .expect("meta")
        .len();
    assert!(file_bytes >= 400 << 20, "the model must be at least 400 MB");
    for shard in [0, 3] {
        let out = Command::new(env!("CARGO_BIN_EXE_gemma-local"))
            .args(["--model", &dir.path().display().to_string()])
            .args(["--tp", "4", "--only-shard", &shard.to_string()])
            .output()
            .expect("run gemma-local");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        let hwm = report["vm_hwm_kib"].as_u64().expect("VmHWM") << 10;
        let weights = report["weight_bytes"].as_u64().expect("weight bytes");
        let limit = file_bytes / 4 + (FIXED_OVERHEAD_MIB << 20);
        eprintln!(
            "shard {shard}: model {} MiB, shard weights {} MiB, peak RSS {} MiB, limit {} MiB \
             (a quarter + {FIXED_OVERHEAD_MIB} MiB)",
            file_bytes >> 20,
            weights >> 20,
            hwm >> 20,
            limit >> 20
        );
        assert!(
            weights <= file_bytes / 4 + (1 << 20),
            "shard {shard} read {weights} bytes"
        );
        assert!(
            hwm <= limit,
            "shard {shard} peaked at {hwm} bytes > {limit}"
        );
    }
}
