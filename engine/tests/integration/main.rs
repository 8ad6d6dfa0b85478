//! Engine integration tests with the real all-MiniLM-L6-v2 weights (one test binary, one
//! module per area). The models come from `scripts/setup-models.sh`.

mod common;
mod constrained;
mod embeddings;
mod generate_worker;
mod gemma3;
mod families;
mod generation;
mod paged;
mod requantized;
mod worker;
