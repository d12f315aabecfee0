//! Process tests' support: the project's binaries started as real processes (`process`) and a
//! minimal HTTP client for their API (`http`). Models, the reference and the single-process
//! cluster come from the test kit, `gemma-testkit`.

pub mod http;
pub mod process;
