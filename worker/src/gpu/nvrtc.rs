//! NVRTC, loaded at run time. Its own small loader rather than cudarc's: cudarc looks for the
//! `.so` of the CUDA version it was built for, and GPU machines carry CUDA 12 or 13, so this
//! one tries `libnvrtc.so.13`, then `.12`, then the unversioned name, and says which it found.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

use libloading::Library;

use crate::bail;
use crate::error::{Context, Error, Result};

const NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

type Program = *mut c_void;

/// A loaded NVRTC.
pub struct Nvrtc {
    lib: Library,
    /// What was loaded: a file name resolved by the dynamic loader, or a path.
    pub found: String,
    pub version: (i32, i32),
}

impl Nvrtc {
    /// Loads the newest NVRTC the library path (or `$CUDA_PATH/lib64`, or
    /// `/usr/local/cuda/lib64`) has, or says where it looked.
    pub fn load() -> Result<Self> {
        let dirs: Vec<Option<PathBuf>> = vec![
            None,
            std::env::var_os("CUDA_PATH").map(|p| PathBuf::from(p).join("lib64")),
            Some(PathBuf::from("/usr/local/cuda/lib64")),
        ];
        for name in NAMES {
            for dir in dirs.iter() {
                let candidate = match dir {
                    None => PathBuf::from(name),
                    Some(dir) => dir.join(name),
                };
                // SAFETY: loading NVRTC runs no initialisers with preconditions.
                if let Ok(lib) = unsafe { Library::new(&candidate) } {
                    let mut nvrtc = Nvrtc {
                        lib,
                        found: candidate.display().to_string(),
                        version: (0, 0),
                    };
                    let (mut major, mut minor) = (0, 0);
                    // SAFETY: nvrtcVersion writes two ints.
                    nvrtc.check(unsafe {
                        nvrtc.symbol::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(
                            b"nvrtcVersion\0",
                        )?(&mut major, &mut minor)
                    })?;
                    nvrtc.version = (major, minor);
                    return Ok(nvrtc);
                }
            }
        }
        bail!(
            "NVRTC not found: tried {} on the library path, $CUDA_PATH/lib64 and \
             /usr/local/cuda/lib64 (install CUDA 12 or 13, or `pip install \
             nvidia-cuda-nvrtc-cu12` and add its nvidia/cuda_nvrtc/lib to LD_LIBRARY_PATH)",
            NAMES.join(", ")
        )
    }

    /// # Safety
    /// `T` must be the C signature of `name`.
    unsafe fn symbol<T: Copy>(&self, name: &[u8]) -> Result<T> {
        // SAFETY: the caller vouches for the signature.
        let symbol = unsafe { self.lib.get::<T>(name) }.with_context(|| {
            format!(
                "{} has no {}",
                self.found,
                String::from_utf8_lossy(&name[..name.len() - 1])
            )
        })?;
        Ok(*symbol)
    }

    fn check(&self, status: c_int) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any status.
        let text = unsafe {
            let describe = self
                .symbol::<unsafe extern "C" fn(c_int) -> *const c_char>(b"nvrtcGetErrorString\0")?;
            CStr::from_ptr(describe(status))
                .to_string_lossy()
                .into_owned()
        };
        Err(Error::Message(format!("NVRTC error {status}: {text}")))
    }

    /// Compiles `source` for `architecture`: PTX text for a virtual one (`compute_90`), a
    /// cubin for a real one (`sm_90a`). `include` is searched for `#include`s. Compile errors
    /// come with NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        architecture: &str,
        include: &Path,
    ) -> Result<Vec<u8>> {
        let source = CString::new(source)
            .map_err(Error::msg)
            .context("kernel source holds a NUL")?;
        let file = CString::new(format!("{name}.cu")).map_err(Error::msg)?;
        let options = [
            format!("--gpu-architecture={architecture}"),
            format!("--include-path={}", include.display()),
            "--std=c++17".to_string(),
        ]
        .map(|o| CString::new(o).expect("options hold no NUL"));
        let option_pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: each signature below is NVRTC's; `program` lives from create to destroy,
        // and every buffer is sized by the matching *Size call first.
        unsafe {
            type Create = unsafe extern "C" fn(
                *mut Program,
                *const c_char,
                *const c_char,
                c_int,
                *const *const c_char,
                *const *const c_char,
            ) -> c_int;
            type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
            type Size = unsafe extern "C" fn(Program, *mut usize) -> c_int;
            type Get = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
            type Destroy = unsafe extern "C" fn(*mut Program) -> c_int;

            let mut program: Program = std::ptr::null_mut();
            self.check(self.symbol::<Create>(b"nvrtcCreateProgram\0")?(
                &mut program,
                source.as_ptr(),
                file.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ))?;
            let read = |size: &[u8], get: &[u8]| -> Result<Vec<u8>> {
                let mut len = 0usize;
                self.check(self.symbol::<Size>(size)?(program, &mut len))?;
                let mut buffer = vec![0u8; len];
                self.check(self.symbol::<Get>(get)?(
                    program,
                    buffer.as_mut_ptr().cast(),
                ))?;
                Ok(buffer)
            };
            let compiled = self.check(self.symbol::<Compile>(b"nvrtcCompileProgram\0")?(
                program,
                option_pointers.len() as c_int,
                option_pointers.as_ptr(),
            ));
            let output = match compiled {
                Err(err) => {
                    let log = read(b"nvrtcGetProgramLogSize\0", b"nvrtcGetProgramLog\0")
                        .map(|log| {
                            String::from_utf8_lossy(&log)
                                .trim_end_matches('\0')
                                .to_string()
                        })
                        .unwrap_or_default();
                    Err(Error::Message(format!(
                        "{name}.cu for {architecture}: {err}\n{log}"
                    )))
                }
                Ok(()) if architecture.starts_with("compute_") => {
                    read(b"nvrtcGetPTXSize\0", b"nvrtcGetPTX\0")
                }
                Ok(()) => read(b"nvrtcGetCUBINSize\0", b"nvrtcGetCUBIN\0"),
            };
            self.check(self.symbol::<Destroy>(b"nvrtcDestroyProgram\0")?(
                &mut program,
            ))?;
            output
        }
    }
}
