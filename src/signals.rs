//! Delivery of termination signals to a thread, without async signal handlers.
//!
//! [`watch`] blocks the signals in the calling thread (call it first thing in `main`,
//! before other threads start, so that they inherit the mask) and starts one thread that
//! takes them with `sigwait` and passes them on a channel. std's `Command` empties the
//! signal mask in the child; signals set to be ignored stay ignored through exec, which
//! [`crate::unix::clean_signals_in_child`] undoes for the children vmhost stops with
//! signals (QEMU, the helper).

use crossbeam_channel::Receiver;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::error::{Error, Result};

/// Blocks `signals` in this thread and delivers each one that arrives on the channel.
pub fn watch(signals: &[Signal]) -> Result<Receiver<Signal>> {
    let mut set = SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| Error::io("block signals", "", e.into()))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("vmhost-signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    log::info!("received {sig:?}");
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("sigwait: {e}");
                    return;
                }
            }
        })
        .map_err(|e| Error::io("start signal thread", "", e))?;
    Ok(rx)
}
