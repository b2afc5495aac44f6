//! Seccomp for the kvm backend's threads that run device models and move the guest's
//! bytes: the vCPUs and the agent channel's pump.
//!
//! Each installs [`confine_thread`] first: a classic BPF filter, per thread (the library
//! may run the VMM inside a caller's process, whose other threads stay as they are),
//! inherited by threads it starts. Like QEMU's `-sandbox` it denies the calls that would
//! take the VMM somewhere new, and **the process** is killed (SIGSYS) on the first one:
//! starting programs or processes (execve, fork, clone without CLONE_THREAD or with a
//! new namespace), tracing or writing other processes, mounts and namespaces, kernel
//! modules, kexec and reboot, BPF, perf, keyrings, userfaultfd, io_uring (which makes
//! sockets of its own), port I/O privileges, and new sockets. `clone3` answers ENOSYS, so
//! that thread creation falls back to `clone`, whose flags the filter can see. Calls of
//! another ABI (x32, i386) are killed too. `PR_SET_NO_NEW_PRIVS` comes with it, so
//! set*id and capset can only lower privileges and stay allowed (glibc makes every
//! thread of a process repeat them, so denying them would kill a caller that drops
//! privileges while a VM runs).
//!
//! What it is not: a boundary between threads. The confined threads share the address
//! space of the supervisor's and (in-process) the caller's, which can still do all of
//! this; a thread taken over can write their memory. What it buys is that a guest
//! exploiting a device model cannot simply exec a shell, open a socket or load a module
//! from the thread it took; running the VMM in a helper process (`VMHOST_USE_HELPER=1`)
//! keeps a kill from taking the caller's process with it. Everything else a Rust thread
//! does (memory, futexes, files it holds, KVM ioctls, logging to stderr) stays allowed:
//! an allow-list is stricter, but one written here could not be checked against a Linux
//! guest on hardware virtualization.

use crate::vm::kvm::Error;

/// The system calls the filter kills the process for (x86-64 numbers).
const DENIED: &[(u32, &str)] = &[
    (59, "execve"),
    (322, "execveat"),
    (57, "fork"),
    (58, "vfork"),
    (101, "ptrace"),
    (310, "process_vm_readv"),
    (311, "process_vm_writev"),
    (165, "mount"),
    (166, "umount2"),
    (155, "pivot_root"),
    (161, "chroot"),
    (272, "unshare"),
    (308, "setns"),
    (175, "init_module"),
    (313, "finit_module"),
    (176, "delete_module"),
    (246, "kexec_load"),
    (320, "kexec_file_load"),
    (169, "reboot"),
    (321, "bpf"),
    (298, "perf_event_open"),
    (248, "add_key"),
    (249, "request_key"),
    (250, "keyctl"),
    (323, "userfaultfd"),
    (172, "iopl"),
    (173, "ioperm"),
    (303, "name_to_handle_at"),
    (304, "open_by_handle_at"),
    (135, "personality"),
    (41, "socket"),
    (53, "socketpair"),
    (425, "io_uring_setup"),
    (426, "io_uring_enter"),
    (427, "io_uring_register"),
];

const NR_CLONE: u32 = 56;
const NR_CLONE3: u32 = 435;
const CLONE_THREAD: u32 = 0x0001_0000;
/// CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
const CLONE_NEW_NAMESPACES: u32 = 0x7E02_0000;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ALLOW: u32 = 0x7FFF_0000;
const RET_ERRNO: u32 = 0x0005_0000;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

// struct seccomp_data: nr at 0, arch at 4, instruction pointer at 8, args from 16.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LOW: u32 = 16;

fn stmt(code: u16, k: u32) -> nix::libc::sock_filter {
    nix::libc::sock_filter { code, jt: 0, jf: 0, k }
}

/// The filter program, every jump forward to one of three returns at its end:
///
/// ```text
/// load arch;  != x86-64            -> KILL
/// load nr;    >= x32 bit           -> KILL
///             == each denied call  -> KILL
///             == clone3            -> ENOSYS
///             != clone             -> ALLOW
/// load flags; a new namespace      -> KILL
///             CLONE_THREAD set     -> ALLOW, else KILL
/// ALLOW: allow   KILL: kill the process   ENOSYS: fail with ENOSYS
/// ```
pub fn program() -> Vec<nix::libc::sock_filter> {
    #[derive(Clone, Copy)]
    enum To {
        Next,
        Allow,
        Kill,
        Enosys,
    }
    let mut steps: Vec<(u16, u32, To, To)> = vec![
        (LD_W_ABS, OFF_ARCH, To::Next, To::Next),
        (JEQ_K, AUDIT_ARCH_X86_64, To::Next, To::Kill),
        (LD_W_ABS, OFF_NR, To::Next, To::Next),
        (JGE_K, X32_SYSCALL_BIT, To::Kill, To::Next),
    ];
    steps.extend(DENIED.iter().map(|&(nr, _)| (JEQ_K, nr, To::Kill, To::Next)));
    steps.extend([
        (JEQ_K, NR_CLONE3, To::Enosys, To::Next),
        (JEQ_K, NR_CLONE, To::Next, To::Allow),
        (LD_W_ABS, OFF_ARG0_LOW, To::Next, To::Next),
        (JSET_K, CLONE_NEW_NAMESPACES, To::Kill, To::Next),
        (JSET_K, CLONE_THREAD, To::Allow, To::Kill),
    ]);
    let (allow, kill, enosys) = (steps.len(), steps.len() + 1, steps.len() + 2);
    let off = |from: usize, to: To| -> u8 {
        let target = match to {
            To::Next => return 0,
            To::Allow => allow,
            To::Kill => kill,
            To::Enosys => enosys,
        };
        u8::try_from(target - from - 1).expect("a filter short enough for 8-bit jumps")
    };
    let mut p: Vec<nix::libc::sock_filter> = steps
        .iter()
        .enumerate()
        .map(|(i, &(code, k, jt, jf))| nix::libc::sock_filter { code, jt: off(i, jt), jf: off(i, jf), k })
        .collect();
    p.push(stmt(RET_K, RET_ALLOW));
    p.push(stmt(RET_K, RET_KILL_PROCESS));
    p.push(stmt(RET_K, RET_ERRNO | nix::libc::ENOSYS as u32));
    p
}

/// Installs the filter on the calling thread (and the threads it will start).
pub fn confine_thread() -> Result<(), Error> {
    let prog = program();
    let fprog = nix::libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut _ };
    // SAFETY: prctl and seccomp with valid arguments; `prog` outlives the call (the
    // kernel copies the program).
    unsafe {
        if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(confining(std::io::Error::last_os_error()));
        }
        let r = nix::libc::syscall(
            nix::libc::SYS_seccomp,
            nix::libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const nix::libc::sock_fprog,
        );
        if r != 0 {
            return Err(confining(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn confining(source: std::io::Error) -> Error {
    Error::Host { op: "confine a VMM thread with seccomp".into(), source }
}
