//! The `vmhost` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::Signal;
use vmhost::server::control::{ControlClient, Response};
use vmhost::server::helper::Helper;
use vmhost::server::{Server, ServerOptions};

const USAGE: &str = "\
vmhost: boot Linux micro-VMs and drive them

USAGE:
    vmhost helper --socket PATH [--max-frame BYTES]
        Serve the helper protocol for one VM on the Unix socket PATH. Exits when its
        last client disconnects, or on SIGTERM/SIGINT, removing the socket.

    vmhost ctl SOCKET (status | info | stop [--timeout SECS] | force-stop)
        Send one control request to a per-VM host process (its vmhost.sock) and print
        the reply JSON on one line. Exits 0 when the reply says ok, 1 otherwise.

    vmhost qmp SOCKET [--timeout SECS] COMMAND [ARGS_JSON]
        Run one QMP command on the QEMU whose QMP socket is SOCKET and print its return
        value as one line of JSON (exit 0), or the QMP error class and description on
        stderr (exit 1).

    vmhost qmp SOCKET [--timeout SECS] --events [--count N]
        Print QEMU's events as JSON lines, N of them or until QEMU exits.

    vmhost --help | --version

ENVIRONMENT:
    VMHOST_LOG          log filter (error, warn, info, debug, trace; default warn)
    VMHOST_HELPER_PATH  the helper binary a library client starts
    VMHOST_USE_HELPER   1/0: run instances through a helper process or in-process
";

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("VMHOST_LOG", "warn"))
        .format_timestamp_millis()
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        Some("qmp") => cmd_qmp(&args[1..]),
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
    let mut opts = ServerOptions::default();
    let mut i = 0;
    while i < args.len() {
        if let Some(v) = flag_value(args, &mut i, "--socket")? {
            socket = Some(PathBuf::from(v));
        } else if let Some(v) = flag_value(args, &mut i, "--max-frame")? {
            opts.max_frame = v.parse().map_err(|_| format!("--max-frame: {v:?} is not a byte count"))?;
        } else {
            return Err(format!("helper: unexpected argument {:?}", args[i]));
        }
        i += 1;
    }
    let socket = socket.ok_or("helper: --socket PATH is required")?;
    let signals = vmhost::signals::watch(&[Signal::SIGTERM, Signal::SIGINT]).map_err(|e| e.to_string())?;
    let helper = Helper::new();
    let server = Server::bind_with(&socket, helper, opts).map_err(|e| e.to_string())?;
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
    outcome.map(|()| ExitCode::SUCCESS).map_err(|e| e.to_string())
}

fn cmd_ctl(args: &[String]) -> Result<ExitCode, String> {
    let usage = "usage: vmhost ctl SOCKET (status | info | stop [--timeout SECS] | force-stop)";
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
    let stream = vmhost::unix::dial(std::path::Path::new(socket), timeout)
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
