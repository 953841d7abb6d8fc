//! The results table.

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    /// A target that this run could not test.
    Untested,
    /// The median meets the target or misses it, but the 95% confidence
    /// interval of the median spans the target: this run cannot tell.
    Unresolved,
}

impl Verdict {
    pub fn from(ok: bool) -> Verdict {
        if ok { Verdict::Met } else { Verdict::NotMet }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT MET",
            Verdict::Untested => "untested",
            Verdict::Unresolved => "unresolved (95% CI spans it)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub section: String,
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub verdict: Option<Verdict>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn row(&mut self, section: &str, figure: impl Into<String>, value: impl Into<String>) -> &mut Row {
        self.rows.push(Row {
            section: section.to_string(),
            figure: figure.into(),
            value: value.into(),
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
            verdict: None,
        });
        self.rows.last_mut().expect("just pushed")
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn render(&self) -> String {
        let head = ["figure", "value", "baseline", "ratio", "target", "verdict"];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.figure.clone(),
                    r.value.clone(),
                    r.baseline.clone(),
                    r.ratio.clone(),
                    r.target.clone(),
                    r.verdict.map(|v| v.text().to_string()).unwrap_or_default(),
                ]
            })
            .collect();
        let mut w = head.map(str::len);
        for c in &cells {
            for (i, s) in c.iter().enumerate() {
                w[i] = w[i].max(s.chars().count());
            }
        }
        let line = |c: &[String; 6]| {
            let mut s = String::from("|");
            for (i, x) in c.iter().enumerate() {
                s.push_str(&format!(" {x:<width$} |", width = w[i]));
            }
            s.push('\n');
            s
        };
        let mut out = line(&head.map(String::from));
        out.push('|');
        for wi in w {
            out.push_str(&"-".repeat(wi + 2));
            out.push('|');
        }
        out.push('\n');
        let mut section = "";
        for (r, c) in self.rows.iter().zip(&cells) {
            if r.section != section {
                section = &r.section;
                let mut h: [String; 6] = Default::default();
                h[0] = format!("**{section}**");
                out.push_str(&line(&h));
            }
            out.push_str(&line(c));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|r| {
                    json!({
                        "section": r.section, "figure": r.figure, "value": r.value, "baseline": r.baseline,
                        "ratio": r.ratio, "target": r.target, "verdict": r.verdict.map(Verdict::text),
                    })
                })
                .collect(),
        )
    }
}

impl Row {
    pub fn baseline(&mut self, b: impl Into<String>) -> &mut Self {
        self.baseline = b.into();
        self
    }
    pub fn ratio(&mut self, r: impl Into<String>) -> &mut Self {
        self.ratio = r.into();
        self
    }
    pub fn target(&mut self, t: impl Into<String>, v: Verdict) -> &mut Self {
        self.target = t.into();
        self.verdict = Some(v);
        self
    }
}
