"""torch.compile providers that never run eager while their rows say torch.compile.

A suite that sweeps shapes compiles the same code object once per shape (``dynamic=False``) and per
requires-grad setting: the ops suite's GPU sweep gives apply_rotary_pos_emb's reference 12 to 18
entries. Past Dynamo's ``recompile_limit`` (8 in torch 2.11 to 2.14) Dynamo stops compiling that
code and runs it eager from then on, with one log line and nothing in the result: the later rows
labelled torch.compile would time eager PyTorch. Inside ``strict_dynamo()`` the limit is raised
above any sweep of the bench, and reaching it anyway raises (``fail_on_recompile_limit_hit``), so
the provider's row is an error row that names it. ``fullgraph=True`` makes a graph break raise too,
instead of timing a half-eager function.
"""

import contextlib

import torch

# Entries per code object the bench's largest sweep needs, with room: the ops suite without --quick on a GPU
# compiles each reference for 3 models x 3 token counts, with and without gradients (18).
RECOMPILE_LIMIT = 64


def compile_static(fn, **options):
    """``torch.compile(fn, dynamic=False, fullgraph=True)``: one graph per shape, none half eager."""
    return torch.compile(fn, dynamic=False, fullgraph=True, **options)


@contextlib.contextmanager
def strict_dynamo(limit: int = RECOMPILE_LIMIT):
    """Dynamo's recompile limit raised to ``limit``, and an error instead of eager when it is reached."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True, suppress_errors=False):
        yield
