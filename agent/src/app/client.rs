//! `sigwake actors` and `sigwake incidents`: clients of a running agent
//! (its socket) and of its state directory.

use std::{io::Write as _, time::Duration};

use anyhow::Context as _;

use crate::{
    cli::{ActorsArgs, IncidentsArgs},
    response::incidents,
};

/// `sigwake actors`: asks the running agent over its socket.
pub fn actors(args: ActorsArgs) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "connecting to the agent at {}; is `sigwake run` running (or does it use another --socket)?",
            args.socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"{\"op\":\"list\"}\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).context("reading the agent's reply")?;
    let reply: serde_json::Value = serde_json::from_str(&line).context("the agent's reply is not JSON")?;
    if reply["ok"] != true {
        anyhow::bail!("the agent refused: {}", reply["error"]);
    }
    let actors = reply["actors"].as_array().cloned().unwrap_or_default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&actors)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<10} {:<15} {:<11} {:<9} {:<6} {:<16} PARENT",
        "NAME", "PID", "RUNTIME", "STATE", "SOURCE", "POLICY", "DROPS", "LAST SEEN"
    );
    for a in actors {
        let s = |k: &str| {
            a[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| if a[k].is_null() { "-".into() } else { a[k].to_string() })
        };
        println!(
            "{:<24} {:<8} {:<10} {:<15} {:<11} {:<9} {:<6} {:<16} {}",
            s("name"),
            s("pid"),
            s("runtime"),
            s("state"),
            s("source"),
            s("policy"),
            s("drops"),
            s("last_seen").get(11..19).unwrap_or("-"),
            s("parent")
        );
    }
    Ok(())
}

/// `sigwake incidents`: reads the incident state the agent keeps.
pub fn incidents(args: IncidentsArgs) -> anyhow::Result<()> {
    let path = args.state_dir.join("incidents.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // --json is read by programs: none is an empty list, not prose.
            if args.json {
                println!("[]");
            } else {
                println!("no incidents recorded in {}", args.state_dir.display());
            }
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(e).with_context(|| {
                format!(
                    "reading {}: the agent keeps its state directory private to its own user (it holds other \
                     users' diagnostics); run `sigwake incidents` as that user (root)",
                    path.display()
                )
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let list: Vec<incidents::Incident> =
        serde_json::from_str(&text).with_context(|| format!("{} is not an incident list", path.display()))?;
    let list: Vec<_> = list.into_iter().filter(|i| !args.open || i.status.is_open()).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<20} {:<8} {:<8} {:<11} {:<9} {:<6} {:<27} STEPS",
        "ID", "ACTOR", "PID", "RUNTIME", "STATUS", "POLICY", "DROPS", "OPENED"
    );
    for i in list.iter().rev() {
        let steps: Vec<String> = i.steps.iter().map(|s| format!("{}:{}", s.action, s.outcome)).collect();
        let status = serde_json::to_value(i.status)?.as_str().unwrap_or("-").to_string();
        println!(
            "{:<5} {:<20} {:<8} {:<8} {:<11} {:<9} {:<6} {:<27} {}",
            i.id,
            i.actor,
            i.pid,
            i.runtime,
            status,
            i.policy.as_deref().unwrap_or("observe"),
            i.evidence.drops,
            i.opened,
            steps.join(" → ")
        );
    }
    Ok(())
}
