//! When the engine thread dies (a panic on it: a bug), no request may hang on it and the
//! server must not look alive: `/health` turns 503, every request it held or had not read yet
//! gets an error (streams: an error event, then `[DONE]`; others a 503), and the process
//! exits with code 70 so an orchestrator restarts it.

use super::*;

/// Fault-injection hook for tests, off unless set: with `LAB_FAULT_PANIC_ON_MODEL=<name>`,
/// the engine thread panics in the first step that runs a request for model `<name>` (how
/// `tests/serve_faults.rs` checks what clients see when the engine dies). Never set it in
/// production.
pub const FAULT_PANIC_ENV: &str = "LAB_FAULT_PANIC_ON_MODEL";

/// Exit code of a server whose engine thread died (EX_SOFTWARE).
pub const ENGINE_DEATH_EXIT: i32 = 70;

/// The longest the dying server waits for handlers to send the errors (then it exits anyway).
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// How long `/health` keeps answering 503 after the errors are out, so a probe sees it.
const LINGER: Duration = Duration::from_secs(1);

/// `LAB_FAULT_PANIC_ON_MODEL`, if set.
pub(super) fn fault_panic_model() -> Option<String> {
    std::env::var(FAULT_PANIC_ENV).ok().filter(|m| !m.is_empty())
}

/// Runs `body`; true if it panicked (the panic is logged).
pub(super) fn panicked(body: impl FnOnce()) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(()) => false,
        Err(p) => {
            tracing::error!("the engine thread panicked: {}", crate::engine::lora::registry::panic_text(&*p));
            true
        }
    }
}

impl EngineState {
    /// The fault hook's panic (see [`FAULT_PANIC_ENV`]).
    pub(super) fn inject_fault(&self, plan: &StepPlan) {
        let Some(model) = &self.fault_panic else { return };
        if plan.batch.iter().any(|s| self.live.get(&s.id).is_some_and(|l| &l.req.model == model)) {
            panic!("fault injected by {FAULT_PANIC_ENV}: a request for {model} is in this step");
        }
    }
}

/// After the engine thread's body panicked: `/health` 503, an error to every request it held
/// and to those still in its channel, a wait (bounded) until their handlers have answered,
/// then exit code 70. Only channels and the metrics are touched: the engine's own state may
/// be half-updated.
pub(super) fn on_engine_death(metrics: &Metrics, live: BTreeMap<SeqId, Live>, rx: mpsc::Receiver<Command>) -> ! {
    metrics.update(|m| m.engine_alive = false);
    eprintln!("lab serve: the engine thread died; /health answers 503; exiting with code {ENGINE_DEATH_EXIT}");
    let mut told = fail_all(live, &rx);
    // Submissions after this see the channel closed: 503 "the engine has stopped".
    drop(rx);
    let t0 = Instant::now();
    while t0.elapsed() < ANSWER_DEADLINE {
        told.retain(|tx| !tx.is_closed());
        if told.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(LINGER);
    std::process::exit(ENGINE_DEATH_EXIT);
}

/// Sends every request (held, or submitted and not read yet) its error; returns their channels.
fn fail_all(live: BTreeMap<SeqId, Live>, rx: &mpsc::Receiver<Command>) -> Vec<tmpsc::UnboundedSender<Event>> {
    let err = || {
        Event::Failed(ApiError::Unavailable(
            "the engine thread died (a bug); the server is exiting to be restarted: retry".into(),
        ))
    };
    let mut told: Vec<_> = live.into_values().map(|l| l.tx).collect();
    while let Ok(cmd) = rx.try_recv() {
        // Registrations and aborts waiting on a reply see it dropped: "the engine has stopped".
        if let Command::Submit(_, tx) = cmd {
            told.push(tx);
        }
    }
    for tx in &told {
        let _ = tx.send(err());
    }
    told
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_engine_body_is_reported() {
        assert!(panicked(|| panic!("boom")));
        assert!(!panicked(|| {}), "a normal return is not a death");
    }

    #[test]
    fn every_request_held_or_queued_gets_the_error() {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (tx, mut queued) = tmpsc::unbounded_channel();
        let (reply, _r) = oneshot::channel();
        cmd_tx.send(Command::AbortAll { reason: "x".into(), reply }).unwrap();
        let params = crate::engine::sampling::SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            max_tokens: 1,
            ignore_eos: false,
            stop: Vec::new(),
        };
        let req = ValidRequest {
            id: "cmpl-0".into(),
            endpoint: crate::serve::validation::Endpoint::Completion,
            model: "base".into(),
            adapter: None,
            tenant: "base".into(),
            prompt_ids: vec![1],
            params,
            stream: false,
            include_usage: false,
            created: 0,
            arrived: Instant::now(),
        };
        cmd_tx.send(Command::Submit(Box::new(req), tx)).unwrap();
        let told = fail_all(BTreeMap::new(), &cmd_rx);
        assert_eq!(told.len(), 1);
        match queued.try_recv() {
            Ok(Event::Failed(ApiError::Unavailable(m))) => assert!(m.contains("engine thread died"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
