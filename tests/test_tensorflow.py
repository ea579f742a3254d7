"""gpu_op and wait with TensorFlow on the CPU (tensorflow-cpu in CI).

The GPU path (a whole-device wait) runs against the driver emulator in
test_cuda_emu.py::test_gpu_op_on_a_tensorflow_gpu_device_awaits_the_device and on a real GPU in
tests/test_gpu.py.
"""

from __future__ import annotations

import threading

import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (tensorflow-cpu)")

import aiocuda  # noqa: E402
import aiocuda.tensorflow as atf  # noqa: E402
from aiocuda._ops import Place, _tf_place  # noqa: E402


def test_gpu_op_runs_eager_and_tf_function_work_on_a_cpu_stream(run):
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])

    @tf.function
    def square(a):
        return tf.matmul(a, a)

    async def main():
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def eager(a):
            threads.append(threading.get_ident())
            return tf.reduce_sum(a * 2.0)

        total = await aiocuda.gpu_op(eager, x)
        sq = await aiocuda.gpu_op(square, x)
        return float(total), sq.numpy().tolist(), threads[0] != loop_thread

    total, sq, off_loop = run(main())
    assert total == 20.0 and sq == [[7.0, 10.0], [15.0, 22.0]] and off_loop


def test_a_keras_model_as_the_function(run):
    model = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])

    async def main():
        return await aiocuda.gpu_op(model, tf.ones((2, 4)))

    assert tuple(run(main()).shape) == (2, 3)


def test_wait_returns_a_host_tensor_at_once(run):
    t = tf.constant([1, 2, 3])

    async def main():
        assert await aiocuda.wait(t) is t
        assert await atf.wait(t) is t
        with pytest.raises(TypeError, match="needs a TensorFlow tensor"):
            await atf.wait([1, 2])

    run(main())
    assert atf.gpu_index(t) is None


def test_tensorflow_device_strings():
    assert _tf_place("/job:localhost/replica:0/task:0/device:GPU:1") == Place("tf", 1)
    assert _tf_place("/job:localhost/replica:0/task:0/device:CPU:0") == Place("cpu")
    assert _tf_place("GPU:0") == Place("tf", 0)
    assert str(Place("tf", 2)) == "/GPU:2"


def test_an_exception_from_a_tf_function_reaches_the_awaiter(run):
    async def main():
        with pytest.raises(tf.errors.InvalidArgumentError):
            await aiocuda.gpu_op(tf.matmul, tf.ones((2, 3)), tf.ones((2, 3)))
        assert float(await aiocuda.gpu_op(tf.reduce_sum, tf.ones((2, 3)))) == 6.0

    run(main())
