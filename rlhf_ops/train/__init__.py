"""The reference training loop for the four InstructGPT stages (see ``python -m rlhf_ops.train -h``).

    pretrain → sft → rm → ppo → grpo, each reading the previous stages' checkpoints from --out
    (ppo and grpo are two RL objectives from the same SFT policy and reward model).
"""
from .run import Run, SimulatedCrash
from .config import DEFAULTS, PRESETS, make_config
from .grpo import run_grpo
from .ppo import run_ppo
from .pretrain import run_pretrain
from .rm import run_rm
from .sft import run_sft

STAGES = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm, "ppo": run_ppo, "grpo": run_grpo}

__all__ = ["Run", "SimulatedCrash", "DEFAULTS", "PRESETS", "make_config", "STAGES", "run_pretrain",
           "run_sft", "run_rm", "run_ppo", "run_grpo", "main"]


def main(argv=None):
    from .__main__ import main as _main
    return _main(argv)
