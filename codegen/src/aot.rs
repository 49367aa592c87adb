//! Ahead-of-time artifacts: an object file holding the kernels, the model's description, its
//! weights (or none, with an external weight file) and the C API functions; a C header that
//! documents it; and the linking of object and runtime into a shared library and an executable
//! with the system C compiler.
//!
//! The object exports `<name>_create`, `<name>_run`, `<name>_last_error`, `<name>_set_threads`
//! and `<name>_destroy`,
//! each forwarding to the runtime's C ABI with the model's image, and `<name>_image`, which the
//! executable's `main` (a second, tiny object) passes to the runtime's `kiln_exe_main`. Compiling
//! the same graph twice gives the same bytes.

use crate::describe::{describe, Description};
use crate::{check_supported, cranelift_error, define_kernels, host_isa, CodegenError, Plan};
use cranelift_codegen::ir::{types, AbiParam, InstBuilder, Type};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, DataId, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};
use kiln_ir::{Dim, Graph};
use kiln_runtime::spec::{DType, ModelSpec};
use kiln_runtime::ErrorCode;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The runtime's static library, built by this crate's build script.
static RUNTIME_LIBRARY: &[u8] = include_bytes!(env!("KILN_RUNTIME_STATICLIB"));

/// The system libraries the runtime's static library needs, as rustc reported them.
const RUNTIME_NATIVE_LIBS: &str = env!("KILN_RUNTIME_NATIVE_LIBS");

/// Where a compiled model's weights live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightPlacement {
    /// In a read-only section of the object (and so of the library and executable).
    Embedded,
    /// In `<name>.weights` beside the artifacts, memory-mapped by the runtime.
    External,
}

/// A compiled model, ready to be written and linked.
pub struct Artifacts {
    /// The C name of the model (the prefix of its API).
    pub name: String,
    /// The object file.
    pub object: Vec<u8>,
    /// The object holding the executable's `main`.
    pub main_object: Vec<u8>,
    /// The C header.
    pub header: String,
    /// The weight file (header and blob), when the weights are external.
    pub weight_file: Option<Vec<u8>>,
}

/// Whether `name` can prefix C identifiers.
pub fn is_c_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A C identifier made from an arbitrary name: other characters become `_`.
pub fn c_identifier(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        id.insert(0, '_');
    }
    id
}

/// Compiles `graph` into an object named `name` (a C identifier) for this CPU.
pub fn compile(
    graph: &Graph,
    name: &str,
    placement: WeightPlacement,
) -> Result<Artifacts, CodegenError> {
    if !is_c_identifier(name) {
        return Err(CodegenError::Artifact(format!(
            "`{name}` cannot prefix C identifiers: use letters, digits and `_`"
        )));
    }
    check_supported(graph)?;
    let plan = Plan::new(graph).map_err(CodegenError::Plan)?;
    let Description {
        mut spec,
        weights,
        kernel_nodes,
    } = describe(graph, &plan, name)?;
    let mut blob = vec![0u8; spec.weight_bytes];
    for (weight, bytes) in spec.weights.iter().zip(&weights) {
        blob[weight.offset..weight.offset + weight.bytes].copy_from_slice(bytes.as_ref());
    }
    spec.weights_id = kiln_runtime::spec::weights_hash(&blob);
    let isa = host_isa(true)?;
    let features = enabled_features(&*isa);
    let mut module = ObjectModule::new(
        ObjectBuilder::new(isa, name, cranelift_module::default_libcall_names())
            .map_err(cranelift_error)?,
    );
    let kernels = define_kernels(&mut module, graph, &plan, &kernel_nodes)?;
    let spec_json = serde_json::to_vec(&spec).map_err(cranelift_error)?;
    let spec_data = define_bytes(&mut module, &format!("{name}_spec"), spec_json.clone(), 8)?;
    let mut table = DataDescription::new();
    table.define(vec![0u8; kernels.len() * 8].into_boxed_slice());
    for (index, &kernel) in kernels.iter().enumerate() {
        let func = module.declare_func_in_data(kernel, &mut table);
        table.write_function_addr((index * 8) as u32, func);
    }
    let table_data = declare_data(&mut module, &format!("{name}_kernels"), Linkage::Local)?;
    module
        .define_data(table_data, &table)
        .map_err(cranelift_error)?;
    let weight_data = match placement {
        WeightPlacement::Embedded => Some(define_bytes(
            &mut module,
            &format!("{name}_weights"),
            std::mem::take(&mut blob),
            64,
        )?),
        WeightPlacement::External => None,
    };
    let mut image = DataDescription::new();
    // The layout of `kiln_runtime::capi::ModelImage`: pointer and length of the spec, of the
    // kernel table and of the embedded weights.
    let mut relocations = vec![(0, spec_data), (16, table_data)];
    relocations.extend(weight_data.map(|w| (32, w)));
    let mut image_bytes = vec![0u8; 48];
    image_bytes[8..16].copy_from_slice(&(spec_json.len() as u64).to_le_bytes());
    image_bytes[24..32].copy_from_slice(&(kernels.len() as u64).to_le_bytes());
    if weight_data.is_some() {
        image_bytes[40..48].copy_from_slice(&(spec.weight_bytes as u64).to_le_bytes());
    }
    image.define(image_bytes.into_boxed_slice());
    image.set_align(8);
    for (offset, target) in relocations {
        let global = module.declare_data_in_data(target, &mut image);
        image.write_data_addr(offset, global, 0);
    }
    let image_data = declare_data(&mut module, &format!("{name}_image"), Linkage::Export)?;
    module
        .define_data(image_data, &image)
        .map_err(cranelift_error)?;
    let i64t = types::I64;
    let returns_status = Some(types::I32);
    define_forwarder(
        &mut module,
        &format!("{name}_create"),
        "kiln_model_create",
        &[i64t, i64t],
        returns_status,
        Some(image_data),
    )?;
    define_forwarder(
        &mut module,
        &format!("{name}_run"),
        "kiln_model_run",
        &[i64t; 5],
        returns_status,
        None,
    )?;
    define_forwarder(
        &mut module,
        &format!("{name}_last_error"),
        "kiln_model_last_error",
        &[i64t],
        Some(i64t),
        None,
    )?;
    define_forwarder(
        &mut module,
        &format!("{name}_set_threads"),
        "kiln_model_set_threads",
        &[i64t, types::I32],
        returns_status,
        None,
    )?;
    define_forwarder(
        &mut module,
        &format!("{name}_destroy"),
        "kiln_model_destroy",
        &[i64t],
        None,
        None,
    )?;
    let object = module.finish().emit().map_err(cranelift_error)?;
    let header = header(graph, &spec, &features, placement);
    let weight_file = (placement == WeightPlacement::External).then(|| {
        let mut file = kiln_runtime::weights::header(spec.weight_bytes, spec.weights_id).to_vec();
        file.extend_from_slice(&blob);
        file
    });
    Ok(Artifacts {
        name: name.to_string(),
        object,
        main_object: main_object(name)?,
        header,
        weight_file,
    })
}

fn declare_data(
    module: &mut ObjectModule,
    symbol: &str,
    linkage: Linkage,
) -> Result<DataId, CodegenError> {
    module
        .declare_data(symbol, linkage, false, false)
        .map_err(cranelift_error)
}

/// Read-only bytes under a local symbol.
fn define_bytes(
    module: &mut ObjectModule,
    symbol: &str,
    bytes: Vec<u8>,
    align: u64,
) -> Result<DataId, CodegenError> {
    let id = declare_data(module, symbol, Linkage::Local)?;
    let mut data = DataDescription::new();
    data.define(bytes.into_boxed_slice());
    data.set_align(align);
    module.define_data(id, &data).map_err(cranelift_error)?;
    Ok(id)
}

/// An exported function that calls a runtime function with its own arguments, preceded by the
/// model's image when `image` is given, and returns what it returns.
fn define_forwarder(
    module: &mut ObjectModule,
    symbol: &str,
    runtime_fn: &str,
    params: &[Type],
    ret: Option<Type>,
    image: Option<DataId>,
) -> Result<(), CodegenError> {
    let mut sig = module.make_signature();
    sig.params = params.iter().map(|&t| AbiParam::new(t)).collect();
    sig.returns = ret.into_iter().map(AbiParam::new).collect();
    let mut callee_sig = sig.clone();
    if image.is_some() {
        callee_sig.params.insert(0, AbiParam::new(types::I64));
    }
    let callee = module
        .declare_function(runtime_fn, Linkage::Import, &callee_sig)
        .map_err(cranelift_error)?;
    let func = module
        .declare_function(symbol, Linkage::Export, &sig)
        .map_err(cranelift_error)?;
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    let mut builder_ctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut builder_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let mut args = b.block_params(entry).to_vec();
        if let Some(image) = image {
            let global = module.declare_data_in_func(image, b.func);
            args.insert(0, b.ins().symbol_value(types::I64, global));
        }
        let callee = module.declare_func_in_func(callee, b.func);
        let call = b.ins().call(callee, &args);
        let results = b.inst_results(call).to_vec();
        b.ins().return_(&results);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    module
        .define_function(func, &mut ctx)
        .map_err(|e| cranelift_error(format!("{symbol}: {e:?}")))?;
    Ok(())
}

/// The executable's `main`, which hands the model's image to the runtime.
fn main_object(name: &str) -> Result<Vec<u8>, CodegenError> {
    let mut module = ObjectModule::new(
        ObjectBuilder::new(
            host_isa(true)?,
            format!("{name}_main"),
            cranelift_module::default_libcall_names(),
        )
        .map_err(cranelift_error)?,
    );
    let image = module
        .declare_data(&format!("{name}_image"), Linkage::Import, false, false)
        .map_err(cranelift_error)?;
    let mut main_sig = module.make_signature();
    main_sig.params = vec![AbiParam::new(types::I32), AbiParam::new(types::I64)];
    main_sig.returns = vec![AbiParam::new(types::I32)];
    let mut exe_sig = main_sig.clone();
    exe_sig.params.insert(0, AbiParam::new(types::I64));
    let exe_main = module
        .declare_function("kiln_exe_main", Linkage::Import, &exe_sig)
        .map_err(cranelift_error)?;
    let main = module
        .declare_function("main", Linkage::Export, &main_sig)
        .map_err(cranelift_error)?;
    let mut ctx = module.make_context();
    ctx.func.signature = main_sig;
    let mut builder_ctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut builder_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let (argc, argv) = (b.block_params(entry)[0], b.block_params(entry)[1]);
        let global = module.declare_data_in_func(image, b.func);
        let image = b.ins().symbol_value(types::I64, global);
        let callee = module.declare_func_in_func(exe_main, b.func);
        let call = b.ins().call(callee, &[image, argc, argv]);
        let status = b.inst_results(call)[0];
        b.ins().return_(&[status]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    module
        .define_function(main, &mut ctx)
        .map_err(|e| cranelift_error(format!("main: {e:?}")))?;
    module.finish().emit().map_err(cranelift_error)
}

/// The CPU features the code was compiled for (`avx2`, `fma`, ...).
fn enabled_features(isa: &dyn cranelift_codegen::isa::TargetIsa) -> Vec<String> {
    isa.isa_flags()
        .iter()
        .filter(|flag| flag.as_bool() == Some(true))
        .filter_map(|flag| flag.name.strip_prefix("has_").map(String::from))
        .collect()
}

/// The C header: the model's inputs, outputs, symbols and weights, the error codes and the API.
fn header(
    graph: &Graph,
    spec: &ModelSpec,
    features: &[String],
    placement: WeightPlacement,
) -> String {
    let name = &spec.name;
    let upper = name.to_uppercase();
    let maxima = graph.maxima();
    let dims_text = |dims: &[usize]| {
        let dims: Vec<String> = dims
            .iter()
            .map(|&d| spec.dims[d].display(&spec.symbols).to_string())
            .collect();
        format!("[{}]", dims.join(", "))
    };
    let max_bytes = |id: kiln_ir::NodeId| -> Option<u64> {
        let node = graph.node(id);
        node.ty
            .shape
            .0
            .iter()
            .map(|d: &Dim| d.bounds(&maxima).map(|(_, hi)| hi.max(0) as u64))
            .try_fold(node.ty.dtype.size_bytes() as u64, |acc, d| {
                d.and_then(|d| acc.checked_mul(d))
            })
    };
    let mut h = String::new();
    let _ = writeln!(
        h,
        "/* {name}.h: generated by kiln {} from graph \"{}\". Do not edit.",
        env!("CARGO_PKG_VERSION"),
        graph.name()
    );
    let _ = writeln!(h, " *");
    let _ = writeln!(h, " * Inputs, in the order {name}_run takes them:");
    for (index, input) in spec.inputs.iter().enumerate() {
        let _ = writeln!(
            h,
            " *   {index}  {}  {}{}",
            input.name,
            input.dtype,
            dims_text(&input.dims)
        );
    }
    let _ = writeln!(h, " * Outputs, in the order {name}_run writes them:");
    for ((index, output), (_, id)) in spec.outputs.iter().enumerate().zip(graph.outputs()) {
        let bound = max_bytes(*id).map_or("no bound".into(), |b| format!("at most {b} bytes"));
        let _ = writeln!(
            h,
            " *   {index}  {}  {}{}  ({bound})",
            output.name,
            output.dtype,
            dims_text(&output.dims)
        );
    }
    if spec.symbols.is_empty() {
        let _ = writeln!(h, " * Every dim is fixed.");
    } else {
        let _ = writeln!(
            h,
            " * Symbolic dims, bound from the inputs' dims (each from 1 to its maximum):"
        );
        for symbol in &spec.symbols {
            let _ = writeln!(h, " *   {} <= {}", symbol.name, symbol.max);
        }
    }
    match placement {
        WeightPlacement::Embedded => {
            let _ = writeln!(
                h,
                " * Weights: embedded ({} bytes); pass NULL to {name}_create.",
                spec.weight_bytes
            );
        }
        WeightPlacement::External => {
            let _ = writeln!(
                h,
                " * Weights: in {name}.weights ({} bytes of weights, hash {:#018x}); pass its path",
                spec.weight_bytes, spec.weights_id
            );
            let _ = writeln!(h, " * to {name}_create.");
        }
    }
    let mut line = String::from(" * Code: compiled for x86-64 with");
    for (index, feature) in features.iter().enumerate() {
        let separator = if index + 1 == features.len() {
            ";"
        } else {
            ","
        };
        if line.len() + feature.len() + 2 > 96 {
            let _ = writeln!(h, "{line}");
            line = String::from(" *");
        }
        let _ = write!(line, " {feature}{separator}");
    }
    let _ = writeln!(h, "{line}");
    let _ = writeln!(h, " * it runs only on CPUs that have these features.");
    let _ = writeln!(h, " *");
    let _ = writeln!(h, " * Calling convention: {name}_create makes an instance, which runs one call at a time (use one");
    let _ = writeln!(h, " * instance per thread);");
    let _ = writeln!(h, " * {name}_run checks every input (dtype, rank, dims within the maxima, size, alignment to the");
    let _ = writeln!(h, " * element size) and every output tensor (dtype, rank, capacity in bytes), runs the model and");
    let _ = writeln!(h, " * writes each output's dims and values. Every function returns KILN_OK or an error code, and");
    let _ = writeln!(h, " * {name}_last_error gives the message. Nothing is ever read or written past a tensor's bytes.");
    let _ = writeln!(h, " */");
    let _ = writeln!(h, "#ifndef {upper}_H\n#define {upper}_H\n");
    let _ = writeln!(h, "#include <stddef.h>\n#include <stdint.h>\n");
    let _ = writeln!(h, "#ifdef __cplusplus\nextern \"C\" {{\n#endif\n");
    let _ = writeln!(
        h,
        "#ifndef KILN_TENSOR_DEFINED\n#define KILN_TENSOR_DEFINED\n"
    );
    let _ = writeln!(h, "/* Element types. */");
    for dtype in DType::ALL {
        let _ = writeln!(
            h,
            "#define KILN_{} {}",
            dtype.name().to_uppercase(),
            dtype as i32
        );
    }
    let _ = writeln!(h, "\n/* Status codes. */\n#define KILN_OK 0");
    for code in ErrorCode::ALL {
        let _ = writeln!(
            h,
            "#define KILN_ERROR_{} {} /* {} */",
            code.name(),
            code as i32,
            code.description()
        );
    }
    let _ = writeln!(h, "\n/* A tensor: dims are read for inputs and written for outputs; bytes is an input's size or");
    let _ = writeln!(
        h,
        " * an output buffer's capacity. Values are row-major and little-endian. */"
    );
    let _ = writeln!(h, "typedef struct kiln_tensor {{\n    int32_t dtype;\n    int32_t rank;\n    int64_t *dims;\n    void *data;\n    size_t bytes;\n}} kiln_tensor;\n");
    let _ = writeln!(h, "#endif /* KILN_TENSOR_DEFINED */\n");
    let _ = writeln!(h, "#define {upper}_NUM_INPUTS {}", spec.inputs.len());
    let _ = writeln!(h, "#define {upper}_NUM_OUTPUTS {}", spec.outputs.len());
    let mut seen = std::collections::HashSet::new();
    for (kind, tensors) in [("INPUT", &spec.inputs), ("OUTPUT", &spec.outputs)] {
        for (index, tensor) in tensors.iter().enumerate() {
            let macro_name = format!(
                "{upper}_{kind}_{}",
                c_identifier(&tensor.name).to_uppercase()
            );
            if seen.insert(macro_name.clone()) {
                let _ = writeln!(h, "#define {macro_name} {index}");
            }
        }
    }
    for ((index, output), (_, id)) in spec.outputs.iter().enumerate().zip(graph.outputs()) {
        if let Some(bytes) = max_bytes(*id) {
            let _ = writeln!(
                h,
                "#define {upper}_OUTPUT_{index}_MAX_BYTES {bytes}u /* {} */",
                output.name
            );
        }
    }
    let _ = writeln!(h, "\ntypedef struct {name}_ctx {name}_ctx;\n");
    let _ = writeln!(h, "/* Creates an instance, loading the weights (NULL: the embedded ones). *ctx is set even on");
    let _ = writeln!(
        h,
        " * failure, so that {name}_last_error can explain it; destroy it either way. */"
    );
    let _ = writeln!(
        h,
        "int32_t {name}_create(const char *weights_path_or_null, {name}_ctx **ctx);\n"
    );
    let _ = writeln!(h, "/* Runs the model on {upper}_NUM_INPUTS inputs into {upper}_NUM_OUTPUTS caller-owned outputs. */");
    let _ = writeln!(
        h,
        "int32_t {name}_run({name}_ctx *ctx, const kiln_tensor *inputs, size_t num_inputs,"
    );
    let _ = writeln!(h, "        kiln_tensor *outputs, size_t num_outputs);\n");
    let _ = writeln!(
        h,
        "/* The message of the instance's last error (\"\" if none), valid until its next call. */"
    );
    let _ = writeln!(h, "const char *{name}_last_error(const {name}_ctx *ctx);\n");
    let _ = writeln!(
        h,
        "/* Sets the threads the instance runs on (at least 1); it starts with one per core. */"
    );
    let _ = writeln!(
        h,
        "int32_t {name}_set_threads({name}_ctx *ctx, int32_t threads);\n"
    );
    let _ = writeln!(h, "/* Frees an instance; NULL is ignored. */");
    let _ = writeln!(h, "void {name}_destroy({name}_ctx *ctx);\n");
    let _ = writeln!(
        h,
        "#ifdef __cplusplus\n}}\n#endif\n\n#endif /* {upper}_H */"
    );
    h
}

/// What [`link`] wrote and ran.
pub struct Linked {
    /// The files written, in order.
    pub files: Vec<PathBuf>,
    /// The commands run, as shell lines.
    pub commands: Vec<String>,
}

/// Writes the artifacts into `dir` (`<name>.o`, `<name>.h`, `<name>.weights` when external) and
/// links `lib<name>.so` and the executable `<name>` with the system C compiler (`$CC`, or `cc`).
pub fn link(artifacts: &Artifacts, dir: &Path) -> Result<Linked, CodegenError> {
    let io =
        |path: &Path, e: std::io::Error| CodegenError::Artifact(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = &artifacts.name;
    let mut files = Vec::new();
    let mut write = |file: String, bytes: &[u8]| -> Result<PathBuf, CodegenError> {
        let path = dir.join(file);
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        files.push(path.clone());
        Ok(path)
    };
    let object = write(format!("{name}.o"), &artifacts.object)?;
    write(format!("{name}.h"), artifacts.header.as_bytes())?;
    if let Some(weights) = &artifacts.weight_file {
        write(format!("{name}.weights"), weights)?;
    }
    let scratch = tempfile::tempdir().map_err(|e| io(Path::new("temporary directory"), e))?;
    let runtime = scratch.path().join("libkiln_runtime.a");
    std::fs::write(&runtime, RUNTIME_LIBRARY).map_err(|e| io(&runtime, e))?;
    let main = scratch.path().join(format!("{name}_main.o"));
    std::fs::write(&main, &artifacts.main_object).map_err(|e| io(&main, e))?;
    let exports = scratch.path().join(format!("{name}.map"));
    let version_script = format!(
        "{{\n  global:\n    {name}_create;\n    {name}_run;\n    {name}_last_error;\n    {name}_set_threads;\n    {name}_destroy;\n  local: *;\n}};\n"
    );
    std::fs::write(&exports, version_script).map_err(|e| io(&exports, e))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let native_libs: Vec<&str> = RUNTIME_NATIVE_LIBS.split_whitespace().collect();
    let library = dir.join(format!("lib{name}.so"));
    let executable = dir.join(name);
    let mut shared = Command::new(&cc);
    shared
        .arg("-shared")
        .arg("-o")
        .arg(&library)
        .arg(&object)
        .arg(&runtime)
        .arg(format!("-Wl,--version-script={}", exports.display()))
        .args([
            "-Wl,--gc-sections",
            "-Wl,--strip-debug",
            "-Wl,-z,noexecstack",
        ])
        .args(&native_libs);
    let mut exe = Command::new(&cc);
    exe.arg("-o")
        .arg(&executable)
        .arg(&main)
        .arg(&object)
        .arg(&runtime)
        .args([
            "-Wl,--gc-sections",
            "-Wl,--strip-debug",
            "-Wl,-z,noexecstack",
        ])
        .args(&native_libs);
    let mut commands = Vec::new();
    for (mut command, output) in [(shared, library), (exe, executable)] {
        let line = format!(
            "{} {}",
            command.get_program().to_string_lossy(),
            command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let result = command
            .output()
            .map_err(|e| CodegenError::Artifact(format!("running `{cc}`: {e}")))?;
        if !result.status.success() {
            return Err(CodegenError::Artifact(format!(
                "linking {} failed:\n{line}\n{}",
                output.display(),
                String::from_utf8_lossy(&result.stderr)
            )));
        }
        commands.push(line);
        files.push(output);
    }
    Ok(Linked { files, commands })
}
