//! The i8042 keyboard controller, for the one thing a guest uses it for: the CPU reset
//! line (command 0xFE on port 0x64), which Linux's `reboot=k` and many small programs
//! use. Put on the port bus at 0x60 for 5 bytes: offset 0 is the data port, 4 the
//! command/status port.

use crate::vm::kvm::bus::BusDevice;

/// The command that pulses the CPU reset line.
pub const CMD_RESET: u8 = 0xfe;

/// The controller.
pub struct I8042 {
    on_reset: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that calls `on_reset` when the guest asks for a reset.
    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> I8042 {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No keyboard: no data, input buffer empty, output buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_command_fe_on_the_command_port_resets() {
        let n = Arc::new(AtomicUsize::new(0));
        let c = n.clone();
        let mut k = I8042::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        k.write(0, &[CMD_RESET]);
        k.write(4, &[0xad]);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        k.write(4, &[CMD_RESET]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let mut b = [9u8];
        k.read(4, &mut b);
        assert_eq!(b, [0]);
    }
}
