//! Command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::kernel::probes::HookPreference;

#[derive(Debug, Parser)]
#[command(
    name = "sigwake",
    version,
    about = "Finds signals that reach a process but never reach its event loop",
    long_about = "sigwake watches signal generation, delivery and the writes signal handlers make \
                  to event-loop wakeup fds (the self-pipe trick used by trio, asyncio and others), \
                  with eBPF programs on kernel tracepoints. A handler write that fails with EAGAIN \
                  means a starved loop never saw the signal: Ctrl-C is dead.\n\n\
                  Loading the kernel programs needs root (or CAP_BPF and CAP_PERFMON)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream signal events, one JSON object per line (or a table with --format text).
    Trace(TraceArgs),
    /// Run the agent: registry, detection, escalation, /metrics; until SIGINT or SIGTERM.
    Run(RunArgs),
    /// List the actors a running agent knows (those you could signal; root sees all).
    Actors(ActorsArgs),
    /// List current and past starvation incidents and what was done about them.
    Incidents(IncidentsArgs),
    /// Load and attach the kernel programs, prove them with the self-test, print which hooks serve each job, detach.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Which hooks carry the write path: auto = the fastest the kernel allows (fentry/fexit, else the socket tier,
    /// else syscall tracepoints), proven by the start-up self-test; socket = the socket tier (socket sends and the
    /// signal restorer; pipe and eventfd writes by syscall tracepoints attached only while needed; Linux 6.12+);
    /// tracepoint = syscall tracepoints (every syscall on the host pays while attached)
    #[arg(long, value_enum, default_value_t = HookPreference::Auto)]
    pub hooks: HookPreference,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// A human-readable table.
    Text,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Show only events whose sender, receiver or target is this process (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Show only this signal, by name or number: INT, SIGTERM, 15 (repeatable).
    #[arg(long = "signal", value_name = "SIG", value_parser = parse_signal)]
    pub signals: Vec<crate::kernel::events::Signal>,
    /// Show only losses: failed handler (wakeup) writes, and signals the kernel merged or could not queue.
    #[arg(long)]
    pub only_drops: bool,
    /// Stop once every --pid process has exited (events before the exit are all printed first).
    #[arg(long, requires = "pids")]
    pub until_exit: bool,
    /// Which hooks carry the write path: auto = the fastest the kernel allows (fentry/fexit, else the socket tier,
    /// else syscall tracepoints), proven by the start-up self-test; socket = the socket tier (socket sends and the
    /// signal restorer; pipe and eventfd writes by syscall tracepoints attached only while needed; Linux 6.12+);
    /// tracepoint = syscall tracepoints (every syscall on the host pays while attached)
    #[arg(long, value_enum, default_value_t = HookPreference::Auto)]
    pub hooks: HookPreference,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address for /metrics, /healthz, /readyz (and /actors, /incidents with --serve-state); no authentication, so
    /// keep it on loopback or firewalled to Prometheus. At most 64 connections; request headers within 5 s
    /// [default: 127.0.0.1:9464]
    #[arg(long, env = "SIGWAKE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Also serve /actors and /incidents on --listen: every supervised process's pid, name, uid and incidents, to
    /// anyone who can connect. For trusted networks only; `sigwake actors` and `sigwake incidents` need no HTTP.
    #[arg(long)]
    pub serve_state: bool,
    /// Optional TOML configuration file (see examples/sigwake.toml); flags override it. It names commands run
    /// as root, so it must be owned by root (or the agent's uid) and not writable by group or others, nor may any
    /// directory above it be (a sticky one like /tmp excepted).
    #[arg(long, env = "SIGWAKE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Registration socket [default: /run/sigwake/registry.sock]
    #[arg(long, env = "SIGWAKE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Where the audit log, incident state and diagnostics go; kept private (0700, the agent's own) [default: /var/lib/sigwake]
    #[arg(long, env = "SIGWAKE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log what escalation would do; signal nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not record self-pipe event loops nobody registered.
    #[arg(long)]
    pub no_discovery: bool,
    /// Discover loops nobody registered whose wakeup is a pipe or eventfd (Twisted, libuv, GLib) too. On the socket
    /// tier this keeps syscall tracepoints attached, so every syscall on the host pays; without it they are attached
    /// only while a registered or selected actor's wakeup fd is a pipe or eventfd (or not known yet).
    #[arg(long, conflicts_with = "no_discovery")]
    pub discover_pipes: bool,
    /// Which hooks carry the write path: auto = the fastest the kernel allows (fentry/fexit, else the socket tier,
    /// else syscall tracepoints), proven by the start-up self-test; socket = the socket tier (socket sends and the
    /// signal restorer; pipe and eventfd writes by syscall tracepoints attached only while needed; Linux 6.12+);
    /// tracepoint = syscall tracepoints (every syscall on the host pays while attached)
    #[arg(long, value_enum, default_value_t = HookPreference::Auto)]
    pub hooks: HookPreference,
}

#[derive(Debug, Args)]
pub struct IncidentsArgs {
    /// The agent's state directory.
    #[arg(long, env = "SIGWAKE_STATE_DIR", default_value = "/var/lib/sigwake")]
    pub state_dir: PathBuf,
    /// Only incidents still open.
    #[arg(long)]
    pub open: bool,
    /// Print the JSON objects instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ActorsArgs {
    /// The agent's registration socket.
    #[arg(long, env = "SIGWAKE_SOCKET", default_value = "/run/sigwake/registry.sock")]
    pub socket: PathBuf,
    /// Print the JSON objects instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_signal(text: &str) -> Result<crate::kernel::events::Signal, String> {
    crate::kernel::events::Signal::parse(text)
        .ok_or_else(|| format!("`{text}` is not a signal name or number (1-64), e.g. INT, SIGTERM, 15"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn trace_flags_parse() {
        let cli = Cli::try_parse_from([
            "sigwake",
            "trace",
            "--only-drops",
            "--pid",
            "10",
            "--pid",
            "11",
            "--signal",
            "INT",
            "--format",
            "text",
        ])
        .unwrap();
        let Command::Trace(t) = cli.command else { panic!() };
        assert!(t.only_drops);
        assert_eq!(t.pids, vec![10, 11]);
        assert_eq!(t.signals, vec![crate::kernel::events::Signal::INT]);
        assert_eq!(t.format, Format::Text);
        let err = Cli::try_parse_from(["sigwake", "trace", "--signal", "NOPE"]).unwrap_err();
        assert!(err.to_string().contains("not a signal name"), "{err}");
    }
}
