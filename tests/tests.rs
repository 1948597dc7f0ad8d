//! Integration tests, one binary with a module per area (ripgrep style).

mod serve_util;
mod util;

mod cli;
mod loadtest;
mod lora;
mod model_parity;
mod peft_interop;
mod prefix_cache;
mod props;
mod serve;
mod serve_faults;
mod serve_limits;
mod serve_poison;
mod serve_tenant;
mod tokenizer;
mod train;
