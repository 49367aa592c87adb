"""The attention block's expected output, computed with numpy independently of kiln (float64).

Run in a local environment with numpy and safetensors (never in CI; the result is committed):
    python examples/attention_block/reference.py
"""
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = Path(__file__).parent
HEADS, HEAD_DIM = 2, 8

weights = {k: v.astype(np.float64) for k, v in load_file(HERE / "attention_block.safetensors").items()}
inputs = load_file(HERE / "inputs.safetensors")
x = inputs["x"].astype(np.float64)
mask = inputs["attention_mask"]
batch, seq, hidden = x.shape


def project(name, t):
    return t @ weights[f"{name}.weight"] + weights[f"{name}.bias"]


def split_heads(t):
    return t.reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)


q = split_heads(project("q_proj", x))
k = split_heads(project("k_proj", x))
v = split_heads(project("v_proj", x))
scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
scores = scores + (1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min
scores -= scores.max(axis=-1, keepdims=True)
probs = np.exp(scores)
probs /= probs.sum(axis=-1, keepdims=True)
context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
out = project("o_proj", context)
save_file({"hidden_states": out.astype(np.float32)}, HERE / "expected.safetensors")
print(f"wrote expected.safetensors: hidden_states {out.shape}, |max| {np.abs(out).max():.4f}")
