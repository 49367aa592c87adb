"""Sentence embeddings from Python with a kiln-compiled all-MiniLM-L6-v2, through ctypes and numpy.

Loads libminilm.so (made by `kiln compile ... --name minilm`), embeds the fixture's sentences
from their token ids and prints the cosine of each embedding with the transformers reference.
Usage: python embed.py LIBDIR REFERENCE.safetensors
"""

import ctypes
import json
import struct
import sys

import numpy as np

# From the generated minilm.h.
KILN_OK, KILN_F32, KILN_I64 = 0, 1, 4


class KilnTensor(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
        ("data", ctypes.c_void_p),
        ("bytes", ctypes.c_size_t),
    ]


def tensor(array, dtype_code):
    """A kiln_tensor over a C-contiguous numpy array (which must outlive the call)."""
    dims = np.array(array.shape, dtype=np.int64)
    t = KilnTensor(dtype_code, array.ndim, dims.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                   array.ctypes.data, array.nbytes)
    return t, dims


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    dtypes = {"I64": np.int64, "F32": np.float32}
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in dtypes:
            continue
        begin, end = entry["data_offsets"]
        data = raw[8 + header_len + begin:8 + header_len + end]
        tensors[name] = np.frombuffer(data, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return tensors


class Model:
    def __init__(self, library):
        self.lib = ctypes.CDLL(library)
        self.lib.minilm_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.minilm_run.argtypes = [ctypes.c_void_p, ctypes.POINTER(KilnTensor), ctypes.c_size_t,
                                        ctypes.POINTER(KilnTensor), ctypes.c_size_t]
        self.lib.minilm_last_error.argtypes = [ctypes.c_void_p]
        self.lib.minilm_last_error.restype = ctypes.c_char_p
        self.lib.minilm_destroy.argtypes = [ctypes.c_void_p]
        self.ctx = ctypes.c_void_p()
        if self.lib.minilm_create(None, ctypes.byref(self.ctx)) != KILN_OK:
            raise RuntimeError(self.lib.minilm_last_error(self.ctx).decode())

    def embed(self, input_ids, attention_mask, token_type_ids, max_seq=128):
        """Returns (last_hidden_state, sentence_embedding) for one sequence of token ids."""
        arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, token_type_ids)]
        inputs, keep = (KilnTensor * 3)(), []
        for i, array in enumerate(arrays):
            inputs[i], dims = tensor(array, KILN_I64)
            keep.append(dims)
        hidden = np.zeros((1, max_seq, 384), dtype=np.float32)
        embedding = np.zeros((1, 384), dtype=np.float32)
        outputs = (KilnTensor * 2)()
        outputs[0], hidden_dims = tensor(hidden, KILN_F32)
        outputs[1], embedding_dims = tensor(embedding, KILN_F32)
        if self.lib.minilm_run(self.ctx, inputs, 3, outputs, 2) != KILN_OK:
            raise RuntimeError(self.lib.minilm_last_error(self.ctx).decode())
        # The run wrote the actual dims; the buffers hold the values row-major at those dims.
        seq = int(hidden_dims[1])
        return hidden.reshape(-1)[:seq * 384].reshape(1, seq, 384), embedding

    def __del__(self):
        self.lib.minilm_destroy(self.ctx)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    library_dir, reference_path = sys.argv[1:]
    model = Model(f"{library_dir}/libminilm.so")
    reference = read_safetensors(reference_path)
    worst = 1.0
    for case in range(6):
        get = lambda name: reference[f"single{case}.{name}"]
        _, embedding = model.embed(get("input_ids"), get("attention_mask"), get("token_type_ids"))
        got, want = embedding[0].astype(np.float64), get("sentence_embedding")[0].astype(np.float64)
        cosine = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
        worst = min(worst, cosine)
        print(f"single{case}: {get('input_ids').shape[1]} tokens, cosine with the reference {cosine:.9f}")
    sys.exit(0 if worst > 0.99999 else 1)


if __name__ == "__main__":
    main()
