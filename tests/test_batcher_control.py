"""The model thread survives control calls (adapter loads) whose caller gave up: found by the
fault soak, where a publish timing out wedged the model server for good."""
import threading
import time

from simkit.modelserver.batcher import ContinuousBatcher


def test_cancelled_control_calls_never_kill_the_model_thread():
    b = ContinuousBatcher(runner=None)
    try:
        started = threading.Event()

        def slow():
            started.set()
            time.sleep(0.3)
            return 1

        running = b.call(slow)
        assert started.wait(5)
        queued = b.call(lambda: 2)  # waits behind `slow`
        assert not running.cancel()  # already running: it completes, its result is simply not awaited
        assert queued.cancel()  # not started: skipped
        assert running.result(5) == 1
        assert b.call(lambda: 3).result(5) == 3  # the thread is alive
        assert b._thread.is_alive()
    finally:
        b.close()
