//! A 16550A UART, the guest's console (`ttyS0` at port 0x3f8, IRQ 4).
//!
//! Enough of the chip for Linux's 8250 driver and for small guest programs: the
//! transmit holding register writes to an output sink at once (so the transmitter is
//! always empty), received bytes queue for the receive buffer, the divisor latch, the
//! line and modem registers (loopback included), the scratch register, and the
//! interrupt identification with "transmitter empty" and "data available" interrupts,
//! raised through a callback (an irqfd in a booted VM).

use std::collections::VecDeque;
use std::io::Write;

use crate::vm::kvm::bus::BusDevice;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;
const MSR_DEFAULT: u8 = 0xb0; // DCD, DSR, CTS
/// The most received bytes kept for the guest; more are dropped (as an overrun would).
pub const RX_LIMIT: usize = 64 << 10;

/// The UART.
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fcr: u8,
    dll: u8,
    dlm: u8,
    thre_pending: bool,
    rx: VecDeque<u8>,
    out: Box<dyn Write + Send>,
    interrupt: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART writing the guest's output to `out` and raising its interrupt with
    /// `interrupt`.
    pub fn new(out: Box<dyn Write + Send>, interrupt: Box<dyn FnMut() + Send>) -> Serial {
        Serial {
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scr: 0,
            fcr: 0,
            dll: 0x0c,
            dlm: 0,
            thre_pending: false,
            rx: VecDeque::new(),
            out,
            interrupt,
        }
    }

    /// Bytes typed to the guest (dropped past [`RX_LIMIT`]).
    pub fn enqueue(&mut self, data: &[u8]) {
        let room = RX_LIMIT.saturating_sub(self.rx.len());
        self.rx.extend(&data[..data.len().min(room)]);
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            (self.interrupt)();
        }
    }

    fn iir(&mut self) -> u8 {
        let fifo = if self.fcr & 1 != 0 { IIR_FIFO } else { 0 };
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            return IIR_RDA | fifo;
        }
        if self.ier & IER_THRE != 0 && self.thre_pending {
            self.thre_pending = false; // reading IIR clears it
            return IIR_THRE | fifo;
        }
        IIR_NONE | fifo
    }

    fn transmit(&mut self, b: u8) {
        if self.mcr & MCR_LOOP != 0 {
            self.enqueue(&[b]);
        } else {
            let _ = self.out.write_all(&[b]);
            let _ = self.out.flush();
        }
        if self.ier & IER_THRE != 0 {
            self.thre_pending = true;
            (self.interrupt)();
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let dlab = self.lcr & LCR_DLAB != 0;
        let v = match offset {
            0 if dlab => self.dll,
            0 => self.rx.pop_front().unwrap_or(0),
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => self.iir(),
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
            6 if self.mcr & MCR_LOOP != 0 => (self.mcr & 0x0f) << 4,
            6 => MSR_DEFAULT,
            7 => self.scr,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = v,
            0 => self.transmit(v),
            1 if dlab => self.dlm = v,
            1 => {
                let was = self.ier;
                self.ier = v & 0x0f;
                // Enabling "transmitter empty" raises it at once: the THR is empty.
                if was & IER_THRE == 0 && self.ier & IER_THRE != 0 {
                    self.thre_pending = true;
                    (self.interrupt)();
                }
            }
            2 => self.fcr = v,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Serial, Sink, Arc<AtomicUsize>) {
        let sink = Sink::default();
        let irqs = Arc::new(AtomicUsize::new(0));
        let i = irqs.clone();
        let s = Serial::new(
            Box::new(sink.clone()),
            Box::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
            }),
        );
        (s, sink, irqs)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn transmit_divisor_scratch_and_line_status() {
        let (mut s, sink, irqs) = uart();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(rd(&mut s, 5), LSR_THRE | LSR_TEMT, "always ready to send, nothing received");
        assert_eq!(irqs.load(Ordering::SeqCst), 0, "no interrupt while IER is 0");
        // Divisor latch behind DLAB: THR/IER are not touched.
        s.write(3, &[0x83]);
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        assert_eq!((rd(&mut s, 0), rd(&mut s, 1)), (0x01, 0x00));
        s.write(3, &[0x03]);
        assert_eq!(*sink.0.lock().unwrap(), b"hi\n", "the divisor write was not output");
        s.write(7, &[0x5a]);
        assert_eq!(rd(&mut s, 7), 0x5a);
        assert_eq!(rd(&mut s, 6), MSR_DEFAULT);
    }

    #[test]
    fn interrupts_and_receive() {
        let (mut s, _sink, irqs) = uart();
        assert_eq!(rd(&mut s, 2) & 0x0f, IIR_NONE);
        s.write(1, &[IER_THRE]);
        assert_eq!(irqs.load(Ordering::SeqCst), 1, "enabling THRE raises it");
        assert_eq!(rd(&mut s, 2) & 0x0f, IIR_THRE);
        assert_eq!(rd(&mut s, 2) & 0x0f, IIR_NONE, "reading IIR cleared it");
        s.write(0, b"x");
        assert_eq!(irqs.load(Ordering::SeqCst), 2);
        s.write(1, &[IER_RDA]);
        s.enqueue(b"ab");
        assert_eq!(irqs.load(Ordering::SeqCst), 3);
        assert_eq!(rd(&mut s, 2) & 0x0f, IIR_RDA);
        assert_ne!(rd(&mut s, 5) & LSR_DR, 0);
        assert_eq!((rd(&mut s, 0), rd(&mut s, 0)), (b'a', b'b'));
        assert_eq!(rd(&mut s, 5) & LSR_DR, 0);
        assert_eq!(rd(&mut s, 0), 0, "empty receive buffer reads 0");
        // Loopback: what is sent comes back.
        s.write(4, &[MCR_LOOP]);
        s.write(0, b"z");
        assert_eq!(rd(&mut s, 0), b'z');
        // Bounded input.
        s.enqueue(&vec![1u8; RX_LIMIT + 10]);
        assert_eq!(s.rx.len(), RX_LIMIT);
    }
}
