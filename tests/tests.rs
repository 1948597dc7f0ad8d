//! Integration tests, one binary with a module per area (ripgrep style).

mod util;

mod cli;
mod lora;
mod model_parity;
mod peft_interop;
mod tokenizer;
mod train;
