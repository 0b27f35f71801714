//! `tensorbus top --once`: the frame's content as plain text (the same
//! header, panes, rows and sorts as the live view; no control codes).

use super::model::{ChannelRow, ClientRow, Pane, PoolRow, State};
use super::view::{header, title};
use crate::table::Table;

/// The frame as text, every column as wide as it needs.
pub fn render(state: &State) -> String {
    let mut out = header(state);
    match state.rate_window() {
        Some(secs) => out.push_str(&format!("   rates over {:.0} ms\n", secs * 1e3)),
        None => out.push('\n'),
    }
    let channels: Vec<Vec<String>> = state.channel_rows().iter().map(ChannelRow::cells).collect();
    let pools: Vec<Vec<String>> = state.pool_rows().iter().map(PoolRow::cells).collect();
    let clients: Vec<Vec<String>> = state.client_rows().iter().map(ClientRow::cells).collect();
    for (pane, head, rows) in [
        (Pane::Channels, &ChannelRow::HEADER[..], channels),
        (Pane::Pools, &PoolRow::HEADER[..], pools),
        (Pane::Clients, &ClientRow::HEADER[..], clients),
    ] {
        out.push_str(&format!("\n{}\n", title(pane, state, rows.len())));
        let mut t = Table::new(head);
        for r in rows {
            t.row(r);
        }
        out.push_str(&t.render(2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::tests::state;
    use crate::top::model::ChannelSort;

    #[test]
    fn once_text_has_the_panes_in_their_sort_and_no_control_codes() {
        let text = render(&state(ChannelSort::Rate));
        assert!(!text.contains('\x1b'), "{text:?}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "tensorbus top   broker pid 42 at sock   every 500 ms   rates over 1000 ms"
        );
        let at = |what: &str| {
            lines
                .iter()
                .position(|l| l.contains(what))
                .unwrap_or_else(|| panic!("no {what:?} in\n{text}"))
        };
        assert!(at("channels (3) sorted by rate") < at("busy"));
        assert!(at("busy") < at("lossy") && at("lossy") < at("quiet"));
        let busy: Vec<&str> = lines[at("busy")].split_whitespace().collect();
        assert_eq!(
            busy,
            [
                "busy",
                "broadcast",
                "live",
                "200",
                "100",
                "1",
                "7/8",
                "2",
                "1.0",
                "-"
            ]
        );
        assert!(at("pools (2) sorted by occupancy") < at("small"));
        assert!(at("small") < at(" big "));
        assert!(at("clients (3) sorted by holds") < at("model"));
    }
}
