"""One DDP rank failing ends the whole job, non-zero, with the cause in the log, nothing left over."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

JOB = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import timedelta
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    how = sys.argv[1]

    class Failing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, _):
            if self.global_rank == 1 and self.global_step == 2:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("rank 1 failed on purpose")
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=50, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=30)),
    )
    trainer.fit(Failing(), torch.utils.data.DataLoader(torch.randn(64, 3), batch_size=2))
    """
)


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_within_bounded_time(tmp_path, how):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), how], cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job hung after one rank failed") from None
    assert proc.returncode != 0
    if how == "raise":
        assert "rank 1 failed on purpose" in out
    # nothing of the job is left running
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _group_alive(proc.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
