//! The enclave process's self-hardening, in the order it happens at start-up:
//!
//! 1. [`harden_process`]: `PR_SET_DUMPABLE = 0` (no ptrace attach by other
//!    processes of the same user, no `/proc/<pid>/mem` reads, no core dumps)
//!    and `RLIMIT_CORE = 0`.
//! 2. Everything that needs the file system happens next (measuring the
//!    executable, loading FLTrust's root data, starting the compute threads).
//! 3. [`lock_memory`]: `mlockall(MCL_CURRENT | MCL_FUTURE)` so keys and
//!    plaintext updates never reach swap — only where the memlock limit
//!    allows it, since a locked process that outgrows a finite limit would
//!    fail its next allocation.
//! 4. [`install_seccomp`]: an allow-list of the few system calls the request
//!    loop needs (read and write on its pipes, memory management, futexes,
//!    time, randomness, exit), applied to every thread (`TSYNC`). Everything
//!    else — `open`, `socket`, `connect`, `execve`, `clone`, `ptrace`, ... —
//!    fails with `EPERM`, so a compromised aggregation path can neither read
//!    files, talk to the network, nor start anything.
//!
//! No `unsafe` is needed: rustix and seccompiler wrap the system calls.

use std::collections::BTreeMap;

use rustix::process::{DumpableBehavior, Resource, Rlimit};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::messages::{Hardening, ProbeAnswer};

/// Step 1: not dumpable, no core files. Failures are reported, not fatal:
/// they leave the process less protected but still correct.
pub fn harden_process() -> Hardening {
    let not_dumpable =
        rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable).is_ok();
    let no_core_files = rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .is_ok();
    Hardening {
        not_dumpable,
        no_core_files,
        memory_locked: false,
        seccomp: false,
    }
}

/// Step 3: locks all current and future memory when the limit is unbounded
/// (or the process may ignore it, as root may).
pub fn lock_memory() -> bool {
    let limit = rustix::process::getrlimit(Resource::Memlock);
    let privileged = rustix::process::geteuid().is_root();
    if limit.current.is_some() && !privileged {
        tracing::info!(limit = ?limit.current, "memory not locked: the memlock limit is finite");
        return false;
    }
    match rustix::mm::mlockall(
        rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE,
    ) {
        Ok(()) => true,
        Err(err) => {
            tracing::info!(%err, "memory not locked");
            false
        }
    }
}

/// The system calls the request loop makes once start-up is over.
fn allowed_syscalls() -> Vec<i64> {
    let mut calls = vec![
        // stdin, stdout, stderr
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        // memory
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        // threads already running (the compute pool) and their sleep
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        // time and randomness (aws-lc's DRBG reseeds from getrandom)
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_getrandom,
        // leaving
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.push(libc::SYS_time);
    calls
}

/// How forbidden system calls are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Forbidden calls fail with `EPERM` (the default).
    Enforce,
    /// Forbidden calls are allowed and logged by the kernel (diagnosis only).
    Log,
}

/// Errors installing the filter.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

fn compile(mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError(format!("unsupported architecture: {e:?}")))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))
}

/// Step 4: installs the allow-list on every thread of the process.
pub fn install_seccomp(mode: SeccompMode) -> Result<(), SeccompError> {
    let program = compile(mode)?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| SeccompError(e.to_string()))
}

/// Tries what the sandbox should forbid, from inside, and reports.
pub fn probe(hardening: Hardening) -> ProbeAnswer {
    let open_blocked = std::fs::File::open("/proc/self/status").is_err();
    let socket_blocked = std::net::UdpSocket::bind("127.0.0.1:0").is_err();
    let exec_blocked = std::process::Command::new("/bin/true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_err();
    let environment = std::env::vars_os()
        .map(|(name, _)| name.to_string_lossy().into_owned())
        .collect();
    ProbeAnswer {
        hardening,
        open_blocked,
        socket_blocked,
        exec_blocked,
        environment,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_for_this_machine() {
        assert!(compile(SeccompMode::Enforce).is_ok_and(|program| !program.is_empty()));
        let calls = allowed_syscalls();
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_ptrace,
        ] {
            assert!(!calls.contains(&forbidden));
        }
    }
}
