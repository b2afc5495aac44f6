//! The KVM backend's VMM core on the real /dev/kvm: small guest programs, assembled
//! here by hand in real mode, exercise the vCPU loop, port-I/O and MMIO exits into
//! devices, the UART, two vCPUs at once, pause and resume, stopping a vCPU that never
//! leaves the guest, and a guest fault reported as an error.
//!
//! On these machines /dev/kvm is PVM (no hardware virtualization): kernel- and real-mode
//! guest code is emulated by KVM, which is enough for these programs, not for Linux.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use vmhost::vm::kvm::devices::i8042::I8042;
use vmhost::vm::kvm::devices::serial::Serial;
use vmhost::vm::kvm::vcpu::VcpuState;
use vmhost::vm::kvm::{BusDevice, Vcpu, VcpuSetup, Vmm};

const GUARD: Duration = Duration::from_secs(30);

/// How `v` ended up once it left the guest code it was running (HLT, a fault...);
/// GUARD is a hang guard only.
fn settle(v: &Vcpu) -> VcpuState {
    v.wait_for(GUARD, |s| *s != VcpuState::Running)
}

/// Writes `code` at `at` (below 64 KiB) and starts vCPU 0 there in real mode.
fn start_real_mode<'a>(vmm: &'a mut Vmm, at: u16, code: &[u8]) -> &'a Vcpu {
    vmm.memory().write(at as u64, code).unwrap();
    vmm.start_vcpu(0, VcpuSetup::real_mode(0, at), false).unwrap()
}

/// Asks `v` to stop and checks that it does: a vCPU that never leaves the guest by
/// itself must be kicked out of it.
fn assert_stops(v: &Vcpu) {
    v.request_stop();
    assert_eq!(v.wait_for(GUARD, VcpuState::is_final), VcpuState::Stopped, "vCPU {} did not stop", v.id());
}

/// Whether /dev/kvm can be used; under CI its absence fails the test.
fn kvm_ready(test: &str) -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            assert!(!common::under_ci(), "{test}: /dev/kvm: {e}");
            eprintln!("SKIP {test}: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 1 MiB of RAM with the 0xA0000-0xBFFFF hole for MMIO, and a UART at 0x3f8.
fn machine() -> (Vmm, Sink) {
    machine_with(1 << 20, &[(0xA_0000, 0x2_0000)])
}

/// A VM of `size` bytes less `holes`, with a UART at 0x3F8 writing into the sink.
fn machine_with(size: u64, holes: &[(u64, u64)]) -> (Vmm, Sink) {
    let vmm = Vmm::new(size, holes).unwrap();
    let sink = Sink::default();
    let uart = Serial::new(Box::new(sink.clone()), Box::new(|| {}));
    vmm.pio().insert(0x3f8, 8, Arc::new(Mutex::new(uart))).unwrap();
    (vmm, sink)
}

/// Counts writes per port and remembers MMIO writes; reads answer 0x37.
#[derive(Default)]
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Probe {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x37);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

struct Counter(Arc<AtomicU64>);
impl BusDevice for Counter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_real_mode_program_prints_through_the_uart_and_halts() {
    if !kvm_ready("a_real_mode_program_prints_through_the_uart_and_halts") {
        return;
    }
    let (mut vmm, sink) = machine();
    #[rustfmt::skip]
    let mut code = vec![
        0xBA, 0xF8, 0x03,       // mov dx, 0x3f8
        0xBE, 0x0F, 0x10,       // mov si, 0x100f (the message)
        0xAC,                   // l: lodsb
        0x84, 0xC0,             // test al, al
        0x74, 0x03,             // jz done
        0xEE,                   // out dx, al
        0xEB, 0xF8,             // jmp l
        0xF4,                   // done: hlt
    ];
    code.extend_from_slice(b"hello from kvm\n\0");
    let v = start_real_mode(&mut vmm, 0x1000, &code);
    assert_eq!(settle(v), VcpuState::Halted);
    assert_eq!(String::from_utf8_lossy(&sink.0.lock()), "hello from kvm\n");
    assert_eq!(vmm.pio().unclaimed(), 0);
    vmm.stop();
}

#[test]
fn mmio_reads_and_writes_reach_the_device_in_the_hole() {
    if !kvm_ready("mmio_reads_and_writes_reach_the_device_in_the_hole") {
        return;
    }
    let (mut vmm, sink) = machine();
    let probe = Arc::new(Mutex::new(Probe::default()));
    vmm.mmio().insert(0xA_0000, 0x1000, probe.clone()).unwrap();
    #[rustfmt::skip]
    let code = [
        0xB8, 0x00, 0xA0,                   // mov ax, 0xA000
        0x8E, 0xC0,                         // mov es, ax
        0x26, 0xC6, 0x06, 0x10, 0x00, 0x42, // mov byte [es:0x10], 0x42
        0x26, 0xA0, 0x20, 0x00,             // mov al, [es:0x20]
        0xBA, 0xF8, 0x03,                   // mov dx, 0x3f8
        0xEE,                               // out dx, al
        0xF4,                               // hlt
    ];
    let v = start_real_mode(&mut vmm, 0x1000, &code);
    assert_eq!(settle(v), VcpuState::Halted);
    assert_eq!(probe.lock().writes, vec![(0x10, vec![0x42])]);
    assert_eq!(*sink.0.lock(), b"7", "the MMIO read's 0x37 went out of the UART");
    vmm.stop();
}

/// `mov cx, n; l: out dx, al; loop l; hlt` with dx = the port.
fn out_loop(n: u16) -> Vec<u8> {
    let [lo, hi] = n.to_le_bytes();
    vec![0xB9, lo, hi, 0xEE, 0xE2, 0xFD, 0xF4]
}

#[test]
fn two_vcpus_run_at_once_on_their_own_ports() {
    if !kvm_ready("two_vcpus_run_at_once_on_their_own_ports") {
        return;
    }
    let (mut vmm, _) = machine();
    let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    for (i, c) in counts.iter().enumerate() {
        vmm.pio().insert(0x500 + i as u64, 1, Arc::new(Mutex::new(Counter(c.clone())))).unwrap();
    }
    vmm.memory().write(0x2000, &out_loop(500)).unwrap();
    for id in 0..2u8 {
        let mut setup = VcpuSetup::real_mode(0, 0x2000);
        setup.regs.rdx = 0x500 + id as u64;
        vmm.start_vcpu(id, setup, false).unwrap();
    }
    for v in vmm.vcpus() {
        assert_eq!(settle(v), VcpuState::Halted, "vCPU {}", v.id());
    }
    assert_eq!(counts[0].load(Ordering::SeqCst), 500);
    assert_eq!(counts[1].load(Ordering::SeqCst), 500);
    vmm.stop();
}

#[test]
fn pause_resume_and_stop_a_running_vcpu() {
    if !kvm_ready("pause_resume_and_stop_a_running_vcpu") {
        return;
    }
    let (mut vmm, _) = machine();
    let count = Arc::new(AtomicU64::new(0));
    vmm.pio().insert(0x510, 1, Arc::new(Mutex::new(Counter(count.clone())))).unwrap();
    // l: inc ax; out dx, al; jmp l   (for ever, one exit per turn)
    vmm.memory().write(0x3000, &[0x40, 0xEE, 0xEB, 0xFC]).unwrap();
    // jmp $   (for ever, never leaving the guest by itself)
    vmm.memory().write(0x3100, &[0xEB, 0xFE]).unwrap();
    let mut setup = VcpuSetup::real_mode(0, 0x3000);
    setup.regs.rdx = 0x510;
    vmm.start_vcpu(0, setup, true).unwrap();
    vmm.start_vcpu(1, VcpuSetup::real_mode(0, 0x3100), false).unwrap();
    let (looper, spinner) = (&vmm.vcpus()[0], &vmm.vcpus()[1]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count.load(Ordering::SeqCst), 0, "started paused");
    looper.resume();
    assert!(common::wait_until(GUARD, || count.load(Ordering::SeqCst) > 100));
    assert_eq!(looper.pause(), VcpuState::Paused);
    let at = count.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count.load(Ordering::SeqCst), at, "a paused vCPU runs no guest code");
    looper.resume();
    assert!(common::wait_until(GUARD, || count.load(Ordering::SeqCst) > at + 100));
    // The spinner never exits on its own: pause and stop must kick it out.
    assert_eq!(spinner.pause(), VcpuState::Paused);
    spinner.resume();
    assert_stops(spinner);
    assert_stops(looper);
    vmm.stop();
}

#[test]
fn a_guest_fault_is_reported_as_an_error() {
    if !kvm_ready("a_guest_fault_is_reported_as_an_error") {
        return;
    }
    let (mut vmm, _) = machine();
    // A jump into the MMIO hole, where there is no memory to fetch instructions from:
    // KVM cannot run it, and the vCPU ends with the reason and where.
    vmm.memory().write(0x4000, &[0xEA, 0x00, 0x08, 0x00, 0xA0]).unwrap(); // jmp 0xA000:0x0800
    let v = vmm.start_vcpu(0, VcpuSetup::real_mode(0, 0x4000), false).unwrap();
    let st = settle(v);
    match &st {
        VcpuState::Failed(why) => assert!(why.contains("rip"), "{why}"),
        VcpuState::Shutdown => {}
        other => panic!("got {other:?}"),
    }
    assert!(st.is_final());
    vmm.stop();
}

#[test]
fn the_i8042_reset_line_reaches_its_handler() {
    if !kvm_ready("the_i8042_reset_line_reaches_its_handler") {
        return;
    }
    let (mut vmm, _) = machine();
    let resets = Arc::new(AtomicU64::new(0));
    let r = resets.clone();
    let kbd = I8042::new(Box::new(move || {
        r.fetch_add(1, Ordering::SeqCst);
    }));
    vmm.pio().insert(0x60, 5, Arc::new(Mutex::new(kbd))).unwrap();
    // mov al, 0xfe; out 0x64, al; hlt
    let v = start_real_mode(&mut vmm, 0x5000, &[0xB0, 0xFE, 0xE6, 0x64, 0xF4]);
    assert_eq!(settle(v), VcpuState::Halted);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    vmm.stop();
}

#[test]
fn backend_kvm_is_refused_with_why_and_qemu_suggested() {
    use vmhost::wire::Backend;
    if vmhost::vm::kvm::probe().is_ok() {
        // Hardware virtualization: kvm is not refused, and auto takes it.
        assert_eq!(vmhost::vm::resolve_backend(Backend::Auto).unwrap(), Backend::Kvm);
        assert_eq!(vmhost::vm::resolve_backend(Backend::Kvm).unwrap(), Backend::Kvm);
        eprintln!("SKIP backend_kvm_is_refused_with_why_and_qemu_suggested: this host can run kvm");
        return;
    }
    // No guest boots here: the refusal comes before anything starts.
    let out = std::process::Command::new(common::vmhost_bin())
        .args(["run", "--backend", "kvm", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("kvm backend cannot run here") && err.contains("qemu"), "{err}");
    assert!(err.contains("hardware virtualization"), "{err}");
    assert!(err.contains("(6)"), "HypervisorUnavailable: {err}");
    // auto never picks a backend that cannot boot the guest.
    assert_eq!(vmhost::vm::resolve_backend(Backend::Auto).unwrap(), Backend::Qemu);
}

#[test]
fn pvh_entry_in_protected_mode_reads_its_start_info() {
    if !kvm_ready("pvh_entry_in_protected_mode_reads_its_start_info") {
        return;
    }
    use vmhost::vm::kvm::boot;
    let base = 0x10_0000u32;
    let bad_msg = base + 31;
    #[rustfmt::skip]
    let mut code = vec![
        0x81, 0x3B, 0x78, 0xC5, 0x6E, 0x33, // cmp dword [ebx], 0x336ec578 (hvm_start_info magic)
        0x75, 0x05,                         // jne bad
        0x8B, 0x73, 0x18,                   // mov esi, [ebx+24]: the command line
        0xEB, 0x05,                         // jmp print
        0xBE,                               // bad: mov esi, bad_msg
    ];
    code.extend_from_slice(&bad_msg.to_le_bytes());
    #[rustfmt::skip]
    code.extend_from_slice(&[
        0x66, 0xBA, 0xF8, 0x03,             // print: mov dx, 0x3f8
        0xAC,                               // l: lodsb
        0x84, 0xC0,                         // test al, al
        0x74, 0x03,                         // jz done
        0xEE,                               // out dx, al
        0xEB, 0xF8,                         // jmp l
        0xF4,                               // done: hlt
    ]);
    assert_eq!(code.len(), 31);
    code.extend_from_slice(b"bad magic\n\0");
    let elf = vmhost::image::elf::pvh_program(&code, base as u64);

    let size = 16u64 << 20;
    let (mut vmm, sink) = machine_with(size, &[]);
    let k = boot::load_kernel(vmm.memory(), &elf).unwrap();
    assert_eq!(k.entry, base);
    assert_eq!(k.end, base as u64 + code.len() as u64 + 4096);
    let cmdline = "console=ttyS0 vmhost-pvh-test\n";
    let placed = boot::setup_pvh(vmm.memory(), size, &[], &k, cmdline, Some(b"initramfs")).unwrap();
    assert!(placed.is_some());
    let v = vmm.start_vcpu(0, boot::pvh_vcpu(k.entry), false).unwrap();
    let st = settle(v);
    assert_eq!(st, VcpuState::Halted, "output so far: {:?}", String::from_utf8_lossy(&sink.0.lock()));
    assert_eq!(
        String::from_utf8_lossy(&sink.0.lock()),
        cmdline,
        "the guest found the command line through ebx"
    );
    vmm.stop();
}

#[test]
fn the_minimal_kernel_loads_at_its_pvh_entry() {
    let cache = vmhost::image::cache_dir();
    let Some(k) = vmhost::image::kernel::cached_minimal(&cache).ok().flatten() else {
        assert!(!common::under_ci(), "CI builds the minimal kernel first");
        eprintln!("SKIP the_minimal_kernel_loads_at_its_pvh_entry: no minimal kernel built");
        return;
    };
    let vmlinux = std::fs::read(&k.vmlinux).unwrap();
    let entry = vmhost::image::elf::pvh_entry(&vmlinux).expect("CONFIG_PVH gives the note");
    let segs = vmhost::image::elf::load_segments(&vmlinux).unwrap();
    assert!(
        segs.iter().any(|s| (s.paddr..s.paddr + s.mem_size).contains(&(entry as u64))),
        "entry inside a segment"
    );
    let mem = vmhost::vm::kvm::GuestMemory::new(128 << 20, &[]).unwrap();
    let loaded = vmhost::vm::kvm::boot::load_kernel(&mem, &vmlinux).unwrap();
    assert_eq!(loaded.entry, entry);
    // Byte for byte: each segment's file bytes are in guest memory at its address.
    for s in &segs {
        let n = s.file_size.min(4096) as usize;
        let mut got = vec![0u8; n];
        mem.read(s.paddr, &mut got).unwrap();
        assert_eq!(got, vmlinux[s.offset as usize..s.offset as usize + n], "segment at {:#x}", s.paddr);
    }
}

/// vmhost's minimal kernel on the kvm backend's machine, without an initramfs. Where KVM
/// is hardware-backed it boots until it finds no root and panics (which reboots, which
/// ends the VM); on this project's PVM hosts the host's emulator of guest kernel code
/// gives up at the kernel's int3 self-test. Either way the console shows the machine
/// as Linux found it: PVH entry, command line, e820 map, KVM, the MP table and its I/O
/// APIC, and the UART console.
#[test]
fn the_minimal_kernel_boots_on_the_machine_as_far_as_this_host_allows() {
    let test = "the_minimal_kernel_boots_on_the_machine_as_far_as_this_host_allows";
    if !kvm_ready(test) {
        return;
    }
    let cache = vmhost::image::cache_dir();
    let Some(k) = vmhost::image::kernel::cached_minimal(&cache).ok().flatten() else {
        assert!(!common::under_ci(), "CI builds the minimal kernel first");
        eprintln!("SKIP {test}: no minimal kernel built (`vmhost kernel build`)");
        return;
    };
    let dir = common::TempDir::new("kvm-linux");
    let log = dir.path().join("console.log");
    let cfg = vmhost::vm::kvm::KvmConfig {
        vmlinux: k.vmlinux.clone(),
        initramfs: None,
        memory_mb: 128,
        cpus: 1,
        // Messages on; FXSAVE instead of XSAVE, and no CMPXCHG16B (X86_FEATURE_CX16, bit
        // 141; SLUB's lockless path), which PVM's emulator cannot run.
        extra_args: vec!["loglevel=7".into(), "noxsave".into(), "clearcpuid=141".into()],
        dmesg: false,
        console_log: Some(log.clone()),
        timeout: None,
        boot_timeout: Duration::from_secs(300),
        first_command: None,
    };
    let Err(err) = vmhost::vm::kvm::KvmVm::boot(cfg) else {
        panic!("a kernel without an initramfs reached an agent")
    };
    let err = err.to_string();
    let console = std::fs::read_to_string(&log).unwrap();
    for line in [
        "Command line: console=ttyS0 reboot=t panic=-1 pci=off 8250.nr_uarts=1 virtio_mmio.device=4K@0xd0000000:5",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        "Hypervisor detected: KVM",
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        "MPTABLE: OEM ID: VMHOST",
        "IOAPIC[0]: apic_id 1, version 17, address 0xfec00000, GSI 0-23",
        "printk: console [ttyS0] enabled",
    ] {
        assert!(console.contains(line), "the console lacks {line:?}:\n{console}\n{err}");
    }
    if vmhost::vm::kvm::probe().is_ok() {
        assert!(console.contains("Kernel panic"), "{console}\n{err}");
        assert!(err.contains("the guest shut down or rebooted"), "{err}");
    } else {
        assert!(err.contains("vCPU 0 failed: KVM internal error"), "{err}");
    }
}

#[test]
fn vcpus_see_kvm_cpuid_with_their_own_apic_id() {
    if !kvm_ready("vcpus_see_kvm_cpuid_with_their_own_apic_id") {
        return;
    }
    let (mut vmm, _) = machine();
    let probe = Arc::new(Mutex::new(Probe::default()));
    vmm.pio().insert(0x600, 1, probe.clone()).unwrap();
    #[rustfmt::skip]
    let code = [
        0x66, 0xB8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0F, 0xA2,                         // cpuid (sets eax, ebx, ecx, edx)
        0x66, 0xC1, 0xEB, 0x18,             // shr ebx, 24: the initial APIC id
        0x88, 0xD8,                         // mov al, bl
        0xBA, 0x00, 0x06,                   // mov dx, 0x600
        0xEE,                               // out dx, al
        0xF4,                               // hlt
    ];
    vmm.memory().write(0x6000, &code).unwrap();
    for id in 0..2u8 {
        vmm.start_vcpu(id, VcpuSetup::real_mode(0, 0x6000), false).unwrap();
    }
    for v in vmm.vcpus() {
        assert_eq!(settle(v), VcpuState::Halted);
    }
    let mut ids: Vec<u8> = probe.lock().writes.iter().map(|(_, d)| d[0]).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1], "each vCPU read its own APIC id from CPUID");
    vmm.stop();
}

#[test]
fn with_the_in_kernel_irqchip_hlt_waits_in_the_kernel_and_stop_still_ends_it() {
    if !kvm_ready("with_the_in_kernel_irqchip_hlt_waits_in_the_kernel_and_stop_still_ends_it") {
        return;
    }
    let (mut vmm, sink) = machine_with(1 << 20, &[]);
    vmm.add_irqchip_and_pit().unwrap();
    // mov dx, 0x3f8; mov al, 'k'; out dx, al; cli; hlt
    let v = start_real_mode(&mut vmm, 0x1000, &[0xBA, 0xF8, 0x03, 0xB0, b'k', 0xEE, 0xFA, 0xF4]);
    assert!(common::wait_until(GUARD, || !sink.0.lock().is_empty()));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(v.state(), VcpuState::Running, "HLT did not exit to us: the kernel waits");
    assert_stops(v);
    assert_eq!(*sink.0.lock(), b"k");
    vmm.stop();
}

#[test]
fn a_guest_reads_the_virtio_mmio_registers() {
    if !kvm_ready("a_guest_reads_the_virtio_mmio_registers") {
        return;
    }
    use vmhost::vm::kvm::devices::virtio::{console::Console, MmioTransport, MMIO_SIZE};
    let (mut vmm, _) = machine();
    let console = Console::new(Box::new(std::io::sink()));
    let transport = MmioTransport::new(console, vmm.memory().clone(), Arc::new(|| {}));
    vmm.mmio().insert(0xA_0000, MMIO_SIZE, Arc::new(Mutex::new(transport))).unwrap();
    let probe = Arc::new(Mutex::new(Probe::default()));
    vmm.pio().insert(0x700, 4, probe.clone()).unwrap();
    #[rustfmt::skip]
    let code = [
        0xB8, 0x00, 0xA0,                   // mov ax, 0xA000
        0x8E, 0xC0,                         // mov es, ax
        0xBA, 0x00, 0x07,                   // mov dx, 0x700
        0x66, 0x26, 0xA1, 0x00, 0x00,       // mov eax, [es:0x000]: MagicValue
        0x66, 0xEF,                         // out dx, eax
        0x66, 0x26, 0xA1, 0x08, 0x00,       // mov eax, [es:0x008]: DeviceID
        0x66, 0xEF,                         // out dx, eax
        0xF4,                               // hlt
    ];
    let v = start_real_mode(&mut vmm, 0x1000, &code);
    assert_eq!(settle(v), VcpuState::Halted);
    let writes = probe.lock().writes.clone();
    assert_eq!(writes, vec![(0, b"virt".to_vec()), (0, 3u32.to_le_bytes().to_vec())]);
    vmm.stop();
}

/// Boots the kvm backend's whole machine on a PVH "kernel" made of `code`; returns the
/// boot error (these programs never start an agent) and how long the boot took.
fn boot_machine(code: &[u8], boot_timeout: Duration) -> String {
    let dir = common::TempDir::new("kvm-machine");
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, vmhost::image::elf::pvh_program(code, 0x10_0000)).unwrap();
    let cfg = vmhost::vm::kvm::KvmConfig {
        vmlinux: kernel,
        initramfs: None,
        memory_mb: 64,
        cpus: 1,
        extra_args: vec!["vmhost.test=1".into()],
        dmesg: false,
        console_log: None,
        timeout: None,
        boot_timeout,
        first_command: None,
    };
    match vmhost::vm::kvm::KvmVm::boot(cfg) {
        Ok(vm) => {
            let _ = vm.force_stop();
            panic!("a program without an agent booted")
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_machine_boots_a_pvh_program_that_prints_its_command_line_finds_virtio_and_resets() {
    if !kvm_ready("the_machine_boots_a_pvh_program_that_prints_its_command_line_finds_virtio_and_resets") {
        return;
    }
    #[rustfmt::skip]
    let code = [
        0x8B, 0x73, 0x18,             // mov esi, [ebx+24]     ; start_info.cmdline_paddr
        0x66, 0xBA, 0xF8, 0x03,       // mov dx, 0x3f8
        0x8A, 0x06,                   // loop: mov al, [esi]
        0x84, 0xC0,                   // test al, al
        0x74, 0x04,                   // jz done
        0xEE,                         // out dx, al
        0x46,                         // inc esi
        0xEB, 0xF6,                   // jmp loop
        0xA1, 0x00, 0x00, 0x00, 0xD0, // done: mov eax, [0xd0000000]
        0x3D, 0x76, 0x69, 0x72, 0x74, // cmp eax, "virt"
        0x75, 0x03,                   // jne skip
        0xB0, b'V',                   // mov al, 'V'
        0xEE,                         // out dx, al
        0xB0, 0xFE,                   // skip: mov al, 0xfe
        0xE6, 0x64,                   // out 0x64, al          ; i8042 reset
        0xF4,                         // hlt
        0xEB, 0xFD,                   // jmp hlt
    ];
    let err = boot_machine(&code, GUARD);
    // The guest printed the machine's command line, with the virtio device on it and
    // the extra argument after it, then found the virtio magic at the device's address.
    let want = "virtio_mmio.device=4K@0xd0000000:5 quiet loglevel=1 vmhost.test=1V";
    assert!(err.contains(want), "{err}");
    assert!(err.contains("console=ttyS0 reboot=t"), "{err}");
    assert!(err.contains("the VM ended: the guest reset the machine through the i8042"), "{err}");
    assert!(err.contains("closed before the agent said hello"), "{err}");
}

#[test]
fn the_machine_reports_a_guest_fault_with_its_address() {
    if !kvm_ready("the_machine_reports_a_guest_fault_with_its_address") {
        return;
    }
    // mov al, 'F'; out 0x3f8 via dx; jmp to memory nothing backs (past the hole's start)
    #[rustfmt::skip]
    let code = [
        0x66, 0xBA, 0xF8, 0x03,             // mov dx, 0x3f8
        0xB0, b'F',                         // mov al, 'F'
        0xEE,                               // out dx, al
        0xB8, 0x00, 0x00, 0x00, 0xF0,       // mov eax, 0xf0000000
        0xFF, 0xE0,                         // jmp eax
    ];
    let err = boot_machine(&code, GUARD);
    assert!(err.contains("the VM ended: vCPU 0 failed"), "{err}");
    assert!(err.contains("at rip 0xf0000000"), "{err}");
    assert!(err.starts_with("VM boot: the guest did not boot: the agent channel closed"), "{err}");
    assert!(err.contains("last console lines:\nF"), "{err}");
}

#[test]
fn the_machine_ends_a_guest_that_never_reaches_its_agent() {
    if !kvm_ready("the_machine_ends_a_guest_that_never_reaches_its_agent") {
        return;
    }
    // jmp $: the guest runs for ever, never speaking on the agent channel.
    let err = boot_machine(&[0xEB, 0xFE], Duration::from_secs(1));
    assert!(err.contains("waiting for the guest agent: timed out after 1.0 s"), "{err}");
    assert!(err.contains("the VM ended: stopped by the host"), "{err}");
    assert!(err.contains("the guest console stayed empty"), "{err}");
}

#[test]
fn a_long_mode_program_runs_64_bit_code_through_the_page_tables() {
    if !kvm_ready("a_long_mode_program_runs_64_bit_code_through_the_page_tables") {
        return;
    }
    let (mut vmm, sink) = machine_with(2 << 20, &[]);
    vmhost::vm::kvm::boot::setup_long_mode(vmm.memory()).unwrap();
    #[rustfmt::skip]
    let code = [
        0x48, 0xB8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // mov rax, 0x1122334455667788
        0x48, 0xA3, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov [0x2000], rax
        0x66, 0xBA, 0xF8, 0x03,                                     // mov dx, 0x3f8
        0xB0, b'L',                                                 // mov al, 'L'
        0xEE,                                                       // out dx, al
        0xF4,                                                       // hlt
    ];
    vmm.memory().write(0x10_0000, &code).unwrap();
    let v = vmm.start_vcpu(0, vmhost::vm::kvm::boot::long_mode_vcpu(0x10_0000, 0), false).unwrap();
    assert_eq!(settle(v), VcpuState::Halted);
    assert_eq!(*sink.0.lock(), b"L");
    // The vCPU thread runs under the VMM's seccomp filter (vm::kvm::seccomp).
    let vcpu_thread = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vmhost-vcpu0"))
        .expect("the vCPU thread");
    let status = std::fs::read_to_string(vcpu_thread.path().join("status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    // A 64-bit store: in 32-bit mode the same bytes would not write these 8 bytes.
    let mut got = [0u8; 8];
    vmm.memory().read(0x2000, &mut got).unwrap();
    assert_eq!(u64::from_le_bytes(got), 0x1122_3344_5566_7788);
    vmm.stop();
}

/// lidt [0] (limit 0: no vector is valid), then ud2: #UD, #GP, #DF, triple fault.
const TRIPLE_FAULT: [u8; 9] = [0x0F, 0x01, 0x1D, 0, 0, 0, 0, 0x0F, 0x0B];

#[test]
fn the_machine_ends_when_the_guest_triple_faults() {
    if !kvm_ready("the_machine_ends_when_the_guest_triple_faults") {
        return;
    }
    // lidt [0] (limit 0: no vector is valid), then ud2: #UD, #GP, #DF, triple fault.
    let err = boot_machine(&TRIPLE_FAULT, GUARD);
    // A reset: what a triple fault is, and also what `reboot=t` does (a guest that reboots
    // says so on its console first, which makes it a reboot: VmEnd::GuestReboot).
    assert!(err.contains("the VM ended: the guest reset the machine (a shutdown exit of vCPU 0)"), "{err}");
}
