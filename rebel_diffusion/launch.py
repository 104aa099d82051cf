"""`python -m rebel_diffusion.launch [accelerate launch options] train.py --config ...`: accelerate launch, but bad input
is one line and exit 2, as under `python train.py`.

Under plain `accelerate launch`, a child that exits non-zero makes accelerate raise `CalledProcessError` (an 11-line
traceback after the child's own error line) and exit 1, whatever the child's code; and `--num_processes 2` without
`--multi_gpu` on a machine without GPUs starts one process and says nothing. This launcher checks the training config
before any process starts (no model is loaded), runs several CPU processes with accelerate's multi-process launcher
(torchrun, gloo), refuses DeepSpeed, and exits with the child's exit code without a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml_collections import ConfigDict


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def load_training_config(script: str | Path, script_args: list[str]) -> "ConfigDict":
    """The config that `script` (train.py) would train with for `--config ...` arguments, checked by `validate_config`
    without loading a model; a one-line `ValueError` (a `ConfigError` is one) when it would stop with exit 2."""
    spec = importlib.util.spec_from_file_location("_rebel_train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.load_config([str(script), *script_args])
    from rebel_diffusion.trainer import validate_config

    validate_config(config)
    return config


def _validate_training_config(script: str, script_args: list[str]) -> str | None:
    """The one-line problem with train.py's `--config ...` arguments, or None (also for another script)."""
    if Path(script).name != "train.py" or not Path(script).is_file():
        return None
    try:
        load_training_config(script, script_args)
    except ValueError as e:
        return str(e)
    return None


def _exit_code(error: BaseException) -> int:
    """The exit code of the child that failed: torchrun's first failure, or the single child's."""
    failures = getattr(error, "failures", None)  # torch.distributed.elastic's ChildFailedError
    if failures:
        return max([failure.exitcode for failure in failures.values() if failure.exitcode > 0], default=1)
    return getattr(error, "returncode", 1) or 1


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import _validate_launch_command, launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    if (problem := _validate_training_config(args.training_script, args.training_script_args)) is not None:
        return _fail(problem)
    args, defaults, mp_from_config_flag = _validate_launch_command(args)
    if args.use_deepspeed:
        from rebel_diffusion.trainer import DEEPSPEED_UNSUPPORTED

        return _fail(DEEPSPEED_UNSUPPORTED)
    import torch

    processes = (args.num_processes or 1) * (args.num_machines or 1)
    on_cpu = args.cpu or getattr(args, "use_cpu", False) or not torch.cuda.is_available()
    if processes > 1 and on_cpu and not (args.multi_gpu or args.use_fsdp or args.use_megatron_lm):
        # accelerate's simple launcher would start a single process; its multi-process launcher runs them with gloo.
        print(f"rebel_diffusion.launch: {args.num_processes} processes on the CPU: started as one job of "
              f"{args.num_processes} gloo processes (accelerate launch alone needs --multi_gpu for that)", file=sys.stderr)
        if torch.cuda.is_available():  # --cpu on a GPU machine: hide the GPUs, since --multi_gpu would use them
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        args.multi_gpu, args.cpu, args.use_cpu = True, False, False
    # The validated arguments again, through accelerate's own entry point (it validates once more, harmlessly).
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # the child printed its own error line; no traceback after it
        return _exit_code(e)
    except Exception as e:
        if type(e).__name__ == "ChildFailedError":
            return _exit_code(e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
