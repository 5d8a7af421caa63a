"""Compatibility with the Triton versions rlhf_ops supports (3.6, the GPU image's, to 3.8).
Imported by ``kernels/__init__.py`` so that it applies before any kernel of this package runs.

Triton 3.6's interpreter (TRITON_INTERPRET=1) turns a scalar into a Python int with
``int(array)``; its scalars are 1-element arrays, and NumPy >= 2.4 refuses ``int()`` of an
array with ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"). So every
``range()`` over a runtime bound (kl's K tokens per row, attention's key and query ranges) fails
under the interpreter. Compiled kernels are not affected — the language is the same, only the
interpreter's conversion differs — and Triton 3.7+ squeezes the array first. On older versions
``_fix_interpreter_range`` makes its tensor-method setup do the same; nothing else changes.
"""
import os

import triton


def _fix_interpreter_range():
    import numpy as np
    try:
        int(np.ones(1, dtype=np.int32))
        return                                    # NumPy < 2.4: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "rlhf_ops_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.rlhf_ops_fixed = True
    interpreter._patch_lang_tensor = patched      # looked up by _patch_lang at every launch


TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])

if os.environ.get("TRITON_INTERPRET", "0") == "1" and TRITON_VERSION < (3, 7):
    _fix_interpreter_range()
