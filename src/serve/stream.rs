//! Response shapes: one JSON body for non-streamed requests, or server-sent events (OpenAI
//! chunks, then `data: [DONE]`). Dropping the SSE stream (client gone) drops the engine
//! channel, which the engine sees at its next step.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use tokio::sync::mpsc::UnboundedReceiver;

use super::batcher::Event;
use super::error::ApiError;
use super::validation::{Endpoint, ValidRequest};
use crate::engine::sampling::FinishReason;
use crate::engine::text::tokenizer::ChatMessage;
use crate::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta, CompletionChoice,
    CompletionResponse, Usage,
};

/// What every chunk of one response repeats.
#[derive(Debug, Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
}

fn reason_str(r: FinishReason) -> String {
    match r {
        FinishReason::Stop => "stop".into(),
        FinishReason::Length => "length".into(),
    }
}

impl Head {
    fn of(req: &ValidRequest) -> Self {
        Self { id: req.id.clone(), created: req.created, model: req.model.clone(), endpoint: req.endpoint }
    }

    fn chat_chunk(&self, delta: ChatDelta, finish: Option<FinishReason>, usage: Option<Usage>) -> String {
        let choices = if usage.is_some() {
            vec![]
        } else {
            vec![ChatChunkChoice { index: 0, delta, finish_reason: finish.map(reason_str) }]
        };
        let c = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).expect("chunk serializes")
    }

    fn completion_chunk(&self, text: String, finish: Option<FinishReason>, usage: Option<Usage>) -> String {
        let choices = if usage.is_some() {
            vec![]
        } else {
            vec![CompletionChoice { index: 0, text, logprobs: None, finish_reason: finish.map(reason_str) }]
        };
        serde_json::to_string(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
        .expect("chunk serializes")
    }

    fn text(&self, t: String) -> String {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(ChatDelta { role: None, content: Some(t) }, None, None),
            Endpoint::Completion => self.completion_chunk(t, None, None),
        }
    }

    fn finish(&self, r: FinishReason) -> String {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(ChatDelta::default(), Some(r), None),
            Endpoint::Completion => self.completion_chunk(String::new(), Some(r), None),
        }
    }

    fn usage(&self, u: Usage) -> String {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(ChatDelta::default(), None, Some(u)),
            Endpoint::Completion => self.completion_chunk(String::new(), None, Some(u)),
        }
    }
}

/// The SSE response of a streamed request.
pub fn sse(req: &ValidRequest, rx: UnboundedReceiver<Event>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let head = Head::of(req);
    let mut queue = VecDeque::new();
    if head.endpoint == Endpoint::Chat {
        queue.push_back(head.chat_chunk(
            ChatDelta { role: Some("assistant".into()), content: Some(String::new()) },
            None,
            None,
        ));
    }
    let include_usage = req.include_usage;
    let s = stream::unfold((rx, head, queue, false), move |(mut rx, head, mut queue, mut done)| async move {
        loop {
            if let Some(data) = queue.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), (rx, head, queue, done)));
            }
            if done {
                return None;
            }
            match rx.recv().await {
                Some(Event::Text(t)) => queue.push_back(head.text(t)),
                Some(Event::Finished { reason, usage }) => {
                    queue.push_back(head.finish(reason));
                    if include_usage {
                        queue.push_back(head.usage(usage));
                    }
                    queue.push_back("[DONE]".into());
                    done = true;
                }
                Some(Event::Failed(e)) => {
                    queue.push_back(serde_json::to_string(&e.body()).expect("error serializes"));
                    queue.push_back("[DONE]".into());
                    done = true;
                }
                None => {
                    let e = ApiError::Internal("the engine dropped the request".into());
                    queue.push_back(serde_json::to_string(&e.body()).expect("error serializes"));
                    queue.push_back("[DONE]".into());
                    done = true;
                }
            }
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// Waits for the whole output of a non-streamed request and builds its JSON body.
pub async fn collect(req: &ValidRequest, mut rx: UnboundedReceiver<Event>) -> Result<serde_json::Value, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Finished { reason, usage }) => return Ok(body(req, text, reason, usage)),
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::Internal("the engine dropped the request".into())),
        }
    }
}

fn body(req: &ValidRequest, text: String, reason: FinishReason, usage: Usage) -> serde_json::Value {
    let v = match req.endpoint {
        Endpoint::Chat => serde_json::to_value(ChatCompletionResponse {
            id: req.id.clone(),
            object: "chat.completion".into(),
            created: req.created,
            model: req.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessage::new("assistant", &text),
                finish_reason: Some(reason_str(reason)),
            }],
            usage: Some(usage),
        }),
        Endpoint::Completion => serde_json::to_value(CompletionResponse {
            id: req.id.clone(),
            object: "text_completion".into(),
            created: req.created,
            model: req.model.clone(),
            choices: vec![CompletionChoice { index: 0, text, logprobs: None, finish_reason: Some(reason_str(reason)) }],
            usage: Some(usage),
        }),
    };
    v.expect("response serializes")
}
