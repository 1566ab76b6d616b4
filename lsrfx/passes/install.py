"""Put the lsrfx rewrite into Inductor's ``pre_grad_custom_pass``, chained with any pass already there.

Nothing is installed on import: ``lsrfx.adapt`` (and ``lsrfx.load_adapters``) call :func:`install`, which is also
when ``LSRFX_LOG`` takes effect.

The pass runs on Dynamo's captured graph before AOTAutograd, so ``torch.compile(lsrfx.adapt(m))`` and
``lsrfx.adapt(torch.compile(m))`` both get it with the default Inductor backend. It is a ``CustomGraphPass`` with a
``uuid()`` (a hash of the pass's source files and the fusion policy) so Inductor's caches stay correct. A user's
pass is kept: the config becomes ``[lsrfx pass, *user passes]``. Graphs without lsrfx ``compose`` nodes come out
unchanged, so other models compiled in the same process are not affected.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import fx
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lsrfx.kernels.factor_table import COMPOSE, is_call
from lsrfx.passes.fuse import fuse_adapted_linears
from lsrfx.passes.logs import LOGGER, configure_from_env
from lsrfx.settings import fuse_policy

log = logging.getLogger(LOGGER)
_SOURCES = tuple(
    str(p) for p in sorted(Path(__file__).parent.glob("*.py")) + sorted((Path(__file__).parent.parent / "kernels")
                                                                       .glob("*.py"))
)


class LsrfxFusePass(CustomGraphPass):
    """Inductor pre-grad pass: fuse every adapted linear-like node (see :mod:`lsrfx.passes.fuse`)."""

    def __call__(self, graph: fx.Graph) -> None:
        if log.isEnabledFor(logging.DEBUG) and _has_compose(graph):
            log.debug("lsrfx: captured graph before the pass:\n%s", graph)
        decisions = fuse_adapted_linears(graph)
        if decisions and log.isEnabledFor(logging.DEBUG):
            log.debug("lsrfx: graph after the pass:\n%s", graph)

    def uuid(self) -> bytes:
        return get_hash_for_files(_SOURCES) + fuse_policy().encode()


def _has_compose(graph: fx.Graph) -> bool:
    return any(is_call(n, COMPOSE.op) for n in graph.nodes)


FUSE_PASS = LsrfxFusePass()


def _passes(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def install() -> None:
    """Add the lsrfx pass in front of the configured ``pre_grad_custom_pass`` and apply ``LSRFX_LOG`` (idempotent).

    ``lsrfx.adapt`` calls it; call it again if code replaced ``torch._inductor.config.pre_grad_custom_pass`` since."""
    configure_from_env()
    current = _passes(inductor_config.pre_grad_custom_pass)
    if any(isinstance(p, LsrfxFusePass) for p in current):
        return
    inductor_config.pre_grad_custom_pass = [FUSE_PASS, *current]


def uninstall() -> None:
    """Remove the lsrfx pass, keeping any other configured pass."""
    rest = [p for p in _passes(inductor_config.pre_grad_custom_pass) if not isinstance(p, LsrfxFusePass)]
    inductor_config.pre_grad_custom_pass = rest[0] if len(rest) == 1 else (rest or None)


def installed() -> bool:
    return any(isinstance(p, LsrfxFusePass) for p in _passes(inductor_config.pre_grad_custom_pass))
