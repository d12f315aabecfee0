//! The test kit: what the crates' tests need to build and run models without the coordinator.
//!
//! - `tiny_model`: tiny random Gemma 1/2/3 models written as HuggingFace folders
//!   (`TinyGemma`), and `gguf_writer` for the same models as GGUF files;
//! - `reference`: a plain unsharded Gemma the worker's model is held to;
//! - `local` and `generate`: a whole shard plan in one process (`LocalCluster`) and a greedy
//!   driver over it (`generate_greedy`), the single-process form of the cluster that the
//!   `gemma-local` binary runs and the multi-process cluster must reproduce. They are test and
//!   CLI harnesses: serving schedules in one place, the coordinator's engine;
//! - `compare`: the measures parity tests state tolerances in (max difference, logit range,
//!   top-two margin);
//! - `cache`: where the fetch scripts keep the real tokenizer and gemma-3-270m;
//! - `scratch`: the folder of one test process, for the fixtures its statics hold.
//!
//! It depends on the worker and the proto crate, never on the coordinator, so building the
//! worker's tests builds no HTTP server, tokenizer or template engine.

pub mod cache;
pub mod compare;
pub mod generate;
pub mod gguf_writer;
pub mod local;
pub mod pki;
pub mod reference;
pub mod scratch;
pub mod tiny_model;

pub use cache::{add_tokenizer, real_model_dir, real_model_path, tokenizer_dir};
pub use generate::{generate_greedy, GreedyOptions, GreedyOutput, RunError};
pub use local::LocalCluster;
pub use scratch::process_scratch;
pub use tiny_model::{stored_values, write_safetensors, NamedTensors, Storage, TinyGemma};
