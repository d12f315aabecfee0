"""Golden logits and greedy tokens from HF transformers for the test kit's tiny Gemma 2/3 models.

Run through scripts/golden/make-golden.sh, which builds the `gemma-tiny-model` binary and a venv
with pinned CPU torch and transformers. For every variant in VARIANTS the binary writes the tiny
model as an HF folder (config.json, model.safetensors, tiny_model.json); transformers loads it
with AutoModelForCausalLM in float32 with eager attention, and greedily continues each prompt,
recomputing the whole sequence at every step (no KV cache: only the attention masks decide what a
query sees). The file records, per prompt, the greedy tokens and, at the prefill and at the last
step, the 20 largest logits, the logits of a few fixed ids and the log-sum-exp of the whole row.

The Rust tests (worker/tests/independent_references/) read these files without torch; they refuse
a file whose recorded provenance (seed, storage, config.json, weight fingerprint) is not what the
kit writes today.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import safetensors
import torch
import transformers
from transformers import AutoModelForCausalLM

VARIANTS = ["gemma2", "gemma2-within-candle", "gemma3", "gemma3-unscaled"]
NEW_TOKENS = 32
TOP = 20
# A few ids anywhere in the vocabulary (every variant has at least 256000 ids).
FIXED_IDS = [0, 1, 2, 3, 106, 4242, 65535, 123457, 200003, 255999]
# The steps whose logits are recorded: the prefill, and the step that picks the last token.
RECORDED_STEPS = [0, NEW_TOKENS - 1]


def splitmix64(seed):
    """The kit's generator (proto/src/rng.rs), to draw the same prompts as the worker's tests."""
    mask = (1 << 64) - 1
    state = seed
    while True:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        yield z ^ (z >> 31)


def prompts():
    """worker/tests/common::prompts(): <bos> and random ids, 5, 11 and 23 tokens long, so the
    longer two outrun both tiny models' windows (5 and 6) while prefilling."""
    rng = splitmix64(42)
    return [[2] + [3 + next(rng) % 255_990 for _ in range(n - 1)] for n in (5, 11, 23)]


def summary(row):
    """What is kept of one row of logits (float32 values written exactly)."""
    top = torch.topk(row, TOP)
    return {
        "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        "fixed": [[i, float(row[i])] for i in FIXED_IDS],
        "log_sum_exp": float(torch.logsumexp(row.double(), 0)),
    }


def greedy(model, prompt):
    ids = list(prompt)
    tokens, steps, margin = [], [], float("inf")
    for step in range(NEW_TOKENS):
        out = model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        row = out.logits[0, -1].float()
        if step in RECORDED_STEPS:
            steps.append({"step": step, **summary(row)})
        best2 = torch.topk(row, 2).values
        margin = min(margin, float(best2[0] - best2[1]))
        token = int(torch.argmax(row))
        tokens.append(token)
        ids.append(token)
    return {"prompt": prompt, "tokens": tokens, "min_margin": margin, "steps": steps}


def check_reading(model, config):
    """Refuses to write a golden file of a model other than the one config.json describes: the
    point of the file is an independent reading, so a key transformers ignored or read
    differently must stop the script, not become the truth."""
    hf = model.config
    layers = config["num_hidden_layers"]
    if config["model_type"] == "gemma2":
        want_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    else:
        want_types = config["layer_types"]
    checks = {
        "layer_types": (list(hf.layer_types), want_types),
        "sliding_window": (hf.sliding_window, config["sliding_window"]),
        "query_pre_attn_scalar": (hf.query_pre_attn_scalar, config["query_pre_attn_scalar"]),
        "attn_logit_softcapping": (hf.attn_logit_softcapping, config["attn_logit_softcapping"]),
        "final_logit_softcapping": (hf.final_logit_softcapping, config["final_logit_softcapping"]),
    }
    for name, (got, want) in checks.items():
        if got != want:
            sys.exit(f"transformers read {name} as {got!r}, config.json says {want!r}")
    check_rope(model, config)
    return {
        "layer_types": list(hf.layer_types),
        "sliding_window": hf.sliding_window,
        "query_pre_attn_scalar": hf.query_pre_attn_scalar,
        "attn_logit_softcapping": hf.attn_logit_softcapping,
        "final_logit_softcapping": hf.final_logit_softcapping,
        "rope_parameters": hf.rope_parameters,
    }


def check_rope(model, config):
    """The inverse frequencies transformers uses per layer kind are those config.json asks for:
    base rope_theta (Gemma 3's sliding layers: rope_local_base_freq), divided by the linear
    scaling factor on Gemma 3's global layers."""
    head_dim = config["head_dim"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    rotary = model.model.rotary_emb
    if config["model_type"] == "gemma2":
        expected = {None: 1.0 / config["rope_theta"] ** exponents}
        got = {None: rotary.inv_freq}
    else:
        factor = (config.get("rope_scaling") or {}).get("factor", 1.0)
        expected = {
            "full_attention": 1.0 / config["rope_theta"] ** exponents / factor,
            "sliding_attention": 1.0 / config["rope_local_base_freq"] ** exponents,
        }
        got = {kind: getattr(rotary, f"{kind}_inv_freq") for kind in expected}
    for kind, want in expected.items():
        if not torch.allclose(got[kind].float(), want.float(), rtol=1e-6, atol=0):
            sys.exit(f"transformers' RoPE for {kind}: {got[kind]} != {want}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-model", required=True, help="the gemma-tiny-model binary")
    parser.add_argument("--out", required=True, type=Path, help="tests/golden")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / variant
            subprocess.run([args.tiny_model, str(folder), variant], check=True)
            description = json.loads((folder / "tiny_model.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="eager"
            ).eval()
            config = description["provenance"]["config"]
            golden = {
                "generator": "scripts/golden/make-golden.sh",
                "versions": versions,
                "model_class": type(model).__name__,
                "dtype": "float32",
                "attention": "eager",
                "variant": variant,
                "provenance": description["provenance"],
                "transformers_reading": check_reading(model, config),
                "new_tokens": NEW_TOKENS,
                "runs": [greedy(model, p) for p in prompts()],
            }
        path = args.out / f"{variant}.json"
        path.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
