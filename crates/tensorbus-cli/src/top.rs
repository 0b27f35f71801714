//! `tensorbus top`: a live terminal view of a broker's channels, pools and
//! clients (ratatui on crossterm), refreshed every `--interval` ms; or one
//! frame as plain text with `--once`.
//!
//! * [`model`]: the rows of each pane from two stat reports (rates are the
//!   difference of the counters between two refreshes), and their sorts.
//!   [`rows`]: the rows and their cells as text.
//! * [`view`]: draws a frame with ratatui; [`text`]: the `--once` text.
//! * [`live`]: the terminal, the refresh loop and the keys.

mod live;
mod model;
mod rows;
mod text;
mod view;

use crate::{CliError, SocketArg};
use model::{ChannelSort, Sample};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tensorbus::Client;

/// Arguments of `tensorbus top`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Milliseconds between refreshes (50 ..= 60000; rates are computed over this interval).
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(50..=60_000))]
    interval: u64,
    /// Print one frame as plain text (no terminal control codes) and exit: two stat
    /// reports `--interval` apart, so that the rates are filled in.
    #[arg(long)]
    once: bool,
    /// The initial sort of the channels (the `s` key cycles it).
    #[arg(long, value_enum, default_value_t = ChannelSort::Drops)]
    sort: ChannelSort,
}

/// The name `top` connects with (shown in its own clients pane).
const CLIENT_NAME: &str = "tensorbus-top";

/// Runs `tensorbus top`: exit status 0 after `q`, 130 after SIGINT /
/// SIGTERM / SIGHUP; an error when no broker answers at the start.
pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let interval = Duration::from_millis(args.interval);
    let socket = args.socket.socket.as_deref();
    let client = Client::connect_to(socket, CLIENT_NAME)
        .map_err(|e| CliError(format!("no broker to watch: {e}")))?;
    let socket_shown = client.socket_path().display().to_string();
    let first = Sample::take(&client)?;
    if args.once {
        std::thread::sleep(interval);
        let second = Sample::take(&client)?;
        let state = model::State::new(socket_shown, interval, args.sort, Some(first), second);
        crate::print_stdout(&text::render(&state))?;
        return Ok(ExitCode::SUCCESS);
    }
    let state = model::State::new(socket_shown, interval, args.sort, None, first);
    live::run(client, args.socket.socket, state)
}

impl Sample {
    /// Asks the broker for a stat report.
    fn take(client: &Client) -> Result<Sample, CliError> {
        let report = client
            .stat()
            .map_err(|e| CliError(format!("stat request failed: {e}")))?;
        Ok(Sample {
            report,
            at: Instant::now(),
        })
    }
}
