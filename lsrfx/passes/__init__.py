"""The FX pass that fuses adapted layers under ``torch.compile``.

Importing this package changes no global configuration: :func:`install` (called by ``lsrfx.adapt``) puts the pass
into Inductor's ``pre_grad_custom_pass`` and applies ``LSRFX_LOG``.
"""

from lsrfx.passes.fuse import Decision, fuse_adapted_linears
from lsrfx.passes.install import install, installed, uninstall

__all__ = ["Decision", "fuse_adapted_linears", "install", "installed", "uninstall"]
