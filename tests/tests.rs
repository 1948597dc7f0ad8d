//! Integration tests, one binary with a module per area (ripgrep style).

mod util;

mod cli;
mod model_parity;
mod tokenizer;
