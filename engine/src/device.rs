//! Device selection: `cpu` (the default), `cuda[:N]`, `metal[:N]` or `auto`.

use crate::error::{EngineError, Result};
use candle_core::Device;

/// Parses a device name and opens it. `auto` picks CUDA, then Metal, then CPU, depending on
/// what this build supports and the machine has.
pub fn open_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n =
                n.parse::<usize>().map_err(|_| EngineError::Device(spec.clone(), "ordinal must be a number".into()))?;
            (k.to_string(), n)
        }
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::Device(
                    spec,
                    "this build has no CUDA support; rebuild with `--features cuda`".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| EngineError::Device(spec, e.to_string()))
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(EngineError::Device(
                    spec,
                    "this build has no Metal support; rebuild with `--features metal`".into(),
                ));
            }
            Device::new_metal(ordinal).map_err(|e| EngineError::Device(spec, e.to_string()))
        }
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(ordinal) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(ordinal) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        _ => Err(EngineError::Device(spec, "expected cpu, cuda[:N], metal[:N] or auto".into())),
    }
}

/// Free and total memory of a CUDA device in bytes; `None` for the CPU and Metal.
pub fn device_memory(device: &Device) -> Result<Option<(usize, usize)>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let stream = cuda.cuda_stream();
        let name = format!("{:?}", device.location());
        stream.context().bind_to_thread().map_err(|e| EngineError::Device(name.clone(), e.to_string()))?;
        let (free, total) = result::mem_get_info().map_err(|e| EngineError::Device(name, e.to_string()))?;
        return Ok(Some((free, total)));
    }
    let _ = device;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_unknown() {
        assert!(open_device("cpu").unwrap().is_cpu());
        assert!(open_device(" CPU ").unwrap().is_cpu());
        assert!(open_device("tpu").is_err());
        assert!(open_device("cuda:x").is_err());
        #[cfg(not(feature = "cuda"))]
        assert!(open_device("cuda").is_err());
    }
}
