//! One worker as the coordinator reaches it: the gRPC connection (dialled, its version checked),
//! and one epoch's step stream, which tells the answer it waits for from stale ones.

use std::time::Duration;

use gemma_proto::pb::worker_client::WorkerClient;
use gemma_proto::tls::TlsIdentity;
use gemma_proto::{pb, Session, ShardSpec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::ClusterError;

/// HTTP/2 flow-control windows of the coordinator-worker connections.
pub const STREAM_WINDOW: u32 = 64 << 20;
pub const CONNECTION_WINDOW: u32 = 128 << 20;

/// The version a worker must report: this coordinator's own (one release of the workspace).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A worker the coordinator has dialled: where, which shard it serves, and the connection.
#[derive(Clone)]
pub struct WorkerLink {
    pub addr: String,
    pub spec: ShardSpec,
    pub client: WorkerClient<Channel>,
}

impl WorkerLink {
    /// "worker ADDR (stage S, rank R)": how every message names a shard.
    pub fn name(&self) -> String {
        shard_name(&self.addr, &self.spec)
    }

    /// Info with a deadline, carrying `session` so that the holder's probe renews its lease.
    pub async fn info(
        &self,
        session: Option<Session>,
        timeout: Duration,
    ) -> Result<pb::InfoResponse, String> {
        let request = pb::InfoRequest {
            session: session.map(Into::into),
        };
        let mut client = self.client.clone();
        tokio::time::timeout(timeout, client.info(request))
            .await
            .map_err(|_| format!("no answer to Info within {timeout:?}"))?
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("unreachable: {}", s.message()))
    }
}

pub fn shard_name(addr: &str, spec: &ShardSpec) -> String {
    format!("worker {addr} (stage {}, rank {})", spec.stage, spec.rank)
}

/// How the coordinator reaches its workers.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// Deadline of a connection and of its first Info.
    pub timeout: Duration,
    /// Mutual TLS: present this identity and require the worker's certificate from the same
    /// CA, naming the host dialled. None: plain HTTP/2.
    pub tls: Option<TlsIdentity>,
}

/// Connects to `addr` and asks its Info; refuses a worker of another version, naming both.
pub async fn dial(
    addr: &str,
    spec: &ShardSpec,
    dialer: &Dialer,
) -> Result<(WorkerLink, pb::InfoResponse), ClusterError> {
    let timeout = dialer.timeout;
    let unreachable = |reason: String| ClusterError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let scheme = if dialer.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?;
    if let Some(identity) = &dialer.tls {
        endpoint = endpoint
            .tls_config(identity.grpc_client(gemma_proto::tls::host_of(addr)))
            .map_err(|e| unreachable(format!("TLS: {}", source_chain(&e))))?;
    }
    let endpoint = endpoint
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        // Logits of a batch are megabytes: HTTP/2's default 64 KiB window would stall every
        // step on window updates.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let channel = tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unreachable(source_chain(&e)))?;
    let link = WorkerLink {
        addr: addr.to_string(),
        spec: spec.clone(),
        client: WorkerClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    };
    let info = link.info(None, timeout).await.map_err(unreachable)?;
    if info.version != VERSION {
        return Err(ClusterError::Version {
            addr: addr.to_string(),
            theirs: info.version,
            ours: VERSION,
        });
    }
    Ok((link, info))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Why one worker did not answer a step; ranked so that the step's error names the shard that
/// broke rather than a peer that only saw it break.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Miss {
    /// The worker's own step failed (often: its data-plane peer vanished).
    Failed(String),
    /// No answer within the deadline.
    Late(Duration),
    /// The stream ended or broke: the process or its connection is gone.
    Gone(String),
}

impl Miss {
    pub fn reason(&self) -> String {
        match self {
            Miss::Failed(e) => e.clone(),
            Miss::Late(d) => format!("no answer to the step within {d:?}"),
            Miss::Gone(why) => why.clone(),
        }
    }
}

/// One epoch's `Steps` stream to one worker.
pub struct StepStream {
    requests: mpsc::Sender<pb::StepRequest>,
    responses: tonic::Streaming<pb::StepResponse>,
}

impl StepStream {
    pub async fn open(link: &WorkerLink) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(4);
        let responses = link
            .client
            .clone()
            .steps(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
        })
    }

    /// Sends a step; its answer is read by [`StepStream::answer`]. Several steps may be sent
    /// before the first is answered: the worker answers them one by one, in order.
    pub async fn send(&mut self, request: pb::StepRequest) -> Result<(), Miss> {
        self.requests
            .send(request)
            .await
            .map_err(|_| Miss::Gone("its step stream is closed".into()))
    }

    /// Waits, at most `deadline`, for the answer to step `step_id` of `epoch`: the oldest step
    /// sent and not yet answered. Anything older (a worker that hung and woke up answering what
    /// it was asked before) is logged and dropped, never taken for this step's answer.
    pub async fn answer(
        &mut self,
        epoch: u64,
        step_id: u64,
        deadline: Duration,
    ) -> Result<pb::StepResponse, Miss> {
        tokio::time::timeout(deadline, self.next_answer(epoch, step_id))
            .await
            .map_err(|_| Miss::Late(deadline))?
    }

    async fn next_answer(&mut self, epoch: u64, step_id: u64) -> Result<pb::StepResponse, Miss> {
        loop {
            let response = self
                .responses
                .next()
                .await
                .ok_or_else(|| Miss::Gone("the worker closed its step stream".into()))?
                .map_err(|s| Miss::Gone(format!("its step stream broke: {}", s.message())))?;
            match answer_kind(&response, epoch, step_id) {
                Answer::Current => return Ok(response),
                Answer::Stale => {
                    tracing::warn!(
                        epoch = response.epoch,
                        step_id = response.step_id,
                        expected_epoch = epoch,
                        expected_step = step_id,
                        "dropped a stale step answer"
                    );
                }
                Answer::Ahead => {
                    return Err(Miss::Failed(format!(
                        "answered step {} of epoch {} while step {step_id} of epoch {epoch} \
                         was asked",
                        response.step_id, response.epoch
                    )))
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Current,
    /// Of an older step or another epoch: dropped.
    Stale,
    /// Of a step not yet asked: the worker is broken.
    Ahead,
}

fn answer_kind(r: &pb::StepResponse, epoch: u64, step_id: u64) -> Answer {
    match (r.epoch == epoch, r.step_id.cmp(&step_id)) {
        (true, std::cmp::Ordering::Equal) => Answer::Current,
        (true, std::cmp::Ordering::Greater) => Answer::Ahead,
        _ => Answer::Stale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_apart_by_epoch_and_step() {
        let r = |epoch, step_id| pb::StepResponse {
            epoch,
            step_id,
            ..Default::default()
        };
        assert_eq!(answer_kind(&r(2, 7), 2, 7), Answer::Current);
        assert_eq!(answer_kind(&r(2, 6), 2, 7), Answer::Stale);
        assert_eq!(answer_kind(&r(1, 7), 2, 7), Answer::Stale, "another epoch");
        assert_eq!(answer_kind(&r(1, 9), 2, 7), Answer::Stale);
        assert_eq!(answer_kind(&r(2, 8), 2, 7), Answer::Ahead);
    }

    #[test]
    fn a_vanished_worker_outranks_a_late_one_and_a_failing_peer() {
        let mut misses = [
            Miss::Failed("collective: peer closed".into()),
            Miss::Gone("the worker closed its step stream".into()),
            Miss::Late(Duration::from_secs(3)),
        ];
        misses.sort();
        assert!(matches!(misses.last(), Some(Miss::Gone(_))));
    }
}
