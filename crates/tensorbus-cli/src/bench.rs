//! `tensorbus bench`: runs the `tensorbus-bench` binary that sits next to
//! this one (it carries iceoryx2 and the other contenders, which the
//! everyday build of the CLI leaves out), forwarding every argument.

use crate::{fail, CliError};
use std::path::{Path, PathBuf};

/// Arguments: everything is forwarded to `tensorbus-bench`.
#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// Arguments for tensorbus-bench (`--quick`, `--json FILE`, `--sizes ...`, `--only ...`; `--help` lists them).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

/// Name of the harness binary.
const BENCH_BIN: &str = "tensorbus-bench";

/// Where the harness binary should be: beside the running executable.
pub fn sibling(exe: &Path) -> PathBuf {
    exe.with_file_name(BENCH_BIN)
}

/// Replaces this process with `tensorbus-bench ARGS`.
pub fn run(args: Args) -> Result<(), CliError> {
    let exe = std::env::current_exe()?;
    let bench = sibling(&exe);
    if !bench.is_file() {
        return fail(format!(
            "{} is not built (the benchmark harness is a separate binary so that iceoryx2 stays out of the everyday build); \
             build it with `cargo build --release -p tensorbus-bench` and run this again, \
             or run `cargo run --release -p tensorbus-bench -- {}`",
            bench.display(),
            args.args.join(" ")
        ));
    }
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&bench).args(&args.args).exec();
    fail(format!("cannot run {}: {err}", bench.display()))
}
