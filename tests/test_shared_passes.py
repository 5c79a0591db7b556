"""Requests to different endpoints and taps of one model, with the same inputs, ride in
one forward pass (and each still gets exactly its own outputs); config can turn it off.
Rows with byte-identical inputs in that pass are computed once (`dedup_rows`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
import zoo

ASKS = [("two_heads", None), ("two_heads.branches", None), ("two_heads", ["a_hidden"])]


def repository(tmp: Path, shared: bool, dedup: bool = True) -> Path:
    zoo.write_model("two_heads", tmp)
    config = dict(zoo.CONFIGS["two_heads"])
    # The batch closes when its 12 rows are in: three 4-row requests, one of each kind.
    config["batching"] = {"max_batch_size": 12, "max_queue_delay_ms": 60_000, "eager": False,
                          "shared_passes": shared, "dedup_rows": dedup}
    (tmp / "two_heads" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp


@pytest.mark.parametrize("shared", [True, False])
def test_mixed_endpoints_share_one_pass(start_server, tmp_path: Path, shared: bool) -> None:
    server = start_server(repository(tmp_path, shared), max_queue_delay_ms=60_000)
    model = keras.models.load_model(tmp_path / "two_heads" / "1" / "model.keras")
    feeds = [zoo.sample_inputs(model, batch=4, seed=i) for i in range(len(ASKS))]

    def call(i: int) -> dict[str, np.ndarray]:
        name, outputs = ASKS[i]
        return server.infer(name, feeds[i], outputs, timeout=None if shared else 2)

    if not shared:
        # Without sharing, each output set waits for its own full batch: none comes.
        with ThreadPoolExecutor(3) as pool, pytest.raises(Exception, match="DEADLINE"):
            list(pool.map(call, range(3)))
        assert server.metric("tapserve_batch_size_count", model="two_heads") == 0
        return
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, range(3)))
    assert server.metric("tapserve_batch_size_count", model="two_heads") == 1
    assert server.metric("tapserve_batch_size_sum", model="two_heads") == 12
    assert server.metric("tapserve_deduplicated_rows_total", model="two_heads") == 0
    check_answers(model, feeds, results)


def check_answers(model: keras.Model, feeds: list[dict[str, np.ndarray]],
                  results: list[dict[str, np.ndarray]]) -> None:
    """Each of ASKS' results is what the model computes for that request alone."""
    probe = keras.Model(model.inputs, {
        "label": model.output["label"], "score": model.output["score"],
        **{n: model.get_layer(n).output for n in ("a_hidden", "branch_a", "branch_b")}})
    expect = [["label", "score"], ["branch_a", "branch_b"], ["a_hidden"]]
    for i, result in enumerate(results):
        want = {k: np.asarray(v) for k, v in probe(feeds[i]["x"]).items()}
        assert sorted(result) == sorted(expect[i])
        for name in expect[i]:
            np.testing.assert_allclose(result[name], want[name], atol=1e-5)


@pytest.mark.parametrize("dedup", [True, False])
def test_the_same_rows_asked_of_different_endpoints_are_computed_once(
        start_server, tmp_path: Path, dedup: bool) -> None:
    server = start_server(repository(tmp_path, True, dedup), max_queue_delay_ms=60_000)
    model = keras.models.load_model(tmp_path / "two_heads" / "1" / "model.keras")
    image = zoo.sample_inputs(model, batch=4, seed=7)
    image["x"][2] = image["x"][0]  # a row repeated inside one request too
    with ThreadPoolExecutor(3) as pool:  # the same 4 rows to two endpoints and a tap
        results = list(pool.map(lambda ask: server.infer(ask[0], image, ask[1]), ASKS))
    check_answers(model, [image] * 3, results)
    assert server.metric("tapserve_batch_size_count", model="two_heads") == 1
    assert server.metric("tapserve_batch_size_sum", model="two_heads") == 12  # rows asked
    # 12 rows asked, 3 distinct: 9 not computed.
    assert server.metric("tapserve_deduplicated_rows_total", model="two_heads") == (
        9 if dedup else 0)
