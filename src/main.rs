//! The `gpdp` command line: parse arguments, call one handler per command,
//! map errors to the exit statuses of the interface contract.
//!
//! The grammar is in [`commands::cli`], each handler in its own file under
//! `commands/`, and the error-to-status walk in [`commands::exit`].

mod commands;

use std::process::ExitCode;

use clap::Parser;
use gpdp::error::ExitStatus;
use gpdp::progress::Progress;

use commands::cli::{Cli, Command, OptoutCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::new(cli.quiet);
    match run(cli.command, &progress) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let status = commands::exit::exit_status_of(&err);
            let label = match status {
                ExitStatus::Refused => "refused",
                _ => "error",
            };
            eprintln!("gpdp: {label}: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(status as u8)
        }
    }
}

/// One handler per command.
fn run(command: Command, progress: &Progress) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => commands::demo::run(args, progress),
        Command::Synth(args) => commands::synth::run(args, progress),
        Command::Link(args) => commands::link::run(args),
        Command::Collect(args) => commands::collect::run(args, progress),
        Command::Query(args) => commands::query::run(args),
        Command::Optout { command } => match command {
            OptoutCommand::Ingest(args) => commands::optout::ingest(args),
            OptoutCommand::Apply(args) => commands::optout::apply(args),
            OptoutCommand::Purge(args) => commands::optout::purge(args),
            OptoutCommand::Status(args) => commands::optout::status(args),
        },
        Command::Audit(args) => commands::audit::run(args),
        Command::Bench(args) => commands::bench::run(args, progress),
        Command::Serve(args) => commands::serve::run(args),
        Command::Report(args) => commands::report::run(args),
        Command::Register(args) => commands::register::run(args),
        Command::Keygen(args) => commands::keygen::run(args),
        Command::RotatePerturbationKey(args) => commands::rotate_perturbation_key::run(args),
    }
}
