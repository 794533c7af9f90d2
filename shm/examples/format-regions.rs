//! Creates a fresh set of regions for a pair: `DIR/a.region`, `DIR/b.region` (node regions)
//! and `DIR/control.region`. For booting guests by hand; `hostd up` does this itself.
//!
//! ```text
//! cargo run -p shm --example format-regions -- DIR [SIZE_MIB]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use shm::{ControlRegion, Mapping, NodeRegion};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: format-regions DIR [SIZE_MIB]")?);
    let size_mib: u64 = args.next().map_or(Ok(64), |s| s.parse())?;
    std::fs::create_dir_all(&dir)?;
    for (id, name) in ["a", "b"].iter().enumerate() {
        let path = dir.join(format!("{name}.region"));
        NodeRegion::format(
            Mapping::create_file(&path, size_mib << 20)?,
            id as u32,
            name,
        )?;
        println!("{}", path.display());
    }
    let control = dir.join("control.region");
    ControlRegion::format(
        Mapping::create_file(&control, 1 << 20)?,
        &["a", "b"],
        &["a", "b"],
    )?;
    println!("{}", control.display());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "format-regions: error: {}",
                wire::error_chain::one_line(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
