//! The results table, printed and written to BENCHMARKS.md.

use std::fmt::Write;

/// Whether a figure meets its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// No target, or not measured.
    None,
}

impl Verdict {
    pub fn of(met: bool) -> Self {
        if met { Verdict::Met } else { Verdict::Missed }
    }

    fn cell(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::None => "—",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub figure: String,
    pub ours: String,
    pub target: String,
    pub incumbent: String,
    pub verdict: Verdict,
}

#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Markdown sections after the table: stage breakdowns and, for each
    /// missed target, what dominates.
    pub sections: Vec<(String, String)>,
}

impl Report {
    pub fn row(
        &mut self,
        figure: &str,
        ours: String,
        target: &str,
        incumbent: &str,
        verdict: Verdict,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            ours,
            target: target.into(),
            incumbent: incumbent.into(),
            verdict,
        });
    }

    pub fn section(&mut self, title: &str, body: String) {
        self.sections.push((title.into(), body));
    }

    pub fn table(&self) -> String {
        let mut s = String::from(
            "| figure | ours | target | verdict | incumbent (published) |\n|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.figure,
                r.ours,
                r.target,
                r.verdict.cell(),
                r.incumbent
            );
        }
        s
    }

    pub fn markdown(&self, header: &str) -> String {
        let mut s = String::from(header);
        s.push_str(&self.table());
        for (title, body) in &self.sections {
            let _ = write!(s, "\n## {title}\n\n{body}");
            if !body.ends_with('\n') {
                s.push('\n');
            }
        }
        s
    }
}

/// The machine, for the record: (cpus, model, kernel, memory).
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, m)| m.trim().to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!(
        "{cpus} CPUs (nproc), {model}, Linux {}, {mem_gib:.0} GiB RAM",
        kernel.trim()
    )
}

/// Today's date (UTC), from `date`, to avoid a time crate for one line.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown date".into())
}
