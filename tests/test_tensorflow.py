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


def test_gpu_op_under_a_gradient_tape_gives_gradients_and_keeps_the_device_scope(run):
    # TensorFlow keeps tapes and device scopes per thread: fn on a cpu worker recorded nothing
    # (every gradient None, silently) and ran outside the caller's tf.device.
    from tensorflow.python.eager import context

    w = tf.Variable([[1.0], [2.0]])
    x = tf.constant([[3.0, 4.0]])

    def model(a):
        return tf.matmul(a, w), context.context().device_name

    async def main():
        with tf.GradientTape() as tape:
            y, _ = await aiocuda.gpu_op(model, x)
            loss = tf.reduce_sum(y)
        with tf.device("/CPU:0"):
            _, scope = await aiocuda.gpu_op(model, x)
        return tape.gradient(loss, w), scope

    grad, scope = run(main())
    assert grad is not None and grad.numpy().tolist() == [[3.0], [4.0]]
    assert scope.endswith("device:CPU:0")


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


def test_tensorflow_gpu_numbers_are_mapped_to_cuda_ordinals(monkeypatch):
    class Physical:  # what tf.config lists: "/physical_device:GPU:N" carries the CUDA ordinal
        def __init__(self, n: int) -> None:
            self.name, self.device_type = f"/physical_device:GPU:{n}", "GPU"

    gpus = [Physical(0), Physical(1), Physical(2)]
    visible, split = gpus[1:], {id(gpus[1]): [object(), object()]}  # GPU 1 split in two
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: visible)
    monkeypatch.setattr(tf.config, "get_logical_device_configuration",
                        lambda gpu: split.get(id(gpu)))
    # set_visible_devices([GPU1, GPU2]) with GPU 1 split: /GPU:0 and /GPU:1 are CUDA 1, /GPU:2 is 2
    assert [atf.cuda_ordinal(i) for i in range(3)] == [1, 1, 2]
    with pytest.raises(aiocuda.AiocudaError, match=r"no /GPU:3: it sees 3 GPU"):
        atf.cuda_ordinal(3)
    visible = []  # no GPU visible to TensorFlow: the number can only be CUDA's
    assert atf.cuda_ordinal(1) == 1


def test_bad_gpu_numbers_and_tensors_are_refused():
    # cuda_ordinal() handed back whatever it got where TensorFlow sees no GPU (-1, "x", None,
    # 1.5, True), and gpu_index() of anything but a tensor was an AttributeError.
    for bad in ("x", None, 1.5, True):
        with pytest.raises(TypeError, match=r"cuda_ordinal\(\) takes TensorFlow's GPU index"):
            atf.cuda_ordinal(bad)
    with pytest.raises(ValueError, match=r"GPU index \(N in /GPU:N\) must be >= 0, got -1"):
        atf.cuda_ordinal(-1)
    for bad in (5, None, "x"):
        with pytest.raises(TypeError, match=r"gpu_index\(\) needs a TensorFlow tensor"):
            atf.gpu_index(bad)
    assert atf.gpu_index(tf.ones((1,))) is None  # a host tensor


def test_a_numpy_gpu_number_is_a_gpu_number():
    # An int check refused numpy's integers, which the other device arguments take.
    np = pytest.importorskip("numpy")
    result = atf.cuda_ordinal(np.int64(0))
    assert result == atf.cuda_ordinal(0) and type(result) is int


def test_a_tensorflow_gpu_wait_uses_the_cuda_ordinal(run, monkeypatch):
    waited: list[int] = []

    async def synchronize_device(device: int) -> None:
        waited.append(device)

    monkeypatch.setattr(atf, "cuda_ordinal", lambda index: index + 3)
    monkeypatch.setattr(atf, "synchronize_device", synchronize_device)
    monkeypatch.setattr(aiocuda._ops, "synchronize_device", synchronize_device)
    checked: list[int] = []  # gpu_op checks the device before fn runs: device 3 is made up
    monkeypatch.setattr(aiocuda._ops, "check_await", lambda _, device: checked.append(device))

    monkeypatch.setattr(atf, "gpu_index", lambda x: 1)  # as if on /GPU:1 (tensorflow-cpu here)

    async def main():
        x = tf.constant(1.0)
        assert await atf.wait(x) is x
        assert await aiocuda.gpu_op(lambda: 7, device="/GPU:0") == 7

    run(main())
    assert waited == [4, 3] and checked == [3]


@pytest.fixture
def host_is_gpu0(monkeypatch):
    """Read TensorFlow's host devices as /GPU:0, where a GPU machine puts tensors and variables
    by default (tensorflow-cpu here): what gpu_op's placement would see there."""
    real = aiocuda._ops._tf_place

    def place(device: str) -> Place:
        p = real(device)
        return Place("tf", 0) if p == Place("cpu") and "CPU" in device.upper() else p

    monkeypatch.setattr(aiocuda._ops, "_tf_place", place)
    monkeypatch.setattr(aiocuda._ops, "_tf_has_gpu", lambda index: index == 0)


def test_gpu_op_finds_gpu_work_in_composites_models_and_device_scopes(host_is_gpu0):
    # Each of these went to a cpu worker and was not awaited on the GPU: its await returned
    # while the GPU work was queued (ragged and sparse tensors, a model's weights with numpy
    # inputs, host inputs in a tf.device scope).
    np = pytest.importorskip("numpy")
    from aiocuda._ops import placement

    gpu = Place("tf", 0)
    batch = np.ones((2, 4), dtype=np.float32)
    model = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(3)])

    class Scale(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(2.0)

        def __call__(self, x):
            return x * self.w

    scale = Scale()
    cases = {
        "ragged": ((tf.ragged.constant([[1, 2], [3]]),), {}, tf.identity),
        "sparse": ((), {"sp": tf.sparse.from_dense(tf.eye(2))}, lambda sp: sp),
        "keras model": ((batch,), {}, model),
        "tf.Module method": ((batch,), {}, scale.__call__),
        "tf.Module argument": ((scale, batch), {}, lambda m, x: m(x)),
    }
    found = {name: placement(fn, args, kwargs, None, None) for name, (args, kwargs, fn) in
             cases.items()}
    assert found == dict.fromkeys(cases, gpu)
    assert placement(len, (batch,), {}, None, None) == Place("cpu")
    assert placement(lambda: 0, (), {}, None, None) == Place("cpu")
    with tf.device("/CPU:0"):  # read as /GPU:0 here: a closure of TF work runs where it says
        assert placement(lambda: 0, (), {}, None, None) == gpu
        assert placement(len, (batch,), {}, None, None) == Place("cpu")  # numpy is not TF's
    unbuilt = tf.keras.Sequential([tf.keras.layers.Dense(3)])  # no weights yet: inputs decide
    assert placement(unbuilt, (batch,), {}, None, None) == Place("cpu")


def test_a_gpu_scope_tensorflow_lacks_leaves_host_work_on_the_host():
    # tensorflow-cpu has no GPU: its soft placement runs /GPU:0 scoped ops on the host, and
    # gpu_op must not go looking for a CUDA driver (it refused every call in such a scope).
    from aiocuda._ops import placement

    with tf.device("/GPU:0"):
        assert placement(lambda: 0, (), {}, None, None) == Place("cpu")
        assert placement(tf.identity, (tf.ones(1),), {}, None, None) == Place("cpu")


def test_tensors_on_two_tensorflow_gpus_are_refused_with_tensorflow_advice(monkeypatch):
    from aiocuda._ops import placement

    gpus = iter([Place("tf", 0), Place("tf", 1)])
    monkeypatch.setattr(aiocuda._ops, "_tf_place", lambda device: next(gpus))
    with pytest.raises(ValueError, match=r"tf\.identity"):
        placement(tf.add, (tf.ones(1), tf.ones(1)), {}, None, None)


def test_tensorflow_gpu_work_runs_in_the_scope_of_the_device_it_awaits(run, monkeypatch):
    # device="/GPU:1" awaited device 1 while fn's ops went to TensorFlow's default GPU (0).
    from tensorflow.python.eager import context

    waited: list[int] = []

    async def synchronize_device(device: int) -> None:
        waited.append(device)

    monkeypatch.setattr(aiocuda._ops, "synchronize_device", synchronize_device)
    monkeypatch.setattr(aiocuda._ops, "check_await", lambda *_: None)  # no GPU here

    async def main():
        return await aiocuda.gpu_op(lambda: context.context().device_name, device="/GPU:1")

    assert run(main()).endswith("device:GPU:1") and waited == [atf.cuda_ordinal(1)]


def test_gpu_op_with_no_running_loop_refuses_before_fn_runs(monkeypatch):
    # A coroutine driven by hand (or by another framework's loop): fn ran (queuing its GPU
    # work) and only then was the await refused.
    monkeypatch.setattr(aiocuda._ops, "check_await", lambda *_: None)
    ran: list[int] = []
    for kwargs in ({}, {"device": "/GPU:0"}):
        coro = aiocuda.gpu_op(ran.append, 1, **kwargs)
        with pytest.raises(aiocuda.AiocudaError, match=r"aiocuda\.gpu_op\(\) needs a running"):
            coro.send(None)
    assert ran == []


def test_a_distribution_strategy_reaches_the_worker(run):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    def make() -> tuple[bool, str]:
        return tf.distribute.has_strategy(), type(tf.Variable(1.0)).__name__

    async def main():
        with strategy.scope():
            return await aiocuda.gpu_op(make)

    assert run(main()) == (True, "MirroredVariable")


def test_waiting_on_a_composite_tensor_waits_for_its_parts_devices(run, host_is_gpu0, monkeypatch):
    waited: list[int] = []

    async def synchronize_device(device: int) -> None:
        waited.append(device)

    monkeypatch.setattr(atf, "_tf_place", aiocuda._ops._tf_place)
    monkeypatch.setattr(atf, "synchronize_device", synchronize_device)
    rt = tf.ragged.constant([[1, 2], [3]])

    async def main():
        return await aiocuda.wait(rt)

    assert run(main()) is rt and waited == [atf.cuda_ordinal(0)]
