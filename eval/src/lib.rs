//! # ragway-eval
//!
//! Offline evaluation: datasets, metrics with their published definitions, runners and
//! reports. So far: retrieval metrics as pytrec_eval computes them.

pub mod retrieval;
