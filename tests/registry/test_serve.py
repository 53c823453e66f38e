"""`mlflow models serve -m models:/NAME@champion --env-manager local` answers REST requests on loopback,
alone and under concurrent load.

The server (one per module: it takes seconds to start) runs as a subprocess in its own process
group (MLflow starts uvicorn under it), with ``MLFLOW_TRACKING_URI`` pointing at the temp SQLite
store; start-up is polled on ``/ping`` with a bound, and the whole group is killed in the fixture's
teardown whatever happens.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moe_llava.registry.gate import GateSettings
from moe_llava.registry.registry import ModelRegistry
from tests.conftest import png_bomb
from tests.registry.conftest import LIMITS, image_base64

START_TIMEOUT_S = 240.0
REQUEST_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_champion(tracking_uri, logged_model, tmp_path_factory):
    model_name = "t-served-champion"
    tmp_path = tmp_path_factory.mktemp("serve")
    registry = ModelRegistry(model_name, GateSettings(), tracking_uri=tracking_uri)
    registry.register(logged_model["model_uri"], {"pope/mean_f1": 0.5}, run_id=logged_model["run_id"])
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow` and the `uvicorn` it execs live in the venv
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{model_name}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log_path = tmp_path / "server.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > START_TIMEOUT_S:
                pytest.fail(f"server not up after {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        startup_s = time.monotonic() - started
        print(f"mlflow models serve: up after {startup_s:.1f} s")
        yield {"url": base, "startup_s": startup_s}
    finally:
        _kill_group(proc)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_rest_invocations_answer_like_the_direct_model(served_champion, answerer, images):
    url = served_champion["url"] + "/invocations"
    questions = ["What shape is in the image?", "What color is the shape?"]
    direct = answerer.answer([(images[0], questions[0]), (images[1], questions[1])])

    split = _post(
        url,
        {
            "dataframe_split": {
                "columns": ["image", "prompt"],
                "data": [[image_base64(images[0]), questions[0]], [image_base64(images[1]), questions[1]]],
            }
        },
    )
    assert split == {"predictions": [{"answer": direct[0]}, {"answer": direct[1]}]}

    records = _post(
        url,
        {
            "dataframe_records": [
                {"image": "data:image/png;base64," + image_base64(images[0]), "prompt": questions[0]}
            ],
            "params": {"max_new_tokens": 1},
        },
    )
    assert len(records["predictions"]) == 1 and len(records["predictions"][0]["answer"]) <= len(direct[0])

    # Bad input: HTTP 400 with a message naming the row, and the server keeps serving.
    bomb = base64.b64encode(png_bomb(8000, 8000)).decode()
    over_pillow = base64.b64encode(png_bomb(14000, 14000)).decode()  # over Pillow's own limit too
    good = image_base64(images[0])
    bad_requests = [
        ([{"image": "not an image!"}], {}, "row 0: image 'not an image!' is not base64-encoded image data"),
        ([{"image": str(images[0])}], {}, "is not base64-encoded image data"),  # a file on the server
        ([{"image": bomb}], {}, "row 0: 8000x8000 = 64000000 pixels exceeds the limit"),
        ([{"image": over_pillow}], {}, "row 0: decompression bomb guard"),
        ([{"image": "QUFB" * 50_000}], {}, "row 0: image data of about 150000 bytes exceeds the limit"),
        ([{"image": good}] * (LIMITS["max_rows"] + 1), {}, "rows in one request exceed the limit"),
        ([{"image": good}], {"max_new_tokens": 100_000}, "exceeds the model's context"),
    ]
    for rows, params, message in bad_requests:
        payload = {"dataframe_records": [{**row, "prompt": questions[0]} for row in rows], "params": params}
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(url, payload)
        assert bad.value.code == 400
        body = json.loads(bad.value.read())
        assert body["error_code"] == "INVALID_PARAMETER_VALUE" and message in body["message"], body["message"]
    assert _post(url, {"dataframe_records": [{"image": good, "prompt": questions[0]}]}) == {
        "predictions": [{"answer": direct[0]}]
    }


LOAD_CLIENTS = 8
LOAD_S = 8.0
BAD_EVERY = 8  # one request in 8 is malformed: the errors must stay clear under load too


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rest_under_concurrent_load_every_response_is_an_answer_or_a_clear_error(
    served_champion, answerer, images
):
    """LOAD_CLIENTS clients post back to back for LOAD_S seconds; prints throughput and latency."""
    url = served_champion["url"] + "/invocations"
    question = "What shape is in the image?"
    expected = answerer.answer([(image, question) for image in images])
    good = [
        {"dataframe_split": {"columns": ["image", "prompt"], "data": [[image_base64(image), question]]}}
        for image in images
    ]
    bad = {"dataframe_records": [{"image": "not an image!", "prompt": question}]}
    deadline = time.monotonic() + LOAD_S

    def client(index: int) -> list[tuple[int | None, int, bytes, float]]:
        """(image index or None for a bad request, status, body, seconds) per request."""
        done = []
        while time.monotonic() < deadline:
            n = len(done)
            which = None if n % BAD_EVERY == BAD_EVERY - 1 else (index + n) % len(images)
            request = urllib.request.Request(
                url,
                data=json.dumps(bad if which is None else good[which]).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as err:  # a 4xx/5xx answer; a dropped connection fails the test
                status, body = err.code, err.read()
            done.append((which, status, body, time.perf_counter() - started))
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = [r for rs in pool.map(client, range(LOAD_CLIENTS)) for r in rs]
    elapsed = time.monotonic() - started

    for which, status, body, _ in results:
        if which is None:
            error = json.loads(body)
            assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE" and error["message"], (
                body[:300]
            )
        else:
            assert status == 200, f"HTTP {status}: {body[:300]!r}"
            assert json.loads(body) == {"predictions": [{"answer": expected[which]}]}
    latencies = sorted(seconds for which, _, _, seconds in results if which is not None)
    assert len(latencies) >= LOAD_CLIENTS and len(results) > len(latencies)
    percentiles = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"REST load: {LOAD_CLIENTS} clients, {elapsed:.1f} s: {len(results)} requests "
        f"({len(results) - len(latencies)} malformed, all 400), {len(results) / elapsed:.1f} requests/s; "
        f"answers p50 {percentiles[49] * 1000:.0f} ms, p99 {percentiles[98] * 1000:.0f} ms"
    )
