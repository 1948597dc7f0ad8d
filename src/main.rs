//! Thin main: parse, init tracing, dispatch, map errors to one line and exit code 2.

use clap::Parser;
use lab::cli::{Cli, Command};
use lab::commands;

fn main() {
    // candle asks for the thread count on every CPU matmul and, without RAYON_NUM_THREADS,
    // answers by re-reading /proc/cpuinfo each time (13% of a decode step in `perf`). Set it
    // once, before any thread pool exists.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAB_LOG").unwrap_or_else(|_| "warn,lab::serve=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::try_parse().unwrap_or_else(|e| exit_on_bad_args(e));
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&args),
        Command::TrainLora(args) => commands::train::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::Loadtest(args) => commands::loadtest::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Demo(args) => commands::demo::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Selftest(args) => commands::selftest::run(&args),
        Command::Datasets(args) => commands::datasets(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", commands::one_line(&e));
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", e.backtrace());
        }
        std::process::exit(2);
    }
}

/// `--help` and `--version` as clap prints them; any other argument error as one line (the
/// message and its details, without the usage block and the help hint), exit code 2.
fn exit_on_bad_args(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    eprintln!("{}", parts.join(" "));
    std::process::exit(2);
}
