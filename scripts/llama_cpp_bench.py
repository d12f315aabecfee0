#!/usr/bin/env python3
"""Reference benchmark: llama.cpp (through llama-cpp-python) on a GGUF model, on the CPU.

Usage:
  python3 scripts/llama_cpp_bench.py --model FILE.gguf --threads 2 \
      --prompt-tokens 512 --decode-tokens 128 [--repeats 3]

Prints one line of JSON on stdout:
  {"engine": "llama.cpp", "version": ..., "decode_tok_s": ..., "prefill_tok_s": ..., "threads": ...,
   "prompt_tokens": ..., "decode_tokens": ..., "repeats": ..., "n_vocab": ...}
or, when llama-cpp-python cannot be imported (exit status 0):
  {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"}

Method (no tokenizer involved): the prompt is a fixed list of token ids ([2] = <bos>, then
(i*7919 % 200000) + 1000). Prefill times one llm.eval() of the whole prompt (n_batch = n_ubatch =
prompt tokens, so one batch). Decode then runs greedily: argmax of the last logits, eval that one
token, --decode-tokens times. Each figure is the median of --repeats runs, after a warm-up run
(gemma-bench times its own side the same way).
"""

import argparse
import json
import os
import statistics
import sys
import time

SKIP_HINT = "pip install llama-cpp-python==0.3.36"


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def prompt_ids(n, n_vocab):
    span = min(200000, n_vocab - 1000)
    return [2] + [(i * 7919 % span) + 1000 for i in range(1, n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for name in ("threads", "prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    try:
        import llama_cpp
    except ModuleNotFoundError:
        emit({"skipped": f"llama-cpp-python is not installed ({SKIP_HINT})"})
        return 0
    except Exception as e:  # installed but broken, e.g. its shared library fails to load
        emit({"skipped": f"llama-cpp-python failed to import: {type(e).__name__}: {e} ({SKIP_HINT})"})
        return 0
    import numpy as np

    if not os.path.isfile(args.model):
        print(f"llama_cpp_bench: model file not found: {args.model}", file=sys.stderr)
        return 2

    # Whatever llama.cpp prints goes to stderr; stdout carries only the JSON line.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=args.prompt_tokens + args.decode_tokens + 16,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_batch=args.prompt_tokens,
            n_ubatch=args.prompt_tokens,
            verbose=False,
            logits_all=False,
        )
        n_vocab = llm.n_vocab()
        tokens = prompt_ids(args.prompt_tokens, n_vocab)

        # With logits_all=False, llama-cpp-python 0.3.x no longer copies logits into llm.scores
        # (so llm.scores / llm.eval_logits stay stale); read the last row from llama.cpp itself.
        def last_argmax():
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

        def run(n_prompt, n_decode):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens[:n_prompt])
            t1 = time.perf_counter()
            for _ in range(n_decode):
                llm.eval([last_argmax()])
            t2 = time.perf_counter()
            return n_prompt / (t1 - t0), (n_decode / (t2 - t1)) if n_decode else 0.0

        run(args.prompt_tokens, min(8, args.decode_tokens))  # warm-up
        prefills, decodes = [], []
        for i in range(args.repeats):
            p, d = run(args.prompt_tokens, args.decode_tokens)
            print(f"llama_cpp_bench: run {i + 1}/{args.repeats}: prefill {p:.1f} tok/s, "
                  f"decode {d:.1f} tok/s", file=sys.stderr)
            prefills.append(p)
            decodes.append(d)
        prefill, decode = statistics.median(prefills), statistics.median(decodes)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)

    emit({
        "engine": "llama.cpp",
        "version": getattr(llama_cpp, "__version__", "unknown"),
        "decode_tok_s": round(decode, 2),
        "prefill_tok_s": round(prefill, 2),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "n_vocab": n_vocab,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
