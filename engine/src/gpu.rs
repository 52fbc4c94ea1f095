//! GPU discovery through the CUDA driver API (cudarc, loaded at run time) and NVML
//! (nvml-wrapper, also loaded at run time) for utilisation and temperature. A machine
//! without the NVIDIA driver is CPU-only and says so; nothing here may panic on one.
//!
//! One of the two modules of the workspace allowed `unsafe` (with `kernels`): cudarc's
//! check for the driver library is an `unsafe fn`.
#![allow(unsafe_code)]

use serde::Serialize;

/// A GPU found on this machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectedGpu {
    /// The CUDA device ordinal.
    pub index: u32,
    pub name: String,
    pub memory_total_mib: u64,
    /// Free memory when discovery ran (the CUDA driver's, else NVML's).
    pub memory_free_mib: Option<u64>,
    pub compute_capability: Option<(i32, i32)>,
    /// GPU utilisation in percent, from NVML when it is present.
    pub utilization_percent: Option<u32>,
    pub temperature_celsius: Option<u32>,
}

/// Whether the NVIDIA driver is there, and what it found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DriverStatus {
    /// No CUDA driver library on this machine: CPU only.
    Absent,
    /// The driver library is there but could not be used (no device node, a version
    /// mismatch, ...).
    Failed {
        reason: String,
    },
    Present {
        devices: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuDiscovery {
    pub driver: DriverStatus,
    pub gpus: Vec<DetectedGpu>,
}

impl GpuDiscovery {
    /// One line for the node's log.
    pub fn summary(&self) -> String {
        match &self.driver {
            DriverStatus::Absent => "no NVIDIA driver found: this node is CPU-only".to_owned(),
            DriverStatus::Failed { reason } => {
                format!("the NVIDIA driver is installed but unusable ({reason}): this node is CPU-only")
            }
            DriverStatus::Present { devices } => {
                let names: Vec<String> =
                    self.gpus.iter().map(|g| format!("{}: {} ({} MiB)", g.index, g.name, g.memory_total_mib)).collect();
                format!("{devices} GPU(s): {}", names.join(", "))
            }
        }
    }
}

const MIB: usize = 1024 * 1024;

/// Whether the CUDA driver library can be loaded. The default build loads it at run time
/// and must check first: calling cudarc's driver functions without it would panic.
#[cfg(not(feature = "cuda"))]
fn driver_present() -> bool {
    // SAFETY: only probes whether the driver library can be loaded.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// With the `cuda` feature, candle links cudarc to the driver library (its
/// `dynamic-linking`), so a process of this build only starts where the library is.
#[cfg(feature = "cuda")]
fn driver_present() -> bool {
    true
}

/// Finds this machine's GPUs. Never panics: without a driver it reports `Absent`.
pub fn discover() -> GpuDiscovery {
    if !driver_present() {
        return GpuDiscovery { driver: DriverStatus::Absent, gpus: Vec::new() };
    }
    let count = match cudarc::driver::CudaContext::device_count() {
        Ok(count) => u32::try_from(count).unwrap_or(0),
        Err(err) => return GpuDiscovery { driver: DriverStatus::Failed { reason: err.to_string() }, gpus: Vec::new() },
    };
    let nvml = nvml_wrapper::Nvml::init().ok();
    let mut gpus = Vec::new();
    for index in 0..count {
        let ordinal = usize::try_from(index).unwrap_or(usize::MAX);
        let context = match cudarc::driver::CudaContext::new(ordinal) {
            Ok(context) => context,
            Err(err) => {
                tracing::warn!(index, error = %err, "cannot open GPU; leaving it out");
                continue;
            }
        };
        let nvml_device = nvml.as_ref().and_then(|n| n.device_by_index(index).ok());
        let memory_total_mib = context.total_mem().map_or(0, |bytes| (bytes / MIB) as u64);
        let memory_free_mib = context
            .mem_get_info()
            .ok()
            .map(|(free, _)| (free / MIB) as u64)
            .or_else(|| nvml_device.as_ref().and_then(|d| d.memory_info().ok()).map(|m| m.free / (MIB as u64)));
        gpus.push(DetectedGpu {
            index,
            name: context.name().unwrap_or_else(|_| "unknown NVIDIA GPU".to_owned()),
            memory_total_mib,
            memory_free_mib,
            compute_capability: context.compute_capability().ok(),
            utilization_percent: nvml_device.as_ref().and_then(|d| d.utilization_rates().ok()).map(|u| u.gpu),
            temperature_celsius: nvml_device
                .as_ref()
                .and_then(|d| d.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu).ok()),
        });
    }
    GpuDiscovery { driver: DriverStatus::Present { devices: count }, gpus }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_never_panics_and_agrees_with_itself() {
        let found = discover();
        match &found.driver {
            DriverStatus::Absent | DriverStatus::Failed { .. } => assert!(found.gpus.is_empty()),
            DriverStatus::Present { devices } => {
                assert!(found.gpus.len() <= *devices as usize);
                assert!(found.gpus.iter().all(|g| g.memory_total_mib > 0));
            }
        }
        assert!(!found.summary().is_empty());
    }
}
