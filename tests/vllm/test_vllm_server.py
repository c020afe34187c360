"""`engram serve` behind the official `openai` client: completions, chat, streaming, stop,
logprobs and seed work unchanged and give engram's numbers; 64 concurrent streams with some
clients gone mid-stream leave nothing running; bad requests get 4xx in the OpenAI error format
and the server keeps serving. A named overlay (`engram serve --overlay`) is selected per request
through `vllm_xargs` and gives the materialized edit's numbers; an unknown one is an HTTP 400.
One server start (~35 s) for the module."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run in the vLLM venv "
                    "(pip install -e '.[vllm]', docs/serving.md)")
openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.vllm.harness import LOGPROB_TOL, bios_prompts, reference, write_folder, write_overlay  # noqa: E402

pytestmark = pytest.mark.vllm
CONTEXT = 256
LEAVERS = set(range(3, 64, 10))  # 7 of 64 streaming clients (~10%) close their stream mid-way


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    folder = write_folder(root / "tiny-engram", train_steps=150)
    overlay_prompt = bios_prompts(folder, [40])[0]
    write_overlay(folder, overlay_prompt, root / "ov_alice", root / "edited_alice", seed=0)
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.Popen([sys.executable, "-m", "engram", "serve", str(folder), "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", "float32", "--max-model-len", str(CONTEXT),
                             "--enforce-eager", "--max-num-seqs", "64", "--block-size", "32",
                             "--overlay", f"alice={root / 'ov_alice'}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"server did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(1)
        yield {"base": base, "folder": folder, "client": openai.OpenAI(base_url=f"{base}/v1", api_key="none"),
               "model": "tiny-engram", "overlay_prompt": overlay_prompt, "edited": root / "edited_alice"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def complete(server, prompt, **kw):
    return server["client"].completions.create(model=server["model"], prompt=prompt, **kw)


def test_completions_and_logprobs_are_engrams(server):
    prompts = bios_prompts(server["folder"], [12, 40, 75])
    expected = reference(server["folder"], prompts, n=16)
    for prompt, (tokens, logps) in zip(prompts, expected):
        out = complete(server, prompt, max_tokens=16, temperature=0, logprobs=2,
                       extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
        assert out.token_ids == tokens
        assert all(len(top) == 2 for top in out.logprobs.top_logprobs)
        assert max(abs(a - b) for a, b in zip(out.logprobs.token_logprobs, logps)) < LOGPROB_TOL


def test_streaming_and_stop(server):
    prompt = "Their birth city was"
    full = complete(server, prompt, max_tokens=24, temperature=0).choices[0]
    chunks = complete(server, prompt, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full.text
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), full.text
    cut = complete(server, prompt, max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_chat_applies_the_template(server):
    reply = server["client"].chat.completions.create(
        model=server["model"], messages=[{"role": "user", "content": "Where was Alice born?"}], max_tokens=12,
        temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = reply.choices[0]
    assert choice.message.content
    (tokens, _), = reference(server["folder"], [reply.prompt_token_ids], n=12)
    assert choice.token_ids == tokens


def test_seed_makes_sampling_repeatable(server):
    texts = [complete(server, "She studied", max_tokens=20, temperature=1.0, seed=seed).choices[0].text
             for seed in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_concurrent_streams_with_disconnects_leave_nothing_running(server):
    prompts = bios_prompts(server["folder"], [20 + 2 * i for i in range(64)])
    expected = reference(server["folder"], prompts, n=20)
    client = openai.AsyncOpenAI(base_url=f"{server['base']}/v1", api_key="none")

    async def one(i):
        stream = await client.completions.create(model=server["model"], prompt=prompts[i], max_tokens=20,
                                                 temperature=0, stream=True,
                                                 extra_body={"return_token_ids": True, "ignore_eos": True})
        got = []
        async for chunk in stream:
            got += chunk.choices[0].token_ids or []
            if i in LEAVERS and len(got) >= 2:  # these clients leave mid-stream
                await stream.close()
                return None
        return got

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(all_of_them())
    finished = [(got, exp) for got, (exp, _) in zip(results, expected) if got is not None]
    assert len(finished) == 64 - len(LEAVERS)
    assert all(got == exp for got, exp in finished)
    deadline = time.time() + 15
    while True:
        m = metrics(server["base"])
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            break
        assert time.time() < deadline, f"requests or blocks left after the clients finished: {m}"
        time.sleep(0.5)


def test_a_request_selects_its_overlay_and_an_unknown_one_is_a_400(server):
    prompt = server["overlay_prompt"]
    (tokens, logps), = reference(server["edited"], [prompt], n=16)
    (plain, _), = reference(server["folder"], [prompt], n=16)
    assert tokens != plain  # the overlay changes this prompt's tokens
    body = {"return_token_ids": True, "ignore_eos": True}
    out = complete(server, prompt, max_tokens=16, temperature=0, logprobs=0,
                   extra_body={**body, "vllm_xargs": {"engram_overlays": "alice"}}).choices[0]
    assert out.token_ids == tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs.token_logprobs, logps)) < LOGPROB_TOL
    assert complete(server, prompt, max_tokens=16, temperature=0, extra_body=body).choices[0].token_ids == plain
    with pytest.raises(openai.BadRequestError, match="no overlay named 'bob' is served"):
        complete(server, prompt, max_tokens=4, extra_body={"vllm_xargs": {"engram_overlays": "bob"}})


@pytest.mark.parametrize("bad", [
    {"prompt": "word " * 400, "max_tokens": 8},  # over the context
    {"prompt": "hello", "max_tokens": "many"},  # wrong type
    {"prompt": "hello", "max_tokens": 8, "temperature": -1},  # out of range
    {"prompt": "hello", "max_tokens": 8, "model": "another-model"},  # no such model
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, bad):
    kw = {"model": server["model"], **bad}
    with pytest.raises(openai.APIStatusError) as info:
        server["client"].completions.create(**kw)
    assert 400 <= info.value.status_code < 500
    body = info.value.body
    body = body.get("error", body) if isinstance(body, dict) else body
    assert isinstance(body, dict) and body.get("message") and body.get("type"), info.value.body
    assert complete(server, "hello", max_tokens=4, temperature=0).choices[0].text is not None
