//! Cross-service end-to-end tests (`e2e/`), the ingest benchmark client
//! (`src/bin/bench_ingest.rs`) and the generated-client tests in other
//! languages (`clients/`).
#![forbid(unsafe_code)]
