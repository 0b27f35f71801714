//! Draws one frame of `tensorbus top` with ratatui: a header line, the
//! channels, pools and clients panes, and a line of keys.

use super::model::{ChannelRow, ClientRow, Pane, PoolRow, State};
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Padding, Paragraph, Row, Table};
use ratatui::Frame;

/// The keys, as the last line shows them.
pub const KEYS: &str = "q quit   s/Tab change sort   Up/Down change pane";

/// The header line: the broker watched, the refresh interval, and
/// "broker gone, retrying" while it does not answer.
pub fn header(state: &State) -> String {
    let every = state.interval.as_millis();
    match &state.gone {
        // The reason names the socket (a connect error) or the request.
        Some(why) => format!("tensorbus top   broker gone, retrying every {every} ms   ({why})"),
        None => format!(
            "tensorbus top   broker pid {} at {}   every {every} ms",
            state.report().broker_pid,
            state.socket,
        ),
    }
}

/// A pane's title, e.g. `channels (3) sorted by drops`.
pub fn title(pane: Pane, state: &State, rows: usize) -> String {
    let (name, sort) = match pane {
        Pane::Channels => ("channels", state.channel_sort.label()),
        Pane::Pools => ("pools", state.pool_sort.label()),
        Pane::Clients => ("clients", state.client_sort.label()),
    };
    format!("{name} ({rows}) sorted by {sort}")
}

/// Draws the whole frame.
pub fn draw(frame: &mut Frame, state: &State) {
    let channels: Vec<Vec<String>> = state.channel_rows().iter().map(ChannelRow::cells).collect();
    let pools: Vec<Vec<String>> = state.pool_rows().iter().map(PoolRow::cells).collect();
    let clients: Vec<Vec<String>> = state.client_rows().iter().map(ClientRow::cells).collect();
    let pool_height = u16::try_from(pools.len() + 3).unwrap_or(u16::MAX).min(10);
    let [head, ch, po, cl, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(3),
        Constraint::Length(pool_height),
        Constraint::Fill(2),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let head_style = if state.gone.is_some() {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new().add_modifier(Modifier::BOLD)
    };
    frame.render_widget(Paragraph::new(header(state)).style(head_style), head);
    pane(
        frame,
        ch,
        state,
        Pane::Channels,
        &ChannelRow::HEADER,
        &[0, 1, 2],
        &channels,
    );
    pane(
        frame,
        po,
        state,
        Pane::Pools,
        &PoolRow::HEADER,
        &[0],
        &pools,
    );
    pane(
        frame,
        cl,
        state,
        Pane::Clients,
        &ClientRow::HEADER,
        &[2],
        &clients,
    );
    frame.render_widget(
        Paragraph::new(Line::from(vec![Span::styled(
            KEYS,
            Style::new().add_modifier(Modifier::DIM),
        )])),
        keys,
    );
}

/// One pane: a bordered table, its columns as wide as their widest cell;
/// the columns in `left` are left-aligned, the numbers right-aligned.
fn pane(
    frame: &mut Frame,
    area: Rect,
    state: &State,
    which: Pane,
    header: &[&str],
    left: &[usize],
    rows: &[Vec<String>],
) {
    let mut widths: Vec<u16> = header.iter().map(|h| width(h)).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(width(c));
        }
    }
    let align = |i: usize| {
        if left.contains(&i) {
            Alignment::Left
        } else {
            Alignment::Right
        }
    };
    let cells = |r: &[String], style: Style| {
        Row::new(
            r.iter()
                .enumerate()
                .map(|(i, c)| Cell::from(Line::from(c.clone()).alignment(align(i))))
                .collect::<Vec<_>>(),
        )
        .style(style)
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let border = if state.focus == which {
        Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    let table = Table::new(
        rows.iter().map(|r| cells(r, Style::new())),
        widths.into_iter().map(Constraint::Length),
    )
    .header(cells(&head, Style::new().add_modifier(Modifier::BOLD)))
    .column_spacing(2)
    .block(
        Block::bordered()
            .title(format!(" {} ", title(which, state, rows.len())))
            .border_style(border)
            .padding(Padding::horizontal(1)),
    );
    frame.render_widget(table, area);
}

/// Display width of a cell (its characters; the cells are plain text).
fn width(s: &str) -> u16 {
    u16::try_from(s.chars().count()).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::tests::state;
    use crate::top::model::ChannelSort;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    /// Renders `state` on a `w` x `h` test terminal; the screen's lines.
    fn screen(state: &State, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, state)).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>())
            .collect()
    }

    fn line_with<'a>(lines: &'a [String], what: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} on\n{}", lines.join("\n")))
    }

    fn row_index(lines: &[String], what: &str) -> usize {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} on\n{}", lines.join("\n")))
    }

    #[test]
    fn frame_shows_sorted_panes_their_sorts_and_the_keys() {
        let mut s = state(ChannelSort::Drops);
        let lines = screen(&s, 120, 30);
        assert!(lines[0].starts_with("tensorbus top   broker pid 42 at sock   every 500 ms"));
        assert!(line_with(&lines, "channels (3) sorted by drops").contains('┌'));
        line_with(&lines, "pools (2) sorted by occupancy");
        line_with(&lines, "clients (3) sorted by holds");
        assert!(lines[29].starts_with(KEYS), "{}", lines[29]);
        // The header row, then lossy (drops) above busy above quiet.
        let head = line_with(&lines, "published");
        for col in ChannelRow::HEADER {
            assert!(head.contains(col), "{col} missing in {head}");
        }
        assert!(row_index(&lines, "lossy") < row_index(&lines, "busy"));
        assert!(row_index(&lines, "busy") < row_index(&lines, "quiet  "));
        let lossy: Vec<&str> = line_with(&lines, "lossy").split_whitespace().collect();
        assert_eq!(
            lossy,
            [
                "│",
                "lossy",
                "broadcast",
                "live",
                "20",
                "10.0",
                "2",
                "1/4",
                "6",
                "3.0",
                "-",
                "│"
            ]
        );
        assert!(row_index(&lines, "small") < row_index(&lines, " big "));
        assert!(line_with(&lines, "small").contains("50%"));
        assert!(row_index(&lines, "model") < row_index(&lines, "camera"));

        s.cycle_sort();
        let lines = screen(&s, 120, 30);
        line_with(&lines, "channels (3) sorted by depth");
        assert!(row_index(&lines, "busy") < row_index(&lines, "lossy"));
    }

    #[test]
    fn a_gone_broker_is_announced_and_its_last_report_stays() {
        let mut s = state(ChannelSort::Drops);
        s.mark_gone("connection reset".into());
        let lines = screen(&s, 120, 30);
        assert_eq!(
            lines[0].trim_end(),
            "tensorbus top   broker gone, retrying every 500 ms   (connection reset)"
        );
        line_with(&lines, "lossy");
        // Without an earlier report there are no rates: "-".
        let lossy: Vec<&str> = line_with(&lines, "lossy").split_whitespace().collect();
        assert_eq!(lossy[5], "-");
    }

    #[test]
    fn a_small_terminal_does_not_panic() {
        let s = state(ChannelSort::Drops);
        for (w, h) in [(1, 1), (10, 3), (40, 8), (200, 5)] {
            screen(&s, w, h);
        }
    }
}
