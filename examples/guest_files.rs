//! Moves a file into a VM and back: writes it with the `std::fs`-like [`vmhost::Fs`],
//! has a guest command change it, reads the result and a directory listing.
//!
//! ```sh
//! cargo run --example guest_files
//! ```

use std::io::{Read, Seek, SeekFrom, Write};

use vmhost::{Image, Instance};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vm = Instance::new(Image::Default, Default::default())?;
    let fs = vm.fs();
    fs.create_dir_all("/work")?;
    fs.write("/work/words.txt", b"pear\napple\nfig\n")?;
    // A guest program works on it.
    let status = vm.command("sh").args(["-c", "sort /work/words.txt > /work/sorted.txt"]).status()?;
    assert!(status.success());
    // Read + Write + Seek on a guest file.
    let mut f = fs.options().read(true).write(true).open("/work/sorted.txt")?;
    let mut sorted = String::new();
    f.read_to_string(&mut sorted)?;
    print!("{sorted}");
    f.seek(SeekFrom::End(0))?;
    f.write_all(b"(sorted in the guest)\n")?;
    for entry in fs.read_dir("/work")? {
        let entry = entry?;
        println!("{} {} bytes", entry.file_name(), fs.metadata(entry.path())?.len());
    }
    drop(f);
    vm.close()?;
    Ok(())
}
