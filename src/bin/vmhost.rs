//! The `vmhost` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::Signal;
use std::sync::Arc;
use vmhost::server::control::{ControlClient, Response};
use vmhost::server::helper::Helper;

use vmhost::server::{Server, ServerOptions};

const USAGE: &str = "\
vmhost: boot Linux micro-VMs and drive them

USAGE:
    vmhost run [VM OPTIONS] [--net | --net-host-loopback] [-t] [-i|-n] [-e KEY=VAL]... [-w DIR] -- CMD [ARGS...]
        Boot a guest, run CMD in it with its stdout and stderr on ours as they come,
        and exit with its exit code; when the VM ends before CMD does: 121 the guest
        powered off, halted or rebooted, 122 it crashed (kernel panic, triple fault),
        123 QEMU died, 124 --timeout; 125 when vmhost itself fails. Our stdin is fed to
        CMD when it is a pipe or a file (-i: from a terminal too; -n: never; else CMD
        reads /dev/null). -t runs CMD on a terminal in the guest: ours in raw mode,
        keys typed into it, window size changes followed. --net connects the guest's
        network first (QEMU's user-mode NAT: the guest is 10.0.2.15): it reaches what
        any machine on this host's network reaches, not this host's loopback services;
        --net-host-loopback also lets it reach those, at 10.0.2.2. Without either the
        guest has no network. CMD starts as soon as the guest is up (its
        arguments are on the guest's kernel command line, readable by every guest user:
        pass secrets with -e), except with -t, -e or --net.

    vmhost host --name NAME --dir DIR [VM OPTIONS]
        Boot one guest and serve it: the control protocol on DIR/vmhost.sock (pid in
        DIR/vmhost.pid) and the helper protocol on DIR/helper.sock. Exits when the VM
        does, or on SIGTERM/SIGINT after stopping it.

    vmhost kernel fetch [--package PKG]
        Provision a stock Debian kernel (default linux-image-cloud-amd64) into the cache.
    vmhost kernel build [--source DIR]
        Build vmhost's minimal guest kernel (kernel/vmhost.config) from Debian's
        linux-source package or a source tree; `vmhost run` then boots it.
    vmhost kernel list
        Show the cached kernels and which one `vmhost run` uses.

    vmhost image pull [--platform OS/ARCH[/VARIANT]] REF
        Pull a container image into the image store (the cache's images/): what the tag
        names now, layers verified, three at a time, with progress on a terminal.
    vmhost image ls
        List the stored references: name, digest, size of the platform's layers.
    vmhost image inspect REF
        Print the stored image's manifest digest, platform, layers and configuration
        as JSON.
    vmhost image export NAME|KEY DIR
        Write a stored image (a committed snapshot too), or a snapshot by its key, as
        an OCI image layout in DIR (new, or a layout that gains it), as skopeo, umoci
        and buildah read one.
    vmhost image rm REF...
        Forget references (their blobs go at the next prune).
    vmhost image prune
        Remove the blobs and unpacked roots no stored reference reaches, and the
        snapshot records no name keeps.

    vmhost helper --socket PATH [--max-frame BYTES]
        Serve the helper protocol for one VM on the Unix socket PATH. Exits when its
        last client disconnects, or on SIGTERM/SIGINT, removing the socket. Also
        `-socket PATH`, and run through a link named cc-helper (`cc-helper -socket
        PATH`), as the original's clients start their helper.

    vmhost ctl SOCKET (status | info | stop [--timeout SECS] | force-stop | commit NAME)
        Send one control request to a per-VM host process (its vmhost.sock) and print
        the reply JSON on one line. Exits 0 when the reply says ok, 1 otherwise.

    vmhost commit [--exclude PATH]... VM_DIR|SOCKET NAME
        Keep the guest root of the VM `vmhost host --dir VM_DIR` serves as the image NAME,
        as `docker commit` does: its changes since boot become a layer (the guest is
        paused meanwhile), PATH and what lies under it left out. Prints the name as
        stored and the snapshot's key; `vmhost run --image NAME` boots it.

    vmhost qmp SOCKET [--timeout SECS] COMMAND [ARGS_JSON]
        Run one QMP command on the QEMU whose QMP socket is SOCKET and print its return
        value as one line of JSON (exit 0), or the QMP error class and description on
        stderr (exit 1).

    vmhost qmp SOCKET [--timeout SECS] --events [--count N]
        Print QEMU's events as JSON lines, N of them or until QEMU exits.

    vmhost --help | --version

VM OPTIONS:
    --image IMAGE     a root filesystem directory or tar archive, or a container image
                      reference (alpine, localhost:5000/app:1, repo@sha256:...): pulled into
                      the image store when missing (VMHOST_PULL=always|missing|never), run
                      with its entrypoint, command, env, working directory and user
                      (default: busybox); `run --pull always` asks the registry first,
                      `--pull never` only uses the store, `--entrypoint PROG` replaces
                      the image's entrypoint; `--disk 10G` gives the image's writable
                      layer a disk of that size instead of the guest's memory
    --memory MB       guest memory, 96 MiB to the host's (default 256)
    --cpus N          vCPUs, 1 to 255 (default 2 with QEMU on a host with 2 CPUs or more,
                      else 1)
    --timeout SECS    stop the guest after this long
    --user USER       run commands as USER (name from the image's /etc/passwd, or uid[:gid])
    --backend B       kvm, qemu or auto (default): auto takes kvm where hardware
                      virtualization exists and the kvm backend can boot the guest
    --mount DIR:TAG[:ro]
                      share host directory DIR with the guest at /mnt/TAG (over virtio-9p;
                      :ro makes it read-only); repeatable
    -p, --publish [HOST_IP:]HOST_PORT:GUEST_PORT
                      publish a guest port on the host, as docker run -p: connections to
                      HOST_IP:HOST_PORT go to GUEST_PORT on the guest's loopback (over
                      vmhost's own channel: no guest network needed). HOST_IP is
                      127.0.0.1 unless given (0.0.0.0 for every address); an empty
                      HOST_PORT takes a free one; repeatable
    --dmesg           show the guest's kernel console on stderr

ENVIRONMENT:
    VMHOST_KERNEL       kernel to boot (vmlinux or bzImage); VMHOST_MODULES its modules dir
    VMHOST_AGENT        the static guest agent (scripts/build-agent.sh builds it)
    VMHOST_ACCEL        kvm, tcg or auto (default: kvm where hardware virtualization exists)
    VMHOST_CPU          QEMU -cpu model (default: host with kvm, max,-erms,-fsrm with tcg)
    XDG_CACHE_HOME      cache root (kernels, images, initramfs): $XDG_CACHE_HOME/vmhost
    VMHOST_LOG          log filter (error, warn, info, debug, trace; default warn)
    VMHOST_HELPER_PATH  the helper binary a library client starts
    VMHOST_USE_HELPER   1/0: run instances through a helper process or in-process
";

/// The name under which the original's clients start their helper.
const CC_HELPER: &str = "cc-helper";

fn main() -> ExitCode {
    // Each line is stamped with the time since vmhost started, which is what reading a
    // boot or a slow call needs.
    let started = std::time::Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("VMHOST_LOG", "warn"))
        .format(move |buf, rec| {
            use std::io::Write;
            let t = started.elapsed();
            writeln!(
                buf,
                "[{:4}.{:03} {:5} {}] {}",
                t.as_secs(),
                t.subsec_millis(),
                rec.level(),
                rec.target(),
                rec.args()
            )
        })
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Called as `cc-helper` (a link to vmhost), it is the original's helper: the clients of
    // the original start `cc-helper -socket PATH`.
    let called_as = std::env::args_os().next().map(PathBuf::from);
    if called_as.as_deref().and_then(|p| p.file_name()).is_some_and(|n| n == CC_HELPER) {
        return match cmd_helper(&args) {
            Ok(code) => code,
            Err(msg) => {
                eprintln!("{CC_HELPER}: {msg}");
                ExitCode::from(2)
            }
        };
    }
    let result = match args.first().map(String::as_str) {
        None | Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some("-V" | "--version") => {
            println!("vmhost {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Some("helper") => cmd_helper(&args[1..]),
        Some("ctl") => cmd_ctl(&args[1..]),
        Some("commit") => cmd_commit(&args[1..]),
        Some("qmp") => cmd_qmp(&args[1..]),
        Some("run") => cmd_run(&args[1..]),
        Some("host") => cmd_host(&args[1..]),
        Some("kernel") => cmd_kernel(&args[1..]),
        Some("image") => cmd_image(&args[1..]),
        Some(other) => Err(format!("unknown command {other:?}; see 'vmhost --help'")),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("vmhost: {msg}");
            ExitCode::from(2)
        }
    }
}

/// Takes the value of `--flag VALUE` or `--flag=VALUE` at `args[*i]`.
fn flag_value(args: &[String], i: &mut usize, flag: &str) -> Result<Option<String>, String> {
    let a = &args[*i];
    if a == flag {
        *i += 1;
        return args.get(*i).cloned().map(Some).ok_or_else(|| format!("{flag} needs a value"));
    }
    Ok(a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')).map(str::to_string))
}

fn cmd_helper(args: &[String]) -> Result<ExitCode, String> {
    let mut socket = None;
    // Descriptors for many clients first: the connection cap follows the limit.
    vmhost::internals::unix::raise_fd_limit();
    let mut opts = ServerOptions::default();
    let mut i = 0;
    while i < args.len() {
        // `-socket` too: the original's clients pass Go-style flags.
        let socket_flag = if args[i].starts_with("--") { "--socket" } else { "-socket" };
        if let Some(v) = flag_value(args, &mut i, socket_flag)? {
            socket = Some(PathBuf::from(v));
        } else if let Some(v) = flag_value(args, &mut i, "--max-frame")? {
            opts.max_frame = v.parse().map_err(|_| format!("--max-frame: {v:?} is not a byte count"))?;
        } else {
            return Err(format!("helper: unexpected argument {:?}", args[i]));
        }
        i += 1;
    }
    let socket = socket.ok_or("helper: --socket PATH is required")?;
    let signals =
        vmhost::internals::signals::watch(&[Signal::SIGTERM, Signal::SIGINT]).map_err(|e| e.to_string())?;
    let helper = Helper::new();
    // The library's first command, when it boots through this helper.
    if let Some(first) = vmhost::FirstCommand::from_env()? {
        helper.set_first_command(first);
    }
    let server = Server::bind_with(&socket, helper.clone(), opts).map_err(|e| e.to_string())?;
    log::info!("helper {} serving {}", std::process::id(), socket.display());
    let serving = server.clone();
    let (served_tx, served_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = served_tx.send(serving.serve_until_idle());
    });
    let outcome = crossbeam_channel::select! {
        recv(signals) -> sig => {
            log::info!("helper stopping on {sig:?}");
            Ok(())
        }
        recv(served_rx) -> r => r.unwrap_or(Ok(())),
    };
    server.close();
    helper.shutdown();
    outcome.map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string())
}

/// `[--exclude PATH]... NAME` of a commit.
fn commit_args(args: &[String], usage: &str) -> Result<(String, Vec<String>), String> {
    let (mut name, mut excludes) = (None, Vec::new());
    let mut i = 0;
    while i < args.len() {
        if let Some(v) = flag_value(args, &mut i, "--exclude")? {
            excludes.push(v);
        } else if name.is_none() && !args[i].starts_with('-') {
            name = Some(args[i].clone());
        } else {
            return Err(usage.into());
        }
        i += 1;
    }
    Ok((name.ok_or(usage)?, excludes))
}

/// `vmhost commit [--exclude PATH]... VM NAME`: the root of the VM that `vmhost host`
/// serves (VM: its --dir, or its control socket) as the image NAME, as `docker commit`.
fn cmd_commit(args: &[String]) -> Result<ExitCode, String> {
    let usage = "usage: vmhost commit [--exclude PATH]... VM_DIR|SOCKET NAME";
    let Some(pos) = args.iter().position(|a| !a.starts_with('-') && !args_is_flag_value(args, a)) else {
        return Err(usage.into());
    };
    let target = PathBuf::from(&args[pos]);
    let rest: Vec<String> =
        args.iter().enumerate().filter(|(i, _)| *i != pos).map(|(_, a)| a.clone()).collect();
    let (name, excludes) = commit_args(&rest, usage)?;
    let socket = if target.is_dir() { target.join("vmhost.sock") } else { target };
    match ControlClient::new(&socket).commit(&name, &excludes) {
        Ok(r) if r.ok => {
            println!("{} {}", r.image, r.key);
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => {
            eprintln!("vmhost commit: {}", r.error);
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("vmhost commit: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Whether `a` is the value of a `--exclude` before it.
fn args_is_flag_value(args: &[String], a: &String) -> bool {
    args.windows(2).any(|w| w[0] == "--exclude" && std::ptr::eq(&w[1], a))
}

fn cmd_ctl(args: &[String]) -> Result<ExitCode, String> {
    let usage =
        "usage: vmhost ctl SOCKET (status | info | stop [--timeout SECS] | force-stop | commit [--exclude P]... NAME)";
    let (socket, method) = match args {
        [s, m, ..] => (s, m.as_str()),
        _ => return Err(usage.into()),
    };
    let client = ControlClient::new(socket);
    let rest = &args[2..];
    let reply: vmhost::Result<Response> = match method {
        "status" | "info" | "force-stop" | "force_stop" if !rest.is_empty() => return Err(usage.into()),
        "status" => client.status(),
        "info" => client.info(),
        "force-stop" | "force_stop" => client.force_stop(),
        "commit" => {
            let (name, excludes) = commit_args(rest, usage)?;
            client.commit(&name, &excludes)
        }
        "stop" => {
            let mut timeout = 0i64;
            let mut i = 0;
            while i < rest.len() {
                match flag_value(rest, &mut i, "--timeout")? {
                    Some(v) => {
                        let secs: f64 =
                            v.parse().map_err(|_| format!("--timeout: {v:?} is not a number of seconds"))?;
                        timeout = secs.clamp(1.0, 86_400.0) as i64;
                    }
                    None => return Err(usage.into()),
                }
                i += 1;
            }
            client.stop(timeout)
        }
        _ => return Err(usage.into()),
    };
    match reply {
        Ok(r) => {
            print!("{}", r.to_line());
            Ok(if r.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Err(e) => {
            eprintln!("vmhost ctl: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn cmd_qmp(args: &[String]) -> Result<ExitCode, String> {
    use vmhost::qmp;
    let usage = "usage: vmhost qmp SOCKET [--timeout SECS] (COMMAND [ARGS_JSON] | --events [--count N])";
    let Some(socket) = args.first() else { return Err(usage.into()) };
    let mut timeout = Duration::from_secs(10);
    let mut events = false;
    let mut count: Option<u64> = None;
    let mut positional = Vec::new();
    let mut i = 1;
    while i < args.len() {
        if let Some(v) = flag_value(args, &mut i, "--timeout")? {
            let secs: f64 = v.parse().map_err(|_| format!("--timeout: {v:?} is not a number of seconds"))?;
            timeout = Duration::from_secs_f64(secs.clamp(0.001, 86_400.0));
        } else if let Some(v) = flag_value(args, &mut i, "--count")? {
            count = Some(v.parse().map_err(|_| format!("--count: {v:?} is not a number"))?);
        } else if args[i] == "--events" {
            events = true;
        } else {
            positional.push(args[i].clone());
        }
        i += 1;
    }
    let stream = vmhost::internals::unix::dial(std::path::Path::new(socket), timeout)
        .map_err(|e| format!("{e}; is QEMU running with -qmp unix:{socket},server=on?"))?;
    let fail = |e: qmp::Error| -> Result<ExitCode, String> {
        match e {
            qmp::Error::Qmp { class, desc, .. } => eprintln!("{class}: {desc}"),
            other => eprintln!("vmhost qmp: {other}"),
        }
        Ok(ExitCode::FAILURE)
    };
    if events {
        if !positional.is_empty() {
            return Err(usage.into());
        }
        let (client, listener) = match qmp::Client::connect_with_listener(stream, timeout, 1024) {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        let mut seen = 0u64;
        let mut out = std::io::stdout().lock();
        while count.is_none_or(|n| seen < n) {
            match listener.recv() {
                Ok(ev) => {
                    let line = serde_json::to_string(&ev).map_err(|e| e.to_string())?;
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        break; // stdout closed: we are done
                    }
                    seen += 1;
                }
                Err(_) => break, // QEMU went away
            }
        }
        client.close();
        return Ok(ExitCode::SUCCESS);
    }
    let (name, arguments) = match positional.as_slice() {
        [name] => (name, None),
        [name, json] => {
            let v: serde_json::Value =
                serde_json::from_str(json).map_err(|e| format!("ARGS_JSON is not valid JSON: {e}"))?;
            (name, Some(v))
        }
        _ => return Err(usage.into()),
    };
    let client = match qmp::Client::connect(stream, timeout) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let result = client.execute_raw(name, arguments, timeout);
    client.close();
    match result {
        Ok(v) => {
            println!("{v}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => fail(e),
    }
}

/// VM options shared by `run` and `host`.
#[derive(Default)]
struct VmFlags {
    image: Option<PathBuf>,
    options: vmhost::InstanceOptions,
    /// `-p`: host addresses and the guest ports published on them.
    publish: Vec<(std::net::SocketAddr, u16)>,
}

impl VmFlags {
    /// Takes one VM option at `args[*i]`; false when it is not one.
    fn take(&mut self, args: &[String], i: &mut usize) -> Result<bool, String> {
        let num = |v: String, flag: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{flag}: {v:?} is not a number"))
        };
        if let Some(v) = flag_value(args, i, "--image")? {
            self.image = Some(PathBuf::from(v));
        } else if let Some(v) = match flag_value(args, i, "--publish")? {
            Some(v) => Some(v),
            None => flag_value(args, i, "-p")?,
        } {
            self.publish.push(vmhost::vm::publish::parse_publish(&v)?);
        } else if let Some(v) = flag_value(args, i, "--memory")? {
            // Passed on as given: the library refuses what a guest cannot have, saying why.
            self.options.memory_mb =
                v.parse::<u64>().map_err(|_| format!("--memory: {v:?} is not a number of MiB"))?;
        } else if let Some(v) = flag_value(args, i, "--cpus")? {
            self.options.cpus = v.parse::<i32>().map_err(|_| format!("--cpus: {v:?} is not a number"))?;
        } else if let Some(v) = flag_value(args, i, "--timeout")? {
            self.options.timeout =
                Some(Duration::from_secs_f64(num(v, "--timeout")?.clamp(0.001, 31_536_000.0)));
        } else if let Some(v) = flag_value(args, i, "--user")? {
            self.options.user = v;
        } else if let Some(v) = flag_value(args, i, "--backend")? {
            self.options.backend = v.parse()?;
        } else if let Some(v) = flag_value(args, i, "--mount")? {
            // HOSTDIR:TAG[:ro]; the guest sees it at /mnt/TAG.
            let (rest, writable) = match v.strip_suffix(":ro") {
                Some(r) => (r.to_string(), false),
                None => (v.strip_suffix(":rw").unwrap_or(&v).to_string(), true),
            };
            let Some((host, tag)) = rest.rsplit_once(':') else {
                return Err(format!("--mount {v:?}: use HOSTDIR:TAG[:ro] (the guest sees /mnt/TAG)"));
            };
            self.options.mounts.push(vmhost::wire::MountConfig {
                tag: tag.to_string(),
                host_path: host.to_string(),
                writable,
            });
        } else if args[*i] == "--dmesg" {
            self.options.dmesg = true;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The image: a directory or tar file that exists, else a registry reference.
    fn image(&self) -> vmhost::Image {
        match &self.image {
            None => vmhost::Image::Default,
            Some(p) if p.exists() => vmhost::Image::from_path(p),
            // A snapshot's key, as `docker run` takes an image id.
            Some(p) if p.to_str().is_some_and(vmhost::image::snapshot::is_key) => {
                let key = p.to_str().unwrap_or_default();
                vmhost::Image::Snapshot(
                    vmhost::image::snapshot::records_dir(&vmhost::image::cache_dir()).join(key),
                )
            }
            Some(p) => match p.to_str().map(|s| (s, s.parse::<vmhost::image::reference::Reference>())) {
                Some((s, Ok(_))) => vmhost::Image::Ref(s.to_string()),
                // Neither: a path, whose open fails with what is missing.
                _ => vmhost::Image::from_path(p),
            },
        }
    }
}

/// Whether our stdin is the null device (/dev/null: character device 1:3).
fn stdin_is_dev_null() -> bool {
    use nix::sys::stat::{fstat, makedev, SFlag};
    match fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stdin())) {
        Ok(st) => {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR
                && st.st_rdev == makedev(1, 3)
        }
        Err(_) => false,
    }
}

fn cmd_run(args: &[String]) -> Result<ExitCode, String> {
    let usage =
        "usage: vmhost run [VM OPTIONS] [--net | --net-host-loopback] [-t] [-i|-n] [-e KEY=VAL]... [-w DIR] \
         [--entrypoint PROG] [--pull always|missing|never] [--disk SIZE] -- CMD [ARGS...] (CMD optional with a container \
         --image)";
    let mut vm = VmFlags::default();
    let mut env = Vec::new();
    let mut dir = None;
    let mut tty = false;
    // The guest's network (QEMU's user-mode NAT, the host as 10.0.2.2): off unless asked.
    let mut net = false;
    // Our stdin goes to the command when it is not a terminal (piped or redirected) nor
    // /dev/null, with -i also from a terminal, never with -n (like ssh -n).
    let mut stdin_mode = None;
    let mut entrypoint: Option<String> = None;
    let mut i = 0;
    let mut cmd = Vec::new();
    while i < args.len() {
        if args[i] == "--" {
            cmd = args[i + 1..].to_vec();
            break;
        }
        let env_flag = if args[i].starts_with("--env") { "--env" } else { "-e" };
        let dir_flag = if args[i].starts_with("--workdir") { "--workdir" } else { "-w" };
        if vm.take(args, &mut i)? {
        } else if let Some(v) = flag_value(args, &mut i, env_flag)? {
            let (k, val) = v.split_once('=').ok_or_else(|| format!("-e {v:?}: expected KEY=VALUE"))?;
            env.push((k.to_string(), val.to_string()));
        } else if let Some(v) = flag_value(args, &mut i, dir_flag)? {
            dir = Some(v);
        } else if let Some(v) = flag_value(args, &mut i, "--entrypoint")? {
            entrypoint = Some(v);
        } else if let Some(v) = flag_value(args, &mut i, "--disk")? {
            // SIZE in MiB, or with a suffix M, G or T (powers of 1024).
            let (num, mult) = match v.chars().last() {
                Some('M' | 'm') => (&v[..v.len() - 1], 1u64),
                Some('G' | 'g') => (&v[..v.len() - 1], 1 << 10),
                Some('T' | 't') => (&v[..v.len() - 1], 1 << 20),
                _ => (v.as_str(), 1),
            };
            let mb = num
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| format!("--disk {v:?}: give a size such as 512M or 10G"))?;
            // Read where the instance boots (here, or in the helper it starts).
            std::env::set_var("VMHOST_DISK_MB", mb.to_string());
        } else if let Some(v) = flag_value(args, &mut i, "--pull")? {
            v.parse::<vmhost::image::pull::PullPolicy>()?;
            // Read where the image is resolved (in this process, or the helper it
            // starts, which inherits it); set before any thread starts.
            std::env::set_var("VMHOST_PULL", &v);
        } else if args[i] == "-t" || args[i] == "--tty" {
            tty = true;
        } else if args[i] == "--net" {
            net = true;
        } else if args[i] == "--net-host-loopback" {
            net = true;
            vm.options.host_loopback = true;
        } else if args[i] == "-i" || args[i] == "--interactive" {
            stdin_mode = Some(true);
        } else if args[i] == "-n" || args[i] == "--no-stdin" {
            stdin_mode = Some(false);
        } else if args[i].starts_with('-') {
            return Err(format!("run: unknown option {:?}; {usage}", args[i]));
        } else {
            cmd = args[i..].to_vec();
            break;
        }
        i += 1;
    }
    // A container image runs its entrypoint with CMD as its arguments (or its own
    // command), as `docker run IMAGE CMD` does; --entrypoint PROG runs PROG instead.
    let image = vm.image();
    let container = match &image {
        vmhost::Image::Ref(_) | vmhost::Image::Snapshot(_) => true,
        vmhost::Image::Dir(p) | vmhost::Image::Tar(p) => {
            use vmhost::image::archive::{recognise, Local};
            matches!(recognise(p), Ok(Local::OciLayout | Local::OciArchive | Local::DockerArchive))
        }
        vmhost::Image::Default => false,
    };
    let from_image = container && entrypoint.is_none();
    if let (Some(e), true) = (&entrypoint, container) {
        cmd.insert(0, e.clone());
    }
    if cmd.is_empty() && !from_image {
        return Err(usage.into());
    }
    let (program, rest) = match cmd.split_first() {
        Some((p, r)) => (p.clone(), r.to_vec()),
        None => (String::new(), Vec::new()),
    };
    let fail = |e: vmhost::Error| {
        eprintln!("vmhost: {e}");
        Ok(ExitCode::from(125))
    };
    // A terminal: both ends must be one; window changes arrive as SIGWINCH, taken
    // before any thread starts so that every thread leaves it to the watcher.
    let winch = if tty {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
            return Err("run -t: stdin and stdout must be a terminal (drop -t to pipe them)".into());
        }
        Some(
            vmhost::internals::signals::watch(&[nix::sys::signal::Signal::SIGWINCH])
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    // /dev/null is not fed: the command reads the guest's, which ends the same way,
    // without a pipe and the thread that feeds it (cron jobs, CI steps, `< /dev/null`).
    let feed_stdin = stdin_mode.unwrap_or_else(|| {
        use std::io::IsTerminal;
        !std::io::stdin().is_terminal() && !stdin_is_dev_null()
    });
    // The guest starts the command as soon as it is up, unless it needs a terminal (its
    // size is known only then), caller-given environment values (the command line that
    // carries it is readable to every user of the guest in /proc/cmdline) or the network
    // (connected after the boot).
    let booted = if winch.is_none() && env.is_empty() && !net && !container {
        let mut first = vmhost::FirstCommand::new(&program).args(rest.iter()).stdin_piped(feed_stdin);
        if let Some(d) = &dir {
            first = first.current_dir(d);
        }
        vmhost::Instance::new_with_first_command(image, vm.options.clone(), first)
    } else {
        vmhost::Instance::new(image, vm.options.clone())
    };
    let inst = match booted {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if net {
        if let Err(e) = inst.set_network(true) {
            let _ = inst.kill();
            return fail(e);
        }
    }
    for (host, guest_port) in &vm.publish {
        match inst.publish(*host, *guest_port) {
            // A port vmhost picked is worth saying; one asked for is known.
            Ok(bound) if host.port() == 0 => {
                eprintln!("vmhost: guest port {guest_port} published on {bound}")
            }
            Ok(_) => {}
            Err(e) => {
                let _ = inst.kill();
                return fail(e);
            }
        }
    }
    log::debug!("instance {} ready; running {program}", inst.id());
    let mut c = if from_image {
        let mut c = inst.entrypoint();
        c.args(cmd.iter().cloned());
        c
    } else {
        let mut c = inst.command(program.clone());
        c.args(rest.iter().cloned());
        c
    };
    c.envs(env);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut pipe_closed = false;
    let mut forward = |stream: u8, data: &[u8]| {
        let w: &mut dyn Write = if stream == vmhost::wire::STREAM_STDERR { &mut err } else { &mut out };
        match w.write_all(data).and_then(|()| w.flush()) {
            Ok(()) => Ok(()),
            // Our reader went away (`vmhost run -- yes | head -1`): stop the guest
            // command, as SIGPIPE would stop a local one.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                pipe_closed = true;
                Err(vmhost::Error::Closed)
            }
            Err(_) => Ok(()),
        }
    };
    let code = match winch {
        None if feed_stdin => c.stream_stdin(std::io::stdin(), &mut forward),
        None => c.stream(&mut forward),
        Some(winch) => {
            if let Ok(term) = std::env::var("TERM") {
                c.env("TERM", term);
            }
            c.tty(true);
            let (cols, rows) = terminal_size();
            if let Err(e) = inst.set_console(cols, rows) {
                return fail(e);
            }
            let raw = RawMode::enter().map_err(|e| format!("run -t: raw mode: {e}"))?;
            let done = std::sync::atomic::AtomicBool::new(false);
            let code = std::thread::scope(|s| {
                s.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::SeqCst) {
                        if winch.recv_timeout(Duration::from_millis(100)).is_ok() {
                            let (cols, rows) = terminal_size();
                            if let Err(e) = inst.set_console(cols, rows) {
                                log::debug!("resizing the guest terminal: {e}");
                            }
                        }
                    }
                });
                let code = c.stream_stdin(std::io::stdin(), &mut forward);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                code
            });
            drop(raw);
            code
        }
    };
    log::debug!("{program} ended: {code:?}");
    let ended = match &code {
        Err(e) if e.code() == vmhost::wire::ErrorCode::NotRunning => inst.end().ok().flatten(),
        _ => None,
    };
    // The guest is thrown away: no need for its orderly shutdown.
    if let Err(e) = inst.kill() {
        log::warn!("stopping the guest: {e}");
    }
    log::debug!("guest stopped");
    match code {
        _ if pipe_closed => Ok(ExitCode::from(141)),
        Ok(code) if (0..=255).contains(&code) => Ok(ExitCode::from(code as u8)),
        Ok(code) => {
            eprintln!("vmhost: the guest command ended without an exit code ({code})");
            Ok(ExitCode::from(125))
        }
        Err(e) if e.code() == vmhost::wire::ErrorCode::NotRunning => {
            // The VM ended under the command: say how, and exit with the end's code.
            eprintln!("vmhost: {e}");
            match ended {
                Some(end) => Ok(ExitCode::from(end.exit_code())),
                None => Ok(ExitCode::from(125)),
            }
        }
        Err(e) => fail(e),
    }
}

/// The size of our terminal (stdout), or 80x24.
fn terminal_size() -> (u16, u16) {
    let mut ws = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize.
    let r = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

/// Our terminal in raw mode (keys go to the guest as typed, Ctrl-C included) until
/// dropped, which restores it.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> nix::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

fn cmd_kernel(args: &[String]) -> Result<ExitCode, String> {
    let cache = vmhost::image::cache_dir();
    let progress = vmhost::progress::Progress::auto();
    match args.first().map(String::as_str) {
        Some("fetch") => {
            let mut package = vmhost::image::kernel::DEFAULT_PACKAGE.to_string();
            let mut i = 1;
            while i < args.len() {
                match flag_value(args, &mut i, "--package")? {
                    Some(p) => package = p,
                    None => return Err(format!("kernel fetch: unexpected argument {:?}", args[i])),
                }
                i += 1;
            }
            Ok(report_kernel(vmhost::image::kernel::fetch(&cache, &package, &progress)))
        }
        Some("build") => {
            let mut source = None;
            let mut i = 1;
            while i < args.len() {
                match flag_value(args, &mut i, "--source")? {
                    Some(p) => source = Some(PathBuf::from(p)),
                    None => return Err(format!("kernel build: unexpected argument {:?}", args[i])),
                }
                i += 1;
            }
            Ok(report_kernel(vmhost::image::kernel_build::build(&cache, source.as_deref(), &progress)))
        }
        Some("list") => {
            // What `vmhost run` would boot, without provisioning anything.
            let used = if let Some(k) = std::env::var_os("VMHOST_KERNEL") {
                println!("VMHOST_KERNEL={} (used by vmhost run)", PathBuf::from(k).display());
                None
            } else {
                let stock_only = std::env::var("VMHOST_KERNEL_KIND").is_ok_and(|k| k == "stock");
                let minimal = if stock_only {
                    None
                } else {
                    vmhost::image::kernel::cached_minimal(&cache).ok().flatten()
                };
                minimal.or_else(|| vmhost::image::kernel::cached_default(&cache).ok().flatten())
            };
            for dir in vmhost::image::kernel::list(&cache) {
                let kind = std::fs::read_to_string(dir.join("kind")).unwrap_or_else(|_| "stock".into());
                let mark = if used.as_ref().is_some_and(|k| k.vmlinux.parent() == Some(dir.as_path())) {
                    "  (used by vmhost run)"
                } else {
                    ""
                };
                println!("{}  [{}]{mark}", dir.display(), kind.trim());
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => Err("usage: vmhost kernel (fetch [--package PKG] | build [--source DIR] | list)".into()),
    }
}

fn cmd_image(args: &[String]) -> Result<ExitCode, String> {
    use vmhost::image::{oci::Platform, prune, pull, reference::Reference, store::Store};
    let cache = vmhost::image::cache_dir();
    let store = Store::open(cache.join("images")).map_err(|e| e.to_string())?;
    let parse = |s: &str| s.parse::<Reference>().map_err(|e| e.to_string());
    let fail = |e: vmhost::Error| {
        eprintln!("vmhost: {e}");
        Ok(ExitCode::from(1))
    };
    match args.first().map(String::as_str) {
        Some("pull") => {
            let mut opts =
                pull::PullOptions { progress: vmhost::progress::Progress::auto(), ..Default::default() };
            let mut name = None;
            let mut i = 1;
            while i < args.len() {
                if let Some(p) = flag_value(args, &mut i, "--platform")? {
                    opts.platform = Platform::parse(&p)?;
                } else if name.is_none() && !args[i].starts_with('-') {
                    name = Some(parse(&args[i])?);
                } else {
                    return Err(format!("image pull: unexpected argument {:?}", args[i]));
                }
                i += 1;
            }
            let r = name.ok_or("usage: vmhost image pull [--platform OS/ARCH[/VARIANT]] REF")?;
            match pull::pull(&store, &r, &opts) {
                Ok(img) => {
                    println!("{r}@{}", img.resolved);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => fail(e),
            }
        }
        Some("export") if args.len() == 3 => {
            // A stored image by name, or a snapshot by key, into an OCI layout.
            let (img, tag) = if vmhost::image::snapshot::is_key(&args[1]) {
                let r = vmhost::image::snapshot::load(&cache, &args[1]).map_err(|e| e.to_string())?;
                (vmhost::image::snapshot::image(&store, &r).map_err(|e| e.to_string())?, args[1].clone())
            } else {
                let r = parse(&args[1])?;
                let tag = r.tag().unwrap_or("latest").to_string();
                match pull::local(&store, &r, &Platform::host()) {
                    Ok(Some(img)) => (img, tag),
                    Ok(None) => return Err(format!("image export: {r} is not in the image store")),
                    Err(e) => return fail(e),
                }
            };
            match vmhost::image::export::export(&store, &img, Path::new(&args[2]), &tag) {
                Ok(()) => {
                    println!("{}:{tag}", args[2]);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => fail(e),
            }
        }
        Some("ls") => {
            let refs = store.refs().map_err(|e| e.to_string())?;
            println!("{:<60} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
            for (name, digest) in refs {
                let size = name
                    .parse::<Reference>()
                    .ok()
                    .and_then(|r| pull::local(&store, &r, &Platform::host()).ok().flatten())
                    .map(|img| img.manifest.layers.iter().map(|l| l.size).sum::<u64>());
                let size = size.map_or_else(|| "-".into(), vmhost::progress::human);
                println!("{name:<60} {:<20} {size:>10}", &digest.to_string()[..19]);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some("inspect") if args.len() == 2 => {
            let r = parse(&args[1])?;
            match pull::local(&store, &r, &Platform::host()) {
                Ok(Some(img)) => {
                    let v = serde_json::json!({
                        "reference": r.to_string(),
                        "digest": img.resolved.to_string(),
                        "manifest": img.manifest_digest.to_string(),
                        "platform": format!("{}/{}", img.config.os, img.config.architecture),
                        "layers": img.manifest.layers,
                        "config": img.config.config,
                    });
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(None) => {
                    eprintln!("vmhost: {r} is not in the image store; pull it with vmhost image pull {r}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => fail(e),
            }
        }
        Some("rm") if args.len() >= 2 => {
            let mut code = ExitCode::SUCCESS;
            for a in &args[1..] {
                let r = parse(a)?;
                match store.remove_ref(&r.to_string()) {
                    Ok(true) => println!("untagged {r}"),
                    Ok(false) => {
                        eprintln!("vmhost: {r} is not in the image store");
                        code = ExitCode::from(1);
                    }
                    Err(e) => return fail(e),
                }
            }
            Ok(code)
        }
        Some("prune") if args.len() == 1 => match prune::prune(&store, &cache) {
            Ok(p) => {
                println!(
                    "removed {} blobs ({}) and {} unpacked roots",
                    p.blobs,
                    vmhost::progress::human(p.bytes),
                    p.roots
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => fail(e),
        },
        _ => {
            Err("usage: vmhost image (pull [--platform P] REF | ls | inspect REF | export NAME|KEY DIR | rm REF... | prune)".into())
        }
    }
}

/// Prints the kernel's path (exit 0), or the error (exit 1).
fn report_kernel(k: vmhost::Result<vmhost::image::kernel::Kernel>) -> ExitCode {
    match k {
        Ok(k) => {
            println!("{}", k.vmlinux.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmhost: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_host(args: &[String]) -> Result<ExitCode, String> {
    use vmhost::server::control::ControlServer;
    let mut vm = VmFlags::default();
    let mut name = None;
    let mut dir = None;
    let mut i = 0;
    while i < args.len() {
        if vm.take(args, &mut i)? {
        } else if let Some(v) = flag_value(args, &mut i, "--name")? {
            name = Some(v);
        } else if let Some(v) = flag_value(args, &mut i, "--dir")? {
            dir = Some(PathBuf::from(v));
        } else {
            return Err(format!("host: unexpected argument {:?}", args[i]));
        }
        i += 1;
    }
    let name = name.ok_or("host: --name NAME is required")?;
    let dir = dir.ok_or("host: --dir DIR is required")?;
    // Descriptors for many clients (the helper's connection cap follows the limit).
    vmhost::internals::unix::raise_fd_limit();
    // A DIR that a live host serves is refused before a whole VM boots for nothing.
    ControlServer::check_free(&dir.join("vmhost.sock")).map_err(|e| e.to_string())?;
    let signals =
        vmhost::internals::signals::watch(&[Signal::SIGTERM, Signal::SIGINT]).map_err(|e| e.to_string())?;
    let source = match &vm.image {
        Some(p) => vmhost::image::rootfs::Source::from_path(p).map_err(|e| e.to_string())?,
        None => vmhost::image::rootfs::Source::Default,
    };
    let spec_source = source.clone();
    // What the root is as the guest boots from it: its snapshots refuse a changed one.
    let identity = vmhost::image::snapshot::root_identity(&vmhost::image::cache_dir(), &source);
    let spec = vmhost::vm::InstanceSpec {
        source,
        cache_dir: vmhost::image::cache_dir(),
        options: vm.options.clone(),
        first_command: None,
        image: None,
        lease: None,
        snapshot_base: None,
    };
    let machine = spec.boot(&vmhost::progress::Progress::auto()).map_err(|e| e.to_string())?;
    log::info!("host {name}: VM {} running", machine.id());
    let mut published = Vec::new();
    for (host, guest_port) in &vm.publish {
        let p = machine
            .agent()
            .and_then(|agent| vmhost::vm::publish::Published::start(agent, *host, *guest_port))
            .map_err(|e| {
                let _ = machine.force_stop();
                e.to_string()
            })?;
        if host.port() == 0 {
            eprintln!("vmhost host {name}: guest port {guest_port} published on {}", p.host_addr());
        }
        published.push(p);
    }
    // `info` reports the host port of the guest's SSH port (22) when it is published.
    let ssh_port = published.iter().find(|p| p.guest_port() == 22).map_or(0, |p| p.host_addr().port());
    let hosted_source = spec_source.clone();
    let controlled = vmhost::server::control::Hosted {
        machine: machine.clone(),
        ssh_port,
        source: spec_source,
        identity: identity.clone(),
        cache: vmhost::image::cache_dir(),
    };
    let control =
        match ControlServer::start(dir.join("vmhost.sock"), dir.join("vmhost.pid"), Arc::new(controlled)) {
            Ok(c) => c,
            Err(e) => {
                let _ = machine.force_stop();
                return Err(e.to_string());
            }
        };
    let helper = Helper::with_vm(
        machine.clone(),
        vm.options.user.clone(),
        hosted_source,
        identity,
        vmhost::image::cache_dir(),
    );
    let server = match Server::bind(dir.join("helper.sock"), helper) {
        Ok(s) => s,
        Err(e) => {
            let _ = machine.force_stop();
            return Err(e.to_string());
        }
    };
    let s = server.clone();
    std::thread::spawn(move || s.serve());
    let stop = control.shutdown_handle();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.recv() {
            log::info!("host: {sig:?}; stopping the VM");
            let _ = stop.send(());
        }
    });
    let _ = control.run();
    // Here the VM has exited, or a signal came: make sure it is down, then clean up.
    if !machine.state().is_final() {
        let _ = machine.stop(Duration::from_secs(5));
    }
    server.close();
    drop(control);
    drop(published);
    match machine.end() {
        None | Some(vmhost::vm::VmEnd::Stopped) => Ok(ExitCode::SUCCESS),
        Some(end) => {
            eprintln!("vmhost host {name}: the VM ended unasked: {end}");
            Ok(ExitCode::FAILURE)
        }
    }
}
