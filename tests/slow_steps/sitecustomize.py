"""Python imports this at start-up in every process whose PYTHONPATH begins with this folder
(tests/test_faults.py puts it there for a launcher and its ranks): each minititan training step
first sleeps MINITITAN_TEST_STEP_SLEEP_S seconds, so a test gets steps as slow as a big model's."""
import os
import time

SLEEP_S = float(os.environ.get("MINITITAN_TEST_STEP_SLEEP_S", "0"))

if SLEEP_S:
    import minititan.train as trainer

    step = trainer.train_step

    def slow_step(*args, **kwargs):
        time.sleep(SLEEP_S)
        return step(*args, **kwargs)

    trainer.train_step = slow_step
