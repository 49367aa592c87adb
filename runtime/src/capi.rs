//! The C ABI behind every generated library: the generated `<name>_create`, `<name>_run`,
//! `<name>_last_error` and `<name>_destroy` forward here with the model's image. Every pointer
//! is checked, every panic is caught, and every failure is a code plus a message kept in the
//! context.

use crate::model::{Error, ErrorCode, Input, Kernel, Model};
use crate::spec::{DType, ModelSpec};
use crate::weights;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// What a compiled object holds about its model (the layout the code generator emits).
#[repr(C)]
pub struct ModelImage {
    /// The [`ModelSpec`] as JSON.
    pub spec: *const u8,
    /// Its length in bytes.
    pub spec_len: usize,
    /// The kernels, in execution order.
    pub kernels: *const Kernel,
    /// How many.
    pub num_kernels: usize,
    /// The embedded weight blob, or null when the weights live in a file.
    pub weights: *const u8,
    /// Its length in bytes.
    pub weight_bytes: usize,
}

/// A tensor passed through the C API.
#[repr(C)]
pub struct KilnTensor {
    /// A dtype code ([`DType`] as `i32`).
    pub dtype: i32,
    /// Number of dims.
    pub rank: i32,
    /// `rank` dims: read for inputs, written for outputs.
    pub dims: *mut i64,
    /// The values, row-major.
    pub data: *mut c_void,
    /// Bytes at `data`: an input's size, or an output buffer's capacity.
    pub bytes: usize,
}

/// A model instance behind the C API.
pub struct Context {
    model: Option<Model>,
    last_error: CString,
    /// The views of a call's inputs, kept so that calls after the first allocate nothing. Empty
    /// between calls: the `'static` is only ever true for the duration of one `run`.
    views: Vec<Input<'static>>,
}

impl Context {
    fn fail(&mut self, error: Error) -> i32 {
        self.last_error = c_string(&error.message);
        error.code as i32
    }
}

fn c_string(message: &str) -> CString {
    CString::new(message.replace('\0', " ")).expect("no NUL bytes remain")
}

/// Reads the model's spec and kernels from its image, with the embedded weights or those of the
/// weight file at `weights_path`.
///
/// # Safety
/// `image` must point to a valid image emitted by the code generator.
pub(crate) unsafe fn load_model(
    image: *const ModelImage,
    weights_path: Option<&Path>,
) -> Result<Model, Error> {
    let internal = |message: String| Error::new(ErrorCode::Internal, message);
    // SAFETY: the caller's contract.
    let image = unsafe { &*image };
    // SAFETY: the code generator emits `spec_len` bytes of JSON at `spec`.
    let spec_json = unsafe { std::slice::from_raw_parts(image.spec, image.spec_len) };
    let spec: ModelSpec = serde_json::from_slice(spec_json)
        .map_err(|e| internal(format!("the model's description is invalid: {e}")))?;
    // SAFETY: the code generator emits `num_kernels` function pointers at `kernels`.
    let kernels = unsafe { std::slice::from_raw_parts(image.kernels, image.num_kernels) }.to_vec();
    let (blob, mapped): (&[u8], _) = if let Some(path) = weights_path {
        let map = weights::map(path, &spec)?;
        // SAFETY: the slice points into the mapping, which moves into the model below and lives
        // as long as it; moving the `Mmap` value does not move the mapped pages.
        let blob = unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) };
        (&blob[weights::HEADER_BYTES..], Some(map))
    } else {
        if image.weights.is_null() {
            return Err(Error::new(
                ErrorCode::Weights,
                format!(
                    "`{}` was compiled with external weights: pass the path of its weight file",
                    spec.name
                ),
            ));
        }
        // SAFETY: the code generator emits `weight_bytes` bytes at `weights`, static for the
        // program's life.
        let blob = unsafe { std::slice::from_raw_parts(image.weights, image.weight_bytes) };
        (blob, None)
    };
    let slices = weights::slices(blob, &spec)?;
    // SAFETY: the kernels were compiled for this spec; the weights are static or mapped for the
    // model's life.
    let mut model = unsafe { Model::new(spec, kernels, &slices) }?;
    model._weights = mapped;
    Ok(model)
}

/// Creates a model instance: reads the model's description and loads its weights (embedded, or
/// from `weights_path` when it is not null). `*out` receives the instance even on failure (so that
/// its last error can be read), unless `out` is null or memory ran out; destroy it either way.
///
/// # Safety
/// `image` must be the image of a compiled model; `weights_path` null or a NUL-terminated string;
/// `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_create(
    image: *const ModelImage,
    weights_path: *const c_char,
    out: *mut *mut Context,
) -> i32 {
    if out.is_null() || image.is_null() {
        return ErrorCode::NullPointer as i32;
    }
    // SAFETY: `out` is writable (the caller's contract).
    unsafe { *out = std::ptr::null_mut() };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let path = if weights_path.is_null() {
            None
        } else {
            // SAFETY: the caller passes a NUL-terminated string.
            let path = unsafe { CStr::from_ptr(weights_path) }
                .to_str()
                .map_err(|_| {
                    Error::new(ErrorCode::Weights, "the weight path is not valid UTF-8")
                })?;
            Some(Path::new(path))
        };
        // SAFETY: forwarded from the caller's contract.
        unsafe { load_model(image, path) }
    }))
    .unwrap_or_else(|_| {
        Err(Error::new(
            ErrorCode::Internal,
            "the runtime panicked while loading the model",
        ))
    });
    let mut context = Box::new(Context {
        model: None,
        last_error: CString::default(),
        views: Vec::new(),
    });
    let status = match result.and_then(|mut model| {
        model.set_threads(default_threads())?;
        Ok(model)
    }) {
        Ok(model) => {
            context.model = Some(model);
            0
        }
        Err(error) => context.fail(error),
    };
    // SAFETY: as above.
    unsafe { *out = Box::into_raw(context) };
    status
}

/// Checks one C tensor and views it as a run input.
///
/// # Safety
/// `tensor.dims` must hold `rank` values and `tensor.data` `bytes` bytes, when not null.
unsafe fn input_view<'a>(tensor: &'a KilnTensor, index: usize) -> Result<Input<'a>, Error> {
    let fail = |code, what: &str| Error::new(code, format!("input {index}: {what}"));
    let dtype = DType::from_code(tensor.dtype).ok_or_else(|| {
        fail(
            ErrorCode::Input,
            &format!("unknown dtype code {}", tensor.dtype),
        )
    })?;
    let rank = usize::try_from(tensor.rank)
        .map_err(|_| fail(ErrorCode::Input, &format!("negative rank {}", tensor.rank)))?;
    if rank > 0 && tensor.dims.is_null() {
        return Err(fail(ErrorCode::NullPointer, "dims is null"));
    }
    if tensor.bytes > 0 && tensor.data.is_null() {
        return Err(fail(ErrorCode::NullPointer, "data is null"));
    }

    let dims = if rank == 0 {
        &[][..]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(tensor.dims, rank) }
    };
    let data = if tensor.bytes == 0 {
        &[][..]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(tensor.data.cast::<u8>(), tensor.bytes) }
    };
    Ok(Input { dtype, dims, data })
}

/// Runs the model: checks inputs and output buffers against the model, runs it, writes each
/// output's dims and values into the caller's buffers.
///
/// # Safety
/// `context` must come from [`kiln_model_create`]; `inputs` and `outputs` must point to
/// `num_inputs` and `num_outputs` tensors whose `dims` and `data` pointers address `rank` dims
/// and `bytes` bytes.
unsafe fn run(
    context: &mut Context,
    inputs: *const KilnTensor,
    num_inputs: usize,
    outputs: *mut KilnTensor,
    num_outputs: usize,
) -> Result<(), Error> {
    let Some(model) = context.model.as_mut() else {
        return Err(Error::new(
            ErrorCode::Weights,
            format!(
                "the model was not created: {}",
                context.last_error.to_string_lossy()
            ),
        ));
    };
    let null = |what: &str| Error::new(ErrorCode::NullPointer, format!("{what} is null"));
    if (inputs.is_null() && num_inputs > 0) || (outputs.is_null() && num_outputs > 0) {
        return Err(null(if inputs.is_null() {
            "inputs"
        } else {
            "outputs"
        }));
    }
    let spec = model.spec();
    if num_outputs != spec.outputs.len() {
        return Err(Error::new(
            ErrorCode::Output,
            format!(
                "{num_outputs} outputs given, the model has {}",
                spec.outputs.len()
            ),
        ));
    }
    let outputs = if num_outputs == 0 {
        &mut [][..]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(outputs, num_outputs) }
    };
    for (index, (tensor, expected)) in outputs.iter().zip(&spec.outputs).enumerate() {
        let fail = |what: String| {
            Error::new(
                ErrorCode::Output,
                format!("output {index} (`{}`): {what}", expected.name),
            )
        };
        if tensor.dtype != expected.dtype as i32 {
            return Err(fail(format!(
                "dtype code {}, the output is {} (code {})",
                tensor.dtype, expected.dtype, expected.dtype as i32
            )));
        }
        if usize::try_from(tensor.rank).ok() != Some(expected.dims.len()) {
            return Err(fail(format!(
                "rank {}, the output has rank {}",
                tensor.rank,
                expected.dims.len()
            )));
        }
        if !expected.dims.is_empty() && tensor.dims.is_null() {
            return Err(null(&format!("output {index}'s dims")));
        }
    }
    let inputs = if num_inputs == 0 {
        &[][..]
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(inputs, num_inputs) }
    };
    let views = &mut context.views;
    views.clear();
    for (index, tensor) in inputs.iter().enumerate() {
        // SAFETY: the caller's contract.
        match unsafe { input_view(tensor, index) } {
            // SAFETY: the view stays in `views` only until this call returns (cleared below on
            // every path), and the caller's buffers are valid for all of the call.
            Ok(view) => {
                views.push(unsafe { std::mem::transmute::<Input<'_>, Input<'static>>(view) })
            }
            Err(error) => {
                views.clear();
                return Err(error);
            }
        }
    }
    let result = model.run(views);
    context.views.clear();
    let result = result?;
    for (index, tensor) in outputs.iter_mut().enumerate() {
        let bytes = result.bytes(index);
        if bytes.len() > tensor.bytes {
            return Err(Error::new(
                ErrorCode::Output,
                format!(
                    "output {index} needs {} bytes, its buffer holds {}",
                    bytes.len(),
                    tensor.bytes
                ),
            ));
        }
        if !bytes.is_empty() && tensor.data.is_null() {
            return Err(null(&format!("output {index}'s data")));
        }
        for (axis, dim) in result.dims(index).enumerate() {
            // SAFETY: `dims` holds `rank` values, checked equal to the output's rank.
            unsafe { *tensor.dims.add(axis) = dim };
        }
        // SAFETY: the buffer holds at least `bytes.len()` bytes (checked above) and belongs to
        // the caller, not to the model.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), tensor.data.cast(), bytes.len());
        }
    }
    Ok(())
}

/// Runs a model instance; see the generated header for the contract.
///
/// # Safety
/// As the generated `<name>_run`: `context` from [`kiln_model_create`] (or null), the tensors as
/// the header describes them.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_run(
    context: *mut Context,
    inputs: *const KilnTensor,
    num_inputs: usize,
    outputs: *mut KilnTensor,
    num_outputs: usize,
) -> i32 {
    if context.is_null() {
        return ErrorCode::NullPointer as i32;
    }
    // SAFETY: a context from `kiln_model_create`, used by one thread at a time.
    let context = unsafe { &mut *context };
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from the caller's contract.
        unsafe { run(context, inputs, num_inputs, outputs, num_outputs) }
    }))
    .unwrap_or_else(|_| Err(Error::new(ErrorCode::Internal, "the runtime panicked")));
    match result {
        Ok(()) => 0,
        Err(error) => context.fail(error),
    }
}

/// Every core the process may use.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Sets the threads an instance runs on (1: the calling thread only); it starts with one per
/// core.
///
/// # Safety
/// `context` from [`kiln_model_create`], or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_set_threads(context: *mut Context, threads: i32) -> i32 {
    if context.is_null() {
        return ErrorCode::NullPointer as i32;
    }
    // SAFETY: a context from `kiln_model_create`, used by one thread at a time.
    let context = unsafe { &mut *context };
    let result = match (usize::try_from(threads), context.model.as_mut()) {
        (Ok(threads @ 1..), Some(model)) => model.set_threads(threads),
        (_, None) => Err(Error::new(
            ErrorCode::Weights,
            format!(
                "the model was not created: {}",
                context.last_error.to_string_lossy()
            ),
        )),
        _ => Err(Error::new(
            ErrorCode::Input,
            format!("{threads} threads: at least 1 is needed"),
        )),
    };
    match result {
        Ok(()) => 0,
        Err(error) => context.fail(error),
    }
}

/// The message of the instance's last failure ("" if none); valid until the next call on it.
///
/// # Safety
/// `context` from [`kiln_model_create`], or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_last_error(context: *const Context) -> *const c_char {
    if context.is_null() {
        return c"the model context is null".as_ptr();
    }
    // SAFETY: a context from `kiln_model_create`.
    unsafe { (*context).last_error.as_ptr() }
}

/// Frees a model instance (null is ignored).
///
/// # Safety
/// `context` from [`kiln_model_create`] and not used afterwards, or null.
#[no_mangle]
pub unsafe extern "C" fn kiln_model_destroy(context: *mut Context) {
    if !context.is_null() {
        // SAFETY: the box made by `kiln_model_create`.
        drop(unsafe { Box::from_raw(context) });
    }
}
