//! Request routing and validation, separate from HTTP transport so it can be
//! tested (and fuzzed) without a socket or KVM.
//!
//! Firecracker-compatible subset (same paths, field names and error shape
//! `{"fault_message": "..."}`): `GET /`, `PUT /boot-source`,
//! `PUT /machine-config`, `GET /machine-config`, `PUT /actions`,
//! `PATCH /vm`. foliovm's own: `GET /vms`, `GET /vms/{name}`,
//! `PATCH /vms/{name}`, `PUT /vms/{name}/limits`, `PUT /reclaim`,
//! `GET /operations`, `GET /operations/{id}`, `GET /stats`, `GET /metrics`.
//!
//! Long requests (`PUT /reclaim`, `PUT /vms/{name}/compact`, `PUT
//! /budget`) take `"async": true` in their body: they
//! then answer `202 Accepted` at once with the operation (its `id`,
//! `state` and `progress`), which `GET /operations/{id}` follows. Without
//! it they answer when done, as before.

use crate::config::valid_vm_name;
use crate::operations::{Job, OperationId, Operations, SpawnError};
use crate::virtio::{BalloonSection, DriveSection};
use serde::{Deserialize, Serialize};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// An API failure: an HTTP status and a message for `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (4xx for the client's fault, 5xx for ours).
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// 400 Bad Request.
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
        }
    }
    /// 500 Internal Server Error.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: message.into(),
        }
    }
}

/// A response: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// `application/json` or `text/plain; version=0.0.4` (metrics).
    pub content_type: &'static str,
    /// Body, possibly empty (204).
    pub body: String,
}

impl ApiResponse {
    fn no_content() -> Self {
        ApiResponse {
            status: 204,
            content_type: "application/json",
            body: String::new(),
        }
    }
    fn json<T: Serialize>(v: &T) -> Self {
        ApiResponse {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string(v).expect("API types serialise"),
        }
    }
    pub(crate) fn error(e: ApiError) -> Self {
        ApiResponse {
            status: e.status,
            content_type: "application/json",
            body: serde_json::json!({ "fault_message": e.message }).to_string(),
        }
    }
}

/// Firecracker's `PUT /boot-source` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceBody {
    /// Kernel image path on the host.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Initrd path on the host.
    #[serde(default)]
    pub initrd_path: Option<String>,
}

/// Firecracker's `PUT /machine-config` body (and `GET` answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigBody {
    /// vCPUs, 1..=254 here (Firecracker: 1..=32).
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Accepted; must be false (no SMT topology).
    #[serde(default)]
    pub smt: bool,
    /// Accepted; dirty tracking is not implemented, must be false.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Accepted and ignored, with a warning in the log (Firecracker
    /// clients send it); the guest sees the CPUID KVM supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<serde_json::Value>,
    /// `None` or `2M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// Firecracker's `PUT /actions` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

/// `PUT /vms/{name}/limits` body: the VM's reclaim limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    /// Reclaim never takes the VM's resident memory below this (MiB).
    #[serde(default)]
    pub mem_min_mib: u64,
    /// The VM's resident memory is reclaimed down to this (MiB).
    #[serde(default)]
    pub mem_max_mib: Option<u64>,
    /// Lower priorities are reclaimed first.
    #[serde(default)]
    pub priority: i32,
}

/// `PUT /reclaim` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReclaimBody {
    #[serde(default)]
    vm: Option<String>,
    mib: u64,
    /// Answer at once with an operation id instead of when done.
    #[serde(default, rename = "async")]
    run_async: bool,
}

/// `PUT /vms/{name}/compact` body (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactBody {
    /// Answer at once with an operation id instead of when done.
    #[serde(default, rename = "async")]
    run_async: bool,
}

/// `PUT /vms/{name}/relocate` body: which region, and exactly one of the
/// three operations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelocateBody {
    /// A guest-physical address inside the region (default 0).
    #[serde(default)]
    pub region_gpa: u64,
    /// Move it to a 2 MiB-aligned host range.
    #[serde(default)]
    pub to_aligned: bool,
    /// Merge it with the adjacent region holding this address.
    #[serde(default)]
    pub merge_with_gpa: Option<u64>,
    /// Grow it to this size (MiB).
    #[serde(default)]
    pub grow_mib: Option<u64>,
}

impl RelocateBody {
    /// The operation it asks for.
    ///
    /// # Errors
    /// Not exactly one operation, or an out-of-range size.
    pub fn op(&self) -> Result<mem::RelocateOp, ApiError> {
        match (self.to_aligned, self.merge_with_gpa, self.grow_mib) {
            (true, None, None) => Ok(mem::RelocateOp::ToAligned),
            (false, Some(g), None) => Ok(mem::RelocateOp::MergeWith(mem::GuestAddress(g))),
            (false, None, Some(m)) if m > 0 && m <= 1 << 24 => Ok(mem::RelocateOp::Grow(m << 20)),
            (false, None, Some(m)) => Err(ApiError::bad(format!(
                "grow_mib {m} is out of range 1..=16777216"
            ))),
            _ => Err(ApiError::bad(
                "give exactly one of to_aligned, merge_with_gpa, grow_mib",
            )),
        }
    }
}

/// `PUT /budget` body: the host budget of the memory manager.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    budget_mib: u64,
    /// Answer at once with an operation id instead of when done (a
    /// lowering reclaims, at disk speed).
    #[serde(default, rename = "async")]
    run_async: bool,
}

/// Firecracker's `PATCH /balloon` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonUpdateBody {
    amount_mib: u64,
}

/// `PATCH /vm` and `PATCH /vms/{name}` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: String,
}

/// Firecracker's `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// `foliovm`.
    pub app_name: String,
    /// The (first) VM's name.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// foliovm's version.
    pub vmm_version: String,
}

/// What the router needs from the VMM. Every method either changes what it
/// says or returns an error and changes nothing.
pub trait ApiBackend: Send + Sync {
    /// `GET /`.
    fn instance_info(&self) -> InstanceInfo;
    /// Store the boot source for `InstanceStart`.
    fn set_boot_source(&self, body: BootSourceBody) -> Result<(), ApiError>;
    /// Add or replace (by id) a drive for `InstanceStart` (Firecracker's
    /// `PUT /drives/{drive_id}`).
    fn put_drive(&self, drive: DriveSection) -> Result<(), ApiError>;
    /// Configure the balloon for `InstanceStart` (Firecracker's `PUT
    /// /balloon`).
    fn put_balloon(&self, balloon: BalloonSection) -> Result<(), ApiError>;
    /// Store the machine config for `InstanceStart`.
    fn set_machine_config(&self, body: MachineConfigBody) -> Result<(), ApiError>;
    /// The machine config.
    fn machine_config(&self) -> MachineConfigBody;
    /// Build and start the configured VM.
    fn instance_start(&self) -> Result<(), ApiError>;
    /// Press Ctrl+Alt+Del on a VM's keyboard; `None` means the only one.
    fn send_ctrl_alt_del(&self, vm: Option<&str>) -> Result<(), ApiError>;
    /// Pause (`true`) or resume (`false`) a VM; `None` means the only one.
    fn set_paused(&self, vm: Option<&str>, paused: bool) -> Result<(), ApiError>;
    /// Set a VM's balloon target; `None` means the only VM.
    fn set_balloon(&self, vm: Option<&str>, amount_mib: u64) -> Result<(), ApiError>;
    /// A VM's balloon target, size and counters (`GET /balloon`), or with
    /// `stats` the guest's statistics (`GET /balloon/statistics`); `None`
    /// means the only VM.
    fn balloon(&self, vm: Option<&str>, stats: bool) -> Result<serde_json::Value, ApiError>;
    /// Set a VM's reclaim limits.
    fn set_limits(&self, vm: &str, limits: LimitsBody) -> Result<(), ApiError>;
    /// A job that reclaims `bytes` from `vm` (or the VMs the policy
    /// picks), with progress in bytes; its result is
    /// `{"reclaimed_bytes": N}`. Unknown VMs and a manager without swap
    /// are refused here, before anything runs.
    fn reclaim(&self, vm: Option<&str>, bytes: u64) -> Result<Job, ApiError>;
    /// The registry of long operations.
    fn operations(&self) -> &Operations;
    /// A job that compacts `vm`'s memory (rebuild free 2 MiB blocks, collapse
    /// small folios into 2 MiB ones); its result reports the 2 MiB folios
    /// before and after.
    fn compact(&self, vm: &str) -> Result<Job, ApiError>;

    /// Relocate a region of `vm` while it runs; answers when done (the
    /// switch holds the VM, so it is not an operation).
    fn relocate(&self, vm: &str, body: &RelocateBody) -> Result<serde_json::Value, ApiError>;

    /// `GET /budget`: the host budget, its maximum and free memory.
    fn budget(&self) -> Result<serde_json::Value, ApiError>;
    /// Set the host budget; answers the old and new budget and what was
    /// reclaimed to lower it.
    fn set_budget(&self, bytes: u64) -> Result<serde_json::Value, ApiError>;
    /// The same as an operation, refused first for what needs no reclaim
    /// (as [`ApiBackend::set_budget`] refuses it); its result is the same
    /// JSON, and a lowering that cannot free enough fails it.
    fn budget_job(&self, bytes: u64) -> Result<Job, ApiError>;
    /// `GET /vms`: every VM's name, state and size.
    fn list_vms(&self) -> serde_json::Value;
    /// `GET /vms/{name}`: one VM with its memory statistics.
    fn vm_info(&self, vm: &str) -> Result<serde_json::Value, ApiError>;
    /// `GET /stats`: host-wide memory statistics and every VM's.
    fn stats(&self) -> serde_json::Value;
    /// `GET /metrics`: Prometheus text format.
    fn metrics(&self) -> String;
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("missing JSON request body"));
    }
    let bad = |field: &str, e: serde_json::Error| {
        ApiError::bad(format!("malformed request body: {field}{e}"))
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    // serde says only where a value of the wrong type or out of range is;
    // its key path names the field (`rate_limiter.bandwidth.size`). An
    // error about the body itself (a missing, unknown or repeated field,
    // which serde names) has the empty path ".".
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = match path.as_str() {
            "." => String::new(),
            p => format!("{p}: "),
        };
        bad(&field, e.into_inner())
    })?;
    de.end().map_err(|e| bad("", e))?;
    Ok(value)
}

fn validate_machine_config(m: &MachineConfigBody) -> Result<(), ApiError> {
    if m.vcpu_count == 0 || m.vcpu_count > 254 {
        return Err(ApiError::bad(format!(
            "vcpu_count {} is out of range 1..=254",
            m.vcpu_count
        )));
    }
    if m.mem_size_mib == 0 || m.mem_size_mib > (1 << 24) {
        return Err(ApiError::bad(format!(
            "mem_size_mib {} is out of range 1..=16777216",
            m.mem_size_mib
        )));
    }
    if m.smt {
        return Err(ApiError::bad("smt is not supported"));
    }
    if m.track_dirty_pages {
        return Err(ApiError::bad("track_dirty_pages is not supported"));
    }
    if let Some(w) = crate::config::cpu_template_warning(m.cpu_template.as_ref()) {
        tracing::warn!("{w}");
    }
    match m.huge_pages.as_deref() {
        None | Some("None") | Some("2M") => Ok(()),
        Some(other) => Err(ApiError::bad(format!(
            "huge_pages must be \"None\" or \"2M\", not {other:?}"
        ))),
    }
}

fn paused_from(body: &[u8]) -> Result<bool, ApiError> {
    let s: StateBody = parse(body)?;
    match s.state.as_str() {
        "Paused" => Ok(true),
        "Resumed" => Ok(false),
        other => Err(ApiError::bad(format!(
            "state must be \"Paused\" or \"Resumed\", not {other:?}"
        ))),
    }
}

fn not_allowed(method: &str, path: &str) -> ApiError {
    ApiError {
        status: 405,
        message: format!("method {method} is not allowed on {path}"),
    }
}

/// Run `job` now (200 with its result) or, with `run_async`, on a thread
/// of its own (202 with the operation).
fn run_job(api: &dyn ApiBackend, job: Job, run_async: bool) -> Result<ApiResponse, ApiError> {
    if !run_async {
        let kind = job.kind();
        return job
            .run_now()
            .map(|v| ApiResponse::json(&v))
            .map_err(|e| ApiError::internal(format!("{kind} failed: {e}")));
    }
    match api.operations().spawn(job) {
        Ok(op) => Ok(ApiResponse {
            status: 202,
            ..ApiResponse::json(&op)
        }),
        Err(e @ SpawnError::TooMany(_)) => Err(ApiError {
            status: 429,
            message: e.to_string(),
        }),
        Err(e @ SpawnError::Thread(_)) => Err(ApiError::internal(format!(
            "{e}: {}",
            std::error::Error::source(&e).map_or(String::new(), |c| c.to_string())
        ))),
    }
}

fn operation_id(s: &str) -> Option<OperationId> {
    // Digits only: `+1` and `01` name no operation.
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0')
    {
        return None;
    }
    s.parse().ok().map(OperationId)
}

/// Route one request. Never panics; malformed requests get a 4xx and change
/// nothing.
pub fn route(api: &dyn ApiBackend, method: &str, path: &str, body: &[u8]) -> ApiResponse {
    let path = path.split('?').next().unwrap_or("");
    let result = if body.len() > MAX_BODY {
        Err(ApiError {
            status: 413,
            message: format!("request body larger than {MAX_BODY} bytes"),
        })
    } else {
        dispatch(api, method, path, body)
    };
    result.unwrap_or_else(ApiResponse::error)
}

/// A balloon target, as `PUT` and `PATCH /balloon` take it.
fn check_amount_mib(mib: u64) -> Result<(), ApiError> {
    if mib > (1 << 24) {
        return Err(ApiError::bad(format!(
            "amount_mib {mib} is out of range 0..=16777216"
        )));
    }
    Ok(())
}

/// `PATCH /balloon` or `PATCH /vms/{name}/balloon`.
fn set_balloon(
    api: &dyn ApiBackend,
    vm: Option<&str>,
    body: &[u8],
) -> Result<ApiResponse, ApiError> {
    let b: BalloonUpdateBody = parse(body)?;
    check_amount_mib(b.amount_mib)?;
    api.set_balloon(vm, b.amount_mib)
        .map(|()| ApiResponse::no_content())
}

fn dispatch(
    api: &dyn ApiBackend,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<ApiResponse, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", [""]) => Ok(ApiResponse::json(&api.instance_info())),
        ("PUT", ["boot-source"]) => {
            let b: BootSourceBody = parse(body)?;
            if b.kernel_image_path.is_empty() {
                return Err(ApiError::bad("kernel_image_path must not be empty"));
            }
            api.set_boot_source(b).map(|()| ApiResponse::no_content())
        }
        ("PUT", ["machine-config"]) => {
            let m: MachineConfigBody = parse(body)?;
            validate_machine_config(&m)?;
            api.set_machine_config(m)
                .map(|()| ApiResponse::no_content())
        }
        ("GET", ["machine-config"]) => Ok(ApiResponse::json(&api.machine_config())),
        ("PUT", ["drives", id]) => {
            let d: DriveSection = parse(body)?;
            if d.drive_id != *id {
                return Err(ApiError::bad(format!(
                    "drive_id {:?} in the body is not {id:?} of the path",
                    d.drive_id
                )));
            }
            api.put_drive(d).map(|()| ApiResponse::no_content())
        }
        ("PUT", ["balloon"]) => {
            let b: BalloonSection = parse(body)?;
            check_amount_mib(b.amount_mib)?;
            api.put_balloon(b).map(|()| ApiResponse::no_content())
        }
        ("PUT", ["actions"]) => {
            let a: ActionBody = parse(body)?;
            match a.action_type.as_str() {
                "InstanceStart" => api.instance_start().map(|()| ApiResponse::no_content()),
                "FlushMetrics" => Ok(ApiResponse::no_content()),
                "SendCtrlAltDel" => api
                    .send_ctrl_alt_del(None)
                    .map(|()| ApiResponse::no_content()),
                other => Err(ApiError::bad(format!("unknown action_type {other:?}"))),
            }
        }
        ("PUT", ["vms", name, "actions"]) if valid_vm_name(name) => {
            let a: ActionBody = parse(body)?;
            match a.action_type.as_str() {
                "SendCtrlAltDel" => api
                    .send_ctrl_alt_del(Some(name))
                    .map(|()| ApiResponse::no_content()),
                other => Err(ApiError::bad(format!(
                    "action_type {other:?} does not act on one VM (SendCtrlAltDel does)"
                ))),
            }
        }
        ("PATCH", ["vm"]) => {
            let paused = paused_from(body)?;
            api.set_paused(None, paused)
                .map(|()| ApiResponse::no_content())
        }
        ("PATCH", ["balloon"]) => set_balloon(api, None, body),
        ("GET", ["balloon"]) => api.balloon(None, false).map(|v| ApiResponse::json(&v)),
        ("GET", ["balloon", "statistics"]) => {
            api.balloon(None, true).map(|v| ApiResponse::json(&v))
        }
        ("PATCH", ["vms", name, "balloon"]) if valid_vm_name(name) => {
            set_balloon(api, Some(name), body)
        }
        ("GET", ["vms", name, "balloon"]) if valid_vm_name(name) => api
            .balloon(Some(name), false)
            .map(|v| ApiResponse::json(&v)),
        ("GET", ["vms", name, "balloon", "statistics"]) if valid_vm_name(name) => {
            api.balloon(Some(name), true).map(|v| ApiResponse::json(&v))
        }
        ("GET", ["vms"]) => Ok(ApiResponse::json(&api.list_vms())),
        ("GET", ["vms", name]) if valid_vm_name(name) => {
            api.vm_info(name).map(|v| ApiResponse::json(&v))
        }
        ("PATCH", ["vms", name]) if valid_vm_name(name) => {
            let paused = paused_from(body)?;
            api.set_paused(Some(name), paused)
                .map(|()| ApiResponse::no_content())
        }
        ("PUT", ["vms", name, "limits"]) if valid_vm_name(name) => {
            let l: LimitsBody = parse(body)?;
            if l.mem_max_mib.is_some_and(|m| m < l.mem_min_mib.max(2)) {
                return Err(ApiError::bad(
                    "mem_max_mib must be at least 2 and at least mem_min_mib",
                ));
            }
            for (field, mib) in [
                ("mem_min_mib", Some(l.mem_min_mib)),
                ("mem_max_mib", l.mem_max_mib),
            ] {
                if let Some(m) = mib.filter(|&m| m > (1 << 24)) {
                    return Err(ApiError::bad(format!(
                        "{field} {m} is out of range (at most 16777216 MiB)"
                    )));
                }
            }
            api.set_limits(name, l).map(|()| ApiResponse::no_content())
        }
        ("PUT", ["vms", name, "compact"]) if valid_vm_name(name) => {
            let c: CompactBody = match body.iter().all(u8::is_ascii_whitespace) {
                true => CompactBody::default(),
                false => parse(body)?,
            };
            let job = api.compact(name)?;
            run_job(api, job, c.run_async)
        }
        ("PUT", ["vms", name, "relocate"]) if valid_vm_name(name) => {
            let r: RelocateBody = parse(body)?;
            r.op()?;
            api.relocate(name, &r).map(|v| ApiResponse::json(&v))
        }
        ("PUT", ["reclaim"]) => {
            let r: ReclaimBody = parse(body)?;
            if r.mib == 0 || r.mib > (1 << 24) {
                return Err(ApiError::bad(format!(
                    "mib {} is out of range 1..=16777216",
                    r.mib
                )));
            }
            if let Some(n) = r.vm.as_deref().filter(|n| !valid_vm_name(n)) {
                return Err(ApiError::bad(format!("vm {n:?}: invalid VM name")));
            }
            let job = api.reclaim(r.vm.as_deref(), r.mib << 20)?;
            run_job(api, job, r.run_async)
        }
        ("GET", ["budget"]) => api.budget().map(|v| ApiResponse::json(&v)),
        ("PUT", ["budget"]) => {
            let b: BudgetBody = parse(body)?;
            if b.budget_mib == 0 || b.budget_mib > (1 << 24) {
                return Err(ApiError::bad(format!(
                    "budget_mib {} is out of range 1..=16777216",
                    b.budget_mib
                )));
            }
            if b.run_async {
                let job = api.budget_job(b.budget_mib << 20)?;
                return run_job(api, job, true);
            }
            api.set_budget(b.budget_mib << 20)
                .map(|v| ApiResponse::json(&v))
        }
        ("GET", ["operations"]) => Ok(ApiResponse::json(&api.operations().list())),
        ("GET", ["operations", id]) => operation_id(id)
            .and_then(|id| api.operations().get(id))
            .map(|v| ApiResponse::json(&v))
            .ok_or_else(|| ApiError::not_found(format!("no operation {id:?}"))),
        ("GET", ["stats"]) => Ok(ApiResponse::json(&api.stats())),
        ("GET", ["metrics"]) => Ok(ApiResponse {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: api.metrics(),
        }),
        (
            _,
            ["" | "boot-source" | "machine-config" | "actions" | "vm" | "vms" | "stats" | "metrics"
            | "reclaim" | "balloon" | "operations" | "budget"],
        ) => Err(not_allowed(method, path)),
        (_, ["operations", id]) if operation_id(id).is_some() => Err(not_allowed(method, path)),
        (_, ["drives", _]) => Err(not_allowed(method, path)),
        (_, ["balloon", "statistics"]) => Err(not_allowed(method, path)),
        (
            _,
            ["vms", name]
            | ["vms", name, "limits" | "compact" | "relocate" | "balloon" | "actions"]
            | ["vms", name, "balloon", "statistics"],
        ) if valid_vm_name(name) => Err(not_allowed(method, path)),
        _ => Err(ApiError::not_found(format!("no such resource: {path}"))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A backend that records every change it is asked to make.
    #[derive(Default)]
    pub(crate) struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        started: Mutex<bool>,
        ops: Operations,
        /// `GET /` panics (a bug in a request, for the `api` thread's
        /// tests) while this is set.
        pub(crate) panics: std::sync::atomic::AtomicBool,
    }

    impl Fake {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn record(&self, c: String) {
            self.calls.lock().unwrap().push(c);
        }
        /// Refuses a VM named other than `vm0`.
        fn vm(&self, vm: Option<&str>) -> Result<(), ApiError> {
            match vm {
                Some(n) if n != "vm0" => Err(ApiError::not_found(format!("no VM named {n:?}"))),
                _ => Ok(()),
            }
        }
    }

    impl ApiBackend for Fake {
        fn instance_info(&self) -> InstanceInfo {
            if self.panics.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("a bug in GET /");
            }
            InstanceInfo {
                app_name: "foliovm".into(),
                id: "vm0".into(),
                state: if *self.started.lock().unwrap() {
                    "Running"
                } else {
                    "Not started"
                }
                .into(),
                vmm_version: "0".into(),
            }
        }
        fn set_boot_source(&self, b: BootSourceBody) -> Result<(), ApiError> {
            if *self.started.lock().unwrap() {
                return Err(ApiError::bad("not after start"));
            }
            self.record(format!("boot {}", b.kernel_image_path));
            Ok(())
        }
        fn set_machine_config(&self, m: MachineConfigBody) -> Result<(), ApiError> {
            self.record(format!("machine {} {}", m.vcpu_count, m.mem_size_mib));
            Ok(())
        }
        fn machine_config(&self) -> MachineConfigBody {
            MachineConfigBody {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: false,
                track_dirty_pages: false,
                cpu_template: None,
                huge_pages: None,
            }
        }
        fn put_drive(&self, d: DriveSection) -> Result<(), ApiError> {
            self.record(format!("drive {} {}", d.drive_id, d.path_on_host.display()));
            Ok(())
        }
        fn put_balloon(&self, b: BalloonSection) -> Result<(), ApiError> {
            self.record(format!("balloon config {}", b.amount_mib));
            Ok(())
        }
        fn instance_start(&self) -> Result<(), ApiError> {
            *self.started.lock().unwrap() = true;
            self.record("start".into());
            Ok(())
        }
        fn send_ctrl_alt_del(&self, vm: Option<&str>) -> Result<(), ApiError> {
            if !*self.started.lock().unwrap() {
                return Err(ApiError::bad("the microVM has not been started"));
            }
            self.vm(vm)?;
            self.record(format!("ctrl-alt-del {vm:?}"));
            Ok(())
        }
        fn set_paused(&self, vm: Option<&str>, paused: bool) -> Result<(), ApiError> {
            match vm {
                Some(n) if n != "vm0" => Err(ApiError::not_found(format!("no VM named {n:?}"))),
                _ => {
                    self.record(format!("paused {paused}"));
                    Ok(())
                }
            }
        }
        fn set_balloon(&self, vm: Option<&str>, mib: u64) -> Result<(), ApiError> {
            self.vm(vm)?;
            self.record(format!("balloon {vm:?} {mib}"));
            Ok(())
        }
        fn balloon(&self, vm: Option<&str>, stats: bool) -> Result<serde_json::Value, ApiError> {
            self.vm(vm)?;
            match vm {
                None => Err(ApiError::bad("no balloon")),
                Some(_) => Ok(serde_json::json!({ "stats": stats })),
            }
        }
        fn set_limits(&self, vm: &str, l: LimitsBody) -> Result<(), ApiError> {
            if vm != "vm0" {
                return Err(ApiError::not_found(format!("no VM named {vm:?}")));
            }
            self.record(format!(
                "limits {} {:?} {}",
                l.mem_min_mib, l.mem_max_mib, l.priority
            ));
            Ok(())
        }
        fn reclaim(&self, vm: Option<&str>, bytes: u64) -> Result<Job, ApiError> {
            if vm.is_some_and(|v| v != "vm0") {
                return Err(ApiError::not_found("no such VM"));
            }
            let calls = self.calls.clone();
            // Frees half of what is asked, in two steps.
            Ok(Job::new("reclaim", "bytes", bytes, move |p| {
                calls.lock().unwrap().push(format!("reclaim {bytes}"));
                p.advance(bytes / 4);
                p.advance(bytes / 4);
                Ok(serde_json::json!({ "reclaimed_bytes": p.done() }))
            }))
        }
        fn operations(&self) -> &Operations {
            &self.ops
        }
        fn compact(&self, vm: &str) -> Result<Job, ApiError> {
            if vm != "vm0" {
                return Err(ApiError::not_found(format!("no VM named {vm:?}")));
            }
            let calls = self.calls.clone();
            Ok(Job::new("compact", "ranges", 2, move |p| {
                calls.lock().unwrap().push("compact".into());
                p.set_done(2);
                Ok(serde_json::json!({ "pmd_folios_after": 2 }))
            }))
        }
        fn relocate(&self, vm: &str, body: &RelocateBody) -> Result<serde_json::Value, ApiError> {
            if vm != "vm0" {
                return Err(ApiError::not_found(format!("no VM named {vm:?}")));
            }
            self.record(format!("relocate {:?}", body.op()?));
            Ok(serde_json::json!({ "tables": 1 }))
        }
        fn budget(&self) -> Result<serde_json::Value, ApiError> {
            Ok(serde_json::json!({"budget_bytes": 1u64 << 30, "max_budget_bytes": 1u64 << 30}))
        }
        fn set_budget(&self, bytes: u64) -> Result<serde_json::Value, ApiError> {
            if bytes > 1 << 30 {
                return Err(ApiError::bad("above the pool"));
            }
            self.record(format!("budget {bytes}"));
            Ok(serde_json::json!({"budget_bytes": bytes}))
        }
        fn budget_job(&self, bytes: u64) -> Result<Job, ApiError> {
            if bytes > 1 << 30 {
                return Err(ApiError::bad("above the pool"));
            }
            let calls = self.calls.clone();
            Ok(Job::new("budget", "bytes", 0, move |_| {
                calls.lock().unwrap().push(format!("budget {bytes}"));
                Ok(serde_json::json!({"budget_bytes": bytes}))
            }))
        }
        fn list_vms(&self) -> serde_json::Value {
            serde_json::json!([{"name": "vm0"}])
        }
        fn vm_info(&self, vm: &str) -> Result<serde_json::Value, ApiError> {
            if vm == "vm0" {
                Ok(serde_json::json!({"name": "vm0"}))
            } else {
                Err(ApiError::not_found(format!("no VM named {vm:?}")))
            }
        }
        fn stats(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn metrics(&self) -> String {
            "foliovm_up 1\n".into()
        }
    }

    fn fault(r: &ApiResponse) -> String {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn firecracker_sequence() {
        let f = Fake::default();
        let r = route(
            &f,
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        );
        assert_eq!(r.status, 204);
        let r = route(
            &f,
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false, "cpu_template": "T2"}"#,
        );
        assert_eq!(r.status, 204, "{}", r.body);
        let r = route(
            &f,
            "PUT",
            "/actions",
            br#"{"action_type": "InstanceStart"}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(f.calls()[..3], ["boot /k", "machine 2 1024", "start"]);
        let r = route(
            &f,
            "PUT",
            "/actions",
            br#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(f.calls()[3], "ctrl-alt-del None");
        let r = route(&f, "GET", "/", b"");
        assert!(r.body.contains("\"state\":\"Running\""), "{}", r.body);
        let r = route(
            &f,
            "PUT",
            "/vms/vm0/limits",
            br#"{"mem_min_mib": 64, "priority": -1}"#,
        );
        assert_eq!(r.status, 204, "{}", r.body);
        let r = route(&f, "PUT", "/reclaim", br#"{"mib": 8}"#);
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, r#"{"reclaimed_bytes":4194304}"#)
        );
        let r = route(&f, "PUT", "/budget", br#"{"budget_mib": 512}"#);
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, r#"{"budget_bytes":536870912}"#)
        );
        assert_eq!(
            f.calls().last().map(String::as_str),
            Some("budget 536870912")
        );
        let r = route(&f, "GET", "/budget", b"");
        assert_eq!(r.status, 200);
        let r = route(
            &f,
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k2"}"#,
        );
        assert_eq!((r.status, fault(&r).as_str()), (400, "not after start"));
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message_and_change_nothing() {
        let f = Fake::default();
        let cases: &[(&str, &str, &[u8], u16, &str)] = &[
            ("PUT", "/boot-source", b"", 400, "missing JSON"),
            ("PUT", "/boot-source", b"{", 400, "malformed"),
            (
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": 3}"#,
                400,
                "invalid type",
            ),
            (
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": "/k", "x": 1}"#,
                400,
                "unknown field",
            ),
            (
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": ""}"#,
                400,
                "must not be empty",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 0, "mem_size_mib": 1}"#,
                400,
                "vcpu_count 0",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
                400,
                "mem_size_mib 0",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 8, "smt": true}"#,
                400,
                "smt",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 8, "huge_pages": "1G"}"#,
                400,
                "huge_pages",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": -1, "mem_size_mib": 8}"#,
                400,
                "invalid value",
            ),
            (
                "PUT",
                "/actions",
                br#"{"action_type": "Reboot"}"#,
                400,
                "unknown action_type",
            ),
            (
                "PUT",
                "/actions",
                br#"{"action_type": "SendCtrlAltDel"}"#,
                400,
                "not been started",
            ),
            ("PATCH", "/vm", br#"{"state": "Sleeping"}"#, 400, "Paused"),
            (
                "PATCH",
                "/vms/other",
                br#"{"state": "Paused"}"#,
                404,
                "no VM named",
            ),
            ("GET", "/vms/other", b"", 404, "no VM named"),
            ("GET", "/vms/..%2f", b"", 404, "no such resource"),
            ("DELETE", "/boot-source", b"", 405, "not allowed"),
            ("GET", "/nope", b"", 404, "no such resource"),
            (
                "PUT",
                "/vms/vm0/limits",
                br#"{"mem_min_mib": 64, "mem_max_mib": 32}"#,
                400,
                "at least mem_min",
            ),
            (
                "PUT",
                "/vms/vm0/limits",
                br#"{"mem_min_mib": -1}"#,
                400,
                "invalid value",
            ),
            (
                "PUT",
                "/vms/vm0/limits",
                br#"{"min": 1}"#,
                400,
                "unknown field",
            ),
            (
                "PUT",
                "/vms/zz/limits",
                br#"{"mem_min_mib": 1}"#,
                404,
                "no VM named",
            ),
            ("GET", "/vms/vm0/limits", b"", 405, "not allowed"),
            ("PUT", "/reclaim", br#"{"mib": 0}"#, 400, "out of range"),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 0}"#,
                400,
                "out of range",
            ),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 16777217}"#,
                400,
                "out of range",
            ),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 4096}"#,
                400,
                "above the pool",
            ),
            ("PUT", "/budget", br#"{"mib": 64}"#, 400, "unknown field"),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": "1G"}"#,
                400,
                "invalid type",
            ),
            (
                "PATCH",
                "/budget",
                br#"{"budget_mib": 64}"#,
                405,
                "not allowed",
            ),
            (
                "PATCH",
                "/balloon",
                br#"{"amount": 3}"#,
                400,
                "unknown field",
            ),
            (
                "PATCH",
                "/balloon",
                br#"{"amount_mib": 99999999999}"#,
                400,
                "out of range",
            ),
            ("GET", "/balloon", b"", 400, "no balloon"),
            (
                "PUT",
                "/reclaim",
                br#"{"vm": "a b", "mib": 1}"#,
                400,
                "invalid VM name",
            ),
            (
                "PUT",
                "/reclaim",
                br#"{"vm": "zz", "mib": 1}"#,
                404,
                "no such VM",
            ),
            ("PUT", "/vms/vm0/relocate", b"{}", 400, "exactly one"),
            (
                "PUT",
                "/vms/vm0/relocate",
                br#"{"to_aligned": true, "grow_mib": 8}"#,
                400,
                "exactly one",
            ),
            (
                "PUT",
                "/vms/vm0/relocate",
                br#"{"grow_mib": 0}"#,
                400,
                "out of range",
            ),
            (
                "PUT",
                "/vms/vm0/relocate",
                br#"{"to_aligned": true, "region": 0}"#,
                400,
                "unknown field",
            ),
            (
                "PUT",
                "/vms/zz/relocate",
                br#"{"to_aligned": true}"#,
                404,
                "no VM named",
            ),
            ("GET", "/vms/vm0/relocate", b"", 405, "not allowed"),
            (
                "PUT",
                "/vms/vm0/compact",
                br#"{"sync": 1}"#,
                400,
                "unknown field",
            ),
            ("PUT", "/vms/zz/compact", b"", 404, "no VM named"),
        ];
        for (m, p, b, status, want) in cases {
            let r = route(&f, m, p, b);
            assert_eq!(r.status, *status, "{m} {p}: {}", r.body);
            assert!(fault(&r).contains(want), "{m} {p}: {}", r.body);
        }
        assert!(f.calls().is_empty(), "{:?}", f.calls());
        let big = vec![b' '; MAX_BODY + 1];
        assert_eq!(route(&f, "PUT", "/boot-source", &big).status, 413);
    }

    /// A refused field is named: serde's "invalid type" and "invalid
    /// value" say only where (line and column), the limits' range check
    /// said "limits", and a bad `vm` "invalid VM name"; `PUT /balloon`
    /// took any `amount_mib` that `PATCH` refuses (found by the seeded
    /// route test).
    #[test]
    fn a_refused_field_is_named() {
        let f = Fake::default();
        for (m, p, b, want) in [
            (
                "PUT",
                "/boot-source",
                &br#"{"kernel_image_path": "/k", "initrd_path": false}"#[..],
                "initrd_path: invalid type",
            ),
            (
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": [1, 2]}"#,
                "mem_size_mib: invalid type",
            ),
            ("PUT", "/reclaim", br#"{"mib": -1}"#, "mib: invalid value"),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 1e308}"#,
                "budget_mib: invalid type",
            ),
            (
                "PUT",
                "/vms/vm0/limits",
                br#"{"mem_max_mib": 18446744073709551615}"#,
                "mem_max_mib 18446744073709551615 is out of range",
            ),
            (
                "PUT",
                "/vms/vm0/limits",
                br#"{"mem_min_mib": 16777217}"#,
                "mem_min_mib 16777217 is out of range",
            ),
            (
                "PUT",
                "/reclaim",
                br#"{"vm": "a b", "mib": 1}"#,
                "vm \"a b\": invalid VM name",
            ),
            (
                "PUT",
                "/balloon",
                br#"{"amount_mib": 18446744073709551615, "deflate_on_oom": true}"#,
                "amount_mib 18446744073709551615 is out of range",
            ),
        ] {
            let r = route(&f, m, p, b);
            assert_eq!(r.status, 400, "{m} {p}: {}", r.body);
            assert!(fault(&r).contains(want), "{m} {p}: {}", r.body);
        }
        assert!(f.calls().is_empty(), "{:?}", f.calls());
    }

    #[test]
    fn compact_and_relocate_reach_the_backend() {
        let f = Fake::default();
        let r = route(&f, "PUT", "/vms/vm0/compact", b"");
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, r#"{"pmd_folios_after":2}"#)
        );
        let r = route(&f, "PUT", "/vms/vm0/compact", br#"{"async": true}"#);
        assert_eq!(r.status, 202, "{}", r.body);
        let r = route(&f, "PUT", "/vms/vm0/relocate", br#"{"to_aligned": true}"#);
        assert_eq!(r.status, 200, "{}", r.body);
        let r = route(
            &f,
            "PUT",
            "/vms/vm0/relocate",
            br#"{"region_gpa": 0, "merge_with_gpa": 4294967296}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let r = route(&f, "PUT", "/vms/vm0/relocate", br#"{"grow_mib": 64}"#);
        assert_eq!(r.status, 200, "{}", r.body);
        let calls = f.calls();
        assert_eq!(&calls[0], "compact");
        assert_eq!(
            &calls[calls.len() - 3..],
            [
                "relocate ToAligned",
                "relocate MergeWith(GuestAddress(4294967296))",
                "relocate Grow(67108864)"
            ]
        );
    }

    /// `GET /operations/{id}` until the operation is no longer running
    /// (at most 5 s); its last state.
    fn follow_operation(f: &Fake, id: u64) -> serde_json::Value {
        let mut op = serde_json::Value::Null;
        for _ in 0..500 {
            let r = route(f, "GET", &format!("/operations/{id}"), b"");
            assert_eq!(r.status, 200, "{}", r.body);
            op = serde_json::from_str(&r.body).unwrap();
            if op["state"] != "running" {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        op
    }

    #[test]
    fn async_reclaim_answers_202_and_is_followed_to_its_result() {
        let f = Fake::default();
        let r = route(&f, "PUT", "/reclaim", br#"{"mib": 8, "async": true}"#);
        assert_eq!(r.status, 202, "{}", r.body);
        let op: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            (op["id"].as_u64(), op["kind"].as_str()),
            (Some(1), Some("reclaim"))
        );
        assert_eq!(op["progress"]["total"], 8 << 20);
        assert_eq!(op["progress"]["unit"], "bytes");
        let done = follow_operation(&f, 1);
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(done["result"]["reclaimed_bytes"], 4 << 20);
        assert_eq!(done["progress"]["done"], 4 << 20);
        assert_eq!(f.calls(), ["reclaim 8388608"]);
        let list = route(&f, "GET", "/operations", b"");
        let list: serde_json::Value = serde_json::from_str(&list.body).unwrap();
        assert_eq!(list.as_array().map(Vec::len), Some(1));
        assert_eq!(list[0]["id"], 1);
        // Without "async" the same request answers when done.
        let r = route(&f, "PUT", "/reclaim", br#"{"mib": 2, "async": false}"#);
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, r#"{"reclaimed_bytes":1048576}"#)
        );
    }

    #[test]
    fn an_async_budget_change_is_an_operation_with_the_same_result() {
        let f = Fake::default();
        let r = route(
            &f,
            "PUT",
            "/budget",
            br#"{"budget_mib": 512, "async": true}"#,
        );
        assert_eq!(r.status, 202, "{}", r.body);
        let op: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(op["kind"], "budget", "{op}");
        let done = follow_operation(&f, op["id"].as_u64().unwrap());
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(
            done["result"],
            serde_json::json!({"budget_bytes": 512u64 << 20})
        );
        assert_eq!(f.calls(), ["budget 536870912"]);
    }

    #[test]
    fn bad_operation_requests_change_nothing() {
        let f = Fake::default();
        let cases: &[(&str, &str, &[u8], u16, &str)] = &[
            ("GET", "/operations/1", b"", 404, "no operation"),
            ("GET", "/operations/01", b"", 404, "no operation"),
            ("GET", "/operations/x", b"", 404, "no operation"),
            (
                "GET",
                "/operations/99999999999999999999",
                b"",
                404,
                "no operation",
            ),
            ("DELETE", "/operations/1", b"", 405, "not allowed"),
            ("PUT", "/operations", b"{}", 405, "not allowed"),
            (
                "PUT",
                "/reclaim",
                br#"{"mib": 8, "async": "yes"}"#,
                400,
                "invalid type",
            ),
            (
                "PUT",
                "/reclaim",
                br#"{"mib": 8, "async": true, "x": 1}"#,
                400,
                "unknown field",
            ),
            (
                "PUT",
                "/reclaim",
                br#"{"vm": "zz", "mib": 8, "async": true}"#,
                404,
                "no such VM",
            ),
            (
                "PUT",
                "/reclaim",
                br#"{"mib": 0, "async": true}"#,
                400,
                "out of range",
            ),
            // A budget is refused before an operation starts, as without
            // "async".
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 0, "async": true}"#,
                400,
                "out of range",
            ),
            (
                "PUT",
                "/budget",
                br#"{"budget_mib": 4096, "async": true}"#,
                400,
                "above the pool",
            ),
        ];
        for (m, p, b, status, want) in cases {
            let r = route(&f, m, p, b);
            assert_eq!(r.status, *status, "{m} {p}: {}", r.body);
            assert!(fault(&r).contains(want), "{m} {p}: {}", r.body);
        }
        assert!(f.calls().is_empty(), "{:?}", f.calls());
        assert_eq!(route(&f, "GET", "/operations", b"").body, "[]");
    }

    #[test]
    fn metrics_are_text() {
        let f = Fake::default();
        let r = route(&f, "GET", "/metrics", b"");
        assert_eq!(
            (r.status, r.content_type),
            (200, "text/plain; version=0.0.4")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Arbitrary requests never panic, always answer with a known status,
        /// and an error never changes anything.
        #[test]
        fn arbitrary_requests_are_answered_safely(
            method in proptest::sample::select(vec!["GET", "PUT", "PATCH", "POST", "DELETE", "X"]),
            path in "(/[a-z0-9._-]{0,12}){0,3}",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let f = Fake::default();
            let r = route(&f, method, &path, &body);
            proptest::prop_assert!([200u16, 204, 400, 404, 405, 413].contains(&r.status), "{}", r.status);
            proptest::prop_assert!(f.ops.list() == serde_json::json!([]), "no operation from a bad request");
            if r.status >= 400 {
                proptest::prop_assert!(f.calls().is_empty());
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                proptest::prop_assert!(v["fault_message"].is_string());
            }
        }

        /// Well-formed JSON with arbitrary machine-config values is either
        /// accepted within range or rejected with a 400.
        #[test]
        fn machine_config_ranges(vcpus in 0u32..400, mib in 0u64..(1 << 25)) {
            let f = Fake::default();
            let body = format!(r#"{{"vcpu_count": {vcpus}, "mem_size_mib": {mib}}}"#);
            let r = route(&f, "PUT", "/machine-config", body.as_bytes());
            let ok = (1..=254).contains(&vcpus) && (1..=(1 << 24)).contains(&mib);
            proptest::prop_assert_eq!(r.status, if ok { 204 } else { 400 });
        }
    }

    /// In a run of several VMs, each VM's balloon and Ctrl+Alt+Del are
    /// reached under `/vms/{name}` (the paths without a name act on the
    /// only VM of a run of one).
    #[test]
    fn balloon_and_ctrl_alt_del_of_a_named_vm() {
        let f = Fake::default();
        *f.started.lock().unwrap() = true;
        let r = route(&f, "PATCH", "/vms/vm0/balloon", br#"{"amount_mib": 4}"#);
        assert_eq!(r.status, 204, "{}", r.body);
        let r = route(&f, "GET", "/vms/vm0/balloon", b"");
        assert_eq!((r.status, r.body.as_str()), (200, r#"{"stats":false}"#));
        let r = route(&f, "GET", "/vms/vm0/balloon/statistics", b"");
        assert_eq!((r.status, r.body.as_str()), (200, r#"{"stats":true}"#));
        let r = route(
            &f,
            "PUT",
            "/vms/vm0/actions",
            br#"{"action_type": "SendCtrlAltDel"}"#,
        );
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(
            f.calls(),
            ["balloon Some(\"vm0\") 4", "ctrl-alt-del Some(\"vm0\")"]
        );
        for (method, path, body, status, want) in [
            (
                "PATCH",
                "/vms/zz/balloon",
                &br#"{"amount_mib": 4}"#[..],
                404,
                "no VM named",
            ),
            ("GET", "/vms/zz/balloon/statistics", b"", 404, "no VM named"),
            (
                "PUT",
                "/vms/zz/actions",
                br#"{"action_type": "SendCtrlAltDel"}"#,
                404,
                "no VM named",
            ),
            (
                "PATCH",
                "/vms/vm0/balloon",
                br#"{"amount_mib": 99999999999}"#,
                400,
                "out of range",
            ),
            (
                "PATCH",
                "/vms/vm0/balloon",
                br#"{"amount": 3}"#,
                400,
                "unknown field",
            ),
            (
                "PUT",
                "/vms/vm0/actions",
                br#"{"action_type": "InstanceStart"}"#,
                400,
                "does not act on one VM",
            ),
            ("PUT", "/vms/vm0/balloon", b"{}", 405, "not allowed"),
            (
                "PATCH",
                "/vms/vm0/balloon/statistics",
                b"{}",
                405,
                "not allowed",
            ),
            ("GET", "/vms/vm0/actions", b"", 405, "not allowed"),
        ] {
            let r = route(&f, method, path, body);
            assert_eq!(r.status, status, "{method} {path}: {}", r.body);
            assert!(r.body.contains(want), "{method} {path}: {}", r.body);
        }
        assert_eq!(f.calls().len(), 2, "nothing else reached the backend");
    }

    /// Firecracker's pre-boot device calls: `PUT /drives/{drive_id}` (the
    /// id of the path and of the body must agree) and `PUT /balloon`.
    #[test]
    fn drives_and_the_balloon_are_configured_by_put() {
        let f = Fake::default();
        let drive = br#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true, "is_read_only": false}"#;
        let r = route(&f, "PUT", "/drives/rootfs", drive);
        assert_eq!(r.status, 204, "{}", r.body);
        let r = route(
            &f,
            "PUT",
            "/balloon",
            br#"{"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        );
        assert_eq!(r.status, 204, "{}", r.body);
        assert_eq!(f.calls(), ["drive rootfs /img", "balloon config 8"]);
        for (method, path, body, status, want) in [
            ("PUT", "/drives/other", &drive[..], 400, "of the path"),
            (
                "PUT",
                "/drives/rootfs",
                br#"{"drive_id": "rootfs", "path_on_host": "/img"}"#,
                400,
                "missing field",
            ),
            (
                "PUT",
                "/drives/rootfs",
                br#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true, "is_read_only": false, "x": 1}"#,
                400,
                "unknown field",
            ),
            ("PUT", "/balloon", br#"{"amount_mib": 8}"#, 400, "missing field"),
            ("GET", "/drives/rootfs", b"", 405, "not allowed"),
            ("PATCH", "/drives/rootfs", b"{}", 405, "not allowed"),
        ] {
            let r = route(&f, method, path, body);
            assert_eq!(r.status, status, "{method} {path}: {}", r.body);
            assert!(r.body.contains(want), "{method} {path}: {}", r.body);
        }
        assert_eq!(f.calls().len(), 2, "nothing else reached the backend");
    }

    // ---- Seeded hostile bodies, methods and names -------------------------

    use devices::testing::{for_each_seed, Rng};
    use serde_json::{json, Value};

    const ROUTE_SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 0x5eed_7047];
    const ROUTE_CASES: usize = 1000;
    const MIB_MAX: u64 = 1 << 24;

    /// What a field of a body takes.
    #[derive(Clone, Copy)]
    enum Kind {
        /// An unsigned number in this range.
        U(u64, u64),
        /// A signed 32-bit number.
        I32,
        /// A boolean; `Some(b)`: only `b` is accepted.
        Bool(Option<bool>),
        /// One of these strings (any non-empty one if none).
        Str(&'static [&'static str]),
        /// Any JSON value (accepted and ignored).
        Any,
    }

    #[derive(Clone, Copy)]
    struct Field {
        name: &'static str,
        kind: Kind,
        required: bool,
        /// `null` is accepted (an `Option`).
        nullable: bool,
    }

    const fn f(name: &'static str, kind: Kind, required: bool, nullable: bool) -> Field {
        Field {
            name,
            kind,
            required,
            nullable,
        }
    }

    /// The routes that take a body: method, path (`{}`: a VM's name or a
    /// drive's id) and fields.
    fn schemas() -> Vec<(&'static str, &'static str, Vec<Field>)> {
        use Kind::*;
        vec![
            (
                "PUT",
                "/boot-source",
                vec![
                    f("kernel_image_path", Str(&[]), true, false),
                    f("boot_args", Str(&[]), false, true),
                    f("initrd_path", Str(&[]), false, true),
                ],
            ),
            (
                "PUT",
                "/machine-config",
                vec![
                    f("vcpu_count", U(1, 254), true, false),
                    f("mem_size_mib", U(1, MIB_MAX), true, false),
                    f("smt", Bool(Some(false)), false, false),
                    f("track_dirty_pages", Bool(Some(false)), false, false),
                    f("cpu_template", Any, false, true),
                    f("huge_pages", Str(&["None", "2M"]), false, true),
                ],
            ),
            (
                "PUT",
                "/drives/{}",
                vec![
                    f("drive_id", Str(&[]), true, false),
                    f("path_on_host", Str(&[]), true, false),
                    f("is_root_device", Bool(None), true, false),
                    f("is_read_only", Bool(None), true, false),
                    f("io_engine", Str(&[]), false, true),
                    f("cache_type", Str(&[]), false, true),
                    f("rate_limiter", Any, false, true),
                ],
            ),
            (
                "PUT",
                "/balloon",
                vec![
                    f("amount_mib", U(0, MIB_MAX), true, false),
                    f("deflate_on_oom", Bool(None), true, false),
                    f(
                        "stats_polling_interval_s",
                        U(0, u32::MAX as u64),
                        false,
                        false,
                    ),
                    f("free_page_reporting", Bool(None), false, true),
                ],
            ),
            (
                "PUT",
                "/actions",
                vec![f(
                    "action_type",
                    Str(&["InstanceStart", "FlushMetrics"]),
                    true,
                    false,
                )],
            ),
            (
                "PUT",
                "/vms/{}/actions",
                vec![f("action_type", Str(&["SendCtrlAltDel"]), true, false)],
            ),
            (
                "PATCH",
                "/vm",
                vec![f("state", Str(&["Paused", "Resumed"]), true, false)],
            ),
            (
                "PATCH",
                "/vms/{}",
                vec![f("state", Str(&["Paused", "Resumed"]), true, false)],
            ),
            (
                "PATCH",
                "/balloon",
                vec![f("amount_mib", U(0, MIB_MAX), true, false)],
            ),
            (
                "PATCH",
                "/vms/{}/balloon",
                vec![f("amount_mib", U(0, MIB_MAX), true, false)],
            ),
            (
                "PUT",
                "/vms/{}/limits",
                vec![
                    f("mem_min_mib", U(0, MIB_MAX), false, false),
                    f("mem_max_mib", U(2, MIB_MAX), false, true),
                    f("priority", I32, false, false),
                ],
            ),
            (
                "PUT",
                "/vms/{}/compact",
                vec![f("async", Bool(Some(false)), false, false)],
            ),
            (
                "PUT",
                "/vms/{}/relocate",
                vec![
                    f("region_gpa", U(0, u64::MAX), false, false),
                    f("grow_mib", U(1, MIB_MAX), false, true),
                ],
            ),
            (
                "PUT",
                "/reclaim",
                vec![
                    f("vm", Str(&["vm0"]), false, true),
                    f("mib", U(1, MIB_MAX), true, false),
                    f("async", Bool(Some(false)), false, false),
                ],
            ),
            (
                "PUT",
                "/budget",
                vec![
                    f("budget_mib", U(1, MIB_MAX), true, false),
                    f("async", Bool(Some(false)), false, false),
                ],
            ),
        ]
    }

    /// A valid value of `kind`.
    fn valid(rng: &mut Rng, kind: Kind) -> Value {
        match kind {
            Kind::U(lo, hi) => {
                let span = hi - lo;
                let off = match rng.below(3) {
                    0 => 0,
                    1 => span,
                    _ => rng.next_u64() % span.saturating_add(1).max(1),
                };
                json!(lo + off.min(span))
            }
            Kind::I32 => json!(rng.pick(&[i32::MIN, -1, 0, 1, i32::MAX])),
            Kind::Bool(Some(b)) => json!(b),
            Kind::Bool(None) => json!(rng.one_in(2)),
            Kind::Str(&[]) => json!(rng.pick(&["/k", "a b", "\u{e9}\u{0}", "x"])),
            Kind::Str(xs) => json!(rng.pick(xs)),
            Kind::Any => rng.pick(&[json!(null), json!("T2"), json!({"a": [1]})]),
        }
    }

    /// A value `field` refuses, none of which could be read as another.
    fn invalid(rng: &mut Rng, field: &Field) -> Option<Value> {
        let mut bad = vec![json!({"a": [1, {"b": null}]}), json!([1, 2])];
        if !field.nullable {
            bad.push(Value::Null);
        }
        match field.kind {
            Kind::U(lo, hi) => {
                bad.extend([json!("1"), json!(true), json!(-1), json!(1.5), json!(1e308)]);
                if hi < u64::MAX {
                    bad.extend([json!(hi + 1), json!(u64::MAX)]);
                }
                if lo > 0 {
                    bad.push(json!(lo - 1));
                }
            }
            Kind::I32 => bad.extend([
                json!("1"),
                json!(1u64 << 31),
                json!(-(1i64 << 32)),
                json!(0.5),
            ]),
            Kind::Bool(only) => {
                bad.extend([json!(1), json!("true")]);
                // `async` is valid either way; valid bodies run now.
                if let Some(b) = only.filter(|_| field.name != "async") {
                    bad.push(json!(!b));
                }
            }
            Kind::Str(xs) => {
                bad.extend([json!(1), json!(false)]);
                match xs {
                    [] if field.name == "kernel_image_path" => bad.push(json!("")),
                    [] => {}
                    // A VM name nothing could have.
                    _ if field.name == "vm" => {
                        bad.extend([json!(""), json!("a b"), json!("x".repeat(100))])
                    }
                    _ => bad.extend([json!(""), json!("paused"), json!("x".repeat(100))]),
                }
            }
            Kind::Any => return None,
        }
        Some(rng.pick(&bad))
    }

    /// `fields` as a JSON object text, keys in order (so that a duplicate
    /// can be written).
    fn object(fields: &[(String, Value)]) -> String {
        let inner: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}: {v}", Value::from(k.as_str())))
            .collect();
        format!("{{{}}}", inner.join(", "))
    }

    /// A valid body of a route's fields, as (name, value) pairs.
    fn valid_body(rng: &mut Rng, path: &str, fields: &[Field], name: &str) -> Vec<(String, Value)> {
        let mut body: Vec<(String, Value)> = Vec::new();
        for f in fields {
            if f.required || rng.one_in(2) {
                body.push((f.name.to_string(), valid(rng, f.kind)));
            }
        }
        let set = |body: &mut Vec<(String, Value)>, k: &str, v: Value| {
            body.retain(|(n, _)| n != k);
            body.push((k.to_string(), v));
        };
        match path {
            "/drives/{}" => set(&mut body, "drive_id", json!(name)),
            "/vms/{}/limits" => {
                // mem_max_mib at least 2 and at least mem_min_mib.
                let min = body
                    .iter()
                    .find(|(k, _)| k == "mem_min_mib")
                    .and_then(|(_, v)| v.as_u64())
                    .unwrap_or(0);
                if body.iter().any(|(k, _)| k == "mem_max_mib") {
                    let max = min.max(2) + rng.next_u64() % (MIB_MAX - min.max(2) + 1);
                    set(&mut body, "mem_max_mib", json!(max));
                }
            }
            "/vms/{}/relocate" => {
                // Exactly one operation.
                body.retain(|(k, _)| k == "region_gpa");
                match rng.below(3) {
                    0 => body.push(("to_aligned".into(), json!(true))),
                    1 => body.push(("merge_with_gpa".into(), json!(rng.next_u64()))),
                    _ => body.push(("grow_mib".into(), json!(1 + rng.next_u64() % MIB_MAX))),
                }
            }
            _ => {}
        }
        body
    }

    /// The backend call a valid body makes on the fake, if it records one.
    fn expected_call(method: &str, path: &str, body: &[(String, Value)]) -> Option<String> {
        let get = |k: &str| body.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let u = |k: &str| get(k).and_then(|v| v.as_u64());
        let s = |k: &str| get(k).and_then(|v| v.as_str().map(String::from));
        Some(match (method, path) {
            ("PUT", "/boot-source") => format!("boot {}", s("kernel_image_path")?),
            ("PUT", "/machine-config") => {
                format!("machine {} {}", u("vcpu_count")?, u("mem_size_mib")?)
            }
            ("PUT", "/drives/{}") => format!("drive {} {}", s("drive_id")?, s("path_on_host")?),
            ("PUT", "/balloon") => format!("balloon config {}", u("amount_mib")?),
            ("PUT", "/actions") if s("action_type")? == "InstanceStart" => "start".into(),
            ("PATCH", "/vm" | "/vms/{}") => format!("paused {}", s("state")? == "Paused"),
            ("PATCH", "/balloon") => format!("balloon None {}", u("amount_mib")?),
            ("PATCH", "/vms/{}/balloon") => format!("balloon Some(\"vm0\") {}", u("amount_mib")?),
            ("PUT", "/vms/{}/limits") => format!(
                "limits {} {:?} {}",
                u("mem_min_mib").unwrap_or(0),
                u("mem_max_mib"),
                get("priority").and_then(|v| v.as_i64()).unwrap_or(0)
            ),
            ("PUT", "/vms/{}/compact") => "compact".into(),
            ("PUT", "/vms/{}/relocate") => {
                match (get("to_aligned"), u("merge_with_gpa"), u("grow_mib")) {
                    (Some(_), _, _) => "relocate ToAligned".into(),
                    (_, Some(g), _) => format!("relocate MergeWith(GuestAddress({g}))"),
                    (_, _, Some(m)) => format!("relocate Grow({})", m << 20),
                    _ => return None,
                }
            }
            ("PUT", "/reclaim") => format!("reclaim {}", u("mib")? << 20),
            ("PUT", "/budget") => format!("budget {}", u("budget_mib")? << 20),
            _ => return None,
        })
    }

    /// A request's answer: a known status, a JSON fault with a message for
    /// an error, and never a 5xx.
    fn answered(f: &Fake, method: &str, path: &str, body: &[u8], what: &str) -> (u16, String) {
        let r = route(f, method, path, body);
        assert!(
            [200, 202, 204, 400, 404, 405, 413, 429].contains(&r.status),
            "{what}: {} {}",
            r.status,
            r.body
        );
        if r.status >= 400 {
            let v: Value =
                serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{what}: {e}: {}", r.body));
            let m = v["fault_message"].as_str().unwrap_or_default().to_string();
            assert!(!m.trim().is_empty(), "{what}: no message: {}", r.body);
            return (r.status, m);
        }
        (r.status, r.body)
    }

    /// Valid bodies reach the backend with their values, unchanged; a body
    /// with one field made invalid (a wrong type, null, negative, a
    /// fraction, 2^64-1, 1e308, out of range), missing, unknown or given
    /// twice is a 400 that names the field, and reaches nothing.
    #[test]
    fn bodies_with_one_bad_field_are_refused_naming_it() {
        for_each_seed("route bodies", &ROUTE_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            let schemas = schemas();
            for case in 0..ROUTE_CASES {
                let (method, tpl, fields) = &schemas[rng.below(schemas.len())];
                let name = if tpl.starts_with("/drives") {
                    "rootfs"
                } else {
                    "vm0"
                };
                let path = tpl.replace("{}", name);
                let mut body = valid_body(&mut rng, tpl, fields, name);
                let f = Fake::default();
                let what = |b: &str| format!("case {case}: {method} {path} {b}");
                if rng.one_in(4) {
                    let text = object(&body);
                    let (status, out) = answered(&f, method, &path, text.as_bytes(), &what(&text));
                    match expected_call(method, tpl, &body) {
                        // The fake's pool is 1 GiB.
                        Some(call)
                            if call.starts_with("budget ") && out.contains("above the pool") =>
                        {
                            assert!(
                                call["budget ".len()..].parse::<u64>().unwrap() > 1 << 30,
                                "{}",
                                what(&text)
                            );
                        }
                        Some(call) => {
                            assert!(status < 300, "{}: {status} {out}", what(&text));
                            assert_eq!(f.calls(), [call], "{}", what(&text));
                        }
                        None => assert!(f.calls().is_empty(), "{}: {:?}", what(&text), f.calls()),
                    }
                    continue;
                }
                // One field made bad.
                let field = fields[rng.below(fields.len())];
                let named = field.name;
                match rng.below(4) {
                    0 if field.required => body.retain(|(k, _)| k != named),
                    1 => {
                        let v = valid(&mut rng, field.kind);
                        body.push((named.to_string(), v));
                        if body.iter().filter(|(k, _)| k == named).count() < 2 {
                            body.push((named.to_string(), json!(null)));
                        }
                    }
                    2 => {
                        let at = rng.below(body.len() + 1);
                        let v = valid(&mut rng, Kind::Any);
                        body.insert(at, ("mem_size".into(), v));
                    }
                    _ => {
                        let Some(v) = invalid(&mut rng, &field) else {
                            continue;
                        };
                        body.retain(|(k, _)| k != named);
                        let at = rng.below(body.len() + 1);
                        body.insert(at, (named.to_string(), v));
                    }
                }
                let text = object(&body);
                let named = if text.contains("\"mem_size\"") {
                    "mem_size"
                } else {
                    named
                };
                let (status, m) = answered(&f, method, &path, text.as_bytes(), &what(&text));
                assert_eq!(status, 400, "{}: {m}", what(&text));
                assert!(
                    m.contains(named),
                    "{}: {m:?} does not name {named}",
                    what(&text)
                );
                assert!(f.calls().is_empty(), "{}: {:?}", what(&text), f.calls());
            }
        });
    }

    /// The methods each known path takes (`{}`: a valid VM name).
    const PATHS: &[(&str, &[&str])] = &[
        ("/", &["GET"]),
        ("/boot-source", &["PUT"]),
        ("/machine-config", &["PUT", "GET"]),
        ("/drives/{}", &["PUT"]),
        ("/balloon", &["PUT", "PATCH", "GET"]),
        ("/balloon/statistics", &["GET"]),
        ("/actions", &["PUT"]),
        ("/vm", &["PATCH"]),
        ("/vms", &["GET"]),
        ("/vms/{}", &["GET", "PATCH"]),
        ("/vms/{}/limits", &["PUT"]),
        ("/vms/{}/compact", &["PUT"]),
        ("/vms/{}/relocate", &["PUT"]),
        ("/vms/{}/balloon", &["PATCH", "GET"]),
        ("/vms/{}/balloon/statistics", &["GET"]),
        ("/vms/{}/actions", &["PUT"]),
        ("/reclaim", &["PUT"]),
        ("/budget", &["GET", "PUT"]),
        ("/operations", &["GET"]),
        ("/operations/1", &["GET"]),
        ("/stats", &["GET"]),
        ("/metrics", &["GET"]),
    ];

    /// Random methods on every path, with VM names valid, unknown and
    /// hostile, and bodies that are no request (empty, not JSON, nested
    /// past serde's depth, trailing bytes): a method a path does not take
    /// is 405, a path that names nothing 404, and a body 400 with a
    /// message; nothing reaches the backend but what a path with no body
    /// reads.
    #[test]
    fn methods_names_and_garbage_bodies_are_answered_safely() {
        for_each_seed("route methods", &ROUTE_SEEDS, |seed| {
            let mut rng = Rng::new(seed);
            for case in 0..ROUTE_CASES {
                let (tpl, allowed) = PATHS[rng.below(PATHS.len())];
                let method = rng.pick(&["GET", "PUT", "PATCH", "POST", "DELETE", "get", ""]);
                let name = rng.pick(&[
                    "vm0".to_string(),
                    "zz".into(),
                    "..".into(),
                    "a b".into(),
                    "%2e%2e".into(),
                    "".into(),
                    "x".repeat(65),
                    "\u{e9}".into(),
                    "vm0/..".into(),
                ]);
                let path = tpl.replace("{}", &name) + rng.pick(&["", "/", "?x=1"]);
                let body: Vec<u8> = match rng.below(6) {
                    0 => Vec::new(),
                    1 => (0..rng.below(100)).map(|_| rng.next_u64() as u8).collect(),
                    2 => "[".repeat(10_000).into_bytes(),
                    3 => format!("{{\"a\": {}1{}}}", "[".repeat(200), "]".repeat(200)).into_bytes(),
                    4 => b"{} {}".to_vec(),
                    _ => b"{\"state\": \"Paused\"} x".to_vec(),
                };
                let f = Fake::default();
                let what = format!(
                    "case {case}: {method} {path} {}",
                    String::from_utf8_lossy(&body[..body.len().min(60)])
                );
                let (status, m) = answered(&f, method, &path, &body, &what);
                let named = tpl.contains("{}");
                // A drive's id is any one path segment.
                let valid_name = match tpl.starts_with("/drives") {
                    true => !name.is_empty() && !name.contains('/'),
                    false => crate::config::valid_vm_name(&name),
                };
                if named && name.is_empty() {
                    // `/vms/` is `/vms`; `/vms//limits` names nothing.
                    assert!(
                        [400, 404, 405].contains(&status) || status < 300,
                        "{what}: {m}"
                    );
                } else if named && !valid_name {
                    assert_eq!(status, 404, "{what}: {m}");
                } else if !allowed.contains(&method) {
                    assert_eq!(status, 405, "{what}: {m}");
                } else if ["PUT", "PATCH"].contains(&method)
                    && !(tpl == "/vms/{}/compact" && body.is_empty())
                {
                    // No body here is a request: refused as such, or the
                    // VM named is not there.
                    assert!(
                        status == 400 || (status == 404 && name != "vm0"),
                        "{what}: {status} {m}"
                    );
                }
                if status >= 400 {
                    assert!(f.calls().is_empty(), "{what}: {:?}", f.calls());
                }
            }
        });
    }
}
