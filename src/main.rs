//! The `hiermd` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use hiermd::device::describe_devices;
use hiermd::store::{self, Dataset, ExportFormat, ImportOptions};
use hiermd::{Device, DeviceSpec};
use std::path::PathBuf;

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
    /// The built-in demonstration: imports the bundled alanine-dipeptide trajectories,
    /// featurizes them, trains a VAMPnet and an SPIB model, analyses both against a phi/psi
    /// Markov model, and writes the plots to a run folder.
    Demo(hiermd::workflow::demo::DemoArgs),
    /// The device check: every kernel family forward and backward on the chosen device against
    /// the f64 CPU twins, then ten training steps on the device against cpu; one line per
    /// check, a JSON report, exit status 1 when anything fails.
    Selfcheck {
        /// Only these families (comma-separated; all by default).
        #[arg(long, value_delimiter = ',')]
        family: Vec<String>,
        /// Smaller shapes (a dry run on emu or cpu).
        #[arg(long)]
        quick: bool,
        /// Seed of the random inputs (printed; replays a run).
        #[arg(long)]
        seed: Option<u64>,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run every family in this process (faster; a CUDA fault then ends the run) instead
        /// of one child process each.
        #[arg(long)]
        in_process: bool,
        /// Time limit of one family in seconds.
        #[arg(long, default_value_t = 300)]
        family_timeout: u64,
        /// Internal: run one family and print its report for the parent process.
        #[arg(long, hide = true)]
        child: bool,
        /// List the families and exit.
        #[arg(long)]
        list: bool,
    },
    /// Train a VAMPnet or SPIB model (one TOML file describes the run; flags override it).
    Train(hiermd::workflow::cli::TrainArgs),
    /// Analyse a trained run: VAMP-2 and implied timescales vs lag, MSM, CK test, state maps,
    /// attention maps (pictures + analysis.json).
    Analyze(hiermd::workflow::cli::AnalyzeArgs),
    /// Write a trained run's outputs for every frame of a dataset to a .npy file.
    Transform(hiermd::workflow::cli::TransformArgs),
    /// Create an atom-stage model (backbone + atom-to-token merge) from a TOML config and a seed.
    InitModel(hiermd::workflow::atoms::InitModelArgs),
    /// Run the atom stage over every frame of a dataset and store the residue tokens.
    Featurize(hiermd::workflow::atoms::FeaturizeArgs),
    /// Denoising pretraining of the atom stage on a dataset's own trajectories.
    Pretrain(hiermd::workflow::atoms::PretrainArgs),
    /// Benchmarks: each kernel, training steps, attention, the scaling curves, and the fixtures
    /// of the cross-check with the PyTorch peer (benches/README.md).
    Bench(hiermd::bench::BenchArgs),
    /// Import a topology and trajectories into a memory-mapped dataset folder.
    Import {
        /// Topology: PDB, GRO or PSF.
        #[arg(long)]
        top: PathBuf,
        /// Trajectories: DCD, XTC, TRR or multi-model PDB (one stored trajectory each).
        #[arg(long, num_args = 1.., required = true)]
        traj: Vec<PathBuf>,
        /// The dataset folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Atoms to keep, e.g. heavy, protein, "backbone", "name CA", "resid 1-50 and heavy".
        #[arg(long, default_value = "heavy")]
        select: String,
        /// Custom atom-to-token map: one integer per selected (or per topology) atom.
        #[arg(long)]
        token_map: Option<PathBuf>,
        /// Time between frames in ps (for formats without times, or to override them).
        // Negative numbers reach the validation, which names the flag (`--dt -1`).
        #[arg(long, allow_negative_numbers = true)]
        dt: Option<f64>,
        /// Keep only the first N frames of each trajectory.
        #[arg(long)]
        max_frames: Option<usize>,
        /// Replace an existing dataset (only a hiermd dataset, never another folder).
        #[arg(long)]
        force: bool,
    },
    /// Check a dataset, feature store, run folder or model file in full: every checksum, every
    /// header against the manifest, token indices, every coordinate finite and within 1e6 A.
    /// Says what is wrong (exit status 1) or what it checked.
    Verify {
        /// The dataset, feature store, run folder (train or pretrain) or model file.
        path: PathBuf,
    },
    /// Show what a dataset holds.
    Info {
        /// The dataset folder.
        dir: PathBuf,
        /// Print JSON (the manifest) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write frames of a stored trajectory as PDB, XYZ or NumPy .npy.
    Export {
        /// The dataset folder.
        dir: PathBuf,
        /// Trajectory index (0-based, as `hiermd info` lists them).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        traj: usize,
        /// Frames START:END (END exclusive; either may be empty).
        #[arg(long, default_value = ":")]
        frames: String,
        /// pdb, xyz or npy.
        #[arg(long)]
        format: ExportFormat,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file at --out.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    // Behave like other command-line tools when the reader of our output goes away
    // (`hiermd info --json | head`): end quietly instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
        Command::Selfcheck {
            family,
            quick,
            seed,
            json,
            in_process,
            family_timeout,
            child,
            list,
        } => {
            if list {
                for f in hiermd::selfcheck::FAMILIES {
                    println!("{}", f.name);
                }
                return Ok(());
            }
            let opts = hiermd::selfcheck::Options {
                device: cli.device,
                families: family,
                quick,
                seed,
                json,
                in_process,
                family_timeout_s: family_timeout,
            };
            if child {
                return hiermd::selfcheck::child(&opts);
            }
            let report = hiermd::selfcheck::run(&opts)?;
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Bench(args) => hiermd::bench::run(&args, &Device::open(cli.device)?),
        Command::Demo(args) => hiermd::workflow::demo::run(&args, &Device::open(cli.device)?),
        Command::Train(args) => hiermd::workflow::cli::train(&args, cli.device),
        Command::Analyze(args) => hiermd::workflow::cli::analyze(&args, &Device::open(cli.device)?),
        Command::Transform(args) => {
            hiermd::workflow::cli::transform(&args, &Device::open(cli.device)?)
        }
        Command::InitModel(args) => {
            hiermd::workflow::atoms::init_model(&args, &Device::open(cli.device)?)
        }
        Command::Featurize(args) => {
            hiermd::workflow::atoms::featurize(&args, &Device::open(cli.device)?)
        }
        Command::Pretrain(args) => {
            hiermd::workflow::atoms::pretrain(&args, &Device::open(cli.device)?)
        }
        Command::Import {
            top,
            traj,
            out,
            select,
            token_map,
            dt,
            max_frames,
            force,
        } => {
            let opts = ImportOptions {
                topology: top,
                trajectories: traj,
                out,
                selection: select,
                token_map,
                time_step_ps: dt,
                max_frames,
                force,
                progress: true,
            };
            let (ds, report) = store::import(&opts)?;
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            let mb = report.bytes_written as f64 / 1e6;
            println!(
                "imported {} frames of {} atoms ({} residues, {} tokens) into {} in {:.2} s ({:.1} MB/s written)",
                report.frames.iter().sum::<usize>(),
                report.atoms,
                ds.manifest.residues,
                ds.manifest.tokens,
                opts.out.display(),
                report.seconds,
                mb / report.seconds.max(1e-9)
            );
            Ok(())
        }
        Command::Verify { path } => {
            if !store::verify::verify_command(&path)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Info { dir, json } => {
            let ds = Dataset::open(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ds.manifest)?);
            } else {
                print!("{}", store::describe(&ds));
            }
            Ok(())
        }
        Command::Export {
            dir,
            traj,
            frames,
            format,
            out,
            force,
        } => {
            let ds = Dataset::open(&dir)?;
            let n = store::export_with(&ds, traj, &frames, format, &out, force)?;
            println!(
                "wrote {n} frames of {} atoms to {}",
                ds.natoms(),
                out.display()
            );
            Ok(())
        }
    }
}
