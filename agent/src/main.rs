use std::process::ExitCode;

use clap::Parser as _;
use sigwake::{app, cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The start-up self-test runs this binary as its child (selftest.rs);
    // kept out of clap so it never shows in --help.
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() == Some(sigwake::kernel::selftest::CHILD_ARG) {
        return sigwake::kernel::selftest::child_main(&argv.next().unwrap_or_default());
    }
    // glibc gives each thread that allocates its own malloc arena (up to 8
    // per core), and freed memory stays in them: the blocking threads a
    // burst of work starts (a registration flood) left the agent tens of
    // MiB larger for good. Two arenas are plenty for an agent whose hot
    // paths barely allocate.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = match cli.command {
        cli::Command::Actors(args) => return report(app::actors(args)),
        cli::Command::Incidents(args) => return report(app::incidents(args)),
        _ => cli,
    };
    // Blocking threads capped (tokio's default is 512): every registration
    // connection reads its client's /proc under block_in_place, which under
    // a connection flood started a thread per connection up to the cap and
    // left the agent ~90 MiB larger. 32 covers the blocking work that runs
    // at once (diagnostics, notify commands, /proc scans, fsyncs) with room.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sigwake: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Trace(args) => app::trace(args).await,
            cli::Command::Run(args) => app::run(args).await,
            cli::Command::Check(args) => app::check(args).await,
            cli::Command::Actors(_) | cli::Command::Incidents(_) => unreachable!("handled above"),
        }
    });
    report(result)
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigwake: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
