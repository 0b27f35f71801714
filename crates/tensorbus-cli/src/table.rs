//! Aligned plain-text tables for human-readable output.

/// A table: a header row and data rows, printed with aligned columns.
/// Columns whose every data cell parses as a number are right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty, extra cells are ignored).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table with `indent` spaces before every line.
    pub fn render(&self, indent: usize) -> String {
        let cols = self.header.len();
        let cell = |r: &Vec<String>, c: usize| r.get(c).map_or("", |s| s.as_str()).to_owned();
        let mut width: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        let mut numeric = vec![!self.rows.is_empty(); cols];
        for r in &self.rows {
            for c in 0..cols {
                let v = cell(r, c);
                width[c] = width[c].max(v.chars().count());
                numeric[c] &= v.parse::<f64>().is_ok() || v == "-";
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: Vec<String>| {
            out.push_str(&" ".repeat(indent));
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    if numeric[c] {
                        format!("{v:>w$}", w = width[c])
                    } else {
                        format!("{v:<w$}", w = width[c])
                    }
                })
                .collect();
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(&mut out, self.header.clone());
        for r in &self.rows {
            line(&mut out, (0..cols).map(|c| cell(r, c)).collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["name", "n"]);
        t.row(vec!["a".into(), "10".into()]);
        t.row(vec!["long-name".into(), "7".into()]);
        assert_eq!(t.render(0), "name        n\na          10\nlong-name   7\n");
    }
}
