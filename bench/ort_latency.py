"""Median latency of ONNX Runtime on an ONNX encoder at batch 1 and the given sequence length.

Usage: ort_latency.py MODEL.onnx SEQ THREADS ITERS  -> prints "onnxruntime VERSION MEDIAN_MS"
"""
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

model, seq, threads, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
feed = {i.name: np.ones((1, seq), dtype=np.int64) for i in session.get_inputs()}
for _ in range(3):
    session.run(None, feed)
times = []
for _ in range(iters):
    start = time.perf_counter()
    session.run(None, feed)
    times.append((time.perf_counter() - start) * 1e3)
print(f"onnxruntime {ort.__version__} {statistics.median(times):.3f}")
