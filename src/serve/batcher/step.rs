//! One engine step: the packed forward (a decode-graph replay when the step is one, else
//! eager), sampling, and the scheduler's bookkeeping.

use super::*;

impl EngineState {
    /// One packed forward over the plan, then sampling and replies.
    pub(super) fn step(&mut self, plan: &StepPlan) -> crate::engine::Result<()> {
        if plan.batch.is_empty() {
            return Ok(());
        }
        self.inject_fault(plan);
        let mut batch = PackedBatch::default();
        let mut tables: Vec<BlockTable> = Vec::with_capacity(plan.batch.len());
        for s in &plan.batch {
            batch.push_with_slot(&s.tokens, s.past, s.slot);
            tables.push(self.tables.remove(&s.id).unwrap_or_default());
        }
        let live = &mut self.live;
        let params = RowParams(
            plan.batch
                .iter()
                .filter(|s| s.sample)
                .map(|s| live.get_mut(&s.id).expect("live").sampler.device_param())
                .collect(),
        );
        let replayed = self.replay_graph(plan, &batch, &mut tables, &params);
        let sampled = match replayed {
            Some(ids) => Ok((plan.batch.iter().map(|s| s.id).zip(ids).collect(), Vec::new())),
            None => self.forward_eager(plan, &batch, &mut tables, &params),
        };
        for (s, t) in plan.batch.iter().zip(tables) {
            self.tables.insert(s.id, t);
        }
        let (sampled, failed) = sampled?;
        // Counted before any row ends: an ended row is no longer live (indexing `live` for it
        // here panicked the engine thread once a row's sampling failed).
        let prefill: usize = plan
            .batch
            .iter()
            .filter_map(|s| {
                let prompt = self.live.get(&s.id)?.req.prompt_ids.len();
                Some(prompt.saturating_sub(s.past).min(s.tokens.len()))
            })
            .sum();
        self.e.metrics.update(|m| m.prompt_tokens += prefill as u64);
        // Failed rows end first, so their KV is not offered to the prefix cache.
        for (id, e) in failed {
            self.fail_row(id, "sampling failed for this request", &e);
        }
        {
            let EngineState { e, tables, .. } = self;
            let mut res = EngineResources { kv: &mut e.kv, tables, registry: &mut e.registry };
            e.scheduler.complete(plan, &sampled, &mut res);
        }
        for (id, tok) in sampled {
            // One sequence's detokenization error is that sequence's alone.
            if let Err(e) = self.emit(id, tok) {
                self.fail_row(id, "detokenization failed for this request", &e);
            }
        }
        Ok(())
    }

    /// Ends row `id` alone with a 500 whose message is `what` and the first line of `e` (the
    /// full error goes to the log; candle appends a backtrace when RUST_BACKTRACE is set).
    fn fail_row(&mut self, id: SeqId, what: &str, e: &crate::engine::EngineError) {
        tracing::warn!("{what}: {e}");
        let cause = e.to_string().lines().next().unwrap_or_default().to_string();
        self.end(id, Err(ApiError::Internal(format!("{what}: {cause}"))));
    }

    /// The step as a decode-graph replay when it is one (every row one decode token of the
    /// base model, CUDA); `None` runs it eagerly. A graph that fails is logged and dropped
    /// for good: the step and every later one run eagerly.
    fn replay_graph(
        &mut self,
        plan: &StepPlan,
        batch: &PackedBatch,
        tables: &mut [BlockTable],
        params: &RowParams,
    ) -> Option<Vec<u32>> {
        let graphs = self.graphs.as_mut()?;
        if !plan.batch.iter().all(|s| s.sample) {
            return None;
        }
        let mut kv = self.e.kv.batch(tables.iter_mut().collect());
        let bank = self.e.registry.bank();
        let bank = (!bank.is_empty()).then_some(bank as &dyn crate::engine::lora::op::LoraWeights);
        match graphs.decode(&self.e.model, batch, &mut kv, params, bank) {
            Ok(Some(ids)) => {
                self.e.metrics.update(|m| m.decode_graph_replays += 1);
                Some(ids)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!("decode graph replay failed; running eagerly from now on: {e}");
                self.graphs = None;
                None
            }
        }
    }

    /// The step as one eager forward, then sampling: the rows sampled, and the rows that could
    /// not be (that request's failure alone: the caller ends it with its error and the rest of
    /// the batch carries on).
    fn forward_eager(
        &mut self,
        plan: &StepPlan,
        batch: &PackedBatch,
        tables: &mut [BlockTable],
        params: &RowParams,
    ) -> crate::engine::Result<(Vec<(SeqId, u32)>, Vec<(SeqId, crate::engine::EngineError)>)> {
        let last = batch.last_indices();
        let mut rows: Vec<u32> = plan.batch.iter().zip(&last).filter(|(s, _)| s.sample).map(|(_, r)| *r).collect();
        if rows.is_empty() {
            rows.push(0); // prefill chunks only: logits unused
        }
        let logits = {
            let mut kv = self.e.kv.batch(tables.iter_mut().collect());
            self.e.model.forward_lora(batch, &mut kv, Some(self.e.registry.bank()), LogitsAt::Rows(rows))?
        };
        let picks = DeviceSampling::new(&logits, params)?;
        let mut sampled = Vec::with_capacity(params.0.len());
        let mut failed = Vec::new();
        for (row, s) in plan.batch.iter().filter(|s| s.sample).enumerate() {
            let Some(live) = self.live.get_mut(&s.id) else { continue };
            match live.sampler.sample_row(&logits, row, &picks) {
                Ok(tok) => sampled.push((s.id, tok)),
                Err(e) => failed.push((s.id, e)),
            }
        }
        Ok((sampled, failed))
    }
}

/// Captures every decode-graph bucket on the engine's pool (CUDA only). A capture that fails
/// is not fatal: the server runs eagerly and says so.
pub(super) fn capture_graphs(e: &Engine, cfg: GraphConfig) -> Option<DecodeGraphs> {
    if !e.model.device().is_cuda() {
        return None;
    }
    let t = Instant::now();
    let mut graphs = DecodeGraphs::new(cfg);
    let bank = e.registry.bank();
    let bank = (!bank.is_empty()).then_some(bank as &dyn crate::engine::lora::op::LoraWeights);
    match graphs.build_all(&e.model, &e.kv.view([]), bank) {
        Ok(n) => {
            eprintln!(
                "lab serve: captured {n} decode CUDA graphs (batch 1..{}) in {:.1} s",
                graphs.max_batch(),
                t.elapsed().as_secs_f64()
            );
            Some(graphs)
        }
        Err(e) => {
            eprintln!("lab serve: CUDA graph capture failed, decoding eagerly: {e}");
            None
        }
    }
}
