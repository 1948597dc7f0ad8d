//! `lab`: train LoRA adapters, serve many of them on one base model, load-test the server.
//!
//! `engine` is shared by every subcommand; `cli` is the only module that knows clap;
//! `commands` holds one entry point per subcommand.

pub mod cli;
pub mod commands;
pub mod datasets;
pub mod engine;
pub mod eval;
pub mod loadtest;
pub mod openai;
pub mod serve;
pub mod train;
