"""Writes a safetensors file with one f32 input `x` of N values drawn from a normal distribution
with standard deviation SCALE (seed 0), for `kiln bench --inputs`:
`python3 bench/normal_input.py OUT N SCALE`. Needs numpy."""
import json
import struct
import sys

import numpy as np

out, n, scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
x = (np.random.default_rng(0).standard_normal(n) * scale).astype("<f4")
header = json.dumps({"x": {"dtype": "F32", "shape": [n], "data_offsets": [0, x.nbytes]}}).encode()
header += b" " * (-len(header) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + x.tobytes())
