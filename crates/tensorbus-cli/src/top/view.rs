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
/// the columns in `left` are left-aligned, the numbers right-aligned. The
/// first of `left` is the name column: when the table is wider than the
/// pane, the columns move closer, then the name gives up its width (down
/// to 8 columns, cut with `…`), so that the numbers stay whole.
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
    let name = left[0];
    let inner = u32::from(area.width.saturating_sub(4)); // borders and padding
    let total = |spacing: u16| {
        widths.iter().map(|w| u32::from(*w)).sum::<u32>()
            + u32::from(spacing) * (widths.len() as u32).saturating_sub(1)
    };
    // Tight: one column between columns, then a shorter name.
    let spacing = if total(SPACING) > inner { 1 } else { SPACING };
    let total = total(spacing);
    if total > inner {
        let excess = u16::try_from(total - inner).unwrap_or(u16::MAX);
        widths[name] = widths[name].saturating_sub(excess).max(widths[name].min(8));
    }
    let name_width = usize::from(widths[name]);
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
                .map(|(i, c)| {
                    let c = if i == name {
                        cut(c, name_width)
                    } else {
                        c.clone()
                    };
                    Cell::from(Line::from(c).alignment(align(i)))
                })
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
    .column_spacing(spacing)
    .block(
        Block::bordered()
            .title(format!(" {} ", title(which, state, rows.len())))
            .border_style(border)
            .padding(Padding::horizontal(1)),
    );
    frame.render_widget(table, area);
}

/// Blank columns between two table columns (1 where space is short).
const SPACING: u16 = 2;

/// `s`, cut to `width` characters with a `…` when longer.
fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(width.saturating_sub(1)).collect();
        c.push('…');
        c
    }
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
    fn a_long_name_is_cut_so_that_the_numbers_stay_whole() {
        let mut s = state(ChannelSort::Drops);
        let t0 = std::time::Instant::now();
        let mut r = crate::top::model::tests::report(1);
        r.channels[1].name = "a/very/long/channel/name/for/the/left/camera".into();
        r.channels[1].published = 123_456_789;
        s.update(crate::top::model::Sample {
            report: r,
            at: t0 + std::time::Duration::from_secs(5),
        });
        let lines = screen(&s, 80, 24);
        let row = line_with(&lines, "a/very/");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(cells[1].ends_with('…'), "{row}");
        assert_eq!(cells[4], "123456789", "{row}");
        assert_eq!(cells[11], "│", "{row}");
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "ab…");
    }

    #[test]
    fn a_small_terminal_does_not_panic() {
        let s = state(ChannelSort::Drops);
        for (w, h) in [(1, 1), (10, 3), (40, 8), (200, 5)] {
            screen(&s, w, h);
        }
    }
}
