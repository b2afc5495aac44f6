//! Streams data through a guest program as `std::process` would: a spawned child with
//! piped stdin and stdout, written and read at the same time from two threads.
//!
//! ```sh
//! cargo run --example pipes
//! ```

use std::io::{BufRead, BufReader, Write};

use vmhost::{Image, Instance, Stdio};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vm = Instance::new(Image::Default, Default::default())?;
    let mut child =
        vm.command("tr").args(["a-z", "A-Z"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error>> {
        let writer = s.spawn(move || -> std::io::Result<()> {
            for i in 0..5 {
                writeln!(stdin, "line {i} from the host")?;
            }
            Ok(()) // dropping stdin is the guest's end of input
        });
        for line in BufReader::new(stdout).lines() {
            println!("{}", line?);
        }
        writer.join().expect("writer thread")?;
        Ok(())
    })?;
    let status = child.wait()?;
    println!("tr exited with {status:?}");
    drop(child);
    vm.close()?;
    Ok(())
}
