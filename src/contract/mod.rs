//! The host-guest contract: what the host (`vm`, `server`, `image`) and the guest agent
//! (`agent`) must agree on, defined here alone and imported by both. The agent
//! protocol ([`proto`], specified in `docs/agent-protocol.md`); the agent's port; the
//! kernel command-line parameters and initramfs files the agent reads; the guest's
//! network addresses; the guest's default `PATH`; how much file data one agent frame
//! carries.

pub mod proto;

/// The name of the virtio-serial port the agent serves.
pub const PORT_NAME: &str = "vmhost.agent";
/// Where the initramfs keeps the agent's files (modules, module list).
pub const AGENT_DIR: &str = "/vmhost";
/// Host directories shared with the guest are mounted at `MOUNT_ROOT/<tag>`.
pub const MOUNT_ROOT: &str = "/mnt";

/// The kernel command-line parameter that lists the host mounts for the agent:
/// `vmhost.mounts=TAG:rw,TAG:ro`.
pub const MOUNTS_PARAM: &str = "vmhost.mounts=";

/// The kernel command-line parameter that gives the guest its root on a disk (a
/// container image's read-only erofs, the first virtio-blk device) instead of the
/// initramfs: `vmhost.rootdisk=erofs`. The agent mounts it under a writable overlay on
/// tmpfs and makes that the root before anything else runs.
pub const ROOT_DISK_PARAM: &str = "vmhost.rootdisk=";
/// The device of the root disk.
pub const ROOT_DISK_DEVICE: &str = "/dev/vda";
/// The kernel command-line parameter that gives the overlay over the root disk a
/// writable disk of its own (`vmhost.rwdisk=ext4`, the second virtio-blk device) instead
/// of tmpfs: for jobs that write more than the guest's memory holds.
pub const RW_DISK_PARAM: &str = "vmhost.rwdisk=";
/// The device of the writable disk.
pub const RW_DISK_DEVICE: &str = "/dev/vdb";

/// The module list: one `file.ko [params]` per line, in load order.
pub const MODULES_LIST: &str = "/vmhost/modules.load";

/// Where the initramfs lists the hard links the guest makes at boot
/// (`crate::image::cpio` writes it, `crate::agent::init` reads it).
pub const LINKS_FILE: &str = "vmhost/links";

/// The search path when the environment has no PATH (Debian's default for root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The most file data one agent frame carries: the most one FileRead answers with,
/// and the largest FsReadFile the agent serves whole (a frame less room for the header
/// fields).
pub const MAX_CHUNK: usize = proto::MAX_FRAME as usize - 1024;

/// The guest side of QEMU's user-mode network: the address, gateway and DNS server
/// slirp hands out, which the agent sets statically (no DHCP client needed). Whether
/// packets flow is the host's choice: it sets the link up or down (InstanceSetNetwork).
pub const GUEST_ADDR: [u8; 4] = [10, 0, 2, 15];
/// The host as the guest sees it (the host's loopback only when asked for: see
/// the QEMU backend's `net_filter`).
pub const GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// The DNS server slirp answers on.
pub const DNS: &str = "10.0.2.3";

/// Where guest programs reach the host's listeners (NetListen): an address of the
/// guest's own loopback interface that the agent listens on and tunnels to the host
/// (see [`proto::LISTEN`]), with or without a network device. The original's gateway
/// address, kept for its users.
pub const HOST_ADDR: [u8; 4] = [10, 42, 0, 1];
/// The name of [`HOST_ADDR`] in the guest's `/etc/hosts`.
pub const HOST_NAME: &str = "host.internal";
