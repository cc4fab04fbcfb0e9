//! The `hiermd` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use hiermd::device::describe_devices;
use hiermd::{Device, DeviceSpec};

#[derive(Parser)]
#[command(
    name = "hiermd",
    version,
    about = "Hierarchical geometric deep learning for molecular dynamics"
)]
struct Cli {
    /// Where to run: auto (CUDA if a GPU is found, else cpu), cpu, emu or cuda[:N].
    #[arg(long, global = true, default_value = "auto")]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices this machine offers.
    Devices,
    /// The built-in demonstration: runs every op on the chosen device and on emu, checks each
    /// against the f64 reference, and prints errors and timings.
    Demo {
        /// Elements per op.
        #[arg(long, default_value_t = 1 << 20)]
        size: usize,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => {
            for line in describe_devices() {
                println!("{line}");
            }
            Ok(())
        }
        Command::Demo { size } => {
            let dev = Device::open(cli.device)?;
            hiermd::demo::run(&dev, size)
        }
    }
}
