//! `clm-feedback`: runs the feedback service alone. See `clm serve feedback`.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clm_platform::bootstrap::main(&clm_feedback::DESCRIPTOR).await
}
