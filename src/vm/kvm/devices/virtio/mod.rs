//! Virtio devices over the MMIO transport (virtio 1.x, "virtio-mmio" version 2), as a
//! guest finds them from `virtio_mmio.device=<size>@<base>:<irq>` on its command line.
//!
//! [`MmioTransport`] is the register block on the MMIO bus: identification, feature
//! negotiation (the device offers, the driver accepts a subset, FEATURES_OK confirms),
//! queue configuration, notification, interrupt status and the device's config space.
//! A [`VirtioDevice`] sees only configured queues and guest memory.

pub mod console;
pub mod queue;

use std::sync::Arc;

use super::super::bus::BusDevice;
use super::super::memory::GuestMemory;
pub use queue::{Chain, Descriptor, Queue};

/// `virt`, the register block's magic.
pub const MAGIC: u32 = 0x7472_6976;
/// The MMIO transport version implemented.
pub const VERSION: u32 = 2;
/// Our vendor id ("VMHO"-ish, as a number): any value is allowed.
pub const VENDOR_ID: u32 = 0x4f48_4d56;
/// Feature bit: virtio 1.x (modern) device.
pub const F_VERSION_1: u64 = 1 << 32;
/// Status: the guest saw the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Status: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Status: feature negotiation is done.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Status: the device gave up.
pub const STATUS_FAILED: u32 = 0x80;
/// Interrupt status bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// The size of a virtio-mmio register block on the bus.
pub const MMIO_SIZE: u64 = 0x200;

/// Raises the device's interrupt line.
pub type Interrupt = Arc<dyn Fn() + Send + Sync>;

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (3 = console).
    fn device_type(&self) -> u32;
    /// The features offered (F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Each queue's largest size.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads its config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes its config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver finished setting up (DRIVER_OK) with these accepted features.
    fn activate(&mut self, mem: Arc<GuestMemory>, features: u64, interrupt: Interrupt);
    /// The driver notified queue `index` (its buffers are in `queues`).
    fn notify(&mut self, index: usize, queues: &mut [Queue]);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Host-side work to hand to the guest (input that arrived): called by
    /// [`MmioTransport::poll`].
    fn poll(&mut self, _queues: &mut [Queue]) {}
}

/// The virtio-mmio register block of one device.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<std::sync::atomic::AtomicU32>,
    raise: Interrupt,
    config_generation: u32,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport").finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport of `device`; `raise` pulses its interrupt line (an irqfd).
    pub fn new(device: D, mem: Arc<GuestMemory>, raise: Interrupt) -> MmioTransport<D> {
        let queues = device.queue_max_sizes().into_iter().map(Queue::new).collect();
        MmioTransport {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            raise,
            config_generation: 0,
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Lets the device hand host-side work to the guest (once the driver is ready).
    pub fn poll(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device.poll(&mut self.queues);
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            // Reset.
            self.device.reset();
            for q in &mut self.queues {
                q.reset();
            }
            self.status = 0;
            self.driver_features = 0;
            self.interrupt_status.store(0, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Accept only what was offered, and only as a modern driver.
            let ok = self.driver_features & !self.device.features() == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let (status, raise) = (self.interrupt_status.clone(), self.raise.clone());
            let interrupt: Interrupt = Arc::new(move || {
                status.fetch_or(INT_VRING, std::sync::atomic::Ordering::SeqCst);
                raise();
            });
            self.device.activate(self.mem.clone(), self.driver_features, interrupt);
        }
        self.status = v;
    }
}

fn lo(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | x as u64;
}

fn hi(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | ((x as u64) << 32);
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            return self.device.read_config(offset - 0x100, data);
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queue().map_or(0, |q| q.max_size as u32),
            0x044 => self.queue().map_or(0, |q| q.ready as u32),
            0x060 => self.interrupt_status.load(std::sync::atomic::Ordering::SeqCst),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return self.device.write_config(offset - 0x100, data);
        }
        if data.len() != 4 {
            return; // registers are 32-bit
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Queue layout may only change while the driver has not made the queue ready.
        let configurable = |q: &Queue| !q.ready;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => lo(&mut self.driver_features, v),
                1 => hi(&mut self.driver_features, v),
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue().filter(|q| configurable(q)) {
                    q.size = v.min(u16::MAX as u32) as u16;
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            0x050 => {
                let index = v as usize;
                if self.status & STATUS_DRIVER_OK != 0 && index < self.queues.len() {
                    self.device.notify(index, &mut self.queues);
                }
            }
            0x064 => {
                self.interrupt_status.fetch_and(!v, std::sync::atomic::Ordering::SeqCst);
            }
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if let Some(q) = self.queue().filter(|q| configurable(q)) {
                    match offset {
                        0x080 => lo(&mut q.desc_table, v),
                        0x084 => hi(&mut q.desc_table, v),
                        0x090 => lo(&mut q.avail_ring, v),
                        0x094 => hi(&mut q.avail_ring, v),
                        0x0a0 => lo(&mut q.used_ring, v),
                        _ => hi(&mut q.used_ring, v),
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::console::Console;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Clone, Default)]
    struct Sink(Arc<parking_lot::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A test driver: what a guest's virtio-mmio driver does, over guest memory.
    struct Driver {
        mem: Arc<GuestMemory>,
        t: MmioTransport<Console>,
        irqs: Arc<AtomicUsize>,
        sink: Sink,
        nqueues: u32,
    }

    const QSIZE: u16 = 16;
    /// Per queue: descriptor table, available ring, used ring.
    fn rings(q: u64) -> (u64, u64, u64) {
        let base = 0x4_0000 + q * 0x1_0000;
        (base, base + 0x1000, base + 0x2000)
    }

    impl Driver {
        fn new() -> Driver {
            let sink = Sink::default();
            Driver::with(Console::new(Box::new(sink.clone())), 2, sink)
        }
        fn with(console: Console, nqueues: u32, sink: Sink) -> Driver {
            let mem = Arc::new(GuestMemory::new(2 << 20, &[]).unwrap());
            let irqs = Arc::new(AtomicUsize::new(0));
            let i = irqs.clone();
            let t = MmioTransport::new(
                console,
                mem.clone(),
                Arc::new(move || {
                    i.fetch_add(1, Ordering::SeqCst);
                }),
            );
            Driver { mem, t, irqs, sink, nqueues }
        }
        fn r(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes());
        }
        /// The spec's initialisation sequence, accepting `features`.
        fn init(&mut self, features: u64) -> bool {
            self.w(0x070, 0);
            self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.w(0x024, 0);
            self.w(0x020, features as u32);
            self.w(0x024, 1);
            self.w(0x020, (features >> 32) as u32);
            self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
            if self.r(0x070) & STATUS_FEATURES_OK == 0 {
                return false;
            }
            for q in 0..self.nqueues {
                self.w(0x030, q);
                assert_eq!(self.r(0x034), 256, "queue {q} max size");
                self.w(0x038, QSIZE as u32);
                let (d, a, u) = rings(q as u64);
                for (off, v) in [(0x080, d), (0x090, a), (0x0a0, u)] {
                    self.w(off, v as u32);
                    self.w(off + 4, (v >> 32) as u32);
                }
                self.w(0x044, 1);
            }
            self.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
            true
        }
        fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(rings(q).0 + 16 * i as u64, &d).unwrap();
        }
        fn offer(&self, q: u64, slot: u16, head: u16, idx: u16) {
            let a = rings(q).1;
            self.mem.write(a + 4 + 2 * slot as u64, &head.to_le_bytes()).unwrap();
            self.mem.write(a + 2, &idx.to_le_bytes()).unwrap();
        }
        fn used(&self, q: u64) -> (u16, u32, u32) {
            let u = rings(q).2;
            let mut b = [0u8; 12];
            self.mem.read(u, &mut b).unwrap();
            (
                u16::from_le_bytes([b[2], b[3]]),
                u32::from_le_bytes(b[4..8].try_into().unwrap()),
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
            )
        }
    }

    #[test]
    fn identification_and_feature_negotiation() {
        let mut d = Driver::new();
        assert_eq!((d.r(0x000), d.r(0x004), d.r(0x008)), (MAGIC, 2, 3));
        d.w(0x014, 1);
        assert_eq!(d.r(0x010), 1, "VERSION_1 is offered (bit 32)");
        d.w(0x014, 0);
        assert_eq!(d.r(0x010), 0);
        assert!(!d.init(1 << 0), "a feature not offered is refused");
        assert!(!d.init(0), "a legacy driver (no VERSION_1) is refused");
        assert!(d.init(F_VERSION_1));
        assert_ne!(d.r(0x070) & STATUS_DRIVER_OK, 0);
        // Queue layout is fixed once ready.
        d.w(0x030, 0);
        d.w(0x038, 4);
        assert_eq!(d.r(0x044), 1);
        d.w(0x070, 0);
        assert_eq!((d.r(0x070), d.r(0x044)), (0, 0), "reset clears status and queues");
    }

    #[test]
    fn transmit_and_receive_through_the_queues() {
        let mut d = Driver::new();
        assert!(d.init(F_VERSION_1));
        // Guest to host: one readable buffer on queue 1, split in two descriptors.
        d.mem.write(0x1_0000, b"hello, ").unwrap();
        d.mem.write(0x1_1000, b"host\n").unwrap();
        d.desc(1, 0, 0x1_0000, 7, queue::DESC_F_NEXT, 1);
        d.desc(1, 1, 0x1_1000, 5, 0, 0);
        d.offer(1, 0, 0, 1);
        d.w(0x050, 1);
        assert_eq!(*d.sink.0.lock(), b"hello, host\n");
        assert_eq!(d.used(1), (1, 0, 0), "chain 0 returned");
        assert_eq!(d.irqs.load(Ordering::SeqCst), 1);
        assert_eq!(d.r(0x060) & INT_VRING, INT_VRING);
        d.w(0x064, INT_VRING);
        assert_eq!(d.r(0x060), 0, "acknowledged");

        // Host to guest: a writable buffer posted first, the input comes later.
        d.desc(0, 0, 0x2_0000, 8, queue::DESC_F_WRITE, 0);
        d.offer(0, 0, 0, 1);
        d.w(0x050, 0);
        assert_eq!(d.used(0).0, 0, "nothing to give yet");
        d.t.device_mut().enqueue(b"abc");
        d.t.poll();
        assert_eq!(d.used(0), (1, 0, 3));
        let mut b = [0u8; 3];
        d.mem.read(0x2_0000, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(d.t.device_mut().pending(), 0);
    }

    #[test]
    fn broken_chains_and_indices_end_in_errors_not_hangs() {
        let mut d = Driver::new();
        assert!(d.init(F_VERSION_1));
        // A descriptor that chains to itself.
        d.mem.write(0x1_0000, b"x").unwrap();
        d.desc(1, 0, 0x1_0000, 1, queue::DESC_F_NEXT, 0);
        d.offer(1, 0, 0, 1);
        d.w(0x050, 1);
        assert_eq!(d.used(1).0, 0, "nothing returned from a looping chain");
        // An available index far ahead of the queue size.
        let mut d = Driver::new();
        assert!(d.init(F_VERSION_1));
        d.offer(1, 0, 0, 1000);
        d.w(0x050, 1);
        assert_eq!(d.used(1).0, 0);
        // A descriptor pointing outside guest memory.
        let mut d = Driver::new();
        assert!(d.init(F_VERSION_1));
        d.desc(1, 0, u64::MAX - 4, 100, 0, 0);
        d.offer(1, 0, 0, 1);
        d.w(0x050, 1);
        assert!(d.sink.0.lock().is_empty());
        // A notification for a queue that does not exist is ignored.
        d.w(0x050, 7);
    }

    /// The first `count` control messages the device returned in the control-receive
    /// buffers (buffer i posted at 0x8_0000 + 0x100 * i).
    fn control_messages(d: &Driver, count: u16) -> Vec<(u32, u16, u16, Vec<u8>)> {
        let used = rings(2).2;
        (0..count)
            .map(|k| {
                let mut e = [0u8; 8];
                d.mem.read(used + 4 + 8 * k as u64, &mut e).unwrap();
                let id = u32::from_le_bytes(e[0..4].try_into().unwrap()) as u64;
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap()) as usize;
                let mut m = vec![0u8; len];
                d.mem.read(0x8_0000 + 0x100 * id, &mut m).unwrap();
                let port = u32::from_le_bytes(m[0..4].try_into().unwrap());
                (port, u16::from_le_bytes([m[4], m[5]]), u16::from_le_bytes([m[6], m[7]]), m[8..].to_vec())
            })
            .collect()
    }

    #[test]
    fn multiport_handshake_names_the_agent_port_and_carries_its_bytes() {
        use super::console::{control, event, F_MULTIPORT};
        let agent = Sink::default();
        let console = Console::multiport(vec![
            (None, Box::new(std::io::sink())),
            (Some("vmhost.agent".into()), Box::new(agent.clone())),
        ]);
        let mut d = Driver::with(console, 6, agent.clone());
        d.w(0x014, 0);
        assert_eq!(d.r(0x010) as u64 & F_MULTIPORT, F_MULTIPORT, "MULTIPORT offered");
        let mut n = [0u8; 4];
        d.t.read(0x104, &mut n);
        assert_eq!(u32::from_le_bytes(n), 2, "max_nr_ports");
        assert!(d.init(F_VERSION_1 | F_MULTIPORT));
        // Control-receive buffers for the device's messages (queue 2).
        for i in 0..8u16 {
            d.desc(2, i, 0x8_0000 + 0x100 * i as u64, 0x100, queue::DESC_F_WRITE, 0);
            d.offer(2, i, i, i + 1);
        }
        // The driver is ready: DEVICE_READY on the control-transmit queue (3).
        let send = |d: &mut Driver, slot: u16, m: Vec<u8>| {
            let at = 0x9_0000 + 0x100 * slot as u64;
            d.mem.write(at, &m).unwrap();
            d.desc(3, slot, at, m.len() as u32, 0, 0);
            d.offer(3, slot, slot, slot + 1);
            d.w(0x050, 3);
        };
        send(&mut d, 0, control(0, event::DEVICE_READY, 1, &[]));
        let msgs = control_messages(&d, 2);
        assert_eq!(msgs, vec![(0, event::DEVICE_ADD, 1, vec![]), (1, event::DEVICE_ADD, 1, vec![])]);
        // Port 1 set up: the device names it and opens its host end.
        send(&mut d, 1, control(1, event::PORT_READY, 1, &[]));
        let msgs = control_messages(&d, 4);
        assert_eq!(msgs[2], (1, event::PORT_NAME, 1, b"vmhost.agent".to_vec()));
        assert_eq!(msgs[3], (1, event::PORT_OPEN, 1, vec![]));
        // Host bytes for a port the guest has not opened wait (Linux would drop them).
        d.desc(4, 0, 0xB_0000, 64, queue::DESC_F_WRITE, 0);
        d.offer(4, 0, 0, 1);
        let (taken_tx, taken) = crossbeam_channel::bounded(1);
        d.t.device_mut().on_input_taken(taken_tx);
        d.t.device_mut().enqueue_port(1, b"from host");
        d.t.poll();
        assert_eq!(d.used(4).0, 0, "nothing delivered before PORT_OPEN");
        assert!(taken.try_recv().is_err(), "nothing taken yet");
        assert_eq!(d.t.device_mut().pending_port(1), 9);
        // The guest opens the port: what waited goes out at once.
        send(&mut d, 2, control(1, event::PORT_OPEN, 1, &[]));
        assert!(d.t.device_mut().guest_open(1));
        let mut b = [0u8; 9];
        d.mem.read(0xB_0000, &mut b).unwrap();
        assert_eq!(&b, b"from host");
        assert_eq!(d.t.device_mut().pending_port(1), 0);
        assert!(taken.try_recv().is_ok(), "a feeder waiting for room is told");
        // Guest to host on queue 5.
        d.mem.write(0xA_0000, b"hello agent").unwrap();
        d.desc(5, 0, 0xA_0000, 11, 0, 0);
        d.offer(5, 0, 0, 1);
        d.w(0x050, 5);
        assert_eq!(*agent.0.lock(), b"hello agent");
        // A short control message is ignored, not a panic.
        send(&mut d, 3, vec![1, 2, 3]);
    }
}
