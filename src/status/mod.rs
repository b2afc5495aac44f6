//! What every layer reports about a VM's life: its lifecycle state ([`VmState`]) and how
//! it ended ([`VmEnd`]). Below the VM layer, so that the crate's errors, the helper's
//! answers and the control protocol name them without depending on the VMs themselves.

pub mod end;
pub mod state;

pub use end::VmEnd;
pub use state::VmState;
