//! Prometheus metrics, prefixed `gemma_cluster_`, served at GET /metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Finished by a stop token, a stop string or max_tokens.
    Finished,
    /// The client went away or cancelled.
    Cancelled,
    /// Refused: the waiting queue was full.
    Rejected,
    /// Failed inside the cluster.
    Failed,
    /// Refused at once: the cluster was down (healing).
    Unavailable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// Label values in Prometheus' lowercase style.
impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<OutcomeLabel, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_length: Gauge,
    pub running_sequences: Gauge,
    pub step_sequences: Histogram,
    pub step_tokens: Histogram,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_cached: Gauge,
    pub kv_blocks_total: Gauge,
    pub prompt_tokens: Counter,
    pub prompt_tokens_cached: Counter,
    pub prefix_cache_hit_rate: Gauge<f64, AtomicU64>,
    pub generation_tokens: Counter,
    pub preemptions: Counter,
    pub step_duration: Histogram,
    pub all_reduce_duration: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gemma_cluster");
        let seconds = || Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let counts = || Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let m = Self {
            requests: Family::default(),
            time_to_first_token: seconds(),
            inter_token_latency: seconds(),
            e2e_latency: seconds(),
            queue_length: Gauge::default(),
            running_sequences: Gauge::default(),
            step_sequences: counts(),
            step_tokens: counts(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_cached: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            prompt_tokens: Counter::default(),
            prompt_tokens_cached: Counter::default(),
            prefix_cache_hit_rate: Gauge::default(),
            generation_tokens: Counter::default(),
            preemptions: Counter::default(),
            step_duration: seconds(),
            all_reduce_duration: seconds(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by outcome", m.requests.clone());
        registry.register(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "e2e_request_latency_seconds",
            "Time from arrival to the last token",
            m.e2e_latency.clone(),
        );
        registry.register(
            "queue_length",
            "Requests waiting for admission",
            m.queue_length.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running_sequences.clone(),
        );
        registry.register(
            "step_sequences",
            "Sequences carried by one step",
            m.step_sequences.clone(),
        );
        registry.register(
            "step_tokens",
            "Tokens carried by one step",
            m.step_tokens.clone(),
        );
        registry.register(
            "kv_blocks_used",
            "KV cache blocks held by sequences (a shared block counts once)",
            m.kv_blocks_used.clone(),
        );
        registry.register(
            "kv_blocks_cached",
            "KV cache blocks holding a cached prefix that no sequence holds (evicted, least \
             recently used first, when free blocks run out)",
            m.kv_blocks_cached.clone(),
        );
        registry.register(
            "kv_blocks_total",
            "KV cache blocks in the cluster's pool",
            m.kv_blocks_total.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens whose KV was reused from the prefix cache",
            m.prompt_tokens_cached.clone(),
        );
        registry.register(
            "prefix_cache_hit_rate",
            "Share of prompt tokens reused from the prefix cache since start",
            m.prefix_cache_hit_rate.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted to free KV blocks (recomputed later)",
            m.preemptions.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Wall time of one cluster step",
            m.step_duration.clone(),
        );
        registry.register(
            "all_reduce_duration_seconds",
            "Per step, the longest time a worker spent in all-reduces and stage hand-offs",
            m.all_reduce_duration.clone(),
        );
        Self { registry, ..m }
    }

    /// A request was admitted with `tokens` prompt tokens, `cached` of them from the prefix
    /// cache.
    pub fn prompt(&self, tokens: usize, cached: usize) {
        let total = self.prompt_tokens.inc_by(tokens as u64) + tokens as u64;
        let hits = self.prompt_tokens_cached.inc_by(cached as u64) + cached as u64;
        if total > 0 {
            self.prefix_cache_hit_rate.set(hits as f64 / total as f64);
        }
    }

    pub fn outcome(&self, outcome: Outcome) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
