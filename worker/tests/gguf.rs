//! GGUF models: the config comes from the metadata, each shard reads only its rows or columns,
//! quantized blocks are split on block boundaries (or dequantized where a split would cut a
//! block), and every plan agrees with the plain reference run on the values the file holds.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use gemma_proto::{KvBlockManager, ModelConfig, PlanRequest, SplitMix64};
use gemma_testkit::compare::{logit_range, max_abs_diff};
use gemma_testkit::reference::NaiveGemma;
use gemma_testkit::{generate_greedy, GreedyOptions, GreedyOutput, LocalCluster, TinyGemma};
use gemma_worker::weights::gguf::q5_0_to_q8_0;
use gemma_worker::weights::QuantizedWeights;
use gemma_worker::{ModelFolder, ShardOptions};

const NEW_TOKENS: usize = 16;
const VOCAB: usize = 2048;

/// Shaped like gemma-3-270m but smaller: hidden 320 is not a multiple of 256, so its inputs take
/// Q8_0 (the worker's own kernel on AVX512-VNNI machines) and K-quants appear only where the
/// input dimension allows them. With tp=2 the row-parallel inputs (512 attention, 512 MLP
/// columns) split into 256-column halves, as gemma-3-270m's (1024, 2048) do up to tp=4: the
/// K-quant kernels quantize activations in blocks of 256, so such splits quantize exactly as
/// one process does.
fn tiny() -> TinyGemma {
    TinyGemma {
        vocab_size: VOCAB,
        hidden_size: 320,
        intermediate_size: 512,
        num_hidden_layers: 6,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 128,
        sliding_pattern: 6,
        query_pre_attn_scalar: 128.0,
        seed: 270,
        ..TinyGemma::gemma3_like()
    }
}

/// The mix of types llama.cpp's Q4_K_M gives gemma-3-270m, within what the shapes allow: Q5_0
/// (rewritten as Q8_0 at load), Q8_0, and Q6_K whose 256-element blocks tp=4 would cut.
fn quant(name: &str) -> GgmlDType {
    if name.ends_with("k_proj.weight") || name.ends_with("gate_proj.weight") {
        GgmlDType::Q5_0
    } else if name.ends_with("down_proj.weight") {
        GgmlDType::Q6K
    } else {
        GgmlDType::Q8_0
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    reference: NaiveGemma,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir_in(gemma_testkit::process_scratch()).expect("temp dir");
        let path = dir.path().join("tiny-gemma3.gguf");
        let model = tiny();
        let held = model.write_gguf(&path, quant).expect("write gguf");
        let cfg = ModelConfig::from_json(&model.config_json().to_string()).expect("config");
        Fixture {
            _dir: dir,
            path,
            reference: NaiveGemma::new(cfg, held),
        }
    })
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(9);
    [5usize, 11, 23]
        .iter()
        .map(|&n| {
            std::iter::once(2)
                .chain((1..n).map(|_| 3 + (rng.next_u64() % (VOCAB as u64 - 3)) as u32))
                .collect()
        })
        .collect()
}

fn run(path: &Path, req: PlanRequest, quantized: QuantizedWeights) -> GreedyOutput {
    run_prompts(path, req, quantized, &prompts())
}

/// `prompts` admitted one per step and prefilled in chunks of 8, so steps mix prefill chunks
/// and decodes of several sequences.
fn run_prompts(
    path: &Path,
    req: PlanRequest,
    quantized: QuantizedWeights,
    prompts: &[Vec<u32>],
) -> GreedyOutput {
    let folder = ModelFolder::open(path).expect("open gguf");
    let opts = ShardOptions {
        kv_blocks: 64,
        block_size: 4,
        quantized,
        ..ShardOptions::default()
    };
    let cluster = LocalCluster::load(&folder, &req, &opts).expect("load plan");
    let kv = KvBlockManager::new(opts.kv_blocks, opts.block_size);
    generate_greedy(
        &cluster,
        &kv,
        prompts,
        &GreedyOptions {
            max_new_tokens: NEW_TOKENS,
            prefill_chunk: 8,
        },
    )
    .expect("generate")
}

/// Asserts every prompt's last-position logits are within `rel` of the logit range.
fn assert_close(what: &str, got: &GreedyOutput, want: &[Vec<f32>], rel: f32) {
    for (i, (g, w)) in got.prefill_logits.iter().zip(want).enumerate() {
        let (d, r) = (max_abs_diff(g, w), logit_range(w));
        assert!(
            d <= rel * r,
            "{what}, prompt {i}: logits differ by {d}, more than {rel} of their range {r}"
        );
    }
}

#[test]
fn config_comes_from_the_metadata() {
    let f = fixture();
    let folder = ModelFolder::open(&f.path).expect("open");
    let want = ModelConfig::from_json(&tiny().config_json().to_string()).expect("config");
    let got = &folder.config;
    assert_eq!(got.architecture, want.architecture);
    assert_eq!(got.vocab_size, VOCAB, "vocabulary from token_embd's rows");
    assert_eq!(got.head_dim, 128);
    assert_eq!(
        got.layer_kinds, want.layer_kinds,
        "five sliding layers, then a global one"
    );
    assert_eq!(got.sliding_window, want.sliding_window);
    assert_eq!(got.rope_local_theta, 10_000.0);
    assert_eq!(got.rope_theta, 1_000_000.0);
    assert_eq!(got.rope_scaling_factor, 2.0);
    assert_eq!(got.query_pre_attn_scalar, 128.0);
}

/// Dequantized at load, the file's model is the reference's: f32 tolerance, same tokens.
#[test]
fn dequantized_gguf_matches_the_plain_reference() {
    let f = fixture();
    let want: Vec<_> = prompts()
        .iter()
        .map(|p| f.reference.greedy(p, NEW_TOKENS))
        .collect();
    let margin = want
        .iter()
        .map(|g| g.min_margin)
        .fold(f32::INFINITY, f32::min);
    assert!(
        margin > 1e-3,
        "the prompts need clear greedy choices (margin {margin})"
    );
    for req in [PlanRequest::new(1, 1), PlanRequest::new(2, 2)] {
        let got = run(&f.path, req.clone(), QuantizedWeights::Dequantize);
        for (i, (g, w)) in got.prefill_logits.iter().zip(&want).enumerate() {
            let d = max_abs_diff(g, &w.prefill_logits);
            assert!(d <= 1e-4, "{req:?} prompt {i}: logits differ by {d}");
        }
        let tokens: Vec<_> = want.iter().map(|g| g.tokens.clone()).collect();
        assert_eq!(got.tokens, tokens, "{req:?}: greedy tokens");
    }
}

/// Kept quantized, activations are quantized too (as in llama.cpp): close to the reference, and
/// every plan within the quantization's noise of one process, not within rounding. Tensor
/// parallelism has each rank quantize only its own columns of a row-parallel input (other
/// blocks where a split falls inside one), dequantizes at load a slice that would cut a weight
/// block, and changes the shard's shape, by which candle picks its kernel. Measured on an AVX2
/// CPU: one process is 0.5-0.6% of the logit range from the reference; tp=2 and tp=2 x pp=2,
/// whose splits fall on block boundaries, give its bits.
#[test]
fn quantized_plans_agree() {
    let f = fixture();
    let want: Vec<_> = prompts()
        .iter()
        .map(|p| f.reference.greedy(p, 0).prefill_logits)
        .collect();
    let single = run(&f.path, PlanRequest::new(1, 1), QuantizedWeights::Keep);
    assert_close("tp=1 quantized vs reference", &single, &want, 0.03);
    for req in [PlanRequest::new(2, 1), PlanRequest::new(2, 2)] {
        let got = run(&f.path, req.clone(), QuantizedWeights::Keep);
        assert_close(
            &format!("{req:?} vs tp=1"),
            &got,
            &single.prefill_logits,
            0.02,
        );
    }
}

/// What the other sequences of a step may change in a sequence's logits. Activations are
/// quantized row by row, so a row's quantized values never depend on the rows beside it; what
/// can depend on the row count is the kernel candle runs (on x86, Q6_K as tiles for more than
/// one row, AMX Q4_K from 32 rows; f32 matmul blocking) and so the order it accumulates in: a
/// rounding-level difference, which a quantized activation can turn into one quantization step
/// downstream. Bounds: dequantized (f32 kernels), rounding (1e-5 of the logit range); kept
/// quantized, the plans' quantization-noise bound. Measured on an AVX2 CPU: kept quantized, the
/// same bits; dequantized, up to 3e-7 of the range.
#[test]
fn the_rest_of_a_batch_changes_at_most_rounding() {
    let f = fixture();
    for (quantized, rel) in [
        (QuantizedWeights::Dequantize, 1e-5),
        (QuantizedWeights::Keep, 0.02),
    ] {
        let req = PlanRequest::new(2, 1);
        let together = run(&f.path, req.clone(), quantized);
        for (i, prompt) in prompts().iter().enumerate() {
            let alone = run_prompts(
                &f.path,
                req.clone(),
                quantized,
                std::slice::from_ref(prompt),
            );
            let what = format!("{quantized:?}, prompt {i} batched vs alone");
            let (d, r) = (
                max_abs_diff(&together.prefill_logits[i], &alone.prefill_logits[0]),
                logit_range(&alone.prefill_logits[0]),
            );
            assert!(
                d <= rel * r,
                "{what}: logits differ by {d}, more than {rel} of {r}"
            );
            assert_eq!(together.tokens[i], alone.tokens[0], "{what}: greedy tokens");
        }
    }
}

/// tp=4 gives each rank 128 of down_proj's 512 input columns, half a Q6_K block: those slices
/// are dequantized at load instead, and the result still matches the reference within the
/// quantization's noise.
#[test]
fn slices_that_cut_blocks_are_dequantized() {
    let f = fixture();
    let want: Vec<_> = prompts()
        .iter()
        .map(|p| f.reference.greedy(p, 0).prefill_logits)
        .collect();
    let got = run(&f.path, PlanRequest::new(4, 1), QuantizedWeights::Keep);
    assert_close("tp=4 quantized vs reference", &got, &want, 0.03);
}

#[test]
fn q5_0_blocks_become_q8_0_blocks_of_the_same_values() {
    let mut rng = SplitMix64::new(5);
    let values: Vec<f32> = (0..64 * 32).map(|_| rng.symmetric() * 3.0).collect();
    let t = Tensor::from_vec(values, (64, 32), &Device::Cpu).expect("tensor");
    let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).expect("q5_0");
    let q8_bytes = q5_0_to_q8_0(&q5.data().expect("bytes"));
    let q8 = candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q8_0,
        bytemuck::cast_slice(&q8_bytes),
        vec![64, 32],
        &Device::Cpu,
    )
    .expect("q8_0");
    let a = q5
        .dequantize(&Device::Cpu)
        .expect("a")
        .flatten_all()
        .expect("a");
    let b = q8
        .dequantize(&Device::Cpu)
        .expect("b")
        .flatten_all()
        .expect("b");
    assert_eq!(
        a.to_vec1::<f32>().expect("a"),
        b.to_vec1::<f32>().expect("b")
    );
}

#[test]
fn broken_gguf_files_are_refused_with_the_reason() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tmp");
    let bytes = std::fs::read(&f.path).expect("read");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).expect("write");
    let err = ModelFolder::open(&truncated)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("truncated"), "{err}");

    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, b"hello, this is not a model").expect("write");
    let err = ModelFolder::open(&not_gguf)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("magic"), "{err}");

    let mut other = bytes.clone();
    let at = find(&other, b"gemma3").expect("architecture string");
    other[at..at + 6].copy_from_slice(b"llama3");
    let arch = dir.path().join("llama.gguf");
    std::fs::write(&arch, &other).expect("write");
    let err = ModelFolder::open(&arch).err().expect("refused").to_string();
    assert!(err.contains("llama3") && err.contains("gemma3"), "{err}");

    let two = dir.path().join("two");
    std::fs::create_dir(&two).expect("dir");
    std::fs::write(two.join("a.gguf"), &bytes).expect("write");
    std::fs::write(two.join("b.gguf"), &bytes).expect("write");
    let err = ModelFolder::open(&two).err().expect("refused").to_string();
    assert!(err.contains("2 .gguf files"), "{err}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
