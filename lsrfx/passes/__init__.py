"""The FX pass that fuses adapted layers under ``torch.compile``; installed into Inductor on import."""

from lsrfx.passes.fuse import Decision, fuse_adapted_linears
from lsrfx.passes.install import install, installed, uninstall
from lsrfx.passes.logs import configure_from_env

configure_from_env()
install()

__all__ = ["Decision", "fuse_adapted_linears", "install", "installed", "uninstall"]
