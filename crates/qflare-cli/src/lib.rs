//! The `qflare` command's reusable parts: the in-process federation
//! ([`sim`]) behind `qflare demo`, `qflare bench fedavg` and the end-to-end
//! tests. The command itself lives in `main.rs`.

#![forbid(unsafe_code)]

pub mod sim;
