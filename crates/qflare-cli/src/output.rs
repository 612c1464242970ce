//! How commands print data: aligned tables for people, pretty JSON for
//! scripts (`--output json`), and human units (binary byte units, durations,
//! RFC 3339 times). Data goes to stdout; progress and logs go to stderr.

use std::time::Duration;

use serde::Serialize;

/// The format of a listing command's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns with human units.
    #[default]
    Table,
    /// Pretty-printed JSON of the server's answer, for scripts.
    Json,
}

/// `--output`, shared by the listing commands.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format: an aligned table, or JSON (stable field names, pretty-printed).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// How a column's cells are aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table whose columns are as wide as their widest cell. The last column
/// is never padded, so lines carry no trailing spaces.
#[derive(Debug)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            columns: columns
                .iter()
                .map(|(name, align)| ((*name).to_owned(), *align))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per column).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The rendered table, one line per row after the header, each ending in `\n`.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            std::iter::once(&self.columns[i].0)
                .chain(self.rows.iter().filter_map(|row| row.get(i)))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let line = |cells: &mut dyn Iterator<Item = &String>| {
            let mut out = String::new();
            let last = self.columns.len().saturating_sub(1);
            for (i, cell) in cells.enumerate().take(self.columns.len()) {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                match self.columns[i].1 {
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(cell);
                    }
                    Align::Left => {
                        out.push_str(cell);
                        if i < last {
                            out.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(&mut self.columns.iter().map(|(name, _)| name));
        for row in &self.rows {
            out.push_str(&line(&mut row.iter()));
        }
        out
    }

    /// Prints the table on stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// Bytes in binary units: `B`, then KiB, MiB, GiB, TiB (powers of 1024).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Switch up before one decimal would round to "1024.0".
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Unix seconds as an RFC 3339 UTC time, `-` when out of range.
pub fn time(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .map(|secs| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// Whole seconds as a short duration (`1m 5s`).
pub fn seconds(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A fraction as a percentage with two decimals, `-` when absent.
pub fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{:.2}%", 100.0 * v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units_throughout() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        // The old code switched at 2^20 but divided by 10^6: "1.0 MB" for
        // 1,048,576 and "1048.6 KB" just below it.
        assert_eq!(human_bytes(1_048_575), "1.0 MiB");
        assert_eq!(human_bytes(1 << 20), "1.0 MiB");
        assert_eq!(human_bytes(9 * (1 << 20) + (1 << 19)), "9.5 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(5 << 40), "5.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn tables_align_and_leave_no_trailing_spaces() {
        let mut table = Table::new(&[
            ("id", Align::Left),
            ("count", Align::Right),
            ("label", Align::Left),
        ]);
        table.row(vec!["a".into(), "7".into(), "x".into()]);
        table.row(vec!["bbbb".into(), "1234567".into(), "longer".into()]);
        assert_eq!(
            table.render(),
            "id      count  label\n\
             a           7  x\n\
             bbbb  1234567  longer\n"
        );
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(-1), "-");
        assert_eq!(seconds(65), "1m 5s");
        assert_eq!(percent(Some(0.9712)), "97.12%");
        assert_eq!(percent(None), "-");
    }
}
