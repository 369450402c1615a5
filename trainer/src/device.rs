//! `--device cpu|cuda|auto`. A tch binary links libtorch_cuda only "as needed", and it needs
//! nothing from it at link time, so CUDA kernels are not registered until the library is loaded:
//! load it explicitly before asking whether CUDA is available (DESIGN §2).

use tch::Device;

use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

fn load_torch_cuda() -> bool {
    // dlopen searches the executable's RUNPATH (.deps/libtorch/lib) and LD_LIBRARY_PATH.
    let name = c"libtorch_cuda.so";
    // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

pub fn resolve(arg: DeviceArg) -> Result<Device> {
    let cuda = || load_torch_cuda() && tch::Cuda::is_available();
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda if cuda() => Ok(Device::Cuda(0)),
        DeviceArg::Cuda => Err(TrainError::Input(
            "--device cuda: no CUDA device (libtorch_cuda.so not loadable or no GPU visible)".into(),
        )),
        DeviceArg::Auto => Ok(if cuda() { Device::Cuda(0) } else { Device::Cpu }),
    }
}
