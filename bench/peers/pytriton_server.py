"""The bench's Keras model behind NVIDIA PyTriton (bench/.venvs/pytriton).

    bench/.venvs/pytriton/bin/python bench/peers/pytriton_server.py --model M.keras \
        --name dense64 --grpc-port P --http-port H --metrics-port Q \
        --max-batch-size 32 --max-queue-delay-us 2000

What a user would write: `@batch` on an infer function over a `tf.function` with a
None-batch input signature, bound with Triton's dynamic batcher. TensorFlow gets
Tapserve's threading (bench/run.py passes it) so only the serving stack differs.
The Triton server PyTriton starts needs the running Python's libpython: on a
pyenv/virtualenv Python, set LD_LIBRARY_PATH to its lib directory (bench/run.py does).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=2)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    model = keras.models.load_model(args.model, compile=False)
    source = model.inputs[0]
    input_name = source.name
    output_name = model.output_names[0]
    spec = tf.TensorSpec((None, *source.shape[1:]), source.dtype)

    @tf.function(input_signature=[spec])
    def run(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    run(np.zeros((1, *spec.shape[1:]), dtype=spec.dtype.as_numpy_dtype))  # trace

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {output_name: np.asarray(run(inputs[input_name]))}

    dtype = np.dtype(spec.dtype.as_numpy_dtype)
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          http_address="127.0.0.1", http_port=args.http_port,
                          metrics_port=args.metrics_port, allow_metrics=True)
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name, infer_func=infer,
            inputs=[Tensor(name=input_name, dtype=dtype, shape=tuple(source.shape[1:]))],
            outputs=[Tensor(name=output_name, dtype=np.float32,
                            shape=tuple(model.outputs[0].shape[1:]))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=DynamicBatcher(
                max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
