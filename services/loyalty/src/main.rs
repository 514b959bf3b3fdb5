//! `clm-loyalty`: runs the loyalty service alone. See `clm serve loyalty`.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clm_platform::bootstrap::main(&clm_loyalty::DESCRIPTOR).await
}
