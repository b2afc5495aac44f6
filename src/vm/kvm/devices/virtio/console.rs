//! A virtio console: a byte pipe between host and guest per port.
//!
//! With one port (no `MULTIPORT`), queue 0 carries host-to-guest bytes (the driver posts
//! buffers for the device to fill) and queue 1 guest-to-host bytes; the guest sees
//! `/dev/hvc0`. With several ports (`MULTIPORT`, what QEMU's virtio-serial is), queues 2
//! and 3 carry control messages and port N ≥ 1 uses queues 2(N+1) and 2(N+1)+1: the
//! driver says DEVICE_READY, the device announces each port (DEVICE_ADD), the driver
//! answers PORT_READY, and the device names the port (PORT_NAME, what the agent finds
//! in `/sys/class/virtio-ports/*/name`) and opens its host end (PORT_OPEN).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use super::{Interrupt, Queue, VirtioDevice, F_VERSION_1};
use crate::vm::kvm::memory::GuestMemory;

/// The virtio device id of a console.
pub const DEVICE_ID: u32 = 3;
/// Feature bit: several ports and the control queues.
pub const F_MULTIPORT: u64 = 1 << 1;
/// Queue sizes.
pub const QUEUE_SIZE: u16 = 256;
/// The most host-to-guest bytes kept per port while the guest has no buffer for them.
pub const INPUT_LIMIT: usize = 1 << 20;

/// Control events (virtio 1.x, 5.3.6.2).
pub mod event {
    /// Driver: ready for port announcements.
    pub const DEVICE_READY: u16 = 0;
    /// Device: a port exists.
    pub const DEVICE_ADD: u16 = 1;
    /// Driver: a port is set up.
    pub const PORT_READY: u16 = 3;
    /// Device: a port is a console.
    pub const CONSOLE_PORT: u16 = 4;
    /// Both: a port's end is open (value 1) or closed (0).
    pub const PORT_OPEN: u16 = 6;
    /// Device: a port's name follows the header.
    pub const PORT_NAME: u16 = 7;
}

/// A control message: `le32 port, le16 event, le16 value`, then any payload.
pub fn control(port: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + payload.len());
    m.extend_from_slice(&port.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

struct Port {
    name: Option<String>,
    out: Box<dyn Write + Send>,
    input: VecDeque<u8>,
    guest_open: bool,
}

/// The console device.
pub struct Console {
    ports: Vec<Port>,
    multiport: bool,
    /// Control messages waiting for a control-receive buffer.
    control_out: VecDeque<Vec<u8>>,
    mem: Option<Arc<GuestMemory>>,
    interrupt: Option<Interrupt>,
    /// Told each time the guest takes queued input (see [`Console::on_input_taken`]).
    input_taken: Option<crossbeam_channel::Sender<()>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

/// Port `port`'s receive queue index (its transmit queue is the next one).
fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * (port + 1)
    }
}

impl Console {
    /// A one-port console writing what the guest sends to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Console {
        Console::with_ports(vec![(None, out)], false)
    }

    /// A multiport console: port N is `ports[N]` (an optional name, where its guest
    /// output goes).
    pub fn multiport(ports: Vec<(Option<String>, Box<dyn Write + Send>)>) -> Console {
        Console::with_ports(ports, true)
    }

    fn with_ports(ports: Vec<(Option<String>, Box<dyn Write + Send>)>, multiport: bool) -> Console {
        let ports = ports
            .into_iter()
            .map(|(name, out)| Port { name, out, input: VecDeque::new(), guest_open: false })
            .collect();
        Console {
            ports,
            multiport,
            control_out: VecDeque::new(),
            mem: None,
            interrupt: None,
            input_taken: None,
        }
    }

    /// Queues bytes for the guest on port 0.
    pub fn enqueue(&mut self, data: &[u8]) {
        self.enqueue_port(0, data);
    }

    /// Queues bytes for the guest on `port` (dropped past [`INPUT_LIMIT`]); they go
    /// out on the next poll or receive-queue notification.
    pub fn enqueue_port(&mut self, port: usize, data: &[u8]) {
        if let Some(p) = self.ports.get_mut(port) {
            let room = INPUT_LIMIT.saturating_sub(p.input.len());
            p.input.extend(&data[..data.len().min(room)]);
        }
    }

    /// Bytes still waiting for a guest buffer on port 0.
    pub fn pending(&self) -> usize {
        self.ports.first().map_or(0, |p| p.input.len())
    }

    /// Sends on `tx` (without waiting) each time the guest takes queued input, so that a
    /// feeder holding back can go on.
    pub fn on_input_taken(&mut self, tx: crossbeam_channel::Sender<()>) {
        self.input_taken = Some(tx);
    }

    /// Bytes still waiting for a guest buffer on `port`.
    pub fn pending_port(&self, port: usize) -> usize {
        self.ports.get(port).map_or(0, |p| p.input.len())
    }

    /// Whether the guest has opened `port`.
    pub fn guest_open(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(|p| p.guest_open)
    }

    fn raise(&self) {
        if let Some(i) = &self.interrupt {
            i();
        }
    }

    /// Fills the driver's receive buffers of `port` with its pending input.
    fn fill_rx(&mut self, port: usize, queues: &mut [Queue]) {
        let Some(mem) = self.mem.clone() else { return };
        let (Some(rx), Some(p)) = (queues.get_mut(rx_queue(port)), self.ports.get_mut(port)) else { return };
        // Linux discards what arrives on a port it has not opened (QEMU holds it back
        // the same way): input waits for PORT_OPEN.
        if self.multiport && !p.guest_open {
            return;
        }
        let mut used = false;
        while !p.input.is_empty() {
            let Some(chain) = rx.next_chain(&mem, format_args!("virtio console port {port} receive queue"))
            else {
                break;
            };
            let mut written = 0u32;
            for d in chain.descriptors.iter().filter(|d| d.writable) {
                let n = (d.len as usize).min(p.input.len());
                let bytes: Vec<u8> = p.input.drain(..n).collect();
                if mem.write(d.addr, &bytes).is_err() {
                    break;
                }
                written += n as u32;
                if p.input.is_empty() {
                    break;
                }
            }
            if rx.add_used(&mem, chain.head, written).is_err() {
                break;
            }
            used = true;
        }
        if used {
            self.raise();
            if let Some(tx) = &self.input_taken {
                let _ = tx.try_send(());
            }
        }
    }

    /// Takes the driver's buffers from the transmit queue `index`; `each` gets their
    /// bytes, one call per chain.
    fn take_tx(&mut self, index: usize, queues: &mut [Queue], mut each: impl FnMut(&mut Self, Vec<u8>)) {
        let Some(mem) = self.mem.clone() else { return };
        let mut used = false;
        loop {
            let Some(tx) = queues.get_mut(index) else { return };
            let Some(chain) = tx.next_chain(&mem, format_args!("virtio console transmit queue {index}"))
            else {
                break;
            };
            let mut bytes = Vec::new();
            for d in chain.descriptors.iter().filter(|d| !d.writable) {
                let mut buf = vec![0u8; (d.len as usize).min(1 << 20)];
                if mem.read(d.addr, &mut buf).is_ok() {
                    bytes.extend_from_slice(&buf);
                }
            }
            if tx.add_used(&mem, chain.head, 0).is_err() {
                break;
            }
            used = true;
            each(self, bytes);
        }
        if used {
            self.raise();
        }
    }

    /// Acts on the driver's control messages.
    fn on_control(&mut self, m: Vec<u8>) {
        if m.len() < 8 {
            log::warn!("virtio console: a {}-byte control message", m.len());
            return;
        }
        let port = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        let ev = u16::from_le_bytes([m[4], m[5]]);
        let value = u16::from_le_bytes([m[6], m[7]]);
        match ev {
            event::DEVICE_READY if value == 1 => {
                for id in 0..self.ports.len() as u32 {
                    self.control_out.push_back(control(id, event::DEVICE_ADD, 1, &[]));
                }
            }
            event::PORT_READY if value == 1 => {
                let Some(p) = self.ports.get(port as usize) else { return };
                if let Some(name) = &p.name {
                    self.control_out.push_back(control(port, event::PORT_NAME, 1, name.as_bytes()));
                }
                // The host end is always connected.
                self.control_out.push_back(control(port, event::PORT_OPEN, 1, &[]));
            }
            event::PORT_OPEN => {
                if let Some(p) = self.ports.get_mut(port as usize) {
                    p.guest_open = value == 1;
                }
            }
            _ => {}
        }
    }

    /// Hands pending control messages to the driver, one per buffer.
    fn fill_control(&mut self, queues: &mut [Queue]) {
        let (Some(mem), Some(rx)) = (self.mem.clone(), queues.get_mut(2)) else { return };
        let mut used = false;
        while let Some(m) = self.control_out.front() {
            let Some(chain) = rx.next_chain(&mem, format_args!("virtio console control queue")) else {
                break;
            };
            let Some(d) = chain.descriptors.iter().find(|d| d.writable && d.len as usize >= m.len()) else {
                log::warn!("virtio console: a control buffer too small for {} bytes", m.len());
                let _ = rx.add_used(&mem, chain.head, 0);
                continue;
            };
            let n = if mem.write(d.addr, m).is_ok() { m.len() as u32 } else { 0 };
            self.control_out.pop_front();
            if rx.add_used(&mem, chain.head, n).is_err() {
                break;
            }
            used = true;
        }
        if used {
            self.raise();
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | if self.multiport { F_MULTIPORT } else { 0 }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = if self.multiport { 2 * (self.ports.len() + 1) } else { 2 };
        vec![QUEUE_SIZE; n]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // le16 cols, le16 rows (0: no size), le32 max_nr_ports, le32 emerg_wr.
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(v) = config.get(offset as usize + i) {
                *b = *v;
            }
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: Arc<GuestMemory>, _features: u64, interrupt: Interrupt) {
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
    }

    fn notify(&mut self, index: usize, queues: &mut [Queue]) {
        match index {
            2 if self.multiport => self.fill_control(queues),
            3 if self.multiport => {
                self.take_tx(3, queues, |me, m| me.on_control(m));
                self.fill_control(queues);
                // A port just opened gets what waited for it.
                for port in 0..self.ports.len() {
                    self.fill_rx(port, queues);
                }
            }
            i => {
                let port = if i < 2 { 0 } else { i / 2 - 1 };
                if i % 2 == 0 {
                    self.fill_rx(port, queues);
                } else {
                    self.take_tx(i, queues, |me, bytes| {
                        if let Some(p) = me.ports.get_mut(port) {
                            let _ = p.out.write_all(&bytes);
                            let _ = p.out.flush();
                        }
                    });
                }
            }
        }
    }

    fn reset(&mut self) {
        self.mem = None;
        self.interrupt = None;
        self.control_out.clear();
        for p in &mut self.ports {
            p.guest_open = false;
            p.input.clear();
        }
    }

    fn poll(&mut self, queues: &mut [Queue]) {
        if self.multiport {
            self.fill_control(queues);
        }
        for port in 0..self.ports.len() {
            self.fill_rx(port, queues);
        }
    }
}
