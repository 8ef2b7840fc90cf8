//! The closing Markdown table: one row per figure, with its target and
//! PASS or MISS where the issue sets one.

/// One figure of one scenario.
pub struct Row {
    pub scenario: &'static str,
    pub figure: String,
    pub value: String,
    /// The target, or empty.
    pub target: String,
    /// Whether the target is met; `None` without a target.
    pub pass: Option<bool>,
}

impl Row {
    pub fn info(scenario: &'static str, figure: impl Into<String>, value: impl Into<String>) -> Row {
        Row {
            scenario,
            figure: figure.into(),
            value: value.into(),
            target: String::new(),
            pass: None,
        }
    }

    pub fn target(
        scenario: &'static str,
        figure: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        pass: bool,
    ) -> Row {
        Row {
            scenario,
            figure: figure.into(),
            value: value.into(),
            target: target.into(),
            pass: Some(pass),
        }
    }
}

pub fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

pub fn print_table(rows: &[Row]) {
    println!("\n## Summary\n");
    println!("| scenario | figure | measured | target | |");
    println!("| --- | --- | --- | --- | --- |");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.scenario,
            row.figure,
            row.value,
            row.target,
            row.pass.map_or("", |p| if p { "PASS" } else { "**MISS**" })
        );
    }
}
