//! The engine thread: owns the model, the paged KV cache, the adapter registry and the
//! scheduler, and runs continuous batching (one packed forward per step, prefill chunks and
//! decode tokens of many requests and adapters together). HTTP handlers talk to it only
//! through [`EngineHandle`]; each request carries its own reply channel, and a closed channel
//! means the client left, so its sequence and KV blocks are freed at the next step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot};

use super::error::ApiError;
use super::metrics::Metrics;
use super::queue::{Admission, WaitLimits, WaitQueue};
use super::ratelimit::RateLimit;
use super::resources::EngineResources;
use super::validation::ValidRequest;
use crate::engine::graph::{DecodeGraphs, GraphConfig};
use crate::engine::kv::paged::{BlockTable, PagedKvCache};
use crate::engine::lora::registry::AdapterRegistry;
use crate::engine::model::{LogitsAt, PackedBatch};
use crate::engine::sampling::op::RowParams;
use crate::engine::sampling::{DeviceSampling, FinishReason, Sampler};
use crate::engine::scheduler::{Scheduler, SeqId, StepPlan};
use crate::engine::text::detokenizer::Detokenizer;
use crate::engine::text::tokenizer::Tokenizer;
use crate::engine::Llama;
use crate::openai::Usage;

mod death;
mod step;
pub use death::{ENGINE_DEATH_EXIT, FAULT_PANIC_ENV};
use step::capture_graphs;

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// New output text (never taken back: stop strings are held until resolved).
    Text(String),
    /// The request ended normally.
    Finished { reason: FinishReason, usage: Usage },
    /// The request failed.
    Failed(ApiError),
}

/// Messages to the engine thread.
pub enum Command {
    Submit(Box<ValidRequest>, tmpsc::UnboundedSender<Event>),
    /// Register (or reload) an adapter; replies once the registry knows the new version.
    Register {
        name: String,
        path: PathBuf,
        reply: oneshot::Sender<()>,
    },
    /// Forget an adapter (running requests keep their slot); replies whether it was known.
    Unregister {
        name: String,
        reply: oneshot::Sender<bool>,
    },
    /// End every request now with this error (the shutdown timeout expired); replies when done.
    AbortAll {
        reason: String,
        reply: oneshot::Sender<()>,
    },
}

/// The HTTP side's handle on the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Requests submitted and not yet admitted into the running batch (or ended): counted at
    /// the point of submission, so `--max-waiting` and the rate limit hold exactly under a burst.
    queue: Arc<Admission>,
}

impl EngineHandle {
    /// Queues a request unless its tenant's rate limit, its tenant's waiting places or the
    /// server's are spent (then 429 or 503, with Retry-After); its events arrive on the
    /// returned channel.
    pub fn submit(&self, req: ValidRequest) -> Result<tmpsc::UnboundedReceiver<Event>, ApiError> {
        self.queue.enter(&req)?;
        let (tx, rx) = tmpsc::unbounded_channel();
        if let Err(mpsc::SendError(cmd)) = self.tx.send(Command::Submit(Box::new(req), tx)) {
            if let Command::Submit(req, _) = cmd {
                self.queue.leave(&req.tenant);
                self.queue.refund(&req, 0, true);
            }
            return Err(stopped());
        }
        Ok(rx)
    }

    pub async fn register(&self, name: &str, path: PathBuf) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Register { name: name.to_string(), path, reply })?;
        rx.await.map_err(|_| stopped())
    }

    pub async fn unregister(&self, name: &str) -> Result<bool, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Unregister { name: name.to_string(), reply })?;
        rx.await.map_err(|_| stopped())
    }

    /// Ends every request with a 503 saying `reason` (streams get an error event, then
    /// `[DONE]`); returns once the engine has done so.
    pub async fn abort_all(&self, reason: &str) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::AbortAll { reason: reason.to_string(), reply })?;
        rx.await.map_err(|_| stopped())
    }

    fn send(&self, cmd: Command) -> Result<(), ApiError> {
        self.tx.send(cmd).map_err(|_| stopped())
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable("the engine has stopped".into())
}

/// One request in flight.
struct Live {
    /// Still counted in [`EngineHandle`]'s queue (not admitted yet).
    queued: bool,
    req: ValidRequest,
    tx: tmpsc::UnboundedSender<Event>,
    sampler: Sampler,
    detok: Detokenizer,
    output: Vec<u32>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// What the engine thread owns.
pub struct Engine {
    pub model: Llama,
    pub tokenizer: Arc<Tokenizer>,
    pub kv: PagedKvCache,
    pub registry: AdapterRegistry,
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    /// What `/v1/models` lists: told when an adapter's load fails or succeeds.
    pub catalog: Arc<super::catalog::Catalog>,
    pub max_model_len: usize,
    /// Name per-adapter counters use for the base model.
    pub base_name: String,
    /// Decode steps as CUDA graph replays (`None`: `--enforce-eager`, or not on CUDA).
    pub graphs: Option<GraphConfig>,
}

/// Starts the engine thread; `limits` are `--max-waiting` and `--max-waiting-per-model`,
/// `rate` is `--tenant-rate-limit`. Returns once it is ready to step (on CUDA: its decode
/// graphs are captured, so no request waits for a capture).
pub fn spawn(
    engine: Engine,
    limits: WaitLimits,
    rate: Option<RateLimit>,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    // Its total is shared with /metrics, which reads it at scrape time for
    // vllm:num_requests_waiting.
    let places = WaitQueue::new(engine.metrics.queued.clone(), limits);
    let queue = Arc::new(Admission::new(places, rate, engine.metrics.clone()));
    let engine_queue = queue.clone();
    let metrics = engine.metrics.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let join = std::thread::Builder::new().name("lab-engine".into()).spawn(move || {
        let graphs = engine.graphs.and_then(|cfg| capture_graphs(&engine, cfg));
        let mut state = EngineState {
            e: engine,
            tables: BTreeMap::new(),
            live: BTreeMap::new(),
            next_id: 0,
            queue: engine_queue,
            graphs,
            fault_panic: death::fault_panic_model(),
        };
        let _ = ready_tx.send(());
        if death::panicked(|| state.run(&rx)) {
            death::on_engine_death(&metrics, std::mem::take(&mut state.live), rx);
        }
    })?;
    let _ = ready_rx.recv(); // an error here means the thread died: requests will see it
    Ok((EngineHandle { tx, queue }, join))
}

struct EngineState {
    e: Engine,
    queue: Arc<Admission>,
    tables: BTreeMap<SeqId, BlockTable>,
    live: BTreeMap<SeqId, Live>,
    next_id: SeqId,
    graphs: Option<DecodeGraphs>,
    /// [`FAULT_PANIC_ENV`]: a test's fault-injection hook, `None` unless set.
    fault_panic: Option<String>,
}

impl EngineState {
    fn run(&mut self, rx: &mpsc::Receiver<Command>) {
        loop {
            // Idle: block until there is work; busy: take what arrived and keep stepping.
            if self.live.is_empty() {
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return, // every handle dropped: the server is gone
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd);
            }
            for (name, outcome) in self.e.registry.poll_loads() {
                self.e.catalog.set_failed(&name, outcome.err());
            }
            self.drop_cancelled();
            let plan = {
                let EngineState { e, tables, .. } = self;
                let mut res = EngineResources { kv: &mut e.kv, tables, registry: &mut e.registry };
                e.scheduler.schedule(&mut res)
            };
            self.fail_unschedulable(&plan);
            self.mark_admitted(&plan);
            self.e.metrics.update(|m| {
                m.prefix_cache_queries += plan.prefix_queries as u64;
                m.prefix_cache_hits += plan.prefix_hits as u64;
            });
            let began = std::time::Instant::now();
            let stepped = self.step(&plan);
            if !plan.batch.is_empty() {
                let end = std::time::Instant::now();
                let decode = plan.batch.iter().all(|s| s.sample && s.tokens.len() == 1);
                self.e.metrics.update(|m| {
                    m.busy.record(end, end - began);
                    let h = if decode { &mut m.decode_steps } else { &mut m.prefill_steps };
                    h.observe((end - began).as_secs_f64());
                });
            }
            if let Err(e) = stepped {
                tracing::error!("engine step failed: {e}");
                for s in &plan.batch {
                    self.end(s.id, Err(ApiError::Internal(format!("engine step failed: {e}"))));
                }
            }
            // Once per iteration, after the step, so an engine about to block shows its final state.
            self.publish_gauges(plan.preempted.len());
            if plan.batch.is_empty() && !self.live.is_empty() {
                // Waiting on an adapter load: sleep briefly, but wake on a command.
                if let Ok(cmd) = rx.recv_timeout(Duration::from_millis(2)) {
                    self.handle(cmd);
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, tx) => {
                let id = self.next_id;
                self.next_id += 1;
                self.e.scheduler.add_for(id, req.prompt_ids.clone(), req.adapter.clone(), req.tenant.clone());
                let live = Live {
                    queued: true,
                    sampler: Sampler::new(&req.params),
                    detok: Detokenizer::new(req.params.stop.clone()),
                    req: *req,
                    tx,
                    output: Vec::new(),
                    first_token: None,
                    last_token: None,
                };
                self.live.insert(id, live);
            }
            Command::Register { name, path, reply } => {
                self.e.registry.register(&name, &path);
                let _ = reply.send(());
            }
            Command::Unregister { name, reply } => {
                let known = self.e.registry.unregister(&name);
                // Its series leave /metrics (requests still running on it are not counted
                // back in when they end, see `end`).
                self.e.metrics.update(|m| m.per_adapter.remove(&name));
                let _ = reply.send(known);
            }
            Command::AbortAll { reason, reply } => {
                let ids: Vec<SeqId> = self.live.keys().copied().collect();
                for id in ids {
                    self.end(id, Err(ApiError::Unavailable(reason.clone())));
                }
                let _ = reply.send(());
            }
        }
    }

    /// Frees the sequences whose client went away.
    /// Requests in this step's batch have left the queue `--max-waiting` counts.
    fn mark_admitted(&mut self, plan: &StepPlan) {
        for s in &plan.batch {
            if let Some(live) = self.live.get_mut(&s.id).filter(|l| l.queued) {
                live.queued = false;
                self.queue.leave(&live.req.tenant);
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self.live.iter().filter(|(_, l)| l.tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.end(id, Ok(None));
        }
    }

    fn fail_unschedulable(&mut self, plan: &StepPlan) {
        for (id, msg) in &plan.failed {
            // The scheduler already dropped it; `end` gives its place in the queue count back
            // (removing it here directly leaked one place per failure, until --max-waiting
            // refused every request) and answers it.
            let Some(live) = self.live.get(id) else { continue };
            tracing::warn!(id = %live.req.id, model = %live.req.model, "request failed: {msg}");
            let err = self.adapter_error(live.req.adapter.as_deref(), msg);
            self.end(*id, Err(err));
        }
    }

    /// The error of a request its adapter could not be given to: a 400 when the adapter's
    /// files do not load (its owner's to fix), a 404 when it was unloaded, else a 500.
    fn adapter_error(&self, adapter: Option<&str>, msg: &str) -> ApiError {
        let state = self.e.registry.state();
        match adapter {
            Some(a) if state.current(a).is_none() => ApiError::ModelNotFound(a.to_string()),
            Some(a) => match state.load_error(a) {
                Some(why) => ApiError::AdapterFailed {
                    name: a.to_string(),
                    message: why.to_string(),
                    retry_secs: super::RETRY_FAILED_LOAD.as_secs(),
                },
                None => ApiError::Internal(msg.to_string()),
            },
            None => ApiError::Internal(msg.to_string()),
        }
    }

    /// Handles one sampled token of `id`: stream its text, finish on EOS / stop / length.
    fn emit(&mut self, id: SeqId, tok: u32) -> crate::engine::Result<()> {
        let now = Instant::now();
        let Some(live) = self.live.get_mut(&id) else { return Ok(()) };
        match live.last_token {
            None => self.e.metrics.update(|m| m.ttft.observe((now - live.req.arrived).as_secs_f64())),
            Some(t) => self.e.metrics.update(|m| m.tpot.observe((now - t).as_secs_f64())),
        }
        live.first_token.get_or_insert(now);
        live.last_token = Some(now);
        let p = &live.req.params;
        let finish = if !p.ignore_eos && self.e.tokenizer.eos_ids().contains(&tok) {
            Some(FinishReason::Stop)
        } else {
            live.output.push(tok);
            let delta = live.detok.push(&self.e.tokenizer, tok)?;
            if !delta.is_empty() {
                let _ = live.tx.send(Event::Text(delta));
            }
            let len = live.req.prompt_ids.len() + live.output.len();
            if live.detok.stopped() {
                Some(FinishReason::Stop)
            } else if live.output.len() >= p.max_tokens || len >= self.e.max_model_len {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        if let Some(reason) = finish {
            self.end(id, Ok(Some(reason)));
        }
        Ok(())
    }

    /// Removes `id` everywhere: `Ok(Some(reason))` finished, `Ok(None)` cancelled, `Err` failed.
    fn end(&mut self, id: SeqId, outcome: Result<Option<FinishReason>, ApiError>) {
        let Some(mut live) = self.live.remove(&id) else { return };
        if live.queued {
            self.queue.leave(&live.req.tenant);
        }
        self.queue.refund(&live.req, live.output.len(), live.queued);
        {
            let EngineState { e, tables, .. } = self;
            let mut res = EngineResources { kv: &mut e.kv, tables, registry: &mut e.registry };
            e.scheduler.finish(id, &mut res);
        }
        let usage = Usage {
            prompt_tokens: live.req.prompt_ids.len(),
            completion_tokens: live.output.len(),
            total_tokens: live.req.prompt_ids.len() + live.output.len(),
        };
        let ms = live.req.arrived.elapsed().as_millis();
        let (label, event) = match outcome {
            Ok(Some(reason)) => {
                let tail = live.detok.flush();
                if !tail.is_empty() {
                    let _ = live.tx.send(Event::Text(tail));
                }
                (if reason == FinishReason::Stop { "stop" } else { "length" }, Some(Event::Finished { reason, usage }))
            }
            Ok(None) => ("abort", None),
            Err(e) => ("error", Some(Event::Failed(e))),
        };
        // Per-adapter series only for the base and adapters still registered: an unloaded
        // adapter's series were dropped and must not come back with its last requests.
        let adapter = match &live.req.adapter {
            None => Some(self.e.base_name.clone()),
            Some(a) => self.e.registry.state().current(a).map(|_| a.clone()),
        };
        self.e.metrics.update(|m| {
            *m.finished.entry(label).or_default() += 1;
            m.generation_tokens += usage.completion_tokens as u64;
            if let Some(adapter) = adapter {
                let c = m.per_adapter.entry(adapter).or_default();
                c.requests += 1;
                c.prompt_tokens += usage.prompt_tokens as u64;
                c.generation_tokens += usage.completion_tokens as u64;
            }
            if label != "abort" && label != "error" {
                m.e2e.observe(live.req.arrived.elapsed().as_secs_f64());
            }
        });
        // Counted before the client hears the end: a scrape right after a response must
        // already include it.
        if let Some(ev) = event {
            let _ = live.tx.send(ev);
        }
        tracing::info!(
            id = %live.req.id, model = %live.req.model, tenant = %live.req.tenant, prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens, ms = ms as u64, finish = label, "request"
        );
    }

    fn publish_gauges(&mut self, preempted: usize) {
        let name = |id: &SeqId| self.live.get(id).and_then(|l| l.req.adapter.clone());
        let running: std::collections::BTreeSet<String> =
            self.e.scheduler.running_ids().iter().filter_map(name).collect();
        let waiting: std::collections::BTreeSet<String> =
            self.e.scheduler.waiting_ids().filter_map(|id| name(&id)).collect();
        let (loads, evictions) = self.e.registry.counters();
        // Waiting = submitted and never admitted (the shared counter, read at scrape time) +
        // preempted, waiting to be recomputed (admitted before, so not in that counter).
        let requeued = self.e.scheduler.waiting_ids().filter(|id| self.live.get(id).is_some_and(|l| !l.queued)).count();
        let (nr, free) = (self.e.scheduler.num_running(), self.e.kv.num_free_blocks());
        self.e.metrics.update(|m| {
            m.running = nr;
            m.requeued = requeued;
            m.kv_free_blocks = free;
            m.running_adapters = running;
            m.waiting_adapters = waiting;
            m.preemptions += preempted as u64;
            m.adapter_loads = loads;
            m.adapter_evictions = evictions;
            m.engine_updated_at = super::metrics::unix_seconds();
        });
    }
}
