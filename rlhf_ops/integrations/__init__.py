"""Adapters for other libraries' conventions; the only part of rlhf_ops that imports them.

    from rlhf_ops.integrations.flash import flash_attn_func, flash_attn_varlen_func   # no extra deps
    from rlhf_ops.integrations.transformers import apply_rlhf_ops, remove_rlhf_ops    # transformers
    import rlhf_ops.integrations.trl                                                   # transformers + trl

Each submodule imports its library when it is imported itself, so ``import rlhf_ops`` and
``rlhf_ops.integrations.flash`` need neither transformers nor TRL. The versions tested are pinned
in the ``integrations`` extra of pyproject.toml.
"""
