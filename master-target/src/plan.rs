//! Recovery plans (`lifeboat-mt failover --plan FILE`, `test-failover
//! --plan FILE`): ordered groups of machines, each group recovered with its
//! machines in parallel, with scripts before and after it and an optional
//! manual pause before it. The plan file, what runs and what is reported:
//!
//! ```toml
//! name = "billing"              # optional; default: the file's stem
//! script-timeout = "10m"        # optional; each script's bound
//!
//! [[group]]
//! name = "databases"            # unique in the plan
//! machines = ["db-1", "db-2"]   # recovered in parallel; a machine is in one group
//! point = "latest-app"          # optional (latest): as `failover --point`
//! before = ["/etc/lifeboat/plans/fence-old-site.sh"]   # optional
//! after = ["/etc/lifeboat/plans/check-db.sh"]          # optional
//! pause = false                 # optional: wait for the operator before the group
//! ```
//!
//! Order per group: the pause (a line on stdin goes on; stdin closed stops
//! the plan), the `before` scripts one by one, the machines in parallel
//! (each into `<out>/<machine>/`), the `after` scripts. Scripts get
//! `LIFEBOAT_PLAN`, `LIFEBOAT_GROUP`, `LIFEBOAT_PHASE` (`before`, `after`),
//! `LIFEBOAT_MACHINES` (space-separated), `LIFEBOAT_OUT` and `LIFEBOAT_DRILL`
//! (`1` in a test failover); their output goes to stderr. The first
//! failure — a script's non-zero exit or overrun, a machine that cannot be
//! recovered (the others of its group finish) — stops the plan; nothing of
//! a later group runs. The report (`<out>/recovery-plan-report.json`, and
//! printed) lists every group and machine: done, failed with the reason,
//! or not run.
//!
//! Everything a plan names is checked before anything runs: groups and
//! machines (ids, each machine once), scripts (executable files; a relative
//! path is taken from the plan file's directory), and each machine's point
//! resolved in the store (its keys, its stream, the point itself). A plan
//! group is not a consistency group: each machine's point is its own (use
//! `failover --group` for one common moment).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::materialize::PointSpec;

/// The report's file in the plan's output directory.
pub const REPORT_FILE: &str = "recovery-plan-report.json";
/// A script's bound when the plan does not say.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, with = "humantime_serde")]
    script_timeout: Option<Duration>,
    #[serde(default, rename = "group")]
    groups: Vec<GroupFile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct GroupFile {
    name: String,
    machines: Vec<String>,
    #[serde(default)]
    point: Option<String>,
    #[serde(default)]
    before: Vec<PathBuf>,
    #[serde(default)]
    after: Vec<PathBuf>,
    #[serde(default)]
    pause: bool,
}

/// A checked plan.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub script_timeout: Duration,
    pub groups: Vec<Group>,
}

#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub machines: Vec<String>,
    pub point: PointSpec,
    /// The point as the plan spells it (for the report).
    pub point_text: String,
    pub before: Vec<PathBuf>,
    pub after: Vec<PathBuf>,
    pub pause: bool,
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Plan {
    /// Reads and checks the plan at `path`; an error names the file and
    /// the group or machine at fault.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the recovery plan {}", path.display()))?;
        let f: PlanFile = toml::from_str(&text)
            .with_context(|| format!("parsing the recovery plan {}", path.display()))?;
        let name = f.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plan".into())
        });
        let bad = |why: String| anyhow::anyhow!("recovery plan {}: {why}", path.display());
        if f.groups.is_empty() {
            return Err(bad("no [[group]]: nothing to recover".into()));
        }
        let mut seen_groups = std::collections::BTreeSet::new();
        let mut seen_machines = std::collections::BTreeMap::new();
        let mut groups = Vec::new();
        for g in f.groups {
            if g.name.trim().is_empty() {
                return Err(bad("a group has an empty name".into()));
            }
            if !seen_groups.insert(g.name.clone()) {
                return Err(bad(format!("group {:?} is named twice", g.name)));
            }
            if g.machines.is_empty() {
                return Err(bad(format!("group {:?} lists no machine", g.name)));
            }
            for m in &g.machines {
                lifeboat_common::ids::validate_id("machine", m)
                    .map_err(|e| bad(format!("group {:?}: {e}", g.name)))?;
                if let Some(other) = seen_machines.insert(m.clone(), g.name.clone()) {
                    return Err(bad(format!(
                        "machine {m} is in group {other:?} and in group {:?}: a machine is recovered once",
                        g.name
                    )));
                }
            }
            let point_text = g.point.clone().unwrap_or_else(|| "latest".into());
            let point: PointSpec = point_text
                .parse()
                .map_err(|e| bad(format!("group {:?}: point {point_text:?}: {e}", g.name)))?;
            let base = path.parent().unwrap_or(Path::new("."));
            let absolute = |v: Vec<PathBuf>| -> Vec<PathBuf> {
                v.into_iter()
                    .map(|s| if s.is_relative() { base.join(s) } else { s })
                    .collect()
            };
            let (before, after) = (absolute(g.before), absolute(g.after));
            for s in before.iter().chain(&after) {
                if !executable(s) {
                    return Err(bad(format!(
                        "group {:?}: script {} is not an executable file",
                        g.name,
                        s.display()
                    )));
                }
            }
            groups.push(Group {
                name: g.name,
                machines: g.machines,
                point,
                point_text,
                before,
                after,
                pause: g.pause,
            });
        }
        Ok(Plan {
            name,
            script_timeout: f.script_timeout.unwrap_or(DEFAULT_SCRIPT_TIMEOUT),
            groups,
        })
    }
}

/// What became of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Done,
    Failed,
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ScriptRun {
    pub phase: &'static str,
    pub script: PathBuf,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineRun {
    pub machine: String,
    pub state: State,
    /// The point recovered (its id), when done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GroupRun {
    pub name: String,
    pub state: State,
    pub point: String,
    pub machines: Vec<MachineRun>,
    pub scripts: Vec<ScriptRun>,
    pub seconds: f64,
}

/// The plan's report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub plan: String,
    pub drill: bool,
    pub completed: bool,
    /// The step that stopped the plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub groups: Vec<GroupRun>,
    pub seconds: f64,
}

impl Report {
    /// Every group and machine not run yet.
    pub fn new(plan: &Plan, drill: bool) -> Report {
        Report {
            plan: plan.name.clone(),
            drill,
            completed: false,
            stopped: None,
            groups: plan
                .groups
                .iter()
                .map(|g| GroupRun {
                    name: g.name.clone(),
                    state: State::NotRun,
                    point: g.point_text.clone(),
                    machines: g
                        .machines
                        .iter()
                        .map(|m| MachineRun {
                            machine: m.clone(),
                            state: State::NotRun,
                            point: None,
                            seq: None,
                            out: None,
                            error: None,
                        })
                        .collect(),
                    scripts: g
                        .before
                        .iter()
                        .map(|s| ("before", s))
                        .chain(g.after.iter().map(|s| ("after", s)))
                        .map(|(phase, s)| ScriptRun {
                            phase,
                            script: s.clone(),
                            state: State::NotRun,
                            error: None,
                            seconds: 0.0,
                        })
                        .collect(),
                    seconds: 0.0,
                })
                .collect(),
            seconds: 0.0,
        }
    }

    /// Writes the report to `<out>/recovery-plan-report.json`; returns its path.
    pub fn write(&self, out: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join(REPORT_FILE);
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        lifeboat_common::fsutil::replace_file_mode(&path, &bytes, 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The report as text, one line per step.
    pub fn print(&self) {
        println!(
            "recovery plan {}{}: {} in {:.1} s",
            self.plan,
            if self.drill { " (drill)" } else { "" },
            if self.completed {
                "completed".to_string()
            } else {
                format!(
                    "STOPPED {}",
                    self.stopped.as_deref().unwrap_or("at an unknown step")
                )
            },
            self.seconds
        );
        for g in &self.groups {
            println!(
                "  group {}: {} (point {}, {:.1} s)",
                g.name,
                state_text(g.state),
                g.point,
                g.seconds
            );
            for s in &g.scripts {
                println!(
                    "    {} script {}: {}{}",
                    s.phase,
                    s.script.display(),
                    state_text(s.state),
                    s.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            for m in &g.machines {
                let at = match (&m.point, m.seq, &m.out) {
                    (Some(p), Some(seq), Some(out)) => {
                        format!(" at point {p} (seq {seq}) into {}", out.display())
                    }
                    _ => String::new(),
                };
                println!(
                    "    machine {}: {}{at}{}",
                    m.machine,
                    state_text(m.state),
                    m.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }
    }
}

fn state_text(s: State) -> &'static str {
    match s {
        State::Done => "done",
        State::Failed => "FAILED",
        State::NotRun => "not run",
    }
}

/// Runs one script of `group` (see the header for its environment),
/// bounded by `timeout`; its output goes to stderr. An error says why it
/// failed (exit status, signal, overrun).
pub async fn run_script(
    script: &Path,
    phase: &'static str,
    plan: &Plan,
    group: &Group,
    out: &Path,
    drill: bool,
    timeout: Duration,
) -> Result<(), String> {
    use std::os::fd::AsFd;
    let to_stderr = || -> Result<std::process::Stdio, String> {
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(std::process::Stdio::from)
            .map_err(|e| format!("duplicating stderr: {e}"))
    };
    let mut cmd = tokio::process::Command::new(script);
    cmd.env("LIFEBOAT_PLAN", &plan.name)
        .env("LIFEBOAT_GROUP", &group.name)
        .env("LIFEBOAT_PHASE", phase)
        .env("LIFEBOAT_MACHINES", group.machines.join(" "))
        .env("LIFEBOAT_OUT", out)
        .env("LIFEBOAT_DRILL", if drill { "1" } else { "0" })
        // Secrets of this command are not the scripts' business.
        .env_remove("LIFEBOAT_KEK_FILE")
        .env_remove("LIFEBOAT_PS_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .stdout(to_stderr()?)
        .stderr(to_stderr()?)
        // Its own process group: an overrun kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("starting it: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) of the script's own process group.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
            let _ = child.kill().await;
            Err(format!(
                "it ran past its bound ({}, script-timeout) and was killed",
                humantime::format_duration(timeout)
            ))
        }
        Ok(Err(e)) => Err(format!("waiting for it: {e}")),
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(match st.code() {
            Some(c) => format!("it exited with status {c}"),
            None => format!("it was killed by a signal ({st})"),
        }),
    }
}

/// Runs the `phase` scripts of `group` one by one, noting each in `runs`
/// (the report lists every script, `not-run` until it ran); stops at the
/// first that fails and returns where the plan stopped.
pub async fn run_scripts(
    phase: &'static str,
    plan: &Plan,
    group: &Group,
    out: &Path,
    drill: bool,
    runs: &mut Vec<ScriptRun>,
) -> Result<(), String> {
    let scripts = if phase == "before" {
        &group.before
    } else {
        &group.after
    };
    for s in scripts {
        let t = Instant::now();
        let r = run_script(s, phase, plan, group, out, drill, plan.script_timeout).await;
        let run = ScriptRun {
            phase,
            script: s.clone(),
            state: if r.is_ok() {
                State::Done
            } else {
                State::Failed
            },
            error: r.as_ref().err().cloned(),
            seconds: secs(t),
        };
        match runs
            .iter_mut()
            .find(|x| x.phase == phase && x.script == *s && x.state == State::NotRun)
        {
            Some(slot) => *slot = run,
            None => runs.push(run),
        }
        if let Err(e) = r {
            return Err(format!(
                "at group {}: {phase} script {}: {e}",
                group.name,
                s.display()
            ));
        }
    }
    Ok(())
}

/// The manual pause before `group`: waits for a line on stdin; `false`
/// when stdin is closed (the plan stops there).
pub async fn pause(plan: &Plan, group: &Group) -> bool {
    eprintln!(
        "recovery plan {}: paused before group {} ({}): press Enter to go on",
        plan.name,
        group.name,
        group.machines.join(", ")
    );
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        matches!(std::io::stdin().read_line(&mut line), Ok(n) if n > 0)
    })
    .await
    .unwrap_or(false)
}

/// Seconds since `t`, for the report.
pub fn secs(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Plan> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dr.toml");
        std::fs::write(&p, text).unwrap();
        Plan::load(&p)
    }

    #[test]
    fn a_plan_is_checked_whole_before_anything_runs() {
        let p = plan("[[group]]\nname = \"db\"\nmachines = [\"db-1\"]\n[[group]]\nname = \"app\"\nmachines = [\"app-1\", \"app-2\"]\npoint = \"latest-app\"\npause = true\n").unwrap();
        assert_eq!(p.name, "dr");
        assert_eq!(p.groups.len(), 2);
        assert_eq!(p.groups[1].point, PointSpec::LatestApp);
        assert!(p.groups[1].pause);
        let e = |t: &str| format!("{:#}", plan(t).unwrap_err());
        assert!(e("").contains("no [[group]]"));
        assert!(e("[[group]]\nname = \"a\"\nmachines = []\n").contains("lists no machine"));
        assert!(e(
            "[[group]]\nname = \"a\"\nmachines = [\"m-1\"]\n[[group]]\nname = \"b\"\nmachines = [\"m-1\"]\n"
        )
        .contains("machine m-1 is in group \"a\" and in group \"b\""));
        assert!(e("[[group]]\nname = \"a\"\nmachines = [\"M\"]\n").contains("group \"a\""));
        assert!(e(
            "[[group]]\nname = \"a\"\nmachines = [\"m-1\"]\nbefore = [\"/nonexistent.sh\"]\n"
        )
        .contains("/nonexistent.sh is not an executable file"));
        assert!(
            e("[[group]]\nname = \"a\"\nmachines = [\"m-1\"]\npoint = \"soon\"\n")
                .contains("point \"soon\"")
        );
        assert!(
            e("[[group]]\nname = \"a\"\nmachines = [\"m-1\"]\npuase = true\n").contains("puase")
        );
    }
}
