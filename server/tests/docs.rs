//! The runbook covers what can page or confuse an operator: every alert in
//! monitoring/alerts.yml has its page runbook/alerts/<AlertName>.md, and every error code
//! of the schema is explained in runbook/error-codes.md.

mod common;

use common::read_repo_file as read;

#[test]
fn every_alert_has_its_runbook_page() {
    let rules = read("monitoring/alerts.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 5, "alerts found: {alerts:?}");
    for alert in &alerts {
        let page = format!("runbook/alerts/{alert}.md");
        let text = read(&page);
        assert!(text.contains(alert), "{page} does not name its alert");
        for section in ["caus", "mitigat"] {
            assert!(
                text.to_lowercase().contains(section),
                "{page} has no {section}... section"
            );
        }
    }
}

#[test]
fn every_error_code_is_in_the_runbook() {
    let schema = read("schema/kv.capnp");
    let start = schema.find("enum ErrorCode {").expect("ErrorCode enum");
    let body = &schema[start..start + schema[start..].find("\n}").expect("enum end")];
    let codes: Vec<&str> = body
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let (name, rest) = l.split_once(" @")?;
            rest.ends_with(';').then_some(name)
        })
        .collect();
    assert!(codes.len() >= 19, "codes found: {codes:?}");
    let runbook = read("runbook/error-codes.md");
    for code in codes {
        assert!(
            runbook.contains(&format!("`{code}`")),
            "runbook/error-codes.md does not explain `{code}`"
        );
    }
}
