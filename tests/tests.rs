//! Integration tests, one binary with a module per area (ripgrep style).

mod serve_util;
mod util;

mod cli;
mod loadtest;
mod lora;
mod model_parity;
mod peft_interop;
mod prefix_cache;
mod serve;
mod tokenizer;
mod train;
