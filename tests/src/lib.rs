//! Cross-service end-to-end tests (`e2e/`), the benchmark clients
//! (`src/bin`), the requests the journeys are made of ([`journey`]) and
//! the generated-client tests in other languages (`clients/`).
#![forbid(unsafe_code)]

pub mod journey;
