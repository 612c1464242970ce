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
//! 4. [`install_seccomp`]: two stacked filters on every thread (`TSYNC`).
//!    The first kills the whole process on the calls that only an attacker
//!    who already runs code in it would make — `execve`, `execveat`,
//!    `ptrace`, `socket`, `process_vm_readv`/`writev` — so such an attempt
//!    ends the enclave (and its keys) instead of returning an error the
//!    attacker can retry around. The second is an allow-list of the few
//!    calls the request loop needs (read and write on its pipes, memory
//!    management, futexes, time, randomness, exit); `mmap` and `mprotect`
//!    are allowed only without `PROT_EXEC`, so no new code can be mapped.
//!    Everything else — `open`, `connect`, `clone`, ... — fails with `EPERM`:
//!    a compromised aggregation path can neither read files, talk to the
//!    network, nor start anything. The kernel applies the stricter action of
//!    the two, so the kill filter goes first (the allow-list forbids the
//!    `seccomp` call itself).
//!
//! No `unsafe` is needed: rustix and seccompiler wrap the system calls.

use std::collections::BTreeMap;

use rustix::process::{DumpableBehavior, Resource, Rlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::messages::{FatalAttempt, Hardening, ProbeAnswer};

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

/// Calls that end the process: nothing the enclave does needs them, and an
/// attempt means code the enclave does not contain is running in it.
fn fatal_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_socket,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
    ]
}

/// Calls allowed only when their protection argument (the third) lacks
/// `PROT_EXEC`: the process maps data, never new code.
const NO_EXEC_MAPPING_SYSCALLS: [i64; 2] = [libc::SYS_mmap, libc::SYS_mprotect];

/// The system calls the request loop makes once start-up is over (`mmap`
/// and `mprotect` conditionally, see [`NO_EXEC_MAPPING_SYSCALLS`]).
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

/// The file calls of one configfs-tsm request (mkdir, write, read, rmdir),
/// for the helper's allow-list on top of the pipe, memory and exit calls.
fn helper_file_syscalls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_openat,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_fcntl,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_mkdir, libc::SYS_rmdir, libc::SYS_open]);
    calls
}

/// An `ioctl` the sandbox lets through for a TEE device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIoctl {
    /// The device's descriptor, when known (then only on it).
    pub fd: Option<i32>,
    /// The request number.
    pub request: u32,
}

/// `_IOWR(kind, number, size)` of linux/ioctl.h (the generic layout, which
/// x86_64 and aarch64 use): direction read|write in the top two bits, then
/// 14 bits of argument size, the type byte and the number.
pub const fn ioctl_write_read(kind: u8, number: u8, size: u32) -> u32 {
    (3 << 30) | ((size & 0x3FFF) << 16) | ((kind as u32) << 8) | number as u32
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

fn target_arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError(format!("unsupported architecture: {e:?}")))
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    SeccompFilter::new(rules, mismatch, matched, target_arch()?)
        .map_err(|e| SeccompError(e.to_string()))?
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))
}

/// The first filter: [`fatal_syscalls`] kill the process, all else passes
/// on to the allow-list.
fn compile_fatal(mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let rules = fatal_syscalls()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let matched = match mode {
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    build(rules, SeccompAction::Allow, matched)
}

fn condition(
    argument: u8,
    operation: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(argument, SeccompCmpArgLen::Dword, operation, value)
        .map_err(|e| SeccompError(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| SeccompError(e.to_string()))
}

/// One rule per device request: `ioctl(fd, request, ...)` with the request
/// number (and the descriptor, when given) equal.
fn ioctl_rules(ioctls: &[DeviceIoctl]) -> Result<Vec<SeccompRule>, SeccompError> {
    ioctls
        .iter()
        .map(|allowed| {
            let mut conditions = vec![condition(1, SeccompCmpOp::Eq, u64::from(allowed.request))?];
            if let Some(fd) = allowed.fd {
                let fd = u64::try_from(fd)
                    .map_err(|_| SeccompError(format!("device descriptor {fd}")))?;
                conditions.push(condition(0, SeccompCmpOp::Eq, fd)?);
            }
            rule(conditions)
        })
        .collect()
}

/// The second filter: the allow-list (`calls`), with `mmap` and `mprotect`
/// allowed only when `prot & PROT_EXEC == 0`, and `ioctl` only as `ioctls`
/// name.
fn compile_allow_list(
    mode: SeccompMode,
    calls: Vec<i64>,
    ioctls: &[DeviceIoctl],
) -> Result<BpfProgram, SeccompError> {
    let without_exec = || -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![rule(vec![condition(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    let mut rules = BTreeMap::new();
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, ioctl_rules(ioctls)?);
    }
    for call in calls {
        let conditions = if NO_EXEC_MAPPING_SYSCALLS.contains(&call) {
            without_exec()?
        } else {
            Vec::new()
        };
        rules.insert(call, conditions);
    }
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Log => SeccompAction::Log,
    };
    build(rules, mismatch, SeccompAction::Allow)
}

/// Step 4: installs both filters on every thread of the process, the kill
/// filter first (once the allow-list is in, `seccomp(2)` itself is refused).
/// `device_ioctls` are a TEE backend's evidence requests (none in software
/// mode).
pub fn install_seccomp(
    mode: SeccompMode,
    device_ioctls: &[DeviceIoctl],
) -> Result<(), SeccompError> {
    apply(
        compile_fatal(mode)?,
        compile_allow_list(mode, allowed_syscalls(), device_ioctls)?,
    )
}

/// The configfs-tsm helper's filters: the enclave's kill filter, then its
/// allow-list plus [`helper_file_syscalls`].
pub fn install_helper_seccomp(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut calls = allowed_syscalls();
    calls.extend(helper_file_syscalls());
    apply(compile_fatal(mode)?, compile_allow_list(mode, calls, &[])?)
}

fn apply(fatal: BpfProgram, allow_list: BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(&fatal).map_err(|e| SeccompError(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&allow_list).map_err(|e| SeccompError(e.to_string()))
}

/// Tries what the sandbox should refuse, from inside, and reports. The calls
/// it kills for are tried by [`attempt_fatal`] instead.
pub fn probe(hardening: Hardening) -> ProbeAnswer {
    let open_blocked = std::fs::File::open("/proc/self/status").is_err();
    // Fails at clone(2) with EPERM, before any execve.
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
        exec_blocked,
        environment,
    }
}

/// Makes a call the sandbox kills for; returns only when it did not (the
/// sandbox is off or in log mode).
pub fn attempt_fatal(attempt: FatalAttempt) {
    match attempt {
        FatalAttempt::Socket => {
            let outcome = std::net::UdpSocket::bind("127.0.0.1:0");
            tracing::warn!(
                ok = outcome.is_ok(),
                "the fatal probe returned: the sandbox is not enforcing"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let device = [
            DeviceIoctl {
                fd: None,
                request: ioctl_write_read(b'S', 0, 32),
            },
            DeviceIoctl {
                fd: Some(3),
                request: ioctl_write_read(0x0A, 0, 32),
            },
        ];
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            assert!(compile_fatal(mode).is_ok_and(|program| !program.is_empty()));
            let plain = compile_allow_list(mode, allowed_syscalls(), &[]).unwrap();
            let with_devices = compile_allow_list(mode, allowed_syscalls(), &device).unwrap();
            assert!(!plain.is_empty() && with_devices.len() > plain.len());
        }
        assert!(matches!(
            ioctl_rules(&[DeviceIoctl {
                fd: Some(-1),
                request: 1
            }]),
            Err(SeccompError(_))
        ));
        // The helper's extra calls are file calls, never the fatal ones.
        for call in helper_file_syscalls() {
            assert!(!fatal_syscalls().contains(&call));
        }
        let allowed = allowed_syscalls();
        let fatal = fatal_syscalls();
        for forbidden in [libc::SYS_openat, libc::SYS_clone, libc::SYS_clone3] {
            assert!(!allowed.contains(&forbidden) && !fatal.contains(&forbidden));
        }
        for killed in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_socket] {
            assert!(fatal.contains(&killed) && !allowed.contains(&killed));
        }
        // The behaviour itself is tested from outside, in real processes:
        // tests/sandbox.rs and tests/process.rs.
    }
}
