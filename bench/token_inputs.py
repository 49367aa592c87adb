"""Writes a safetensors file of all-ones int64 [1, SEQ] inputs with the given names (the inputs
bench/ort_latency.py feeds ONNX Runtime): `python3 bench/token_inputs.py OUT SEQ NAME...`."""
import json
import struct
import sys

out, seq, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
data = struct.pack(f"<{seq}q", *([1] * seq))
header = {
    name: {"dtype": "I64", "shape": [1, seq], "data_offsets": [i * len(data), (i + 1) * len(data)]}
    for i, name in enumerate(names)
}
encoded = json.dumps(header).encode()
encoded += b" " * (-len(encoded) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + data * len(names))
