//! `tensorbus bridge`: runs the `tensorbus-bridge` binary (beside this one,
//! else on PATH), forwarding every argument. Zenoh is built into that
//! binary only, so the everyday build of the CLI stays without it.

use crate::{fail, CliError};
use std::path::{Path, PathBuf};

/// Arguments: everything is forwarded to `tensorbus-bridge`.
#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// Arguments for tensorbus-bridge (`--config FILE`, `--report-secs N`; `--help` lists them; docs/bridge.md).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

/// Name of the bridge binary.
const BRIDGE_BIN: &str = "tensorbus-bridge";

/// Where the bridge binary is: beside the running executable, else the
/// first `tensorbus-bridge` on PATH.
pub fn find(exe: &Path) -> Option<PathBuf> {
    let sibling = exe.with_file_name(BRIDGE_BIN);
    if sibling.is_file() {
        return Some(sibling);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(BRIDGE_BIN))
        .find(|p| p.is_file())
}

/// Replaces this process with `tensorbus-bridge ARGS`.
pub fn run(args: Args) -> Result<(), CliError> {
    let exe = std::env::current_exe()?;
    let Some(bridge) = find(&exe) else {
        return fail(format!(
            "{BRIDGE_BIN} is not built (the Zenoh bridge is a separate binary so that Zenoh stays out of the everyday build): \
             neither {} nor one on PATH; build it with `cargo build --release -p tensorbus-bridge` and run this again, \
             or run `cargo run --release -p tensorbus-bridge -- {}`",
            exe.with_file_name(BRIDGE_BIN).display(),
            args.args.join(" ")
        ));
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&bridge).args(&args.args).exec();
    fail(format!("cannot run {}: {err}", bridge.display()))
}
