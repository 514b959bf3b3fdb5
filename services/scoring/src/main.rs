//! `clm-scoring`: runs the scoring service alone. See `clm serve scoring`.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clm_platform::bootstrap::main(&clm_scoring::DESCRIPTOR).await
}
