//! ragway-eval: datasets, metrics, runners and reports for offline evaluation.
//! Built by the evaluation issue; nothing is exported yet.
