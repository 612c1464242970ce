//! The seccomp filters exactly as the enclave installs them
//! (`sandbox::install_seccomp`), tested from outside: a sandbox is for the
//! life of a process, so each case runs in a fresh copy of this test binary
//! that installs the filters and makes one system call, and the parent reads
//! how the child ended — killed by `SIGSYS`, or exited with the call's errno.

// Raw system calls are the point: std has no safe way to make exactly these
// calls (its wrappers make others first, which the sandbox refuses), and the
// library crate itself stays free of unsafe code.
#![allow(unsafe_code)]
// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use qflare_enclave::sandbox::{
    DeviceIoctl, SeccompMode, install_helper_seccomp, install_seccomp, ioctl_write_read,
};

/// Names the case a child runs; unset in the parent.
const CASE: &str = "QFLARE_SANDBOX_CASE";
/// The child's test; it does nothing unless [`CASE`] is set.
const CHILD_TEST: &str = "sandboxed_child";

/// The device request the children's filter lets through on stdin (which
/// is `/dev/null`, so the kernel answers it with `ENOTTY`): SEV-SNP's
/// `SNP_GET_REPORT` number.
const DEVICE_REQUEST: u32 = ioctl_write_read(b'S', 0, 32);

/// A child exits with 0 when its call succeeded, else with the call's errno.
fn outcome(result: libc::c_long) -> i32 {
    if result == -1 {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(255)
    } else {
        0
    }
}

fn page_map(prot: libc::c_int) -> libc::c_long {
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // overlaps nothing; it is never unmapped or used (the process exits).
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        -1
    } else {
        address as libc::c_long
    }
}

/// The one call a child makes once the sandbox is up.
fn make_call(case: &str) -> libc::c_long {
    // SAFETY (every block below): the calls take no pointers into this
    // process's memory except static C strings and a page mapped just
    // before; the ones the sandbox lets through have no effect the test
    // relies on afterwards.
    match case {
        "execve" => unsafe {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                argv.as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
            )
        },
        "socket" => unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_DGRAM, 0) },
        "ptrace" => unsafe {
            libc::syscall(
                libc::SYS_ptrace,
                libc::PTRACE_TRACEME,
                0,
                std::ptr::null::<libc::c_void>(),
                std::ptr::null::<libc::c_void>(),
            )
        },
        "openat" => unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/proc/self/status".as_ptr(),
                libc::O_RDONLY,
            )
        },
        "ioctl-allowed" => unsafe { libc::syscall(libc::SYS_ioctl, 0, DEVICE_REQUEST, 0) },
        "ioctl-other-request" => unsafe {
            libc::syscall(libc::SYS_ioctl, 0, DEVICE_REQUEST + 2, 0)
        },
        "ioctl-other-fd" => unsafe { libc::syscall(libc::SYS_ioctl, 2, DEVICE_REQUEST, 0) },
        "helper-openat" => make_call("openat"),
        "helper-socket" => make_call("socket"),
        "mmap-data" => page_map(libc::PROT_READ | libc::PROT_WRITE),
        "mmap-exec" => page_map(libc::PROT_READ | libc::PROT_EXEC),
        "mprotect-exec" => {
            let page = page_map(libc::PROT_READ | libc::PROT_WRITE);
            assert_ne!(page, -1, "a data mapping must be allowed");
            unsafe {
                libc::syscall(
                    libc::SYS_mprotect,
                    page,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            }
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn sandboxed_child() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    if case.starts_with("helper-") {
        install_helper_seccomp(SeccompMode::Enforce).unwrap();
    } else {
        let device = DeviceIoctl {
            fd: Some(0),
            request: DEVICE_REQUEST,
        };
        install_seccomp(SeccompMode::Enforce, &[device]).unwrap();
    }
    let code = outcome(make_call(&case));
    std::process::exit(code);
}

/// Runs `case` in a sandboxed copy of this binary.
fn run_case(case: &str) -> ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CASE, case)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

#[test]
fn execve_ptrace_and_socket_kill_the_process() {
    for case in ["execve", "ptrace", "socket"] {
        let status = run_case(case);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{case}: {status:?}");
    }
}

#[test]
fn executable_mappings_are_refused_and_data_mappings_allowed() {
    for (case, errno) in [("mmap-exec", libc::EPERM), ("mprotect-exec", libc::EPERM)] {
        let status = run_case(case);
        assert_eq!(status.code(), Some(errno), "{case}: {status:?}");
    }
    let status = run_case("mmap-data");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn files_stay_closed_without_killing() {
    let status = run_case("openat");
    assert_eq!(status.code(), Some(libc::EPERM), "{status:?}");
}

#[test]
fn a_tee_device_request_passes_only_as_named() {
    let status = run_case("ioctl-allowed");
    assert_eq!(
        status.code(),
        Some(libc::ENOTTY),
        "reached the kernel: {status:?}"
    );
    for case in ["ioctl-other-request", "ioctl-other-fd"] {
        let status = run_case(case);
        assert_eq!(status.code(), Some(libc::EPERM), "{case}: {status:?}");
    }
}

#[test]
fn the_tsm_helper_may_open_files_but_never_a_socket() {
    let status = run_case("helper-openat");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let status = run_case("helper-socket");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}
