//! The `kiln` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::{Error, Model};

/// kiln: a compiler for transformer models.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every shape contract of a model and print its shape trace table.
    ///
    /// Exit code 0 when every contract holds, 1 on a contract violation (each one
    /// listed with its node, op, shapes and source line), 2 when the input cannot
    /// be read or parsed.
    Check {
        /// A `.kir` text-IR file.
        model: PathBuf,
    },
    /// Print a model's canonical text IR, or its graph as Graphviz DOT.
    Ir {
        /// A `.kir` text-IR file.
        model: PathBuf,
        /// Print Graphviz DOT (shapes on the edges) instead of text IR.
        #[arg(long)]
        dot: bool,
    },
    /// Build the built-in GPT-2-style model, check it and print its shape trace.
    Demo,
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Check { model } => {
            let m = Model::load(&model)?;
            let trace = m.shape_trace()?;
            println!("{}: all shape contracts hold\n", m.origin());
            print!("{trace}");
        }
        Command::Ir { model, dot } => {
            let m = Model::load(&model)?;
            if dot {
                print!("{}", m.to_dot());
            } else {
                print!("{}", m.to_text());
            }
        }
        Command::Demo => {
            let m = Model::demo()?;
            let trace = m.shape_trace()?;
            println!("kiln demo: built-in GPT-2-style model (2 layers, symbolic B and T)");
            println!("all shape contracts hold\n");
            print!("{trace}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
