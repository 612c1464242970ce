//! `qflare-enclave`: the isolated aggregation process (see the crate docs).

fn main() -> std::process::ExitCode {
    qflare_enclave::process::main()
}
