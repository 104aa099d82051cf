"""An error on one process stops every process within a bounded time. The ranks are started by hand, without a
launcher: accelerate launch (torchrun) would itself stop the others when one exits, and hide a missing mechanism."""

from __future__ import annotations

import pytest

from processes import start_ranks, write_script


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_a_failure_on_one_rank_ends_the_rank_blocked_in_a_collective(tmp_path):
    # The failed rank then lingers with its connections open, as a process stuck in teardown would: gloo cannot see
    # it go, and with NCCL nothing would end rank 0's collective before its timeout. Only the watcher can.
    script = write_script(tmp_path / "ranks.py", """
        import time, torch, torch.distributed as dist
        from accelerate import PartialState
        from rebel_diffusion.stop_together import stop_together

        state = PartialState(cpu=True)
        try:
            with stop_together(poll_s=0.1):
                if state.process_index == 1:
                    raise ValueError("the reward server went away")
                dist.all_reduce(torch.zeros(1))  # rank 0 waits here for a rank that will never come
            print("rank 0 got past a collective its peer never joined", file=sys.stderr)
        except ValueError as e:
            print(f"rank 1 raised {e!r}", file=sys.stderr)
            time.sleep(8)
            raise
    """)
    rank0, rank1 = start_ranks([[str(script)], [str(script)]], timeout=90)
    assert rank1.returncode == 1 and "rank 1 raised ValueError('the reward server went away')" in rank1.stderr
    assert rank0.returncode == 1, rank0.stderr[-2000:]
    assert "error: process 1 failed: ValueError: the reward server went away; process 0 of 2 stops with it" in rank0.stderr
    assert "got past" not in rank0.stderr
    assert rank0.seconds < rank1.seconds - 4, (rank0.seconds, rank1.seconds)  # it did not wait for rank 1 to go


def test_ranks_failing_at_once_each_report_their_own_error_without_waiting(tmp_path):
    script = write_script(tmp_path / "ranks.py", """
        from accelerate import PartialState
        from rebel_diffusion.stop_together import stop_together

        state = PartialState(cpu=True)
        with stop_together(poll_s=0.1, wait_for_peers_s=60):
            raise ValueError(f"bad input on rank {state.process_index}")
    """)
    ended = start_ranks([[str(script)], [str(script)]], timeout=90)
    for rank, end in enumerate(ended):
        assert end.returncode == 1 and f"ValueError: bad input on rank {rank}" in end.stderr, end.stderr[-2000:]
        assert end.seconds < 45, end.seconds  # neither waited its 60 s for the other to see its failure


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
@pytest.mark.parametrize("case", ["reward raises on rank 1", "model missing on rank 1"])
def test_a_training_run_stops_on_every_rank_when_one_fails(tmp_path, case):
    (tmp_path / "flaky.py").write_text(
        "import os, torch\n"
        "def reward(responses, prompts):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise ConnectionError('reward server went away')\n"
        "    return torch.zeros(len(responses))\n"
    )
    argv = ["train.py", "--config", "configs/quickstart_text_rebel.py", "--config.num_epochs=1",
            f"--config.logdir={tmp_path}", "--config.run_name=run", "--config.log_with=", "--config.eval.prompt_file=",
            "--config.grid.num_prompts=0", "--config.sample.batch_size=8", "--config.train.batch_size=4"]
    if case == "reward raises on rank 1":
        argvs = [argv + ["--config.reward.name=flaky:reward"]] * 2
        expected = ("RewardError: epoch 0: reward 'flaky:reward' failed on the batch whose first prompt is ", 1)
    else:
        argvs = [argv, argv + [f"--config.model.pretrained={tmp_path / 'not-on-this-machine'}"]]
        expected = ("ConfigError: model.pretrained ", 2)
    rank0, rank1 = start_ranks(argvs, timeout=150, env={"PYTHONPATH": str(tmp_path)})
    assert rank1.returncode == expected[1], rank1.stderr[-2000:]
    assert rank1.stderr.strip().splitlines()[-1].startswith("error: " + expected[0].split(": ", 1)[1])
    assert rank0.returncode == 1, rank0.stderr[-2000:]
    assert f"error: process 1 failed: {expected[0]}" in rank0.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
