use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kosmos-export",
    version,
    about = "Export KOSMOS-1 checkpoints to ONNX packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Ckpt {
        checkpoint: PathBuf,
        #[arg(long, default_value = "onnx")]
        to: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = "portable")]
        profile: String,
        #[arg(long, default_value = "fp32")]
        dtype: String,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    match Cli::parse().command {
        Command::Ckpt {
            checkpoint,
            to: _,
            output,
            profile,
            dtype,
            force,
        } => {
            let opts = kosmos_export::ExportOptions {
                profile: profile.parse()?,
                dtype: kosmos_export::parse_dtype(&dtype)?,
                force,
                progress: true,
            };
            let s = kosmos_export::export(&checkpoint, &output, &opts)?;
            println!("{s:?}");
        }
    }
    Ok(())
}
