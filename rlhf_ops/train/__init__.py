"""The reference training loop for the four InstructGPT stages (see ``python -m rlhf_ops.train -h``).

    pretrain → sft → rm → ppo, each reading the previous stage's checkpoint from --out.
"""
from .run import Run, SimulatedCrash
from .config import DEFAULTS, PRESETS, make_config
from .ppo import run_ppo
from .pretrain import run_pretrain
from .rm import run_rm
from .sft import run_sft

STAGES = {"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm, "ppo": run_ppo}

__all__ = ["Run", "SimulatedCrash", "DEFAULTS", "PRESETS", "make_config", "STAGES", "run_pretrain",
           "run_sft", "run_rm", "run_ppo", "main"]


def main(argv=None):
    from .__main__ import main as _main
    return _main(argv)
