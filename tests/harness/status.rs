//! Typed views of the status files the engine writes (`<state>/status/...`), for
//! assertions that name fields instead of digging through TOML tables.

use std::fmt;

use anyhow::Result;

use crate::repo::TestRepo;

/// One entry of a VM's `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: String,
    pub kind: String,
    pub message: String,
}

/// `status/vms/<name>.toml`, the fields the tests read (absent ones empty).
#[derive(Debug, Clone)]
pub struct VmView {
    pub phase: String,
    /// The host it is on (`host = "..."`).
    pub host: String,
    pub pid: Option<i32>,
    pub restarts: i64,
    pub message: String,
    pub events: Vec<Event>,
    pub raw: toml::Table,
}

impl VmView {
    pub(crate) fn from_table(raw: toml::Table) -> Self {
        let s = |k: &str| {
            raw.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let pid = match raw.get("pid") {
            Some(toml::Value::Integer(n)) => i32::try_from(*n).ok(),
            Some(toml::Value::String(s)) => s.parse().ok(),
            _ => None,
        };
        let events = raw
            .get("events")
            .and_then(|e| e.as_array())
            .map(|events| {
                events
                    .iter()
                    .filter_map(|e| e.as_table())
                    .map(|e| {
                        let f = |k: &str| {
                            e.get(k)
                                .and_then(|v| v.as_str())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        Event {
                            at: f("at"),
                            kind: f("kind"),
                            message: f("message"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            phase: s("phase"),
            host: s("host"),
            pid,
            restarts: raw
                .get("restarts")
                .and_then(toml::Value::as_integer)
                .unwrap_or(0),
            message: s("message"),
            events,
            raw,
        }
    }

    /// Whether the instance runs the committed spec (`up_to_date`): false while a
    /// change of it is still to be carried out.
    pub fn up_to_date(&self) -> bool {
        self.raw
            .get("up_to_date")
            .and_then(toml::Value::as_bool)
            .unwrap_or(false)
    }

    /// A table of its `[health]`: `guest_agent`, `liveness` or `readiness`.
    pub fn health(&self, table: &str) -> Option<&toml::Table> {
        self.raw
            .get("health")
            .and_then(|h| h.get(table))
            .and_then(toml::Value::as_table)
    }

    /// `[health] ready`.
    pub fn ready(&self) -> Option<bool> {
        self.raw
            .get("health")
            .and_then(|h| h.get("ready"))
            .and_then(toml::Value::as_bool)
    }

    /// A boolean of a `[health]` table: `("guest_agent", "answering")`, `("liveness", "ok")`.
    pub fn health_flag(&self, table: &str, key: &str) -> Option<bool> {
        self.health(table)?.get(key)?.as_bool()
    }

    /// A text of a `[health]` table: `("readiness", "last")`, `("guest_agent", "os")`.
    pub fn health_text(&self, table: &str, key: &str) -> &str {
        self.health(table)
            .and_then(|t| t.get(key))
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
    }

    /// Events of `kind`.
    pub fn events_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Event> + 'a {
        self.events.iter().filter(move |e| e.kind == kind)
    }

    /// True if some event of `kind` has a message containing `needle`.
    pub fn has_event(&self, kind: &str, needle: &str) -> bool {
        self.events_of(kind).any(|e| e.message.contains(needle))
    }

    /// Index of the last event of `kind`.
    pub fn last_index_of(&self, kind: &str) -> Option<usize> {
        self.events.iter().rposition(|e| e.kind == kind)
    }
}

impl fmt::Display for VmView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            toml::to_string_pretty(&self.raw).unwrap_or_else(|_| format!("{:?}", self.raw))
        )
    }
}

/// `status/engine.toml`, the fields the tests read.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub updated_at: String,
    pub last_applied_revision: Option<String>,
    pub last_attempted_revision: Option<String>,
    pub last_error: Option<String>,
    pub raw: toml::Table,
}

impl fmt::Display for EngineView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            toml::to_string_pretty(&self.raw).unwrap_or_else(|_| format!("{:?}", self.raw))
        )
    }
}

/// A `vcpus` / `memory_mb` pair (`capacity`, `allocated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub vcpus: i64,
    pub memory_mb: i64,
}

impl Resources {
    fn from_value(value: Option<&toml::Value>) -> Self {
        let n = |k: &str| {
            value
                .and_then(|v| v.get(k))
                .and_then(toml::Value::as_integer)
                .unwrap_or(0)
        };
        Self {
            vcpus: n("vcpus"),
            memory_mb: n("memory_mb"),
        }
    }
}

/// `status/hosts/<name>.toml`, the fields the tests read.
#[derive(Debug, Clone)]
pub struct HostView {
    pub phase: String,
    /// Why it is not ready (empty when it is).
    pub message: String,
    /// When it was last heard from (empty when unknown).
    pub last_heartbeat: String,
    pub capacity: Resources,
    pub allocated: Resources,
    /// The VMs it has instances of.
    pub vms: Vec<String>,
    pub raw: toml::Table,
}

impl fmt::Display for HostView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            toml::to_string_pretty(&self.raw).unwrap_or_else(|_| format!("{:?}", self.raw))
        )
    }
}

/// One `[[orphans]]` entry of `status/hosts/<host>.toml`: a QEMU of ours that no
/// instance record accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub pid: i32,
    /// The instance folder it runs in (`vms/<folder>`).
    pub folder: String,
}

impl TestRepo {
    /// The `[[orphans]]` of `status/hosts/<host>.toml` (empty if none or absent).
    pub fn orphans(&self, host: &str) -> Result<Vec<Orphan>> {
        let Some(table) = self.status_file(&format!("hosts/{host}"))? else {
            return Ok(Vec::new());
        };
        Ok(table
            .get("orphans")
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|o| {
                Some(Orphan {
                    pid: i32::try_from(o.get("pid")?.as_integer()?).ok()?,
                    folder: o.get("folder")?.as_str()?.to_owned(),
                })
            })
            .collect())
    }

    /// `status/hosts/<host>.toml` as a [`HostView`], `None` if absent.
    pub fn host_view(&self, host: &str) -> Result<Option<HostView>> {
        Ok(self
            .status_file(&format!("hosts/{host}"))?
            .map(|raw| HostView {
                phase: text(&raw, "phase"),
                message: text(&raw, "message"),
                last_heartbeat: text(&raw, "last_heartbeat"),
                capacity: Resources::from_value(raw.get("capacity")),
                allocated: Resources::from_value(raw.get("allocated")),
                vms: raw
                    .get("vms")
                    .and_then(toml::Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                raw,
            }))
    }

    /// The `phase` of `status/hosts/<host>.toml` (empty if absent or unreadable).
    pub fn host_phase(&self, host: &str) -> String {
        self.host_view(host)
            .ok()
            .flatten()
            .map(|h| h.phase)
            .unwrap_or_default()
    }

    /// `status/engine.toml`'s `last_error` (empty if none).
    pub fn last_error(&self) -> String {
        self.engine_view()
            .ok()
            .flatten()
            .and_then(|e| e.last_error)
            .unwrap_or_default()
    }

    /// `status/vms/<vm>.toml` as a [`VmView`], `None` if absent.
    pub fn vm_view(&self, vm: &str) -> Result<Option<VmView>> {
        Ok(self.vm_status(vm)?.map(VmView::from_table))
    }

    /// `status/engine.toml` as an [`EngineView`], `None` if absent.
    pub fn engine_view(&self) -> Result<Option<EngineView>> {
        Ok(self.engine_status()?.map(|raw| {
            let s = |k: &str| raw.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            EngineView {
                updated_at: s("updated_at").unwrap_or_default(),
                last_applied_revision: s("last_applied_revision"),
                last_attempted_revision: s("last_attempted_revision"),
                last_error: s("last_error"),
                raw,
            }
        }))
    }

    /// The VM's status once `cond` holds for it (polled; a status file caught
    /// mid-rename or absent counts as "not yet"). Fails after `timeout` showing the
    /// last status seen and the VM's files.
    pub fn wait_vm(
        &self,
        vm: &str,
        what: &str,
        timeout: std::time::Duration,
        mut cond: impl FnMut(&VmView) -> bool,
    ) -> Result<VmView> {
        crate::wait::poll_for(format!("{vm}: {what}"), timeout, || {
            self.vm_view(vm).ok().flatten().filter(|v| cond(v))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.describe_vm(vm)))
    }

    /// Every live QEMU of this test whose argv names VM `vm` (`-name guest=<vm>`),
    /// whether or not `qemu.pid` points at it.
    pub fn qemus_of(&self, vm: &str) -> Vec<i32> {
        let needle = format!("guest={vm},");
        let exact = format!("guest={vm}");
        crate::proc::processes_under(self.root())
            .into_iter()
            .filter(|&pid| {
                crate::proc::cmdline(pid).is_ok_and(|args| {
                    args.first().is_some_and(|a| a.contains("qemu-system"))
                        && args.iter().any(|a| a.starts_with(&needle) || *a == exact)
                })
            })
            .collect()
    }
}

/// A string field of a status table (empty if absent).
fn text(raw: &toml::Table, key: &str) -> String {
    raw.get(key)
        .and_then(toml::Value::as_str)
        .unwrap_or_default()
        .to_owned()
}
