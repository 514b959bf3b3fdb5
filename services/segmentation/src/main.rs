//! `clm-segmentation`: runs the segmentation service alone. See `clm serve segmentation`.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clm_platform::bootstrap::main(&clm_segmentation::DESCRIPTOR).await
}
