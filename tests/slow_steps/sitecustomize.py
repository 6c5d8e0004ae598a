"""Python imports this at start-up in every process whose PYTHONPATH begins with this folder
(tests/test_faults.py puts it there for a launcher and its ranks): each minititan training step
first sleeps MINITITAN_TEST_STEP_SLEEP_S seconds, so a test gets steps as slow as a big model's;
MINITITAN_TEST_FAIL=RANK:STEP makes that rank alone raise a UserError at that step, as a bad
file read by one rank would."""
import os
import time

SLEEP_S = float(os.environ.get("MINITITAN_TEST_STEP_SLEEP_S", "0"))
FAIL = os.environ.get("MINITITAN_TEST_FAIL", "")

if SLEEP_S or FAIL:
    import minititan.train as trainer
    from minititan.core.config import UserError

    step = trainer.train_step

    def slow_step(cfg, layout, optimizer, batch, step_number, *args, **kwargs):
        time.sleep(SLEEP_S)
        if FAIL == f"{os.environ.get('RANK', '0')}:{step_number}":
            raise UserError(f"rank {os.environ.get('RANK', '0')} alone failed at step {step_number} (a test)")
        return step(cfg, layout, optimizer, batch, step_number, *args, **kwargs)

    trainer.train_step = slow_step
