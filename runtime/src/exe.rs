//! The `main` of a compiled executable: `NAME --inputs IN.safetensors --output OUT.safetensors`,
//! the same contract as `kiln run`, plus `--weights FILE`, `--threads N` (default: every core), and
//! `--bench ITERS [--warmup N]`, which times the model in-process after warm-up runs.

use crate::capi::ModelImage;
use crate::model::{Input, Model};
use crate::spec::DType;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::time::Instant;

const USAGE: &str =
    "usage: {exe} --inputs IN.safetensors --output OUT.safetensors [--weights FILE] [--threads N] [--bench ITERS [--warmup N]]";

struct Args {
    inputs: PathBuf,
    output: Option<PathBuf>,
    weights: Option<PathBuf>,
    bench: Option<usize>,
    warmup: Option<usize>,
    threads: Option<usize>,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    let mut rest = args.iter().skip(1);
    while let Some(flag) = rest.next() {
        let key = match flag.as_str() {
            "--inputs" | "--output" | "--weights" | "--bench" | "--warmup" | "--threads" => {
                flag.as_str()
            }
            other => return Err(format!("unknown argument `{other}`")),
        };
        let value = rest.next().ok_or_else(|| format!("{key} needs a value"))?;
        values.insert(key, value);
    }
    // A count given with `key`, at least `min`.
    let count = |key: &str, min: usize| {
        values
            .get(key)
            .map(|v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|&n| n >= min)
                    .ok_or_else(|| format!("{key} {v}: expected a whole number, at least {min}"))
            })
            .transpose()
    };
    let (bench, warmup, threads) = (
        count("--bench", 1)?,
        count("--warmup", 0)?,
        count("--threads", 1)?,
    );
    let inputs = PathBuf::from(values.get("--inputs").ok_or("--inputs is required")?);
    let output = values.get("--output").map(PathBuf::from);
    if output.is_none() && bench.is_none() {
        return Err("--output is required (unless --bench is given)".into());
    }
    Ok(Args {
        inputs,
        output,
        weights: values.get("--weights").map(PathBuf::from),
        bench,
        warmup,
        threads,
    })
}

fn dtype_from_safetensors(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::I8 => DType::I8,
        StDtype::U8 => DType::U8,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

fn dtype_to_safetensors(dtype: DType) -> StDtype {
    match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        DType::I8 => StDtype::I8,
        DType::U8 => StDtype::U8,
        DType::Bool => StDtype::BOOL,
    }
}

/// An input read from the file, copied into 8-byte-aligned memory.
struct OwnedInput {
    dtype: DType,
    dims: Vec<i64>,
    words: Vec<u64>,
    len: usize,
}

impl OwnedInput {
    fn view(&self) -> Input<'_> {
        // SAFETY: `words` holds at least `len` bytes.
        let data =
            unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) };
        Input {
            dtype: self.dtype,
            dims: &self.dims,
            data,
        }
    }
}

fn read_inputs(path: &Path, model: &Model) -> Result<Vec<OwnedInput>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec = model.spec();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !spec.inputs.iter().any(|i| i.name == *n))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{}: unknown inputs: {} (the model takes {})",
            path.display(),
            unknown.join(", "),
            spec.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    spec.inputs
        .iter()
        .map(|input| {
            let view = file
                .tensor(&input.name)
                .map_err(|_| format!("{}: missing input `{}`", path.display(), input.name))?;
            let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
                format!(
                    "{}: input `{}` has dtype {:?}, which kiln does not handle",
                    path.display(),
                    input.name,
                    view.dtype()
                )
            })?;
            let data = view.data();
            let mut words = vec![0u64; data.len().div_ceil(8)];
            // SAFETY: `words` holds at least `data.len()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), words.as_mut_ptr().cast(), data.len())
            };
            Ok(OwnedInput {
                dtype,
                dims: view.shape().iter().map(|&d| d as i64).collect(),
                words,
                len: data.len(),
            })
        })
        .collect()
}

fn median_p10_p90(mut times: Vec<f64>) -> (f64, f64, f64) {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[(((times.len() - 1) as f64) * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

fn execute(image: *const ModelImage, args: &[String]) -> Result<(), String> {
    let exe = args.first().map_or("model", String::as_str);
    let args = parse_args(args).map_err(|e| format!("{e}\n{}", USAGE.replace("{exe}", exe)))?;
    let started = Instant::now();
    // SAFETY: the image the code generator emitted beside this `main`.
    let embedded = unsafe { !(*image).weights.is_null() };
    let weights = args.weights.clone().or_else(|| {
        (!embedded).then(|| {
            let dir = std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_default();
            let name = Path::new(exe)
                .file_name()
                .map_or("model".into(), |n| n.to_os_string());
            let mut file = name;
            file.push(".weights");
            dir.join(file)
        })
    });
    // SAFETY: as above.
    let mut model =
        unsafe { crate::capi::load_model(image, weights.as_deref()) }.map_err(|e| e.message)?;
    let threads = args.threads.unwrap_or_else(crate::capi::default_threads);
    model.set_threads(threads).map_err(|e| e.message)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let inputs = read_inputs(&args.inputs, &model)?;
    let views: Vec<Input<'_>> = inputs.iter().map(OwnedInput::view).collect();
    if let Some(iters) = args.bench {
        let warmup = args.warmup.unwrap_or(iters.div_ceil(5).max(1));
        let mut times = Vec::with_capacity(iters);
        for run in 0..warmup + iters {
            let started = Instant::now();
            model.run(&views).map_err(|e| e.message)?;
            if run >= warmup {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (median, p10, p90) = median_p10_p90(times);
        println!("load: {load_ms:.1} ms");
        println!(
            "run: median {median:.3} ms, p10 {p10:.3} ms, p90 {p90:.3} ms ({iters} runs after {warmup} warm-up, {threads} thread{})",
            if threads == 1 { "" } else { "s" }
        );
    }
    let spec_outputs: Vec<(String, DType)> = model
        .spec()
        .outputs
        .iter()
        .map(|o| (o.name.clone(), o.dtype))
        .collect();
    let outputs = model.run(&views).map_err(|e| e.message)?;
    if let Some(path) = &args.output {
        let tensors = spec_outputs
            .iter()
            .enumerate()
            .map(|(index, (name, dtype))| {
                let shape: Vec<usize> = outputs.dims(index).map(|d| d as usize).collect();
                safetensors::tensor::TensorView::new(
                    dtype_to_safetensors(*dtype),
                    shape,
                    outputs.bytes(index),
                )
                .map(|view| (name.clone(), view))
                .map_err(|e| format!("output `{name}`: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serialized = safetensors::serialize(tensors, None)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(path, serialized).map_err(|e| format!("{}: {e}", path.display()))?;
        for (index, (name, dtype)) in spec_outputs.iter().enumerate() {
            let dims: Vec<String> = outputs.dims(index).map(|d| d.to_string()).collect();
            println!("{name}: {dtype}[{}]", dims.join(", "));
        }
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The executable's entry point, called by the generated `main`.
///
/// # Safety
/// `image` must be the image of a compiled model and `argv` hold `argc` NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn kiln_exe_main(
    image: *const ModelImage,
    argc: i32,
    argv: *const *const c_char,
) -> i32 {
    let args: Vec<String> = (0..usize::try_from(argc).unwrap_or(0))
        // SAFETY: the caller's contract.
        .map(|i| {
            unsafe { CStr::from_ptr(*argv.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    match std::panic::catch_unwind(|| execute(image, &args)) {
        Ok(Ok(())) => 0,
        Ok(Err(message)) => {
            eprintln!("error: {message}");
            1
        }
        Err(_) => {
            eprintln!("error: the runtime panicked");
            2
        }
    }
}
