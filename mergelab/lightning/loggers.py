"""Lightning's WandbLogger as W&B's own users run it: W&B's environment decides.

``WANDB_MODE`` (online, offline, disabled) is W&B's to read and is never overridden:
offline is chosen only when the user set no mode and has no credentials. ``WANDB_PROJECT``
names the project unless the config does (mergelab otherwise); ``WANDB_ENTITY``,
``WANDB_RUN_GROUP``, and a sweep agent's ``WANDB_RUN_ID`` and ``WANDB_SWEEP_ID`` reach
``wandb.init`` untouched.
"""

from __future__ import annotations

import netrc
import os

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from mergelab.errors import BadValue

# the values of W&B's Settings.mode (wandb/sdk/wandb_settings.py, wandb 0.31)
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def check_wandb_mode() -> None:
    """Refuse a ``WANDB_MODE`` that W&B does not know, before any work."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None and mode not in WANDB_MODES:
        raise BadValue(f"WANDB_MODE={mode!r} is not a W&B mode; W&B takes {', '.join(WANDB_MODES)}")


def wandb_logged_in() -> bool:
    """True if W&B has credentials (env or netrc), without contacting the server."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger with W&B's environment honoured.

    Args:
        name: the run's display name.
        save_dir: where the run's files go.
        project: the W&B project; default $WANDB_PROJECT, else mergelab.
        offline: true or false forces it; null (the default) leaves the mode to
            $WANDB_MODE, and without it runs offline when there are no W&B credentials.
        **kwargs: the other arguments of Lightning's WandbLogger and of wandb.init.
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = ".",
        project: str | None = None,
        offline: bool | None = None,
        **kwargs,
    ):
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not wandb_logged_in()
        project = project or os.environ.get("WANDB_PROJECT") or "mergelab"
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, **kwargs)
        # Lightning always hands wandb.init anonymous=None, which wandb 0.31 answers with a
        # deprecation warning; there is no public way to leave the argument out
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
