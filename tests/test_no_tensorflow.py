"""No module of the server imports tensorflow on the jax backend (SPEC "Backends"): a
process on jax imports every module of service/ but TensorFlow's own, serves a .keras
model, answers one request through each front door (KServe gRPC and REST, TF Serving
gRPC and REST), and has imported neither tensorflow nor tensorflow_serving.

The check runs in a process of its own (this file, run as a script): the test process
may have imported TensorFlow already, and keras picks its backend once per process. The
test process writes the model and Keras' answers (keras.utils.set_random_seed, which the
zoo calls, imports tensorflow wherever it is installed).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import zoo

ROOT = Path(__file__).resolve().parents[1]
# The modules that are TensorFlow's code, imported only on the tensorflow backend.
TF_ONLY = {"service.runtime_tf", "service.explain_tf", "service.savedmodel_ops"}
DOORS = ["kserve_grpc", "kserve_rest", "tfserving_grpc", "tfserving_rest"]


def test_no_module_imports_tensorflow_on_jax(tmp_path: Path) -> None:
    pytest.importorskip("jax", reason="the jax backend is not installed")
    path = zoo.write_model("autoencoder", tmp_path / "models")
    image = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
    want = np.asarray(keras.saving.load_model(path)(image))
    np.savez(tmp_path / "expected.npz", image=image, want=want)
    env = {**os.environ, "TAPSERVE_BACKEND": "jax", "KERAS_BACKEND": "jax",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["backend"] == "jax"
    assert result["imported"] > 40  # every module of service/ but TF_ONLY
    assert result["answered"] == DOORS
    assert result["tensorflow_modules"] == []


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def main(folder: Path) -> None:
    import service

    names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.")
             if m.name not in TF_ONLY]
    for name in names:
        importlib.import_module(name)

    from harness import RunningServer
    from ports import free_port

    from service.protocol.generated import tf_serving_apis_pb2 as tfs
    from service.protocol.generated import tf_serving_apis_pb2_grpc as tfs_grpc
    from service.protocol.tensorproto import from_numpy, to_numpy

    expected = np.load(folder / "expected.npz")
    image, want = expected["image"], expected["want"]
    server = RunningServer(folder / "models", http_port=free_port())
    http = f"http://127.0.0.1:{server.server.settings.http_port}"
    answers = {}
    try:
        answers["kserve_grpc"] = server.infer("autoencoder", {"image": image})["recon"]
        answer = _post(f"{http}/v2/models/autoencoder/infer", {"inputs": [{
            "name": "image", "shape": list(image.shape), "datatype": "FP32",
            "data": image.ravel().tolist()}]})
        answers["kserve_rest"] = np.reshape(answer["outputs"][0]["data"],
                                            answer["outputs"][0]["shape"])
        request = tfs.PredictRequest(model_spec=tfs.ModelSpec(name="autoencoder"),
                                     inputs={"image": from_numpy(image)})
        response = tfs_grpc.PredictionServiceStub(server.channel).Predict(request, timeout=60)
        answers["tfserving_grpc"] = to_numpy("recon", response.outputs["recon"])
        answers["tfserving_rest"] = np.asarray(_post(
            f"{http}/v1/models/autoencoder:predict", {"instances": image.tolist()}
        )["predictions"])
    finally:
        server.stop()
    for door, got in answers.items():
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=door)
    print(json.dumps({
        "backend": keras.backend.backend(), "imported": len(names), "answered": list(answers),
        "tensorflow_modules": sorted({m.split(".")[0] for m in sys.modules} & {
            "tensorflow", "tensorflow_serving"}),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
