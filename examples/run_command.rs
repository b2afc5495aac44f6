//! Boots a VM with vmhost's default image, runs the command given on the command line
//! in it and prints what it printed, exiting with its status.
//!
//! ```sh
//! cargo run --example run_command -- uname -a
//! ```

use std::io::Write;

use vmhost::{Image, Instance, InstanceOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (program, rest) = match args.split_first() {
        Some((p, rest)) => (p.clone(), rest.to_vec()),
        None => ("uname".to_string(), vec!["-a".to_string()]),
    };
    let vm = Instance::new(Image::Default, InstanceOptions::default())?;
    let out = vm.command(&program).args(&rest).output()?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    vm.close()?;
    std::process::exit(out.status.code().unwrap_or(1));
}
