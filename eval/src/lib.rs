//! # ragway-eval
//!
//! Offline evaluation: datasets ([`datasets`]), metrics with their published definitions
//! ([`retrieval`] as pytrec_eval, [`answer`] as the SQuAD scripts), seeded statistics
//! ([`stats`]), the judge ([`judge`]), the systems under test ([`backend`]), runs
//! ([`runner`]), reports ([`report`]) and comparisons between runs ([`compare`]).

pub mod answer;
pub mod backend;
pub mod compare;
pub mod datasets;
pub mod judge;
pub mod report;
pub mod retrieval;
pub mod runner;
pub mod stats;
