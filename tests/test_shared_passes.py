"""Requests to different endpoints and taps of one model, with the same inputs, ride in
one forward pass (and each still gets exactly its own outputs); config can turn it off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
import zoo

ASKS = [("two_heads", None), ("two_heads.branches", None), ("two_heads", ["a_hidden"])]


def repository(tmp: Path, shared: bool) -> Path:
    zoo.write_model("two_heads", tmp)
    config = dict(zoo.CONFIGS["two_heads"])
    # The batch closes when its 12 rows are in: three 4-row requests, one of each kind.
    config["batching"] = {"max_batch_size": 12, "max_queue_delay_ms": 60_000,
                          "shared_passes": shared}
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
    probe = keras.Model(model.inputs, {
        "label": model.output["label"], "score": model.output["score"],
        **{n: model.get_layer(n).output for n in ("a_hidden", "branch_a", "branch_b")}})
    expect = [["label", "score"], ["branch_a", "branch_b"], ["a_hidden"]]
    for i, result in enumerate(results):
        want = {k: np.asarray(v) for k, v in probe(feeds[i]["x"]).items()}
        assert sorted(result) == sorted(expect[i])
        for name in expect[i]:
            np.testing.assert_allclose(result[name], want[name], atol=1e-5)
