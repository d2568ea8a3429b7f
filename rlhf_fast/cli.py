"""The ``rlhf-fast`` command."""
from __future__ import annotations

import argparse
import os
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-fast", description="Fast, memory-lean RLHF toolkit.")
    parser.add_argument("--version", action="version", version=f"rlhf-fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="run the kernel microbenchmarks (CSV, markdown table, plots)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes that run on CPU in seconds")
    bench.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    bench.add_argument("--only", nargs="*", default=None, help="run only these benchmark families")
    _add_training_commands(commands)
    return parser


def _add_training_commands(commands) -> None:
    helps = {"sft": "supervised fine-tuning on {prompt, completion} JSONL",
             "rm": "reward model on {prompt, chosen, rejected} JSONL (Bradley-Terry)",
             "ppo": "PPO / GRPO / RLOO on {prompt} JSONL against a reward model",
             "dpo": "direct preference optimisation on {prompt, chosen, rejected} JSONL"}
    for stage, text in helps.items():
        sub = commands.add_parser(stage, help=text, description=f"{text}. Keys: docs/trainers.md.")
        sub.add_argument("--config", required=True, metavar="FILE.yaml", help="paths and config fields (flat YAML)")
    demo = commands.add_parser("demo", help="offline SFT -> reward model -> PPO (or DPO) demo on a built-in task")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes on 2 CPU cores)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1)")
    demo.add_argument("--method", choices=("ppo", "dpo", "both"), default="ppo",
                      help="after SFT: reward model + PPO (default), DPO on the same pairs, or both side by side")
    demo.add_argument("--task", choices=("reviews", "arithmetic"), default="reviews",
                      help="reviews: SFT -> reward model -> PPO (default); arithmetic: SFT -> GRPO on a "
                           "programmatic answer check")
    demo.add_argument("--rollout-engine", choices=("hf", "vllm"), default="hf",
                      help="what samples PPO's rollouts: hf generate (default) or vllm (docs/rollout.md)")
    demo.add_argument("--advantage-estimator", choices=("gae", "grpo", "rloo"), default="gae",
                      help="PPO with a critic (gae, default) or critic-free grpo / rloo (4 samples per prompt)")


# exit status: 0 done, 1 a bug of ours (with its traceback), USER_ERROR a config, data, checkpoint or output
# directory to fix, NonFiniteError.exit_code (3) a run stopped by a NaN / inf loss, gradient norm or reward
USER_ERROR = 2


def _run_training(stage: str, config_path: str) -> int:
    from .trainers.errors import UserError
    from .trainers.from_config import build_trainer

    trainer = None
    try:
        try:  # building checks the config, data, models and checkpoint: what fails here is the user's to fix
            trainer = build_trainer(stage, config_path)
        except (FileNotFoundError, ValueError, TypeError, ImportError) as error:  # ImportError: rollout_engine=vllm
            return _user_error(stage, error, getattr(error, "exit_code", USER_ERROR))
        try:
            trainer.train()
        except UserError as error:  # raised on purpose while training (a NaN, a damaged file): one line
            return _user_error(stage, error, error.exit_code)
    finally:  # under torchrun: leave the process group cleanly (NCCL warns otherwise)
        if hasattr(trainer, "close"):  # PPO's rollout engine (a vLLM engine's processes)
            trainer.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"rlhf-fast {stage}: done; metrics and checkpoints in {trainer.args.output_dir}")
    return 0


def _user_error(stage: str, error: Exception, code: int) -> int:
    message = " ".join(str(error).split())  # one line, whatever the message holds
    print(f"rlhf-fast {stage}: error: {message}", file=sys.stderr)
    return code


def _run_demo(args) -> int:
    import json

    if args.task == "arithmetic":
        if args.method != "ppo":
            print("rlhf-fast demo: error: --task arithmetic trains GRPO on a reward function; --method "
                  f"{args.method} needs the reviews task's preference pairs", file=sys.stderr)
            return USER_ERROR
        if args.rollout_engine != "hf" or args.advantage_estimator != "gae":
            print("rlhf-fast demo: error: --task arithmetic runs GRPO with hf generate; --rollout-engine and "
                  "--advantage-estimator apply to the reviews task", file=sys.stderr)
            return USER_ERROR
        from .demo.arithmetic import run_arithmetic_demo

        summary = run_arithmetic_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    else:
        from .demo.pipeline import run_demo

        try:
            summary = run_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads,
                               rollout_engine=args.rollout_engine, advantage_estimator=args.advantage_estimator,
                               method=args.method)
        except (ImportError, ValueError) as error:  # the vllm engine missing or unable to run: one line
            if not str(error).startswith("rollout_engine="):
                raise
            return _user_error("demo", error, USER_ERROR)
    print(json.dumps(summary, indent=2))
    print(f"rlhf-fast demo: outputs in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import run_benchmarks

        run_benchmarks(out_dir=args.out, quick=args.quick, only=args.only)
        return 0
    if args.command in ("sft", "rm", "ppo", "dpo"):
        return _run_training(args.command, args.config)
    if args.command == "demo":
        return _run_demo(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
