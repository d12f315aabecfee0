"""The official `openai` Python package against a real cluster: completions, chat, streaming.

Starts gemma-coordinator (2 local workers, tp=2) on a tiny random Gemma model with the real
tokenizer, talks to it with the client, and stops it. Run by .ci/run after the cargo tests:
    python3 tests/openai_client_test.py TARGET_DIR
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import openai

TIMEOUT_S = 120


def start_cluster(target: str, model_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [os.path.join(target, "gemma-coordinator"), "--model", model_dir, "--tp", "2",
         "--listen", "127.0.0.1:0", "--kv-budget-mib", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))
    reader.start()
    reader.join(TIMEOUT_S)
    if not line or "listening on" not in line[0]:
        proc.kill()
        raise SystemExit(f"coordinator did not start: {line}")
    return proc, line[0].strip().rsplit(" ", 1)[-1]


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "target/debug"
    tokenizer = os.environ.get("GEMMA_TOKENIZER_DIR",
                               os.path.expanduser("~/.cache/gemma-cluster/tokenizer-gemma"))
    work = tempfile.mkdtemp()
    model = os.path.join(work, "gemma-tiny")
    subprocess.run([os.path.join(target, "gemma-tiny-model"), model, "mqa"], check=True,
                   stderr=subprocess.DEVNULL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer, name), model)
    proc, base = start_cluster(target, model)
    passed = failed = 0
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=TIMEOUT_S)
        checks = []

        def check(name):
            def wrap(fn):
                checks.append((name, fn))
                return fn
            return wrap

        @check("models.list")
        def _():
            ids = [m.id for m in client.models.list().data]
            assert ids == ["gemma-tiny"], ids

        @check("completions.create")
        def _():
            r = client.completions.create(model="gemma-tiny", prompt="The capital of France is",
                                          max_tokens=8, temperature=0, logprobs=2)
            c = r.choices[0]
            assert r.object == "text_completion" and c.finish_reason in ("stop", "length"), r
            assert r.usage.completion_tokens == len(c.logprobs.tokens) <= 8, r.usage
            assert all(len(t) == 2 for t in c.logprobs.top_logprobs), c.logprobs

        @check("chat.completions.create")
        def _():
            r = client.chat.completions.create(
                model="gemma-tiny", max_tokens=6, seed=7, temperature=0.8, top_p=0.9,
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi 👋"}],
                logprobs=True, top_logprobs=3)
            again = client.chat.completions.create(
                model="gemma-tiny", max_tokens=6, seed=7, temperature=0.8, top_p=0.9,
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi 👋"}])
            m = r.choices[0].message
            assert m.role == "assistant" and m.content == again.choices[0].message.content, (r, again)
            assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)

        @check("chat streaming")
        def _():
            full = client.chat.completions.create(
                model="gemma-tiny", max_tokens=10, temperature=0,
                messages=[{"role": "user", "content": "Count to five."}])
            stream = client.chat.completions.create(
                model="gemma-tiny", max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Count to five."}])
            text, finish, usage = "", None, None
            for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            assert text == full.choices[0].message.content, (text, full)
            assert finish == full.choices[0].finish_reason
            assert usage and usage.completion_tokens == full.usage.completion_tokens

        @check("completions streaming")
        def _():
            full = client.completions.create(model="gemma-tiny", prompt="Once upon a time",
                                             max_tokens=12, temperature=0)
            text = "".join(c.choices[0].text for c in client.completions.create(
                model="gemma-tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                stream=True) if c.choices)
            assert text == full.choices[0].text, (text, full.choices[0].text)

        @check("bad request is an APIError with the reason")
        def _():
            try:
                client.completions.create(model="gemma-tiny", prompt="x", temperature=7)
            except openai.BadRequestError as e:
                assert "temperature" in str(e), e
            else:
                raise AssertionError("temperature=7 was accepted")

        for name, fn in checks:
            try:
                fn()
                passed += 1
                print(f"ok: {name}")
            except Exception as e:  # noqa: BLE001 - report every failing check
                failed += 1
                print(f"FAILED: {name}: {e!r}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"openai: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
