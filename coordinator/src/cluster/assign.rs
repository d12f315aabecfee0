//! Assigning the whole group: every shard at once under one session, each worker's load
//! progress logged, and one step stream per worker once all are Ready.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use gemma_proto::{pb, Session, ShardPlan};
use tokio_stream::StreamExt;

use super::link::{StepStream, WorkerLink};
use super::{dtype_of, ClusterError, Prepared};
use crate::settings::Settings;

/// What every assignment of this cluster shares; only the shard, the peers' data addresses and
/// the session change between them.
#[derive(Debug, Clone)]
pub struct AssignTemplate {
    model_path: String,
    tp: u32,
    pp: u32,
    layers_per_stage: Vec<u32>,
    dtype: pb::DType,
    kv: KvRequest,
    block_size: u32,
    collective_timeout_ms: u64,
    lease_ms: u64,
    dequantize: bool,
    load_timeout: Duration,
}

impl AssignTemplate {
    pub fn new(prepared: &Prepared, settings: &Settings) -> Result<Self, ClusterError> {
        Ok(Self {
            model_path: prepared.model_path.display().to_string(),
            tp: prepared.plan.tp as u32,
            pp: prepared.plan.pp as u32,
            layers_per_stage: prepared
                .request
                .layers_per_stage
                .iter()
                .flatten()
                .map(|&l| l as u32)
                .collect(),
            dtype: dtype_of(&settings.dtype)?,
            kv: KvRequest::new(prepared, settings),
            block_size: settings.block_size as u32,
            collective_timeout_ms: settings.collective_timeout_ms,
            lease_ms: settings.lease_ms,
            dequantize: settings.dequantize,
            load_timeout: Duration::from_secs(settings.load_timeout_s),
        })
    }

    fn request(
        &self,
        link: &WorkerLink,
        data_addrs: &[String],
        session: Session,
    ) -> pb::AssignRequest {
        pb::AssignRequest {
            model_path: self.model_path.clone(),
            tp: self.tp,
            pp: self.pp,
            layers_per_stage: self.layers_per_stage.clone(),
            shard: Some((&link.spec).into()),
            data_addrs: data_addrs.to_vec(),
            dtype: self.dtype as i32,
            kv_blocks: self.kv.blocks as u32,
            kv_budget_bytes: self.kv.budget_bytes,
            kv_memory_fraction: self.kv.memory_fraction,
            host_share: self
                .kv
                .host_shares
                .get(link.spec.stage * self.tp as usize + link.spec.rank)
                .copied()
                .unwrap_or(1),
            kv_max_tokens: self.kv.max_tokens,
            block_size: self.block_size,
            collective_timeout_ms: self.collective_timeout_ms,
            session: Some(session.into()),
            lease_ms: self.lease_ms,
            dequantize: self.dequantize,
        }
    }
}

impl AssignTemplate {
    /// Every later assignment asks for exactly `blocks` KV blocks: the pool the engine
    /// schedules, whatever memory the workers' hosts have then (a survivor's own weights and
    /// a busier host would otherwise shrink a pool sized from memory).
    pub fn keep_kv_blocks(&mut self, blocks: usize) {
        self.kv.blocks = blocks;
    }
}

/// How each worker sizes its KV cache (see `AssignRequest`): exactly `blocks` once the pool
/// is known, else `budget_bytes` when `kv_budget_mib` is set, else from its host's memory.
#[derive(Debug, Clone)]
struct KvRequest {
    blocks: usize,
    budget_bytes: u64,
    memory_fraction: f64,
    /// Per shard (plan order): how many of the cluster's workers share its host.
    host_shares: Vec<u32>,
    /// Every running sequence at the model's whole context: more is never used.
    max_tokens: u64,
}

impl KvRequest {
    fn new(prepared: &Prepared, settings: &Settings) -> Self {
        let world = prepared.plan.world_size();
        Self {
            blocks: 0,
            budget_bytes: settings.kv_budget_mib.map_or(0, |mib| mib << 20),
            memory_fraction: settings.kv_memory_fraction,
            host_shares: match settings.workers.is_empty() {
                true => vec![world as u32; world],
                false => host_shares(&settings.workers),
            },
            max_tokens: (settings.max_running as u64)
                .saturating_mul(prepared.config.max_position_embeddings as u64),
        }
    }
}

/// Per worker address, how many of the addresses name its host: workers given by address
/// share a host exactly when their addresses name the same one (loopback workers of one
/// machine do; pods of a StatefulSet do not).
fn host_shares(addrs: &[String]) -> Vec<u32> {
    let host = |a: &str| gemma_proto::tls::host_of(a).to_ascii_lowercase();
    addrs
        .iter()
        .map(|a| addrs.iter().filter(|b| host(b) == host(a)).count() as u32)
        .collect()
}

/// A group that took its assignment: one step stream per worker (plan order) and the KV blocks
/// every shard holds.
pub struct Assigned {
    pub streams: Vec<StepStream>,
    pub kv_blocks: usize,
}

/// Assigns every shard of `plan` under `session` at once and opens the step streams once all
/// are Ready. `data_addrs` are the workers' data-plane addresses as peers should dial them.
pub async fn assign_group(
    template: &AssignTemplate,
    plan: &ShardPlan,
    links: &[WorkerLink],
    data_addrs: &[String],
    session: Session,
) -> Result<Assigned, ClusterError> {
    tracing::info!(
        tp = plan.tp,
        pp = plan.pp,
        %session,
        shards = ?plan.shards.iter().map(|s| format!("stage {} rank {}: layers {:?} heads {:?} kv {:?} mlp {:?} vocab {:?}", s.stage, s.rank, s.layers, s.q_heads, s.kv_heads, s.mlp_cols, s.vocab_rows)).collect::<Vec<_>>(),
        "assigning the shard plan"
    );
    let deadline = Instant::now() + template.load_timeout;
    let loads = links.iter().map(|link| {
        let request = template.request(link, data_addrs, session);
        load(link, request, deadline)
    });
    let kv_blocks = join_all(loads)
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .min()
        .unwrap_or(0);
    let mut streams = Vec::with_capacity(links.len());
    for link in links {
        let stream = StepStream::open(link)
            .await
            .map_err(|s| load_error(link, format!("opening the step stream: {}", s.message())))?;
        streams.push(stream);
    }
    tracing::info!(kv_blocks, %session, "every worker is ready");
    Ok(Assigned { streams, kv_blocks })
}

fn load_error(link: &WorkerLink, reason: String) -> ClusterError {
    ClusterError::Load {
        addr: link.addr.clone(),
        stage: link.spec.stage,
        rank: link.spec.rank,
        reason,
    }
}

/// Assigns one shard and follows its loading until Ready; returns its KV block count.
async fn load(
    link: &WorkerLink,
    request: pb::AssignRequest,
    deadline: Instant,
) -> Result<usize, ClusterError> {
    let started = Instant::now();
    // The assignment stream lives as long as loading; the load deadline bounds it.
    let left = deadline.saturating_duration_since(Instant::now());
    let mut events = tokio::time::timeout(left, link.client.clone().assign(request))
        .await
        .map_err(|_| load_error(link, "no answer to the assignment".into()))?
        .map_err(|s| refusal(link, s))?
        .into_inner();
    let mut last_log = Instant::now();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.next())
            .await
            .map_err(|_| {
                load_error(
                    link,
                    "loading did not finish before the load timeout".into(),
                )
            })?
            .ok_or_else(|| {
                load_error(link, "the worker ended the assignment without Ready".into())
            })?
            .map_err(|s| load_error(link, s.message().to_string()))?;
        match event.event {
            Some(pb::load_event::Event::Progress(p))
                if last_log.elapsed() >= Duration::from_secs(1) =>
            {
                last_log = Instant::now();
                tracing::info!(
                    worker = %link.addr,
                    stage = link.spec.stage,
                    rank = link.spec.rank,
                    loaded_mib = p.bytes_loaded >> 20,
                    total_mib = p.bytes_total >> 20,
                    "loading shard"
                );
            }
            Some(pb::load_event::Event::Ready(r)) => {
                tracing::info!(
                    worker = %link.addr,
                    stage = link.spec.stage,
                    rank = link.spec.rank,
                    weight_mib = r.weight_bytes >> 20,
                    kv_blocks = r.kv_blocks,
                    weights_kept = r.weights_kept,
                    ready_ms = started.elapsed().as_millis() as u64,
                    "shard ready"
                );
                return Ok(r.kv_blocks as usize);
            }
            _ => {}
        }
    }
}

/// An assignment refused before loading began: FAILED_PRECONDITION is a worker held by another
/// session (worth waiting for: its lease runs out); anything else is the worker's reason. A
/// failure while loading arrives inside the stream instead, and is a `Load` error.
fn refusal(link: &WorkerLink, status: tonic::Status) -> ClusterError {
    if status.code() == tonic::Code::FailedPrecondition {
        ClusterError::Held {
            addr: link.addr.clone(),
            stage: link.spec.stage,
            rank: link.spec.rank,
            reason: status.message().to_string(),
        }
    } else {
        load_error(link, status.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::host_shares;

    #[test]
    fn workers_share_a_host_when_their_addresses_name_it() {
        let addrs: Vec<String> = [
            "127.0.0.1:5001",
            "127.0.0.1:5002",
            "w-1.gemma:50051",
            "[::1]:7",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(host_shares(&addrs), [2, 2, 1, 1]);
    }
}
