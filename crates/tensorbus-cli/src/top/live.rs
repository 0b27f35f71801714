//! The live view: raw mode and the alternate screen (restored on every way
//! out: a quit key, an error, a panic, SIGINT / SIGTERM / SIGHUP), a thread
//! that asks the broker for a report every interval (reconnecting while it
//! is gone), and the keys.

use super::model::{Sample, State};
use super::{view, CLIENT_NAME};
use crate::CliError;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::cursor::{Hide, Show};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::Terminal;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};
use tensorbus::Client;

/// Longest wait for a key before checking for a signal or a new report.
const TICK: Duration = Duration::from_millis(100);

/// Whether the terminal is in raw mode on the alternate screen now.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Leaves raw mode and the alternate screen and shows the cursor, once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(std::io::stdout(), Show, LeaveAlternateScreen);
    }
}

/// Restores the terminal when dropped.
struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        restore();
    }
}

/// Enters raw mode and the alternate screen; a panic restores the terminal
/// before its message is printed.
fn enter() -> std::io::Result<Guard> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
    enable_raw_mode()?;
    ACTIVE.store(true, Ordering::SeqCst);
    let guard = Guard;
    execute!(std::io::stdout(), EnterAlternateScreen, Hide)?;
    Ok(guard)
}

/// A report, or why there was none.
type Fetched = Result<Sample, String>;

/// Asks the broker for a report every `interval` and sends it; after a
/// failure it connects again at the next interval. Ends when the view is gone.
fn fetch(client: Client, socket: Option<PathBuf>, interval: Duration, tx: mpsc::Sender<Fetched>) {
    let mut client = Some(client);
    let mut next = Instant::now() + interval;
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += interval;
        let connected = match client.take() {
            Some(c) => Ok(c),
            None => Client::connect_to(socket.as_deref(), CLIENT_NAME).map_err(|e| e.to_string()),
        };
        let fetched = connected.and_then(|c| {
            let sample = Sample::take(&c).map_err(|e| e.0)?;
            client = Some(c);
            Ok(sample)
        });
        if tx.send(fetched).is_err() {
            return;
        }
        // A slow broker: do not try to catch up with missed intervals.
        next = next.max(Instant::now());
    }
}

/// Runs the live view until a quit key (exit 0) or a signal (exit 130).
pub fn run(
    client: Client,
    socket: Option<PathBuf>,
    mut state: State,
) -> Result<ExitCode, CliError> {
    if !std::io::stdout().is_terminal() {
        return Err(CliError(
            "stdout is not a terminal (use --once for plain text)".into(),
        ));
    }
    let signalled = Arc::new(AtomicBool::new(false));
    let flag = signalled.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| CliError(format!("cannot handle signals: {e}")))?;
    let (tx, rx) = mpsc::channel();
    let interval = state.interval;
    std::thread::Builder::new()
        .name("top-fetch".into())
        .spawn(move || fetch(client, socket, interval, tx))
        .map_err(|e| CliError(format!("cannot start a thread: {e}")))?;

    let _guard = enter().map_err(|e| CliError(format!("cannot set up the terminal: {e}")))?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))
        .map_err(|e| CliError(format!("cannot set up the terminal: {e}")))?;
    let mut redraw = true;
    loop {
        if signalled.load(Ordering::SeqCst) {
            return Ok(ExitCode::from(130));
        }
        for fetched in rx.try_iter() {
            match fetched {
                Ok(sample) => state.update(sample),
                Err(why) => state.mark_gone(why),
            }
            redraw = true;
        }
        if redraw {
            terminal
                .draw(|f| view::draw(f, &state))
                .map_err(|e| CliError(format!("drawing: {e}")))?;
            redraw = false;
        }
        if !event::poll(TICK).map_err(|e| CliError(format!("reading keys: {e}")))? {
            continue;
        }
        match event::read().map_err(|e| CliError(format!("reading keys: {e}")))? {
            Event::Key(k) if k.kind != KeyEventKind::Release => {
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(ExitCode::SUCCESS),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(ExitCode::SUCCESS)
                    }
                    KeyCode::Char('s') | KeyCode::Tab => state.cycle_sort(),
                    KeyCode::Down | KeyCode::Right => state.focus = state.focus.next(),
                    KeyCode::Up | KeyCode::Left => state.focus = state.focus.prev(),
                    _ => continue,
                }
                redraw = true;
            }
            Event::Resize(..) => redraw = true,
            _ => {}
        }
    }
}
