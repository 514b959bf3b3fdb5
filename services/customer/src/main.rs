//! `clm-customer`: runs the customer service alone. See `clm serve customer`.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clm_platform::bootstrap::main(&clm_customer::DESCRIPTOR).await
}
