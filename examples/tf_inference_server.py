"""The inference server of inference_server.py with a TensorFlow (Keras) model: the same batching
handler, awaited with aiocuda.gpu_op and with run_in_executor.

    python examples/tf_inference_server.py [--seconds 3] [--clients 64]

Needs: tensorflow, aiohttp.

On a GPU, gpu_op awaits the device's queued work (TensorFlow exposes no stream; see
aiocuda.tensorflow); on the CPU the model runs on a cpu-backend stream.
"""

from __future__ import annotations

import asyncio

from inference_server import FEATURES, Infer, main


def tensorflow_predictors() -> tuple[Infer, Infer, str]:
    import tensorflow as tf

    import aiocuda

    tf.random.set_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(FEATURES,)),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(10),
    ])

    @tf.function(reduce_retracing=True)
    def classify(x: tf.Tensor) -> tf.Tensor:
        return tf.argmax(model(x, training=False), axis=1)

    async def with_aiocuda(batch: list[list[float]]) -> list[int]:
        y = await aiocuda.gpu_op(classify, tf.constant(batch, dtype=tf.float32))
        return [int(v) for v in y.numpy()]

    def blocking(batch: list[list[float]]) -> list[int]:
        return [int(v) for v in classify(tf.constant(batch, dtype=tf.float32)).numpy()]

    async def with_executor(batch: list[list[float]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(None, blocking, batch)

    gpus = tf.config.list_physical_devices("GPU")
    return with_aiocuda, with_executor, f"TensorFlow {tf.__version__} on {'GPU' if gpus else 'CPU'}"


if __name__ == "__main__":
    main(tensorflow_predictors)
