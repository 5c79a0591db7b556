"""The bench's Keras model as a Seldon MLServer custom runtime (bench/.venvs/mlserver).

What a user would write: load the .keras file once, wrap the model in a `tf.function`
with a None-batch input signature (as Tapserve does; `model.predict` costs ~40 ms a
call), and let MLServer's adaptive batching merge requests (model-settings.json:
`max_batch_size`, `max_batch_time`). `parallel_workers: 0` (settings.json) runs it in
the server's own process. TensorFlow gets Tapserve's threading (bench/run.py passes it)
so only the serving stack differs. Each predict call records its rows in the histogram
`bench_batch_rows`, so the bench can report the mean batch size.
"""

from __future__ import annotations

import os

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from prometheus_client import REGISTRY, Histogram

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class KerasModel(MLModel):
    async def load(self) -> bool:
        import keras
        import tensorflow as tf

        extra = self.settings.parameters.extra or {}
        tf.config.threading.set_intra_op_parallelism_threads(int(extra.get("intra_op", 1)))
        tf.config.threading.set_inter_op_parallelism_threads(int(extra.get("inter_op", 2)))
        model = keras.models.load_model(self.settings.parameters.uri, compile=False)
        spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype)

        @tf.function(input_signature=[spec])
        def run(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        self._run = run
        self._output = model.output_names[0]
        run(np.zeros((1, *spec.shape[1:]), dtype=spec.dtype.as_numpy_dtype))  # trace
        # On prometheus_client's default registry: with parallel_workers 0, MLServer's
        # /metrics serves that one, not the one `mlserver.register` adds to.
        if "bench_batch_rows" not in REGISTRY._names_to_collectors:
            Histogram("bench_batch_rows", "Rows per predict call.", ["model_name"])
        self._rows = REGISTRY._names_to_collectors["bench_batch_rows"].labels(self.name)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        self._rows.observe(len(x))
        y = np.asarray(self._run(x))
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._output, y)])
