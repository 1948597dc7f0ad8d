//! Text in and out: the tokenizer with its chat template, and incremental detokenization
//! with stop strings.

pub mod detokenizer;
pub mod tokenizer;
