//! `strata`: one binary for every role of the replicated block store.
//!
//! - `strata up`: a whole replicated volume on this machine (the embedded
//!   default: replicas and a controller in one process);
//! - `strata replica serve`: a replica server hosting many volumes' replicas;
//! - `strata controller serve`: one volume's controller (NBD frontend +
//!   replicator + management API);
//! - `strata volume|snapshot|replica|backup ...`: the operator's commands,
//!   asking a controller or a backup target.
//!
//! The roles themselves live in the member crates; this file only parses
//! the command line (see `cli/`).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if !args.command.is_server() {
        // An operator command piped into `head` ends quietly, like other
        // Unix tools. Servers keep Rust's default (SIGPIPE ignored) so a
        // peer closing a socket is an error to handle, not a death.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        // Backups and restores run in this process: see the function.
        strata_backup::limit_malloc_arenas();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads() {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.command.is_server() {
        // A burst's freed buffers go back to the system (`strata-net`'s
        // `memory` module); the task ends with the runtime.
        runtime.spawn(strata_net::memory::return_freed_memory());
    }
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
